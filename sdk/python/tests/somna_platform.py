"""A throwaway single-node Somna (`somna up`) for tests and benchmarks, the
Python twin of sdk/testkit: its own data directory, real microVMs under TCG,
and a teardown that leaves no VMM process or file behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[3]


def somna_binary() -> Path:
    """`$SOMNA_BIN`, else the release build of the workspace."""
    if os.environ.get("SOMNA_BIN"):
        return Path(os.environ["SOMNA_BIN"])
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    return target / "release" / "somna"


def artifacts() -> Dict[str, Path]:
    """Guest kernel/initramfs and test images; raises (never skips) when they
    are missing: run `scripts/setup.sh build` first."""
    guest = Path(os.environ.get("SOMNA_TEST_GUEST_DIR", REPO / "build" / "guest"))
    images = Path(os.environ.get("SOMNA_TEST_IMAGE_DIR", REPO / "build" / "images"))
    for needed in (guest / "vmlinux", guest / "initramfs.img", images / "busybox" / "index.json",
                   images / "python" / "index.json", somna_binary()):
        if not needed.exists():
            raise RuntimeError(f"{needed} is missing: run `scripts/setup.sh build` (as root) first")
    return {"guest": guest, "images": images}


def processes_mentioning(needle: str) -> List[int]:
    """Live processes with an argument containing `needle`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(needle.encode() in a for a in args):
            pids.append(int(entry.name))
    return pids


class Platform:
    """`somna up --listen 127.0.0.1:0 --json` in a temporary data directory."""

    def __init__(self, extra_args: Optional[List[str]] = None) -> None:
        self.binary = somna_binary()
        self.artifacts = artifacts()
        self.data_dir = Path(tempfile.mkdtemp(prefix="somna-pytest-"))
        self.extra_args = extra_args or []
        self.proc: Optional[subprocess.Popen] = None
        self.addr = ""
        self.api_key = ""
        self.accelerator = ""

    def start(self) -> "Platform":
        env = dict(os.environ)
        env.setdefault("SOMNA_LOG", "warn")
        env.pop("SOMNA_API_KEY", None)
        self.proc = subprocess.Popen(
            [str(self.binary), "--json", "up", "--listen", "127.0.0.1:0",
             "--data-dir", str(self.data_dir),
             "--guest-dir", str(self.artifacts["guest"]),
             "--image-dir", str(self.artifacts["images"]),
             "--accel", "tcg", "--no-templates", "--no-registries", *self.extra_args],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, env=env,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            self.cleanup()
            raise RuntimeError(f"somna up exited before serving (status {code}); see its log above")
        info = json.loads(line)
        self.addr = info["addr"]
        self.api_key = info.get("api_key") or ""
        self.accelerator = info.get("accelerator", "")
        return self

    def env(self) -> Dict[str, str]:
        """Environment for CLI commands and clients pointed at this platform."""
        env = dict(os.environ)
        env["SOMNA_ADDR"] = self.addr
        if self.api_key:
            env["SOMNA_API_KEY"] = self.api_key
        else:
            env.pop("SOMNA_API_KEY", None)
        return env

    def vm_dirs(self) -> List[Path]:
        vms = self.data_dir / "vms"
        return sorted(vms.iterdir()) if vms.is_dir() else []

    def stop(self) -> None:
        """SIGTERM (it destroys its sandboxes), SIGKILL after 30 s, then kill
        any VMM left behind and remove the data directory."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.cleanup()

    def cleanup(self) -> None:
        for pid in processes_mentioning(str(self.data_dir / "vms")):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while processes_mentioning(str(self.data_dir / "vms")) and time.monotonic() < deadline:
            time.sleep(0.05)
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> "Platform":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
