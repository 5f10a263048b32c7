"""Somna: microVM sandboxes for running untrusted code.

Quick start::

    from somna import Sandbox

    with Sandbox.create(image="python", timeout=600) as sbx:
        print(sbx.run_code("print(6*7)").stdout)      # 42
        sbx.files.write("/work/data.txt", "hello")
        r = sbx.exec("wc -c /work/data.txt")
        print(r.exit_code, r.stdout)

The client finds the API through ``$SOMNA_ADDR`` (default: the local
``somna up`` at ``http://127.0.0.1:7477``) and sends ``$SOMNA_API_KEY`` as
``authorization: Bearer <key>`` when it is set. The asyncio flavour lives in
:mod:`somna.aio`. Every error is a :class:`SomnaError`; see
:mod:`somna.errors`.
"""

from ._common import DEFAULT_ADDR
from .apps import App, AppInfo, AppReplica
from .errors import (
    AlreadyExistsError,
    ApiError,
    AuthenticationError,
    CommandExitError,
    CommandTimeoutError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    RequestTimeoutError,
    ResourceExhaustedError,
    SandboxNotFoundError,
    SomnaConnectionError,
    SomnaError,
    UnavailableError,
    UnimplementedError,
)
from .sandbox import Client, Files, Process, Sandbox
from .types import ExecResult, FileInfo, NetworkPolicy, SandboxInfo, TransferStats

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_ADDR",
    "Client",
    "Sandbox",
    "App",
    "AppInfo",
    "AppReplica",
    "Files",
    "Process",
    "ExecResult",
    "FileInfo",
    "SandboxInfo",
    "NetworkPolicy",
    "TransferStats",
    "SomnaError",
    "ApiError",
    "SomnaConnectionError",
    "AuthenticationError",
    "PermissionDeniedError",
    "NotFoundError",
    "SandboxNotFoundError",
    "InvalidArgumentError",
    "AlreadyExistsError",
    "FailedPreconditionError",
    "ResourceExhaustedError",
    "RequestTimeoutError",
    "UnavailableError",
    "UnimplementedError",
    "CommandTimeoutError",
    "CommandExitError",
]
