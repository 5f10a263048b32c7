"""Internals shared by the sync and asyncio APIs: addresses and credentials,
message conversion, error translation, exec output accounting."""

from __future__ import annotations

import codecs
import datetime as _dt
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import grpc

from . import errors
from .types import ExecResult, FileInfo, NetworkPolicy, SandboxInfo
from .v1 import files_pb2, process_pb2, sandbox_pb2

DEFAULT_ADDR = "http://127.0.0.1:7477"
"""Where ``somna up`` listens by default."""

ADDR_ENV = "SOMNA_ADDR"
API_KEY_ENV = "SOMNA_API_KEY"

#: Upload chunk size (and stdin chunk size for run_code).
CHUNK = 256 * 1024
#: Largest message either side accepts.
MAX_MESSAGE = 64 * 1024 * 1024

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.enable_retries", 0),
]

Command = Union[str, Sequence[str]]
OutputCallback = Callable[[str], Any]

#: Interpreters for run_code; the code goes to stdin.
LANGUAGES: Dict[str, List[str]] = {
    "python": ["python3", "-u", "-"],
    "shell": ["sh", "-s"],
    "bash": ["bash", "-s"],
    "javascript": ["node", "-"],
}
_LANGUAGE_ALIASES = {"python3": "python", "py": "python", "sh": "shell", "js": "javascript", "node": "javascript"}

_STATE_NAMES = {
    0: "unknown",
    1: "creating",
    2: "running",
    3: "failed",
    4: "destroying",
    5: "sleeping",
    6: "lost",
    7: "waking",
}
_START_MODES = {"auto": 0, "cold-boot": 1, "template": 2, "warm-pool": 3}
_START_MODE_NAMES = {0: "auto", 1: "cold-boot", 2: "template", 3: "warm-pool"}
_FILE_TYPES = {0: "other", 1: "file", 2: "directory", 3: "symlink", 4: "other"}


@dataclass(frozen=True)
class Connection:
    """Where the API is and how to authenticate.

    Attributes:
        addr: ``http://host:port`` (or ``https://``).
        target: ``host:port`` for gRPC.
        secure: Use TLS.
        api_key: Sent as ``authorization: Bearer <key>``; ``None`` sends none.
        request_timeout: Default deadline in seconds for calls (``None``: none).
    """

    addr: str
    target: str
    secure: bool
    api_key: Optional[str]
    request_timeout: Optional[float]

    @staticmethod
    def resolve(
        addr: Optional[str] = None,
        api_key: Optional[str] = None,
        request_timeout: Optional[float] = None,
    ) -> "Connection":
        """Fills what is not given from ``$SOMNA_ADDR`` / ``$SOMNA_API_KEY``."""
        addr = addr or os.environ.get(ADDR_ENV) or DEFAULT_ADDR
        if api_key is None:
            api_key = os.environ.get(API_KEY_ENV) or None
        api_key = api_key.strip() if api_key else None
        if api_key and any(c in api_key for c in "\r\n"):
            raise errors.InvalidArgumentError("the API key contains a line break (check SOMNA_API_KEY)")
        if request_timeout is not None and not request_timeout > 0:
            raise errors.InvalidArgumentError("request_timeout must be a positive number of seconds")
        secure = addr.startswith("https://")
        target = addr.split("://", 1)[1] if "://" in addr else addr
        target = target.rstrip("/")
        if not target or "/" in target:
            raise errors.InvalidArgumentError(
                f"invalid Somna address {addr!r}: use http://host:port (set SOMNA_ADDR)"
            )
        if "://" not in addr:
            addr = f"http://{addr}"
        return Connection(addr, target, secure, api_key or None, request_timeout)

    @property
    def metadata(self) -> Tuple[Tuple[str, str], ...]:
        if self.api_key:
            return (("authorization", f"Bearer {self.api_key}"),)
        return ()

    def key(self) -> Tuple[str, Optional[str]]:
        return (self.addr, self.api_key)


# --- errors -------------------------------------------------------------------

_CONNECT_HINTS = (
    "failed to connect",
    "connection refused",
    "dns resolution failed",
    "name resolution",
    "connect failed",
    "socket closed",
    "no route to host",
    "network is unreachable",
    "timeout occurred",
    "deadline exceeded while waiting for connection",
)

_BY_CODE = {
    grpc.StatusCode.UNAUTHENTICATED: errors.AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: errors.PermissionDeniedError,
    grpc.StatusCode.NOT_FOUND: errors.NotFoundError,
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgumentError,
    grpc.StatusCode.ALREADY_EXISTS: errors.AlreadyExistsError,
    grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPreconditionError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.ResourceExhaustedError,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.RequestTimeoutError,
    grpc.StatusCode.UNAVAILABLE: errors.UnavailableError,
    grpc.StatusCode.UNIMPLEMENTED: errors.UnimplementedError,
}


def translate(err: grpc.RpcError, conn: Connection, sandbox_id: Optional[str] = None) -> errors.SomnaError:
    """The SDK exception for a failed call, with the server's message."""
    code = err.code() if callable(getattr(err, "code", None)) else None
    details = (err.details() if callable(getattr(err, "details", None)) else None) or ""
    name = code.name if code is not None else "UNKNOWN"
    if code == grpc.StatusCode.UNAVAILABLE and any(h in details.lower() for h in _CONNECT_HINTS):
        return errors.SomnaConnectionError(
            f"cannot connect to Somna at {conn.addr}: {details}; is `somna up` running? "
            f"(set SOMNA_ADDR to its address)",
            code=name,
        )
    # tonic answers a request whose grpc-timeout passed with CANCELLED
    # "Timeout expired"; the client side says DEADLINE_EXCEEDED.
    if code == grpc.StatusCode.DEADLINE_EXCEEDED or (
        code == grpc.StatusCode.CANCELLED and "timeout expired" in details.lower()
    ):
        return errors.RequestTimeoutError(
            f"the call to {conn.addr} did not complete in time ({details or 'deadline exceeded'})",
            code="DEADLINE_EXCEEDED",
        )
    if code == grpc.StatusCode.UNIMPLEMENTED and not details:
        details = "the server does not implement this call (it is older than this SDK)"
    if code == grpc.StatusCode.NOT_FOUND and sandbox_id and details.startswith("sandbox ") and sandbox_id in details:
        return errors.SandboxNotFoundError(details, code=name)
    cls = _BY_CODE.get(code, errors.ApiError) if code is not None else errors.ApiError
    if cls is errors.ApiError:
        return errors.ApiError(f"{details} ({name})" if details else name, code=name)
    return cls(details or name, code=name)


# --- conversions ---------------------------------------------------------------


def _time(msg: Any, field: str) -> Optional[_dt.datetime]:
    if not msg.HasField(field):
        return None
    ts = getattr(msg, field)
    return _dt.datetime.fromtimestamp(ts.seconds + ts.nanos / 1e9, tz=_dt.timezone.utc)


def sandbox_info(s: Any) -> SandboxInfo:
    """SandboxInfo from a somna.v1.Sandbox message."""
    return SandboxInfo(
        id=s.id,
        image=s.image,
        image_digest=s.image_digest,
        state=_STATE_NAMES.get(s.state, "unknown"),
        cpus=s.cpus,
        memory_mib=s.memory_mib,
        disk_mib=s.disk_mib,
        env=dict(s.env),
        labels=dict(getattr(s, "labels", {})),
        created_at=_time(s, "created_at"),
        expires_at=_time(s, "expires_at"),
        host=s.host,
        accelerator=s.accelerator,
        failure=s.failure,
        boot_ms=s.boot_ms,
        start_mode=_START_MODE_NAMES.get(s.start_mode, "auto"),
        idle_timeout_seconds=s.idle_timeout_seconds,
        last_active_at=_time(s, "last_active_at"),
        sleep_count=s.sleep_count,
        wake_count=s.wake_count,
        network_policy=(
            NetworkPolicy(
                no_internet=s.network_policy.no_internet,
                allow_out=list(s.network_policy.allow_out),
                deny_out=list(s.network_policy.deny_out),
            )
            if has_field(type(s), "network_policy") and s.HasField("network_policy")
            else None
        ),
    )


def file_info(f: Any) -> FileInfo:
    """FileInfo from a somna.v1.FileInfo message."""
    modified = None
    if f.modified_unix_ms:
        modified = _dt.datetime.fromtimestamp(f.modified_unix_ms / 1000, tz=_dt.timezone.utc)
    return FileInfo(
        path=f.path,
        name=f.name,
        type=_FILE_TYPES.get(f.type, "other"),
        size=f.size,
        mode=f.mode,
        uid=f.uid,
        gid=f.gid,
        modified_at=modified,
        symlink_target=f.symlink_target,
    )


def has_field(message_cls: Any, name: str) -> bool:
    """Whether the generated message type has field ``name``."""
    return name in message_cls.DESCRIPTOR.fields_by_name


def _seconds(name: str, value: Optional[float]) -> int:
    if value is None:
        return 0
    if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
        raise errors.InvalidArgumentError(f"{name} must be a positive number of seconds, got {value!r}")
    return max(1, math.ceil(value))


def _str_map(name: str, m: Optional[Mapping[str, str]]) -> Dict[str, str]:
    if m is None:
        return {}
    if not isinstance(m, Mapping):
        raise errors.InvalidArgumentError(f"{name} must be a mapping of strings to strings")
    out = {}
    for k, v in m.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise errors.InvalidArgumentError(f"{name} must map strings to strings, got {k!r}: {v!r}")
        out[k] = v
    return out


def _count(name: str, value: Optional[int]) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise errors.InvalidArgumentError(f"{name} must be a positive integer, got {value!r}")
    return value


def create_request(
    image: str,
    cpus: Optional[int],
    memory: Optional[int],
    disk: Optional[int],
    env: Optional[Mapping[str, str]],
    timeout: Optional[float],
    idle_timeout: Optional[float],
    labels: Optional[Mapping[str, str]],
    start_mode: str,
    request_id: Optional[str],
    no_internet: bool = False,
    allow_out: Optional[Sequence[str]] = None,
    deny_out: Optional[Sequence[str]] = None,
) -> Any:
    if not isinstance(image, str) or not image.strip():
        raise errors.InvalidArgumentError("image must be a non-empty image reference, e.g. 'python'")
    if start_mode not in _START_MODES:
        raise errors.InvalidArgumentError(
            f"start_mode must be one of {', '.join(_START_MODES)}, got {start_mode!r}"
        )
    req = sandbox_pb2.CreateSandboxRequest(
        image=image,
        cpus=_count("cpus", cpus),
        memory_mib=_count("memory", memory),
        disk_mib=_count("disk", disk),
        env=_str_map("env", env),
        timeout_seconds=_seconds("timeout", timeout),
        idle_timeout_seconds=_seconds("idle_timeout", idle_timeout),
        start_mode=_START_MODES[start_mode],
    )
    label_map = _str_map("labels", labels)
    if label_map:
        if not has_field(sandbox_pb2.CreateSandboxRequest, "labels"):
            raise errors.UnimplementedError("this SDK was built from protos without sandbox labels")
        req.labels.update(label_map)
    if request_id:
        if not has_field(sandbox_pb2.CreateSandboxRequest, "request_id"):
            raise errors.UnimplementedError("this SDK was built from protos without request ids")
        req.request_id = request_id
    req.no_internet = bool(no_internet)
    req.allow_out.extend(_cidrs("allow_out", allow_out))
    req.deny_out.extend(_cidrs("deny_out", deny_out))
    return req


def _cidrs(name: str, value: Optional[Sequence[str]]) -> List[str]:
    if value is None:
        return []
    if isinstance(value, str) or not all(isinstance(v, str) for v in value):
        raise errors.InvalidArgumentError(f"{name} must be a list of IPv4 CIDR strings, e.g. ['10.0.0.0/8']")
    return list(value)


def update_network_request(
    sandbox_id: str,
    no_internet: bool,
    allow_out: Optional[Sequence[str]],
    deny_out: Optional[Sequence[str]],
) -> Any:
    return sandbox_pb2.UpdateSandboxNetworkRequest(
        id=sandbox_id,
        policy=sandbox_pb2.NetworkPolicy(
            no_internet=bool(no_internet),
            allow_out=_cidrs("allow_out", allow_out),
            deny_out=_cidrs("deny_out", deny_out),
        ),
    )


def list_request(labels: Optional[Mapping[str, str]], page_token: str) -> Any:
    req = sandbox_pb2.ListSandboxesRequest()
    label_map = _str_map("labels", labels)
    if label_map:
        if not has_field(sandbox_pb2.ListSandboxesRequest, "labels"):
            raise errors.UnimplementedError("this SDK was built from protos without label filters")
        req.labels.update(label_map)
    if page_token:
        req.page_token = page_token
    return req


def set_timeout_request(sandbox_id: str, timeout: Optional[float]) -> Any:
    if not hasattr(sandbox_pb2, "SetSandboxTimeoutRequest"):
        raise errors.UnimplementedError("this SDK was built from protos without SetSandboxTimeout")
    return sandbox_pb2.SetSandboxTimeoutRequest(id=sandbox_id, timeout_seconds=_seconds("timeout", timeout))


def language_argv(language: str) -> List[str]:
    lang = _LANGUAGE_ALIASES.get(language.lower(), language.lower()) if isinstance(language, str) else ""
    if lang not in LANGUAGES:
        raise errors.InvalidArgumentError(
            f"unknown language {language!r}: use {', '.join(LANGUAGES)}"
        )
    return list(LANGUAGES[lang])


def exec_start(
    sandbox_id: str,
    cmd: Command,
    env: Optional[Mapping[str, str]],
    cwd: Optional[str],
    user: Optional[str],
    timeout: Optional[float],
    stdin: bool,
) -> Any:
    """ExecStart for ``cmd``: a string runs with ``sh -c``, a list is argv."""
    if isinstance(cmd, str):
        if not cmd.strip():
            raise errors.InvalidArgumentError("the command is empty")
        argv = ["sh", "-c", cmd]
    else:
        argv = list(cmd)
        if not argv or not all(isinstance(a, str) for a in argv):
            raise errors.InvalidArgumentError("the command must be a string or a non-empty list of strings")
    timeout_ms = 0
    if timeout is not None:
        if not (isinstance(timeout, (int, float)) and timeout > 0 and math.isfinite(timeout)):
            raise errors.InvalidArgumentError(f"timeout must be a positive number of seconds, got {timeout!r}")
        timeout_ms = max(1, int(timeout * 1000))
    return process_pb2.ExecRequest(
        start=process_pb2.ExecStart(
            sandbox_id=sandbox_id,
            argv=argv,
            env=_str_map("env", env),
            cwd=cwd or "",
            user=user or "",
            timeout_ms=timeout_ms,
            stdin=stdin,
        )
    )


def stdin_messages(data: Union[bytes, str, None]) -> Iterable[Any]:
    """Stdin chunks then close-stdin, for a fixed input."""
    if data is not None:
        raw = data.encode() if isinstance(data, str) else bytes(data)
        for i in range(0, len(raw), CHUNK):
            yield process_pb2.ExecRequest(stdin=raw[i : i + CHUNK])
    yield process_pb2.ExecRequest(close_stdin=process_pb2.CloseStdin())


def write_start(sandbox_id: str, path: str, mode: Optional[int], append: bool, create_parents: bool) -> Any:
    if not isinstance(path, str) or not path:
        raise errors.InvalidArgumentError("path must be a non-empty string")
    return files_pb2.WriteFileRequest(
        start=files_pb2.WriteFileStart(
            sandbox_id=sandbox_id,
            path=path,
            mode=mode or 0,
            create_parents=create_parents,
            append=append,
        )
    )


def data_chunks(data: Union[bytes, bytearray, memoryview, str]) -> Iterable[Any]:
    raw = data.encode() if isinstance(data, str) else bytes(data)
    for i in range(0, len(raw), CHUNK):
        yield files_pb2.WriteFileRequest(data=raw[i : i + CHUNK])


def join(directory: str, name: str) -> str:
    return f"{directory.rstrip('/')}/{name}"


class OutputSink:
    """Collects one exec's output, decoding it incrementally for callbacks."""

    def __init__(self, on_stdout: Optional[OutputCallback], on_stderr: Optional[OutputCallback]) -> None:
        self.on_stdout = on_stdout
        self.on_stderr = on_stderr
        self.stdout = bytearray()
        self.stderr = bytearray()
        self._dec_out = codecs.getincrementaldecoder("utf-8")("replace")
        self._dec_err = codecs.getincrementaldecoder("utf-8")("replace")
        self.pid = 0
        self.exit: Any = None

    def event(self, resp: Any) -> Tuple[Optional[OutputCallback], Optional[str]]:
        """Records one ExecResponse; returns the callback to call and its text."""
        kind = resp.WhichOneof("event")
        if kind == "stdout":
            self.stdout += resp.stdout
            if self.on_stdout is not None:
                text = self._dec_out.decode(resp.stdout)
                if text:
                    return self.on_stdout, text
        elif kind == "stderr":
            self.stderr += resp.stderr
            if self.on_stderr is not None:
                text = self._dec_err.decode(resp.stderr)
                if text:
                    return self.on_stderr, text
        elif kind == "started":
            self.pid = resp.started.pid
        elif kind == "exit":
            self.exit = resp.exit
        return None, None

    def flush(self) -> List[Tuple[OutputCallback, str]]:
        """Undecoded tails at the end of the stream."""
        out = []
        if self.on_stdout is not None:
            tail = self._dec_out.decode(b"", final=True)
            if tail:
                out.append((self.on_stdout, tail))
        if self.on_stderr is not None:
            tail = self._dec_err.decode(b"", final=True)
            if tail:
                out.append((self.on_stderr, tail))
        return out

    def result(self) -> ExecResult:
        e = self.exit
        if e is None:
            raise errors.ApiError("the exec stream ended without an exit status", code="INTERNAL")
        return ExecResult(
            stdout=self.stdout.decode("utf-8", "replace"),
            stderr=self.stderr.decode("utf-8", "replace"),
            exit_code=e.exit_code,
            stdout_bytes=bytes(self.stdout),
            stderr_bytes=bytes(self.stderr),
            signal=e.signal or None,
            timed_out=e.timed_out,
            message=e.message,
            pid=self.pid,
            output_truncated=e.output_truncated,
        )


def check_result(result: ExecResult, cmd: Command, check: bool, timeout: Optional[float]) -> ExecResult:
    """Raises CommandTimeoutError / CommandExitError as documented."""
    shown = cmd if isinstance(cmd, str) else " ".join(cmd)
    if len(shown) > 200:
        shown = shown[:200] + "..."
    if result.timed_out:
        raise errors.CommandTimeoutError(
            f"command {shown!r} was killed after its {timeout} s timeout", result
        )
    if check and result.exit_code != 0:
        detail = result.message or result.stderr.strip()[-500:]
        raise errors.CommandExitError(
            f"command {shown!r} exited with code {result.exit_code}" + (f": {detail}" if detail else ""),
            result,
        )
    return result


def stream_deadline(timeout: Optional[float], request_timeout: Optional[float]) -> Optional[float]:
    """gRPC deadline of an exec stream: the command's own timeout plus slack,
    else the client's request timeout."""
    if timeout is not None:
        return timeout + 30.0
    return request_timeout
