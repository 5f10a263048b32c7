"""Plain data the SDK returns: sandbox records, command results, file info."""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from typing import Dict, List, Optional

__all__ = ["SandboxInfo", "ExecResult", "FileInfo", "TransferStats"]


@dataclass(frozen=True)
class SandboxInfo:
    """A sandbox's record as the API reported it.

    Attributes:
        id: The sandbox id (``sbx-...``).
        image: The image reference it was created from.
        image_digest: The image's resolved digest.
        state: ``"creating"``, ``"running"``, ``"sleeping"``, ``"waking"``,
            ``"failed"``, ``"destroying"``, ``"lost"`` or ``"unknown"``.
        cpus: Virtual CPUs.
        memory_mib: Guest memory in MiB.
        disk_mib: Size of the writable disk layer in MiB.
        env: Environment for every process.
        labels: Free-form labels given at creation.
        created_at: When it was created (UTC).
        expires_at: When it will be destroyed automatically, if ever.
        host: The host it runs on.
        accelerator: ``"kvm"`` or ``"tcg"``.
        failure: Why it failed (state ``"failed"``), else ``""``.
        boot_ms: Milliseconds from the create request to a running guest.
        start_mode: ``"cold-boot"``, ``"template"`` or ``"warm-pool"``.
        idle_timeout_seconds: Sleeps after this many idle seconds (0: never).
        last_active_at: Last exec or file activity.
        sleep_count: Times it was put to sleep.
        wake_count: Times it was woken.
        network_policy: Where it may send traffic (``None`` on hosts running
            without networking).
    """

    id: str
    image: str = ""
    image_digest: str = ""
    state: str = "unknown"
    cpus: int = 0
    memory_mib: int = 0
    disk_mib: int = 0
    env: Dict[str, str] = field(default_factory=dict)
    labels: Dict[str, str] = field(default_factory=dict)
    created_at: Optional[_dt.datetime] = None
    expires_at: Optional[_dt.datetime] = None
    host: str = ""
    accelerator: str = ""
    failure: str = ""
    boot_ms: int = 0
    start_mode: str = ""
    idle_timeout_seconds: int = 0
    last_active_at: Optional[_dt.datetime] = None
    sleep_count: int = 0
    wake_count: int = 0
    network_policy: Optional["NetworkPolicy"] = None


@dataclass(frozen=True)
class NetworkPolicy:
    """Where a sandbox may send traffic (hosts running with ``--network``).

    Attributes:
        no_internet: No internet access.
        allow_out: IPv4 CIDRs allowed even without internet or in private
            ranges.
        deny_out: IPv4 CIDRs denied.
    """

    no_internet: bool = False
    allow_out: List[str] = field(default_factory=list)
    deny_out: List[str] = field(default_factory=list)


@dataclass(frozen=True)
class ExecResult:
    """How a command ended and what it printed.

    Attributes:
        stdout: Standard output, decoded as UTF-8 (invalid bytes replaced).
        stderr: Standard error, decoded likewise.
        exit_code: Like a shell's ``$?``: the exit code, ``128+N`` when
            killed by signal N, 127 when the program was not found.
        stdout_bytes: Standard output, exactly as printed.
        stderr_bytes: Standard error, exactly as printed.
        signal: The signal that ended the process, if any.
        timed_out: It was killed because its ``timeout`` passed.
        output_truncated: It wrote more than the exec's output limit; the
            output ends with a ``[somna: output truncated ...]`` marker.
        message: Why it could not start or was killed, when the server says.
        pid: Its process id inside the sandbox (0 if it never started).
    """

    stdout: str
    stderr: str
    exit_code: int
    stdout_bytes: bytes = b""
    stderr_bytes: bytes = b""
    signal: Optional[int] = None
    timed_out: bool = False
    message: str = ""
    pid: int = 0
    output_truncated: bool = False

    @property
    def ok(self) -> bool:
        """True when the command exited with code 0."""
        return self.exit_code == 0


@dataclass(frozen=True)
class FileInfo:
    """A file or directory in a sandbox.

    Attributes:
        path: The path as requested (stat) or joined with the directory (list).
        name: The last path component.
        type: ``"file"``, ``"directory"``, ``"symlink"`` or ``"other"``.
        size: Size in bytes.
        mode: Permission bits, e.g. ``0o644``.
        uid: Owner user id.
        gid: Owner group id.
        modified_at: Last modification time (UTC).
        symlink_target: Where a symlink points (not followed), else ``""``.
    """

    path: str
    name: str
    type: str
    size: int = 0
    mode: int = 0
    uid: int = 0
    gid: int = 0
    modified_at: Optional[_dt.datetime] = None
    symlink_target: str = ""

    @property
    def is_dir(self) -> bool:
        return self.type == "directory"

    @property
    def is_file(self) -> bool:
        return self.type == "file"


@dataclass(frozen=True)
class TransferStats:
    """What an upload or download copied.

    Attributes:
        bytes: Bytes copied.
        files: Regular files copied.
        skipped: Entries skipped (symlinks, devices, sockets).
    """

    bytes: int = 0
    files: int = 0
    skipped: int = 0
