"""The synchronous API: :class:`Client`, :class:`Sandbox`, :class:`Files`,
:class:`Process`."""

from __future__ import annotations

import os
import queue
import stat as _stat
import threading
from pathlib import Path
from typing import IO, Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import grpc

from . import _common as c
from . import errors
from .types import ExecResult, FileInfo, SandboxInfo, TransferStats
from .v1 import files_pb2, process_pb2, sandbox_pb2, sandbox_pb2_grpc

__all__ = ["Client", "Sandbox", "Files", "Process"]

_END = object()


class Client:
    """A connection to the Somna API. Thread-safe; share one per process.

    Args:
        addr: ``http://host:port``; default ``$SOMNA_ADDR``, else the local
            ``somna up`` (``http://127.0.0.1:7477``).
        api_key: Sent as ``authorization: Bearer <key>``; default
            ``$SOMNA_API_KEY`` (none when unset).
        request_timeout: Deadline in seconds for each call that is not an
            exec stream; ``None`` (default) waits as long as it takes.

    Raises:
        InvalidArgumentError: The address or key is malformed.
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
            self._channel = grpc.secure_channel(conn.target, grpc.ssl_channel_credentials(), c.CHANNEL_OPTIONS)
        else:
            self._channel = grpc.insecure_channel(conn.target, c.CHANNEL_OPTIONS)
        self.stub = sandbox_pb2_grpc.SandboxesStub(self._channel)

    @property
    def addr(self) -> str:
        """The API address (``http://host:port``)."""
        return self.connection.addr

    def close(self) -> None:
        """Closes the connection. Sandboxes stay as they are."""
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, method: str, request: Any, sandbox_id: Optional[str] = None, timeout: Optional[float] = None) -> Any:
        """Calls unary RPC ``method`` with credentials and the deadline,
        translating errors."""
        fn = getattr(self.stub, method, None)
        if fn is None:
            raise errors.UnimplementedError(f"this SDK was built without {method}")
        try:
            return fn(
                request,
                metadata=self.connection.metadata,
                timeout=timeout if timeout is not None else self.connection.request_timeout,
            )
        except grpc.RpcError as e:
            raise c.translate(e, self.connection, sandbox_id) from None

    def __repr__(self) -> str:
        return f"Client(addr={self.addr!r}, api_key={'set' if self.connection.api_key else None})"


_default_clients: Dict[Tuple[str, Optional[str], Optional[float]], Client] = {}
_default_lock = threading.Lock()


def _client(
    client: Optional[Client], addr: Optional[str], api_key: Optional[str], request_timeout: Optional[float]
) -> Client:
    """The given client, else a shared one for (addr, key, timeout)."""
    if client is not None:
        return client
    conn = c.Connection.resolve(addr, api_key, request_timeout)
    key = (conn.addr, conn.api_key, conn.request_timeout)
    with _default_lock:
        found = _default_clients.get(key)
        if found is None:
            found = Client(conn.addr, conn.api_key or "", conn.request_timeout)
            _default_clients[key] = found
        return found


class Process:
    """A command running in a sandbox (``exec(..., background=True)``).

    Output is read on a background thread: the ``on_stdout``/``on_stderr``
    callbacks run there, and :meth:`wait` returns the full result.
    """

    def __init__(self, sandbox: "Sandbox", cmd: c.Command, start: Any, stdin: bool,
                 on_stdout: Optional[c.OutputCallback], on_stderr: Optional[c.OutputCallback],
                 timeout: Optional[float], check: bool) -> None:
        self._sandbox = sandbox
        self._cmd = cmd
        self._timeout = timeout
        self._check = check
        self._sink = c.OutputSink(on_stdout, on_stderr)
        self._requests: "queue.Queue[Any]" = queue.Queue()
        self._requests.put(start)
        self._stdin_open = stdin
        self._done = threading.Event()
        self._error: Optional[BaseException] = None
        self._thread: Optional[threading.Thread] = None
        client = sandbox.client
        deadline = c.stream_deadline(timeout, client.connection.request_timeout)
        try:
            self._call = client.stub.Exec(self._request_iter(), metadata=client.connection.metadata, timeout=deadline)
            self._responses = iter(self._call)
            # The first event is `started`, or `exit` if it could not run.
            first = next(self._responses, None)
        except grpc.RpcError as e:
            self._requests.put(_END)
            raise c.translate(e, client.connection, sandbox.id) from None
        if first is not None:
            self._deliver(first)

    def _request_iter(self) -> Iterator[Any]:
        while True:
            msg = self._requests.get()
            if msg is _END:
                return
            yield msg

    def _deliver(self, resp: Any) -> None:
        cb, text = self._sink.event(resp)
        if cb is not None:
            cb(text)

    def _pump(self) -> None:
        try:
            for resp in self._responses:
                self._deliver(resp)
            for cb, text in self._sink.flush():
                cb(text)
        except grpc.RpcError as e:
            self._error = c.translate(e, self._sandbox.client.connection, self._sandbox.id)
        except BaseException as e:  # a callback raised: hand it to wait()
            self._error = e
            self._call.cancel()
        finally:
            self._requests.put(_END)
            self._done.set()

    def _start_background(self) -> "Process":
        self._thread = threading.Thread(target=self._pump, name=f"somna-exec-{self.pid}", daemon=True)
        self._thread.start()
        return self

    def _run_here(self) -> ExecResult:
        self._pump()
        return self._finish()

    def _finish(self) -> ExecResult:
        if self._error is not None:
            raise self._error
        return c.check_result(self._sink.result(), self._cmd, self._check, self._timeout)

    @property
    def pid(self) -> int:
        """The process id inside the sandbox (0 if it never started)."""
        return self._sink.pid

    def is_running(self) -> bool:
        """True until the process has exited."""
        return not self._done.is_set()

    @property
    def stdout(self) -> str:
        """Standard output so far."""
        return bytes(self._sink.stdout).decode("utf-8", "replace")

    @property
    def stderr(self) -> str:
        """Standard error so far."""
        return bytes(self._sink.stderr).decode("utf-8", "replace")

    def write_stdin(self, data: Union[bytes, str]) -> None:
        """Sends bytes to the process's stdin (needs ``stdin=True``)."""
        if not self._stdin_open:
            raise errors.FailedPreconditionError("stdin is not open: start the command with stdin=True")
        raw = data.encode() if isinstance(data, str) else bytes(data)
        for i in range(0, len(raw), c.CHUNK):
            self._requests.put(process_pb2.ExecRequest(stdin=raw[i : i + c.CHUNK]))

    def close_stdin(self) -> None:
        """Closes the process's stdin (it reads EOF)."""
        if self._stdin_open:
            self._stdin_open = False
            self._requests.put(process_pb2.ExecRequest(close_stdin=process_pb2.CloseStdin()))

    def send_signal(self, signal: int) -> None:
        """Sends a signal (e.g. 15 for SIGTERM) to the process group."""
        self._requests.put(process_pb2.ExecRequest(signal=process_pb2.SendSignal(signal=int(signal))))

    def kill(self) -> None:
        """Kills the process group (SIGKILL)."""
        self.send_signal(9)

    def wait(self, timeout: Optional[float] = None) -> ExecResult:
        """Waits for the exit and returns the result.

        Args:
            timeout: Give up waiting after this many seconds (the process
                keeps running).

        Raises:
            RequestTimeoutError: ``timeout`` passed first.
            CommandTimeoutError: The command's own timeout killed it.
            CommandExitError: ``check=True`` and it exited non-zero.
        """
        if not self._done.wait(timeout):
            raise errors.RequestTimeoutError(f"the process did not exit within {timeout} s")
        return self._finish()

    def __repr__(self) -> str:
        return f"Process(pid={self.pid}, running={self.is_running()})"


class Files:
    """Files of one sandbox (``sandbox.files``). Paths are resolved inside
    the sandbox's root; relative paths are relative to ``/``."""

    def __init__(self, sandbox: "Sandbox") -> None:
        self._sb = sandbox

    def _call(self, method: str, request: Any) -> Any:
        return self._sb.client.call(method, request, sandbox_id=self._sb.id)

    def _stream(self, path: str, offset: int, length: Optional[int]) -> Iterator[bytes]:
        client = self._sb.client
        req = files_pb2.ReadFileRequest(sandbox_id=self._sb.id, path=path, offset=offset, length=length or 0)
        try:
            for chunk in client.stub.ReadFile(req, metadata=client.connection.metadata,
                                              timeout=client.connection.request_timeout):
                yield chunk.data
        except grpc.RpcError as e:
            raise c.translate(e, client.connection, self._sb.id) from None

    def read_bytes(self, path: str, *, offset: int = 0, length: Optional[int] = None) -> bytes:
        """The file's bytes (or ``length`` bytes from ``offset``).

        Raises:
            NotFoundError: No such file.
            SandboxNotFoundError: The sandbox does not exist.
        """
        return b"".join(self._stream(path, offset, length))

    def read(self, path: str, *, encoding: str = "utf-8", errors: str = "strict") -> str:
        """The file's content as text.

        Raises:
            NotFoundError: No such file.
            UnicodeDecodeError: The file is not valid in ``encoding`` (use
                :meth:`read_bytes`, or ``errors="replace"``).
        """
        return self.read_bytes(path).decode(encoding, errors)

    def write(self, path: str, data: Union[str, bytes, IO[bytes]], *, mode: Optional[int] = None,
              append: bool = False, create_parents: bool = True) -> FileInfo:
        """Writes (atomically replaces, or appends to) a file.

        Args:
            path: Where in the sandbox.
            data: Text (written as UTF-8), bytes, or a binary file object
                (streamed).
            mode: Permission bits for a new file (default ``0o644``).
            append: Append instead of replacing.
            create_parents: Create missing parent directories.
        """
        start = c.write_start(self._sb.id, path, mode, append, create_parents)

        def requests() -> Iterator[Any]:
            yield start
            if isinstance(data, (str, bytes, bytearray, memoryview)):
                yield from c.data_chunks(data)
            else:
                while True:
                    buf = data.read(c.CHUNK)
                    if not buf:
                        return
                    yield files_pb2.WriteFileRequest(data=buf)

        resp = self._call("WriteFile", requests())
        return c.file_info(resp.file)

    def list(self, path: str = "/") -> List[FileInfo]:
        """The entries of directory ``path``."""
        resp = self._call("ListFiles", files_pb2.ListFilesRequest(sandbox_id=self._sb.id, path=path))
        return [c.file_info(e) for e in resp.entries]

    def stat(self, path: str) -> FileInfo:
        """Information about one file (symlinks are not followed)."""
        return c.file_info(self._call("StatFile", files_pb2.StatFileRequest(sandbox_id=self._sb.id, path=path)))

    def exists(self, path: str) -> bool:
        """Whether ``path`` exists in the sandbox."""
        try:
            self.stat(path)
            return True
        except errors.SandboxNotFoundError:
            raise
        except errors.NotFoundError:
            return False

    def mkdir(self, path: str, *, parents: bool = True, mode: Optional[int] = None) -> FileInfo:
        """Creates a directory (with ``parents``: missing parents too, and no
        error if it exists)."""
        req = files_pb2.MakeDirRequest(sandbox_id=self._sb.id, path=path, mode=mode or 0, parents=parents)
        return c.file_info(self._call("MakeDir", req))

    def remove(self, path: str, *, recursive: bool = False) -> None:
        """Removes a file, or a directory (with ``recursive`` if not empty)."""
        self._call("RemoveFile", files_pb2.RemoveFileRequest(sandbox_id=self._sb.id, path=path, recursive=recursive))

    def rename(self, src: str, dst: str) -> None:
        """Renames (moves) ``src`` to ``dst`` inside the sandbox."""
        req = files_pb2.RenameFileRequest(**{"sandbox_id": self._sb.id, "from": src, "to": dst})
        self._call("RenameFile", req)

    def upload(self, local_path: Union[str, "os.PathLike[str]"], remote_path: str) -> TransferStats:
        """Copies a local file or directory tree to exactly ``remote_path``,
        keeping permission bits. Symlinks and special files are skipped."""
        root = Path(local_path)
        st = root.lstat()
        if _stat.S_ISREG(st.st_mode):
            with root.open("rb") as f:
                info = self.write(remote_path, f, mode=_stat.S_IMODE(st.st_mode))
            return TransferStats(bytes=info.size, files=1)
        if not _stat.S_ISDIR(st.st_mode):
            raise errors.InvalidArgumentError(f"{root} is not a regular file or directory")
        total, files, skipped = 0, 0, 0
        stack = [(root, remote_path)]
        while stack:
            d, rd = stack.pop()
            self.mkdir(rd, parents=True)
            for entry in sorted(os.scandir(d), key=lambda e: e.name):
                rp = c.join(rd, entry.name)
                if entry.is_dir(follow_symlinks=False):
                    stack.append((Path(entry.path), rp))
                elif entry.is_file(follow_symlinks=False):
                    mode = _stat.S_IMODE(entry.stat(follow_symlinks=False).st_mode)
                    with open(entry.path, "rb") as f:
                        total += self.write(rp, f, mode=mode).size
                    files += 1
                else:
                    skipped += 1
        return TransferStats(bytes=total, files=files, skipped=skipped)

    def download(self, remote_path: str, local_path: Union[str, "os.PathLike[str]"]) -> TransferStats:
        """Copies a sandbox file or directory tree to exactly ``local_path``,
        keeping permission bits. Symlinks and special files are skipped."""
        info = self.stat(remote_path)
        target = Path(local_path)
        if info.is_file:
            target.parent.mkdir(parents=True, exist_ok=True)
            n = self._download_file(remote_path, target, info.mode)
            return TransferStats(bytes=n, files=1)
        if not info.is_dir:
            raise errors.InvalidArgumentError(f"{remote_path} is not a regular file or directory")
        total, files, skipped = 0, 0, 0
        stack = [(remote_path, target)]
        while stack:
            rd, d = stack.pop()
            d.mkdir(parents=True, exist_ok=True)
            for e in self.list(rd):
                if e.is_dir:
                    stack.append((e.path, d / e.name))
                elif e.is_file:
                    total += self._download_file(e.path, d / e.name, e.mode)
                    files += 1
                else:
                    skipped += 1
        return TransferStats(bytes=total, files=files, skipped=skipped)

    def _download_file(self, remote: str, local: Path, mode: int) -> int:
        n = 0
        with local.open("wb") as f:
            for chunk in self._stream(remote, 0, None):
                f.write(chunk)
                n += len(chunk)
        if mode:
            os.chmod(local, mode & 0o7777)
        return n


class Sandbox:
    """A sandbox: a microVM running an image.

    Create one with :meth:`create`, reach an existing one with
    :meth:`connect`. Used as a context manager it is destroyed on exit::

        with Sandbox.create(image="python") as sbx:
            print(sbx.run_code("print(6*7)").stdout)
    """

    def __init__(self, info: SandboxInfo, client: Client) -> None:
        self._info = info
        self.client = client
        self.files = Files(self)

    # --- constructors -----------------------------------------------------

    @classmethod
    def create(
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
        client: Optional[Client] = None,
        addr: Optional[str] = None,
        api_key: Optional[str] = None,
        request_timeout: Optional[float] = None,
    ) -> "Sandbox":
        """Creates a sandbox and returns once it accepts commands.

        Args:
            image: Image reference, e.g. ``"python"`` or ``"busybox"``.
            cpus: Virtual CPUs (default 1).
            memory: Memory in MiB (default 512).
            disk: Writable disk in MiB (default 1024).
            env: Environment variables for every command.
            timeout: Destroy the sandbox this many seconds after creation
                (default: never; see :meth:`set_timeout`).
            idle_timeout: Put it to sleep after this many seconds without
                commands or file calls.
            labels: Free-form labels, to find it with :meth:`list`.
            start_mode: ``"auto"``, ``"cold-boot"``, ``"template"`` or
                ``"warm-pool"``.
            request_id: Makes retries safe: a second create with the same id
                returns the first one's sandbox.
            no_internet: No internet access (hosts running with networking;
                elsewhere sandboxes have no network device).
            allow_out: IPv4 CIDRs allowed even without internet or in
                private ranges.
            deny_out: IPv4 CIDRs denied.
            client: The :class:`Client` to use (default: a shared one for
                ``addr``/``api_key``/``request_timeout``).

        Raises:
            InvalidArgumentError: Bad sizes or image name.
            NotFoundError: No such image.
            AuthenticationError: Missing or wrong API key.
            SomnaConnectionError: No server at the address.
        """
        cl = _client(client, addr, api_key, request_timeout)
        req = c.create_request(
            image, cpus, memory, disk, env, timeout, idle_timeout, labels, start_mode, request_id,
            no_internet, allow_out, deny_out,
        )
        return cls(c.sandbox_info(cl.call("CreateSandbox", req)), cl)

    @classmethod
    def connect(
        cls,
        sandbox_id: str,
        *,
        client: Optional[Client] = None,
        addr: Optional[str] = None,
        api_key: Optional[str] = None,
        request_timeout: Optional[float] = None,
    ) -> "Sandbox":
        """A handle to an existing sandbox.

        Raises:
            SandboxNotFoundError: No such sandbox (or it was destroyed).
        """
        cl = _client(client, addr, api_key, request_timeout)
        info = cl.call("GetSandbox", sandbox_pb2.GetSandboxRequest(id=sandbox_id), sandbox_id=sandbox_id)
        return cls(c.sandbox_info(info), cl)

    @staticmethod
    def list(
        *,
        labels: Optional[Mapping[str, str]] = None,
        client: Optional[Client] = None,
        addr: Optional[str] = None,
        api_key: Optional[str] = None,
        request_timeout: Optional[float] = None,
    ) -> List[SandboxInfo]:
        """Sandboxes (those carrying all of ``labels``, when given)."""
        cl = _client(client, addr, api_key, request_timeout)
        out: List[SandboxInfo] = []
        token = ""
        while True:
            resp = cl.call("ListSandboxes", c.list_request(labels, token))
            out.extend(c.sandbox_info(s) for s in resp.sandboxes)
            token = getattr(resp, "next_page_token", "")
            if not token:
                return out

    # --- state ------------------------------------------------------------

    @property
    def id(self) -> str:
        """The sandbox id."""
        return self._info.id

    @property
    def info(self) -> SandboxInfo:
        """The record as of creation or the last call that returned it."""
        return self._info

    def refresh(self) -> SandboxInfo:
        """Fetches the current record (state, counters, expiry)."""
        self._info = c.sandbox_info(self._call("GetSandbox", sandbox_pb2.GetSandboxRequest(id=self.id)))
        return self._info

    def is_running(self) -> bool:
        """Whether the sandbox exists and is running (asks the server)."""
        try:
            return self.refresh().state == "running"
        except errors.SandboxNotFoundError:
            return False

    def _call(self, method: str, request: Any) -> Any:
        return self.client.call(method, request, sandbox_id=self.id)

    # --- lifecycle --------------------------------------------------------

    def sleep(self) -> SandboxInfo:
        """Light sleep: memory and processes go to disk, the host's RAM is
        released. Any command or file call wakes it."""
        self._info = c.sandbox_info(self._call("SleepSandbox", sandbox_pb2.SleepSandboxRequest(id=self.id)))
        return self._info

    def wake(self) -> SandboxInfo:
        """Wakes a sleeping sandbox (commands and file calls do it too)."""
        self._info = c.sandbox_info(self._call("WakeSandbox", sandbox_pb2.WakeSandboxRequest(id=self.id)))
        return self._info

    def set_timeout(self, timeout: Optional[float]) -> SandboxInfo:
        """Destroys the sandbox ``timeout`` seconds from now (``None``: never).

        Raises:
            UnimplementedError: The server does not support it yet.
        """
        self._info = c.sandbox_info(self._call("SetSandboxTimeout", c.set_timeout_request(self.id, timeout)))
        return self._info

    def update_network(
        self,
        *,
        no_internet: bool = False,
        allow_out: Optional[Sequence[str]] = None,
        deny_out: Optional[Sequence[str]] = None,
    ) -> SandboxInfo:
        """Replaces the sandbox's network policy; a running VM gets it at once.

        Raises:
            InvalidArgumentError: A bad CIDR, or one in both lists (the
                message names the field).
            FailedPreconditionError: Its host runs without networking.
        """
        req = c.update_network_request(self.id, no_internet, allow_out, deny_out)
        self._info = c.sandbox_info(self._call("UpdateSandboxNetwork", req))
        return self._info

    def destroy(self) -> None:
        """Stops the VM and removes the sandbox and all its data.

        Raises:
            SandboxNotFoundError: It no longer exists.
        """
        self._call("DestroySandbox", sandbox_pb2.DestroySandboxRequest(id=self.id))

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.destroy()
        except errors.SandboxNotFoundError:
            pass

    # --- processes --------------------------------------------------------

    def exec(
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
        """Runs a command and returns its :class:`ExecResult`.

        Args:
            cmd: A shell command line (run with ``sh -c``) or an argv list.
            env: Extra environment variables.
            cwd: Working directory (default: the image's).
            user: ``"name"``, ``"uid"``, ``"uid:gid"`` or ``"name:group"``.
            timeout: Kill the command (its process group) after this many
                seconds; then :class:`CommandTimeoutError` is raised.
            stdin: Bytes or text fed to stdin, or ``True`` to keep stdin open
                for :meth:`Process.write_stdin` (background only).
            on_stdout: Called with each piece of stdout text as it arrives.
            on_stderr: Called with each piece of stderr text as it arrives.
            background: Return a :class:`Process` as soon as the command
                runs, instead of waiting for it.
            check: Raise :class:`CommandExitError` on a non-zero exit.

        Returns:
            :class:`ExecResult`, or a :class:`Process` with ``background``.
            A program that does not exist gives exit code 127.

        Raises:
            SandboxNotFoundError: The sandbox does not exist.
            CommandTimeoutError: ``timeout`` passed.
            CommandExitError: ``check`` and a non-zero exit.
        """
        keep_open = stdin is True
        if keep_open and not background:
            raise errors.InvalidArgumentError("stdin=True needs background=True; pass the input as bytes or str")
        start = c.exec_start(self.id, cmd, env, cwd, user, timeout, stdin is not None and stdin is not False)
        proc = Process(self, cmd, start, keep_open, on_stdout, on_stderr, timeout, check)
        if stdin is not None and stdin is not False and not keep_open:
            for msg in c.stdin_messages(stdin):  # type: ignore[arg-type]
                proc._requests.put(msg)
        if background:
            return proc._start_background()
        return proc._run_here()

    def run_code(
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
        """Runs a snippet of code under the language's interpreter.

        The code is fed on stdin (``python3 -u -``, ``sh -s``, ``bash -s``,
        ``node -``), so it may be of any size.

        Args:
            code: The source.
            language: ``"python"`` (default), ``"shell"``, ``"bash"`` or
                ``"javascript"`` (the image needs the interpreter).

        Other arguments and errors are those of :meth:`exec`.
        """
        if not isinstance(code, str):
            raise errors.InvalidArgumentError("code must be a string")
        argv = c.language_argv(language)
        return self.exec(argv, env=env, cwd=cwd, timeout=timeout, stdin=code, on_stdout=on_stdout,
                         on_stderr=on_stderr, background=background, check=check)

    def __repr__(self) -> str:
        return f"Sandbox(id={self.id!r}, image={self._info.image!r}, state={self._info.state!r})"
