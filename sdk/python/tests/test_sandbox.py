"""The sync API against a real `somna up`: create, exec (streaming,
background, stdin), run_code, files, sleep/wake, list/connect, destroy."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

import somna
from somna import Sandbox
from somna._common import has_field
from somna.v1 import sandbox_pb2


def test_create_info_and_exec(sbx: Sandbox) -> None:
    info = sbx.info
    assert info.id.startswith("sbx-") and info.state == "running"
    assert info.image == "python" and info.memory_mib == 256 and info.env == {"GREETING": "hi"}
    assert info.accelerator == "tcg" and info.created_at is not None

    r = sbx.exec("echo $GREETING; echo oops >&2; exit 3")
    assert (r.stdout, r.stderr, r.exit_code, r.ok) == ("hi\n", "oops\n", 3, False)
    assert r.stdout_bytes == b"hi\n" and r.pid > 0

    r = sbx.exec(["sh", "-c", 'printf "%s|" "$@"', "x", "a b", "c"], env={"E": "1"}, cwd="/tmp")
    assert r.stdout == "a b|c|"
    assert sbx.exec("pwd", cwd="/tmp").stdout == "/tmp\n"
    assert sbx.exec("echo $E", env={"E": "set"}).stdout == "set\n"
    assert sbx.exec("id -u", user="nobody").stdout.strip() != "0"

    r = sbx.exec(["no-such-program"])
    assert r.exit_code == 127
    with pytest.raises(somna.CommandExitError) as e:
        sbx.exec("echo bad >&2; exit 5", check=True)
    assert e.value.exit_code == 5 and "bad" in str(e.value)


def test_stdin_is_fed_and_closed(sbx: Sandbox) -> None:
    assert sbx.exec(["tr", "a-z", "A-Z"], stdin="shout\n").stdout == "SHOUT\n"
    big = b"x" * (1024 * 1024 + 7)
    assert sbx.exec(["wc", "-c"], stdin=big).stdout.strip() == str(len(big))


def test_output_streams_to_callbacks_as_it_is_printed(sbx: Sandbox) -> None:
    # The command only finishes once the callback has seen its first line
    # (the callback releases it): without streaming it would time out.
    seen: list = []
    released = []

    def on_stdout(s: str) -> None:
        seen.append(("out", s))
        if "ready" in s and not released:
            released.append(True)
            sbx.files.write("/tmp/go", "")

    r = sbx.exec(
        "rm -f /tmp/go; echo ready; echo err1 >&2; "
        "while [ ! -e /tmp/go ]; do sleep 0.05; done; echo done; echo err2 >&2",
        on_stdout=on_stdout,
        on_stderr=lambda s: seen.append(("err", s)),
        timeout=60,
    )
    assert released and r.exit_code == 0
    assert "".join(s for k, s in seen if k == "out") == "ready\ndone\n" == r.stdout
    assert "".join(s for k, s in seen if k == "err") == "err1\nerr2\n" == r.stderr


def test_background_process_handle(sbx: Sandbox) -> None:
    lines: list = []
    p = sbx.exec("i=0; while true; do echo tick$i; i=$((i+1)); sleep 0.1; done",
                 background=True, on_stdout=lines.append)
    assert p.pid > 0 and p.is_running()
    deadline = time.monotonic() + 20
    while "tick2" not in "".join(lines) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "tick2" in p.stdout
    with pytest.raises(somna.RequestTimeoutError):
        p.wait(timeout=0.2)
    p.kill()
    r = p.wait(timeout=30)
    assert r.exit_code == 137 and r.signal == 9 and not p.is_running()

    cat = sbx.exec(["cat"], stdin=True, background=True)
    cat.write_stdin("line one\n")
    cat.write_stdin(b"line two\n")
    cat.close_stdin()
    assert cat.wait(timeout=30).stdout == "line one\nline two\n"


def test_command_timeout_raises_with_partial_output(sbx: Sandbox) -> None:
    with pytest.raises(somna.CommandTimeoutError) as e:
        sbx.exec("echo started; sleep 30", timeout=1)
    assert e.value.result.timed_out and e.value.result.stdout == "started\n"
    assert isinstance(e.value, TimeoutError)


def test_run_code(sbx: Sandbox) -> None:
    r = sbx.run_code("print(6*7)")
    assert (r.stdout, r.exit_code) == ("42\n", 0)
    r = sbx.run_code("import sys\nprint('to err', file=sys.stderr)\nraise SystemExit(4)")
    assert r.exit_code == 4 and r.stderr == "to err\n"
    r = sbx.run_code("1/0")
    assert r.exit_code == 1 and "ZeroDivisionError" in r.stderr
    assert sbx.run_code('echo "$((6*7))"', language="shell").stdout == "42\n"
    # Large programs go through stdin, past any argv limit.
    code = "x = 0\n" + "x += 1\n" * 50_000 + "print(x)\n"
    assert sbx.run_code(code).stdout == "50000\n"
    chunks: list = []
    sbx.run_code("import time\nfor i in range(3):\n    print(i, flush=True); time.sleep(0.2)", on_stdout=chunks.append)
    assert "".join(chunks) == "0\n1\n2\n"
    with pytest.raises(somna.InvalidArgumentError):
        sbx.run_code("puts 1", language="ruby")


def test_files(sbx: Sandbox, tmp_path: Path) -> None:
    f = sbx.files
    info = f.write("/work/dir/hello.txt", "héllo\n")
    assert info.size == len("héllo\n".encode()) and info.type == "file" and info.mode == 0o644
    assert f.read("/work/dir/hello.txt") == "héllo\n"
    assert sbx.exec("cat /work/dir/hello.txt").stdout == "héllo\n"
    f.write("/work/dir/hello.txt", "more\n", append=True)
    assert f.read_bytes("/work/dir/hello.txt") == "héllo\nmore\n".encode()
    assert f.read_bytes("/work/dir/hello.txt", offset=1, length=3) == "éll".encode()[:3]

    binary = bytes(range(256)) * 5000
    f.write("/work/bin.dat", binary, mode=0o600)
    assert f.read_bytes("/work/bin.dat") == binary
    st = f.stat("/work/bin.dat")
    assert (st.size, st.mode, st.is_file) == (len(binary), 0o600, True)
    with pytest.raises(UnicodeDecodeError):
        f.read("/work/bin.dat")

    names = {e.name: e for e in f.list("/work")}
    assert names["dir"].is_dir and names["bin.dat"].size == len(binary)
    assert f.exists("/work/bin.dat") and not f.exists("/work/nope")

    f.mkdir("/work/a/b/c")
    f.rename("/work/bin.dat", "/work/a/moved.dat")
    assert not f.exists("/work/bin.dat") and f.exists("/work/a/moved.dat")
    with pytest.raises(somna.SomnaError):
        f.remove("/work/a")  # not empty
    f.remove("/work/a", recursive=True)
    assert not f.exists("/work/a")

    with pytest.raises(somna.NotFoundError) as e:
        f.read("/work/missing.txt")
    assert not isinstance(e.value, somna.SandboxNotFoundError)
    assert "/work/missing.txt" in str(e.value)

    # Trees both ways, with permissions.
    src = tmp_path / "src"
    (src / "x" / "y").mkdir(parents=True)
    (src / "top.txt").write_text("top")
    (src / "x" / "y" / "deep.sh").write_text("#!/bin/sh\necho deep\n")
    (src / "x" / "y" / "deep.sh").chmod(0o755)
    (src / "link").symlink_to("top.txt")
    stats = f.upload(src, "/srv/tree")
    assert (stats.files, stats.skipped, stats.bytes) == (2, 1, 3 + len("#!/bin/sh\necho deep\n"))
    assert sbx.exec("/srv/tree/x/y/deep.sh").stdout == "deep\n"
    dst = tmp_path / "dst"
    stats = f.download("/srv/tree", dst)
    assert stats.files == 2
    assert (dst / "top.txt").read_text() == "top"
    assert (dst / "x" / "y" / "deep.sh").stat().st_mode & 0o777 == 0o755
    one = tmp_path / "one" / "copy.txt"
    assert f.download("/srv/tree/top.txt", one).bytes == 3 and one.read_text() == "top"
    assert f.upload(one, "/srv/single.txt").files == 1 and f.read("/srv/single.txt") == "top"


def test_sleep_wake_keeps_state(client: somna.Client) -> None:
    with Sandbox.create(image="busybox", client=client) as s:
        s.files.write("/root/state.txt", "kept")
        assert s.sleep().state == "sleeping"
        assert s.refresh().state == "sleeping"
        # Any call wakes it.
        assert s.exec("cat /root/state.txt").stdout == "kept"
        assert s.refresh().state == "running" and s.info.wake_count == 1
        s.sleep()
        assert s.wake().state == "running"
        assert s.files.read("/root/state.txt") == "kept"


def test_connect_list_and_context_manager(client: somna.Client, sbx: Sandbox) -> None:
    again = Sandbox.connect(sbx.id, client=client)
    assert again.info.image == "python" and again.exec("echo same").stdout == "same\n"
    assert sbx.id in {s.id for s in Sandbox.list(client=client)}
    # Without client=: $SOMNA_ADDR / $SOMNA_API_KEY.
    assert sbx.id in {s.id for s in Sandbox.list()}

    with Sandbox.create(image="busybox", client=client) as s:
        sid = s.id
        assert s.is_running()
    with pytest.raises(somna.SandboxNotFoundError):
        Sandbox.connect(sid, client=client)
    assert not s.is_running()


@pytest.mark.skipif(not has_field(sandbox_pb2.CreateSandboxRequest, "labels"),
                    reason="the protos have no sandbox labels yet")
def test_labels_filter_listing(client: somna.Client) -> None:
    with Sandbox.create(image="busybox", labels={"team": "a", "job": "x"}, client=client) as a, \
            Sandbox.create(image="busybox", labels={"team": "b"}, client=client) as b:
        assert a.info.labels == {"team": "a", "job": "x"}
        ids = {s.id for s in Sandbox.list(labels={"team": "a"}, client=client)}
        assert a.id in ids and b.id not in ids
        ids = {s.id for s in Sandbox.list(labels={"team": "a", "job": "y"}, client=client)}
        assert ids == set()


@pytest.mark.skipif(not hasattr(sandbox_pb2, "SetSandboxTimeoutRequest"),
                    reason="the protos have no SetSandboxTimeout yet")
def test_set_timeout(sbx: Sandbox) -> None:
    try:
        info = sbx.set_timeout(3600)
    except somna.UnimplementedError as e:
        pytest.skip(f"the server does not implement SetSandboxTimeout yet: {e}")
    assert info.expires_at is not None
    remaining = (info.expires_at - info.created_at).total_seconds()
    assert remaining > 3000
    assert sbx.set_timeout(None).expires_at is None
    with pytest.raises(somna.InvalidArgumentError):
        sbx.set_timeout(-1)


def test_threads_share_a_client(sbx: Sandbox) -> None:
    results = {}

    def work(i: int) -> None:
        results[i] = sbx.exec(f"echo {i}").stdout

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {i: f"{i}\n" for i in range(8)}
