"""The asyncio API against a real `somna up`."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

import somna
from somna.aio import AsyncClient, AsyncSandbox

pytestmark = pytest.mark.asyncio


async def test_async_lifecycle_exec_files(platform, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    async with await AsyncSandbox.create(image="python", env={"GREETING": "hi"}) as sbx:
        assert sbx.info.state == "running" and sbx.id.startswith("sbx-")
        r = await sbx.exec("echo $GREETING; echo e >&2; exit 2")
        assert (r.stdout, r.stderr, r.exit_code) == ("hi\n", "e\n", 2)
        assert (await sbx.run_code("print(6*7)")).stdout == "42\n"
        assert (await sbx.exec(["tr", "a-z", "A-Z"], stdin="abc")).stdout == "ABC"

        # Streaming, with sync and async callbacks.
        out: list = []
        err: list = []

        async def on_err(s: str) -> None:
            err.append(s)

        r = await sbx.exec("for i in 1 2 3; do echo $i; echo x$i >&2; sleep 0.2; done",
                           on_stdout=out.append, on_stderr=on_err)
        assert "".join(out) == "1\n2\n3\n" == r.stdout and "".join(err) == "x1\nx2\nx3\n"

        # Background process with stdin.
        p = await sbx.exec(["cat"], stdin=True, background=True)
        assert p.pid > 0 and p.is_running()
        await p.write_stdin("ping\n")
        await p.close_stdin()
        assert (await p.wait(timeout=30)).stdout == "ping\n"
        p = await sbx.exec("sleep 60", background=True)
        with pytest.raises(somna.RequestTimeoutError):
            await p.wait(timeout=0.2)
        await p.kill()
        assert (await p.wait(timeout=30)).exit_code == 137

        with pytest.raises(somna.CommandTimeoutError):
            await sbx.exec("sleep 30", timeout=1)

        # Files.
        await sbx.files.write("/work/a.txt", "async text")
        assert await sbx.files.read("/work/a.txt") == "async text"
        data = bytes(range(256)) * 2000
        await sbx.files.write("/work/b.bin", data)
        assert await sbx.files.read_bytes("/work/b.bin") == data
        assert {e.name for e in await sbx.files.list("/work")} == {"a.txt", "b.bin"}
        assert await sbx.files.exists("/work/a.txt")
        await sbx.files.remove("/work/a.txt")
        assert not await sbx.files.exists("/work/a.txt")
        (tmp_path / "up").mkdir()
        (tmp_path / "up" / "f.txt").write_text("up")
        assert (await sbx.files.upload(tmp_path / "up", "/srv/up")).files == 1
        assert (await sbx.files.download("/srv/up", tmp_path / "down")).files == 1
        assert (tmp_path / "down" / "f.txt").read_text() == "up"
        with pytest.raises(somna.NotFoundError):
            await sbx.files.read("/nope")

        # Sleep and wake.
        assert (await sbx.sleep()).state == "sleeping"
        assert (await sbx.exec("cat /work/b.bin | wc -c")).stdout.strip() == str(len(data))
        assert (await sbx.refresh()).state == "running"

        again = await AsyncSandbox.connect(sbx.id)
        assert again.id == sbx.id
        assert sbx.id in {s.id for s in await AsyncSandbox.list()}
        sid = sbx.id
    with pytest.raises(somna.SandboxNotFoundError):
        await AsyncSandbox.connect(sid)


async def test_async_concurrent_execs(platform) -> None:  # type: ignore[no-untyped-def]
    sbx = await AsyncSandbox.create(image="busybox")
    try:
        results = await asyncio.gather(*(sbx.exec(f"echo {i}") for i in range(10)))
        assert [r.stdout for r in results] == [f"{i}\n" for i in range(10)]
    finally:
        await sbx.destroy()
    with pytest.raises(somna.SandboxNotFoundError):
        await sbx.exec("true")
    with pytest.raises(somna.SandboxNotFoundError):
        await sbx.files.read("/etc/passwd")


async def test_async_errors(platform) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(somna.SomnaConnectionError):
        await AsyncSandbox.create(image="busybox", addr="http://127.0.0.1:1")
    if platform.api_key:
        async with AsyncClient(platform.addr, api_key="sk-wrong") as bad:
            with pytest.raises(somna.AuthenticationError):
                await AsyncSandbox.list(client=bad)
    with pytest.raises(somna.InvalidArgumentError):
        await AsyncSandbox.create(image="busybox", memory=0)
