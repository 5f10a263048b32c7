"""Apps: long-lived web servers behind Somna's ingress that sleep when idle
and wake on the first request (``somna.v1.Apps``).

::

    from somna import App

    app = App.deploy("blog", image="python", port=8000,
                     command=["python3", "-m", "http.server", "8000"])
    print(app.url)          # http://blog.localhost:7480/
    print(App.logs("blog"))
    App.delete("blog")
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence

import grpc

from . import _common as c
from . import errors
from .sandbox import Client, _client
from .v1 import apps_pb2, apps_pb2_grpc

__all__ = ["App", "AppInfo", "AppReplica"]

_APP_STATES = {0: "unknown", 1: "deploying", 2: "ready"}


@dataclass(frozen=True)
class AppReplica:
    """One sandbox serving an app."""

    sandbox_id: str
    version: int
    state: str
    in_flight: int
    ready: bool = False


@dataclass(frozen=True)
class AppInfo:
    """An app as the platform reports it.

    Attributes:
        name: The app's name (its host name under the ingress domain).
        version: The version serving (a deploy count).
        state: ``deploying`` (first version on its way) or ``ready``.
        url: Where the ingress serves it.
        image, port, command: What each replica runs.
        replicas_awake, replicas_asleep: Replica counts by state.
        replicas: Every replica.
        last_error: Why the last deploy or replacement failed, if it did.
    """

    name: str
    version: int
    state: str
    url: str
    image: str
    port: int
    command: List[str] = field(default_factory=list)
    replicas_awake: int = 0
    replicas_asleep: int = 0
    replicas: List[AppReplica] = field(default_factory=list)
    last_error: str = ""


def _nonneg(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise errors.InvalidArgumentError(f"{name} must be a non-negative integer, got {value!r}")
    return value


def _info(a: Any) -> AppInfo:
    return AppInfo(
        name=a.name,
        version=a.version,
        state=_APP_STATES.get(a.state, "unknown"),
        url=a.url,
        image=a.spec.image,
        port=a.spec.port,
        command=list(a.spec.command),
        replicas_awake=a.replicas_awake,
        replicas_asleep=a.replicas_asleep,
        replicas=[
            AppReplica(r.sandbox_id, r.version, c._STATE_NAMES.get(r.state, "unknown"), r.in_flight, r.ready)
            for r in a.replicas
        ],
        last_error=a.last_error,
    )


def _call(client: Client, method: str, request: Any, timeout: Optional[float] = None) -> Any:
    stub = apps_pb2_grpc.AppsStub(client._channel)
    conn = client.connection
    try:
        return getattr(stub, method)(
            request,
            metadata=conn.metadata,
            timeout=timeout if timeout is not None else conn.request_timeout,
        )
    except grpc.RpcError as e:
        raise c.translate(e, conn) from None


class App:
    """Deploy, inspect and remove apps. Every method takes the optional
    ``client``, ``addr`` and ``api_key`` of :meth:`Sandbox.create`."""

    @staticmethod
    def deploy(
        name: str,
        *,
        image: str,
        port: int,
        command: Optional[Sequence[str]] = None,
        env: Optional[Mapping[str, str]] = None,
        min_replicas: int = 0,
        max_replicas: int = 0,
        idle_timeout: Optional[float] = None,
        health_path: str = "",
        ready_timeout: Optional[float] = None,
        cpus: int = 0,
        memory_mib: int = 0,
        client: Optional[Client] = None,
        addr: Optional[str] = None,
        api_key: Optional[str] = None,
    ) -> AppInfo:
        """Deploys app ``name`` (or rolls it over to these settings) and
        returns once the new version serves.

        Raises:
            InvalidArgumentError: A bad name, port, path or bound.
            FailedPreconditionError: The app never listened (the message
                quotes its last output; a previous version keeps serving),
                or the hosts run without networking.
            AlreadyExistsError: Another tenant owns the name.
        """
        spec = apps_pb2.AppSpec(
            image=image,
            port=c._count("port", port),
            env=c._str_map("env", env),
            command=list(command or []),
            min_replicas=_nonneg("min_replicas", min_replicas),
            max_replicas=_nonneg("max_replicas", max_replicas),
            idle_timeout_seconds=c._seconds("idle_timeout", idle_timeout),
            health_path=health_path,
            ready_timeout_seconds=c._seconds("ready_timeout", ready_timeout),
            cpus=_nonneg("cpus", cpus),
            memory_mib=_nonneg("memory_mib", memory_mib),
        )
        cl = _client(client, addr, api_key, None)
        return _info(_call(cl, "DeployApp", apps_pb2.DeployAppRequest(name=name, spec=spec)))

    @staticmethod
    def get(name: str, *, client: Optional[Client] = None, addr: Optional[str] = None,
            api_key: Optional[str] = None) -> AppInfo:
        """Raises: NotFoundError: No such app."""
        cl = _client(client, addr, api_key, None)
        return _info(_call(cl, "GetApp", apps_pb2.GetAppRequest(name=name)))

    @staticmethod
    def list(*, client: Optional[Client] = None, addr: Optional[str] = None,
             api_key: Optional[str] = None) -> List[AppInfo]:
        cl = _client(client, addr, api_key, None)
        return [_info(a) for a in _call(cl, "ListApps", apps_pb2.ListAppsRequest()).apps]

    @staticmethod
    def delete(name: str, *, client: Optional[Client] = None, addr: Optional[str] = None,
               api_key: Optional[str] = None) -> None:
        """Destroys the app's replicas and forgets it.

        Raises: NotFoundError: No such app.
        """
        cl = _client(client, addr, api_key, None)
        _call(cl, "DeleteApp", apps_pb2.DeleteAppRequest(name=name))

    @staticmethod
    def logs(name: str, *, tail: int = 0, client: Optional[Client] = None, addr: Optional[str] = None,
             api_key: Optional[str] = None) -> Dict[str, str]:
        """The app's output so far, per replica sandbox id (reading wakes
        sleeping replicas)."""
        cl = _client(client, addr, api_key, None)
        stub = apps_pb2_grpc.AppsStub(cl._channel)
        out: Dict[str, bytearray] = {}
        try:
            for chunk in stub.AppLogs(
                apps_pb2.AppLogsRequest(name=name, follow=False, tail_lines=_nonneg("tail", tail)),
                metadata=cl.connection.metadata,
                timeout=cl.connection.request_timeout,
            ):
                out.setdefault(chunk.sandbox_id, bytearray()).extend(chunk.data)
        except grpc.RpcError as e:
            raise c.translate(e, cl.connection) from None
        return {k: v.decode("utf-8", "replace") for k, v in out.items()}
