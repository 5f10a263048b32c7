"""Fixtures: one real `somna up` per test session (see somna_platform.py),
clients pointed at it, and a shared sandbox per module."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Iterator

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import somna  # noqa: E402
from somna_platform import Platform  # noqa: E402


@pytest.fixture(scope="session")
def platform() -> Iterator[Platform]:
    p = Platform().start()
    # Clients built without explicit arguments find it through the env.
    saved = {k: os.environ.get(k) for k in ("SOMNA_ADDR", "SOMNA_API_KEY")}
    os.environ["SOMNA_ADDR"] = p.addr
    if p.api_key:
        os.environ["SOMNA_API_KEY"] = p.api_key
    else:
        os.environ.pop("SOMNA_API_KEY", None)
    try:
        yield p
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        p.stop()
        leftovers = p.vm_dirs()
        assert not leftovers, f"VM run directories left behind: {leftovers}"


@pytest.fixture(scope="session")
def client(platform: Platform) -> Iterator[somna.Client]:
    c = somna.Client(platform.addr, api_key=platform.api_key or "")
    yield c
    c.close()


@pytest.fixture(scope="module")
def sbx(client: somna.Client) -> Iterator[somna.Sandbox]:
    """A python sandbox shared by the tests of one module."""
    s = somna.Sandbox.create(image="python", memory=256, env={"GREETING": "hi"}, client=client)
    yield s
    try:
        s.destroy()
    except somna.SandboxNotFoundError:
        pass
