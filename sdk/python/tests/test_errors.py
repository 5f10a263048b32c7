"""Bad input gets a specific, documented exception with the server's message."""

from __future__ import annotations

import pytest

import somna
from somna import Sandbox


def test_calls_on_a_destroyed_sandbox_raise_sandbox_not_found(client: somna.Client) -> None:
    s = Sandbox.create(image="busybox", client=client)
    s.destroy()
    calls = [
        lambda: s.exec("true"),
        lambda: s.run_code("echo", language="shell"),
        lambda: s.files.read("/etc/passwd"),
        lambda: s.files.write("/tmp/x", "y"),
        lambda: s.files.list("/"),
        lambda: s.sleep(),
        lambda: s.wake(),
        lambda: s.refresh(),
        lambda: s.destroy(),
    ]
    for call in calls:
        with pytest.raises(somna.SandboxNotFoundError) as e:
            call()
        assert s.id in str(e.value) and "not found" in str(e.value)
        assert e.value.code == "NOT_FOUND" and isinstance(e.value, somna.NotFoundError)
    with pytest.raises(somna.SandboxNotFoundError):
        Sandbox.connect("sbx-doesnotexist", client=client)


def test_unreachable_server_raises_connection_error() -> None:
    for call in (
        lambda: Sandbox.create(image="busybox", addr="http://127.0.0.1:1"),
        lambda: Sandbox.list(addr="127.0.0.1:1"),
        lambda: Sandbox.connect("sbx-x", addr="http://127.0.0.1:1"),
    ):
        with pytest.raises(somna.SomnaConnectionError) as e:
            call()
        assert "127.0.0.1:1" in str(e.value) and "somna up" in str(e.value)
        assert isinstance(e.value, ConnectionError)


def test_wrong_api_key_raises_authentication_error(platform) -> None:  # type: ignore[no-untyped-def]
    if not platform.api_key:
        pytest.skip("this server does not require API keys yet")
    bad = somna.Client(platform.addr, api_key="sk-wrong")
    with pytest.raises(somna.AuthenticationError) as e:
        Sandbox.list(client=bad)
    assert e.value.code == "UNAUTHENTICATED" and str(e.value)
    none = somna.Client(platform.addr, api_key="")
    with pytest.raises(somna.AuthenticationError):
        Sandbox.create(image="busybox", client=none)


def test_request_timeout_raises_request_timeout_error(platform, sbx: Sandbox) -> None:  # type: ignore[no-untyped-def]
    slow = somna.Client(platform.addr, api_key=platform.api_key or "", request_timeout=3)
    handle = Sandbox.connect(sbx.id, client=slow)
    with pytest.raises(somna.RequestTimeoutError) as e:
        handle.exec("sleep 10")
    assert isinstance(e.value, TimeoutError) and e.value.code == "DEADLINE_EXCEEDED"
    # The connection still works afterwards.
    assert handle.exec("echo ok").stdout == "ok\n"


def test_invalid_arguments(client: somna.Client, sbx: Sandbox) -> None:
    # Checked by the SDK before sending.
    for kwargs in ({"cpus": 0}, {"memory": -1}, {"timeout": 0}, {"env": {"A": 1}}, {"start_mode": "fast"}):
        with pytest.raises(somna.InvalidArgumentError):
            Sandbox.create(image="busybox", client=client, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(somna.InvalidArgumentError):
        Sandbox.create(image="", client=client)
    with pytest.raises(somna.InvalidArgumentError):
        sbx.exec("")
    with pytest.raises(somna.InvalidArgumentError):
        sbx.exec("true", timeout=-1)
    with pytest.raises(somna.InvalidArgumentError):
        somna.Client("http://host:1/path")
    # Checked by the server: its message comes through unchanged.
    with pytest.raises(somna.InvalidArgumentError) as e:
        Sandbox.create(image="busybox", memory=16, client=client)
    assert "memory" in str(e.value).lower()
    with pytest.raises(somna.SomnaError) as e2:
        Sandbox.create(image="no-such-image-xyz", client=client)
    assert "no-such-image-xyz" in str(e2.value)


def test_network_policy_arguments_and_a_host_without_networking(client: somna.Client, sbx: Sandbox) -> None:
    # A bad CIDR: the server names the field, before any VM starts.
    with pytest.raises(somna.InvalidArgumentError) as e:
        Sandbox.create(image="busybox", allow_out=["10.0.0.0/33"], client=client)
    assert "allow_out" in str(e.value)
    with pytest.raises(somna.InvalidArgumentError):
        Sandbox.create(image="busybox", deny_out="10.0.0.0/8", client=client)  # type: ignore[arg-type]
    # The test platform runs without --network: sandboxes have no network
    # device, so there is no policy to change.
    assert sbx.info.network_policy is None
    with pytest.raises(somna.FailedPreconditionError) as e2:
        sbx.update_network(no_internet=True, allow_out=["10.1.0.0/16"])
    assert "--network" in str(e2.value)


def test_apps_api_errors(client: somna.Client) -> None:
    # The test platform runs without networking, so apps cannot be deployed
    # there; the API says so, and validates before that.
    with pytest.raises(somna.InvalidArgumentError) as e:
        somna.App.deploy("Bad_Name", image="busybox", port=8080, client=client)
    assert "name" in str(e.value)
    with pytest.raises(somna.InvalidArgumentError):
        somna.App.deploy("web", image="busybox", port=8080, min_replicas=-1, client=client)
    with pytest.raises(somna.FailedPreconditionError) as e:
        somna.App.deploy("web", image="busybox", port=8080, command=["httpd", "-f"], client=client)
    assert "--network" in str(e.value)
    with pytest.raises(somna.NotFoundError):
        somna.App.get("web", client=client)
    assert somna.App.list(client=client) == []
