"""The asyncio API: :class:`AsyncClient`, :class:`AsyncSandbox`,
:class:`AsyncFiles`, :class:`AsyncProcess`. Same surface as the sync API,
with coroutines::

    from somna.aio import AsyncSandbox

    async with await AsyncSandbox.create(image="python") as sbx:
        result = await sbx.run_code("print(6*7)")

Callbacks (``on_stdout``/``on_stderr``) may be plain functions or
coroutine functions.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import stat as _stat
import weakref
from pathlib import Path
from typing import IO, Any, AsyncIterator, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import grpc
import grpc.aio

from . import _common as c
from . import errors
from .types import ExecResult, FileInfo, SandboxInfo, TransferStats
from .v1 import files_pb2, process_pb2, sandbox_pb2, sandbox_pb2_grpc

__all__ = ["AsyncClient", "AsyncSandbox", "AsyncFiles", "AsyncProcess"]


class AsyncClient:
    """A connection to the Somna API for one event loop.

    Arguments are those of :class:`somna.Client`.
    """

    def __init__(
        self,
        addr: Optional[str] = None,
        api_key: Optional[str] = None,
        request_timeout: Optional[float] = None,
    ) -> None:
        self.connection = c.Connection.resolve(addr, api_key, request_timeout)
        conn = self.connection
        if conn.secure:
            self._channel = grpc.aio.secure_channel(conn.target, grpc.ssl_channel_credentials(), c.CHANNEL_OPTIONS)
        else:
            self._channel = grpc.aio.insecure_channel(conn.target, c.CHANNEL_OPTIONS)
        self.stub = sandbox_pb2_grpc.SandboxesStub(self._channel)

    @property
    def addr(self) -> str:
        return self.connection.addr

    async def close(self) -> None:
        """Closes the connection. Sandboxes stay as they are."""
        await self._channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def call(self, method: str, request: Any, sandbox_id: Optional[str] = None,
                   timeout: Optional[float] = None) -> Any:
        """Calls unary (or client-streaming) RPC ``method``, translating errors."""
        fn = getattr(self.stub, method, None)
        if fn is None:
            raise errors.UnimplementedError(f"this SDK was built without {method}")
        try:
            return await fn(
                request,
                metadata=self.connection.metadata,
                timeout=timeout if timeout is not None else self.connection.request_timeout,
            )
        except grpc.RpcError as e:
            raise c.translate(e, self.connection, sandbox_id) from None


_clients: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Dict[Tuple[str, Optional[str], Optional[float]], AsyncClient]]" = weakref.WeakKeyDictionary()


def _client(client: Optional[AsyncClient], addr: Optional[str], api_key: Optional[str],
            request_timeout: Optional[float]) -> AsyncClient:
    """The given client, else one shared per event loop and connection."""
    if client is not None:
        return client
    conn = c.Connection.resolve(addr, api_key, request_timeout)
    per_loop = _clients.setdefault(asyncio.get_running_loop(), {})
    key = (conn.addr, conn.api_key, conn.request_timeout)
    found = per_loop.get(key)
    if found is None:
        found = AsyncClient(conn.addr, conn.api_key or "", conn.request_timeout)
        per_loop[key] = found
    return found


async def _invoke(cb: Optional[c.OutputCallback], text: Optional[str]) -> None:
    if cb is None:
        return
    r = cb(text)  # type: ignore[arg-type]
    if inspect.isawaitable(r):
        await r


class AsyncProcess:
    """A command running in a sandbox (``await exec(..., background=True)``).

    Its output is read by a task; callbacks run on the event loop.
    """

    def __init__(self, sandbox: "AsyncSandbox", cmd: c.Command, stdin_open: bool,
                 on_stdout: Optional[c.OutputCallback], on_stderr: Optional[c.OutputCallback],
                 timeout: Optional[float], check: bool) -> None:
        self._sandbox = sandbox
        self._cmd = cmd
        self._timeout = timeout
        self._check = check
        self._stdin_open = stdin_open
        self._sink = c.OutputSink(on_stdout, on_stderr)
        self._call: Any = None
        self._task: Optional["asyncio.Task[ExecResult]"] = None

    async def _start(self, start: Any) -> None:
        client = self._sandbox.client
        deadline = c.stream_deadline(self._timeout, client.connection.request_timeout)
        try:
            self._call = client.stub.Exec(metadata=client.connection.metadata, timeout=deadline)
            await self._call.write(start)
            first = await self._call.read()
        except grpc.RpcError as e:
            raise c.translate(e, client.connection, self._sandbox.id) from None
        if first is not grpc.aio.EOF:
            cb, text = self._sink.event(first)
            await _invoke(cb, text)

    async def _send(self, msg: Any) -> None:
        try:
            await self._call.write(msg)
        except grpc.RpcError as e:
            raise c.translate(e, self._sandbox.client.connection, self._sandbox.id) from None
        except asyncio.InvalidStateError:
            raise errors.FailedPreconditionError("the process has already exited") from None

    async def _pump(self) -> ExecResult:
        try:
            while True:
                resp = await self._call.read()
                if resp is grpc.aio.EOF:
                    break
                cb, text = self._sink.event(resp)
                await _invoke(cb, text)
            for cb, text in self._sink.flush():
                await _invoke(cb, text)
        except grpc.RpcError as e:
            raise c.translate(e, self._sandbox.client.connection, self._sandbox.id) from None
        except BaseException:
            self._call.cancel()
            raise
        return c.check_result(self._sink.result(), self._cmd, self._check, self._timeout)

    @property
    def pid(self) -> int:
        """The process id inside the sandbox (0 if it never started)."""
        return self._sink.pid

    def is_running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def stdout(self) -> str:
        """Standard output so far."""
        return bytes(self._sink.stdout).decode("utf-8", "replace")

    @property
    def stderr(self) -> str:
        """Standard error so far."""
        return bytes(self._sink.stderr).decode("utf-8", "replace")

    async def write_stdin(self, data: Union[bytes, str]) -> None:
        """Sends bytes to stdin (needs ``stdin=True``)."""
        if not self._stdin_open:
            raise errors.FailedPreconditionError("stdin is not open: start the command with stdin=True")
        raw = data.encode() if isinstance(data, str) else bytes(data)
        for i in range(0, len(raw), c.CHUNK):
            await self._send(process_pb2.ExecRequest(stdin=raw[i : i + c.CHUNK]))

    async def close_stdin(self) -> None:
        """Closes stdin (the process reads EOF)."""
        if self._stdin_open:
            self._stdin_open = False
            await self._send(process_pb2.ExecRequest(close_stdin=process_pb2.CloseStdin()))

    async def send_signal(self, signal: int) -> None:
        """Sends a signal to the process group."""
        await self._send(process_pb2.ExecRequest(signal=process_pb2.SendSignal(signal=int(signal))))

    async def kill(self) -> None:
        """Kills the process group (SIGKILL)."""
        await self.send_signal(9)

    async def wait(self, timeout: Optional[float] = None) -> ExecResult:
        """Waits for the exit and returns the result.

        Raises:
            RequestTimeoutError: ``timeout`` passed first (it keeps running).
            CommandTimeoutError: The command's own timeout killed it.
            CommandExitError: ``check=True`` and it exited non-zero.
        """
        assert self._task is not None
        try:
            return await asyncio.wait_for(asyncio.shield(self._task), timeout)
        except asyncio.TimeoutError:
            raise errors.RequestTimeoutError(f"the process did not exit within {timeout} s") from None

    def __repr__(self) -> str:
        return f"AsyncProcess(pid={self.pid}, running={self.is_running()})"


class AsyncFiles:
    """Files of one sandbox (``sandbox.files``); see :class:`somna.Files`."""

    def __init__(self, sandbox: "AsyncSandbox") -> None:
        self._sb = sandbox

    async def _call(self, method: str, request: Any) -> Any:
        return await self._sb.client.call(method, request, sandbox_id=self._sb.id)

    async def _stream(self, path: str, offset: int, length: Optional[int]) -> AsyncIterator[bytes]:
        client = self._sb.client
        req = files_pb2.ReadFileRequest(sandbox_id=self._sb.id, path=path, offset=offset, length=length or 0)
        try:
            async for chunk in client.stub.ReadFile(req, metadata=client.connection.metadata,
                                                    timeout=client.connection.request_timeout):
                yield chunk.data
        except grpc.RpcError as e:
            raise c.translate(e, client.connection, self._sb.id) from None

    async def read_bytes(self, path: str, *, offset: int = 0, length: Optional[int] = None) -> bytes:
        """The file's bytes (or ``length`` bytes from ``offset``)."""
        return b"".join([chunk async for chunk in self._stream(path, offset, length)])

    async def read(self, path: str, *, encoding: str = "utf-8", errors: str = "strict") -> str:
        """The file's content as text."""
        return (await self.read_bytes(path)).decode(encoding, errors)

    async def write(self, path: str, data: Union[str, bytes, IO[bytes]], *, mode: Optional[int] = None,
                    append: bool = False, create_parents: bool = True) -> FileInfo:
        """Writes (atomically replaces, or appends to) a file."""
        start = c.write_start(self._sb.id, path, mode, append, create_parents)
        msgs: List[Any] = [start]
        if isinstance(data, (str, bytes, bytearray, memoryview)):
            msgs.extend(c.data_chunks(data))
        else:
            while True:
                buf = data.read(c.CHUNK)
                if not buf:
                    break
                msgs.append(files_pb2.WriteFileRequest(data=buf))
        resp = await self._call("WriteFile", iter(msgs))
        return c.file_info(resp.file)

    async def list(self, path: str = "/") -> List[FileInfo]:
        resp = await self._call("ListFiles", files_pb2.ListFilesRequest(sandbox_id=self._sb.id, path=path))
        return [c.file_info(e) for e in resp.entries]

    async def stat(self, path: str) -> FileInfo:
        return c.file_info(await self._call("StatFile", files_pb2.StatFileRequest(sandbox_id=self._sb.id, path=path)))

    async def exists(self, path: str) -> bool:
        try:
            await self.stat(path)
            return True
        except errors.SandboxNotFoundError:
            raise
        except errors.NotFoundError:
            return False

    async def mkdir(self, path: str, *, parents: bool = True, mode: Optional[int] = None) -> FileInfo:
        req = files_pb2.MakeDirRequest(sandbox_id=self._sb.id, path=path, mode=mode or 0, parents=parents)
        return c.file_info(await self._call("MakeDir", req))

    async def remove(self, path: str, *, recursive: bool = False) -> None:
        await self._call("RemoveFile", files_pb2.RemoveFileRequest(sandbox_id=self._sb.id, path=path, recursive=recursive))

    async def rename(self, src: str, dst: str) -> None:
        req = files_pb2.RenameFileRequest(**{"sandbox_id": self._sb.id, "from": src, "to": dst})
        await self._call("RenameFile", req)

    async def upload(self, local_path: Union[str, "os.PathLike[str]"], remote_path: str) -> TransferStats:
        """Copies a local file or tree to exactly ``remote_path``."""
        root = Path(local_path)
        st = root.lstat()
        if _stat.S_ISREG(st.st_mode):
            info = await self.write(remote_path, root.read_bytes(), mode=_stat.S_IMODE(st.st_mode))
            return TransferStats(bytes=info.size, files=1)
        if not _stat.S_ISDIR(st.st_mode):
            raise errors.InvalidArgumentError(f"{root} is not a regular file or directory")
        total, files, skipped = 0, 0, 0
        stack = [(root, remote_path)]
        while stack:
            d, rd = stack.pop()
            await self.mkdir(rd, parents=True)
            for entry in sorted(os.scandir(d), key=lambda e: e.name):
                rp = c.join(rd, entry.name)
                if entry.is_dir(follow_symlinks=False):
                    stack.append((Path(entry.path), rp))
                elif entry.is_file(follow_symlinks=False):
                    mode = _stat.S_IMODE(entry.stat(follow_symlinks=False).st_mode)
                    total += (await self.write(rp, Path(entry.path).read_bytes(), mode=mode)).size
                    files += 1
                else:
                    skipped += 1
        return TransferStats(bytes=total, files=files, skipped=skipped)

    async def download(self, remote_path: str, local_path: Union[str, "os.PathLike[str]"]) -> TransferStats:
        """Copies a sandbox file or tree to exactly ``local_path``."""
        info = await self.stat(remote_path)
        target = Path(local_path)
        if info.is_file:
            target.parent.mkdir(parents=True, exist_ok=True)
            return TransferStats(bytes=await self._download_file(remote_path, target, info.mode), files=1)
        if not info.is_dir:
            raise errors.InvalidArgumentError(f"{remote_path} is not a regular file or directory")
        total, files, skipped = 0, 0, 0
        stack = [(remote_path, target)]
        while stack:
            rd, d = stack.pop()
            d.mkdir(parents=True, exist_ok=True)
            for e in await self.list(rd):
                if e.is_dir:
                    stack.append((e.path, d / e.name))
                elif e.is_file:
                    total += await self._download_file(e.path, d / e.name, e.mode)
                    files += 1
                else:
                    skipped += 1
        return TransferStats(bytes=total, files=files, skipped=skipped)

    async def _download_file(self, remote: str, local: Path, mode: int) -> int:
        n = 0
        with local.open("wb") as f:
            async for chunk in self._stream(remote, 0, None):
                f.write(chunk)
                n += len(chunk)
        if mode:
            os.chmod(local, mode & 0o7777)
        return n


class AsyncSandbox:
    """A sandbox, asyncio flavour; see :class:`somna.Sandbox` for the
    arguments and errors of each method. ``async with`` destroys it on exit."""

    def __init__(self, info: SandboxInfo, client: AsyncClient) -> None:
        self._info = info
        self.client = client
        self.files = AsyncFiles(self)

    @classmethod
    async def create(
        cls,
        image: str = "python",
        *,
        cpus: Optional[int] = None,
        memory: Optional[int] = None,
        disk: Optional[int] = None,
        env: Optional[Mapping[str, str]] = None,
        timeout: Optional[float] = None,
        idle_timeout: Optional[float] = None,
        labels: Optional[Mapping[str, str]] = None,
        start_mode: str = "auto",
        request_id: Optional[str] = None,
        no_internet: bool = False,
        allow_out: Optional[Sequence[str]] = None,
        deny_out: Optional[Sequence[str]] = None,
        client: Optional[AsyncClient] = None,
        addr: Optional[str] = None,
        api_key: Optional[str] = None,
        request_timeout: Optional[float] = None,
    ) -> "AsyncSandbox":
        """Creates a sandbox; see :meth:`somna.Sandbox.create`."""
        cl = _client(client, addr, api_key, request_timeout)
        req = c.create_request(
            image, cpus, memory, disk, env, timeout, idle_timeout, labels, start_mode, request_id,
            no_internet, allow_out, deny_out,
        )
        return cls(c.sandbox_info(await cl.call("CreateSandbox", req)), cl)

    @classmethod
    async def connect(cls, sandbox_id: str, *, client: Optional[AsyncClient] = None, addr: Optional[str] = None,
                      api_key: Optional[str] = None, request_timeout: Optional[float] = None) -> "AsyncSandbox":
        """A handle to an existing sandbox; see :meth:`somna.Sandbox.connect`."""
        cl = _client(client, addr, api_key, request_timeout)
        info = await cl.call("GetSandbox", sandbox_pb2.GetSandboxRequest(id=sandbox_id), sandbox_id=sandbox_id)
        return cls(c.sandbox_info(info), cl)

    @staticmethod
    async def list(*, labels: Optional[Mapping[str, str]] = None, client: Optional[AsyncClient] = None,
                   addr: Optional[str] = None, api_key: Optional[str] = None,
                   request_timeout: Optional[float] = None) -> List[SandboxInfo]:
        """Sandboxes (those carrying all of ``labels``, when given)."""
        cl = _client(client, addr, api_key, request_timeout)
        out: List[SandboxInfo] = []
        token = ""
        while True:
            resp = await cl.call("ListSandboxes", c.list_request(labels, token))
            out.extend(c.sandbox_info(s) for s in resp.sandboxes)
            token = getattr(resp, "next_page_token", "")
            if not token:
                return out

    @property
    def id(self) -> str:
        return self._info.id

    @property
    def info(self) -> SandboxInfo:
        return self._info

    async def _call(self, method: str, request: Any) -> Any:
        return await self.client.call(method, request, sandbox_id=self.id)

    async def refresh(self) -> SandboxInfo:
        self._info = c.sandbox_info(await self._call("GetSandbox", sandbox_pb2.GetSandboxRequest(id=self.id)))
        return self._info

    async def is_running(self) -> bool:
        try:
            return (await self.refresh()).state == "running"
        except errors.SandboxNotFoundError:
            return False

    async def sleep(self) -> SandboxInfo:
        self._info = c.sandbox_info(await self._call("SleepSandbox", sandbox_pb2.SleepSandboxRequest(id=self.id)))
        return self._info

    async def wake(self) -> SandboxInfo:
        self._info = c.sandbox_info(await self._call("WakeSandbox", sandbox_pb2.WakeSandboxRequest(id=self.id)))
        return self._info

    async def set_timeout(self, timeout: Optional[float]) -> SandboxInfo:
        self._info = c.sandbox_info(await self._call("SetSandboxTimeout", c.set_timeout_request(self.id, timeout)))
        return self._info

    async def update_network(
        self,
        *,
        no_internet: bool = False,
        allow_out: Optional[Sequence[str]] = None,
        deny_out: Optional[Sequence[str]] = None,
    ) -> SandboxInfo:
        """Replaces the network policy; see :meth:`somna.Sandbox.update_network`."""
        req = c.update_network_request(self.id, no_internet, allow_out, deny_out)
        self._info = c.sandbox_info(await self._call("UpdateSandboxNetwork", req))
        return self._info

    async def destroy(self) -> None:
        await self._call("DestroySandbox", sandbox_pb2.DestroySandboxRequest(id=self.id))

    async def __aenter__(self) -> "AsyncSandbox":
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self.destroy()
        except errors.SandboxNotFoundError:
            pass

    async def exec(
        self,
        cmd: c.Command,
        *,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        user: Optional[str] = None,
        timeout: Optional[float] = None,
        stdin: Union[bytes, str, bool, None] = None,
        on_stdout: Optional[c.OutputCallback] = None,
        on_stderr: Optional[c.OutputCallback] = None,
        background: bool = False,
        check: bool = False,
    ) -> Any:
        """Runs a command; see :meth:`somna.Sandbox.exec`."""
        keep_open = stdin is True
        if keep_open and not background:
            raise errors.InvalidArgumentError("stdin=True needs background=True; pass the input as bytes or str")
        start = c.exec_start(self.id, cmd, env, cwd, user, timeout, stdin is not None and stdin is not False)
        proc = AsyncProcess(self, cmd, keep_open, on_stdout, on_stderr, timeout, check)
        await proc._start(start)
        if stdin is not None and stdin is not False and not keep_open:
            for msg in c.stdin_messages(stdin):  # type: ignore[arg-type]
                await proc._send(msg)
        if background:
            proc._task = asyncio.ensure_future(proc._pump())
            return proc
        return await proc._pump()

    async def run_code(
        self,
        code: str,
        language: str = "python",
        *,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        timeout: Optional[float] = None,
        on_stdout: Optional[c.OutputCallback] = None,
        on_stderr: Optional[c.OutputCallback] = None,
        background: bool = False,
        check: bool = False,
    ) -> Any:
        """Runs a snippet of code; see :meth:`somna.Sandbox.run_code`."""
        if not isinstance(code, str):
            raise errors.InvalidArgumentError("code must be a string")
        argv = c.language_argv(language)
        return await self.exec(argv, env=env, cwd=cwd, timeout=timeout, stdin=code, on_stdout=on_stdout,
                               on_stderr=on_stderr, background=background, check=check)

    def __repr__(self) -> str:
        return f"AsyncSandbox(id={self.id!r}, image={self._info.image!r}, state={self._info.state!r})"
