"""Exceptions raised by the Somna SDK.

Every exception is a :class:`SomnaError`. Errors from the API map one-to-one
to gRPC status codes and carry the server's message unchanged:

=========================  ==========================  =====================================
exception                  status                      typical cause
=========================  ==========================  =====================================
SomnaConnectionError       UNAVAILABLE (no connection) no server at the address
AuthenticationError        UNAUTHENTICATED             missing or wrong API key
PermissionDeniedError      PERMISSION_DENIED           the key may not do this
SandboxNotFoundError       NOT_FOUND                   unknown or destroyed sandbox
NotFoundError              NOT_FOUND                   a missing file or image
InvalidArgumentError       INVALID_ARGUMENT            bad sizes, paths, image names
AlreadyExistsError         ALREADY_EXISTS
FailedPreconditionError    FAILED_PRECONDITION         the sandbox is not running
ResourceExhaustedError     RESOURCE_EXHAUSTED          no room on the hosts, quotas
RequestTimeoutError        DEADLINE_EXCEEDED           ``request_timeout`` passed
UnavailableError           UNAVAILABLE (server said)   no host can serve the request
UnimplementedError         UNIMPLEMENTED               the server is older than the SDK
ApiError                   any other status            e.g. INTERNAL, DATA_LOSS
=========================  ==========================  =====================================

and two that do not come from a status:

* :class:`CommandTimeoutError`: a command ran past its ``timeout`` and was
  killed (its output so far is in ``.result``);
* :class:`CommandExitError`: ``check=True`` and the command exited non-zero.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:  # pragma: no cover
    from .types import ExecResult

__all__ = [
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


class SomnaError(Exception):
    """Base class of every SDK error.

    Attributes:
        message: The server's message (or the SDK's, for local errors).
        code: The gRPC status code name (e.g. ``"NOT_FOUND"``), or ``None``
            when the error did not come from the API.
    """

    code: Optional[str] = None

    def __init__(self, message: str, *, code: Optional[str] = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return self.message


class ApiError(SomnaError):
    """The API failed with a status that has no more specific class."""


class SomnaConnectionError(SomnaError, ConnectionError):
    """The SDK could not reach the Somna API (wrong address, server down)."""

    code = "UNAVAILABLE"


class AuthenticationError(SomnaError):
    """The API rejected the credentials: no API key, or a wrong or revoked one.

    Set ``SOMNA_API_KEY`` or pass ``api_key=``.
    """

    code = "UNAUTHENTICATED"


class PermissionDeniedError(SomnaError):
    """The API key is valid but may not do this."""

    code = "PERMISSION_DENIED"


class NotFoundError(SomnaError):
    """Something named in the call does not exist (a file, an image...)."""

    code = "NOT_FOUND"


class SandboxNotFoundError(NotFoundError):
    """The sandbox does not exist: it never did, or it was destroyed (also by
    its timeout)."""


class InvalidArgumentError(SomnaError, ValueError):
    """The request was rejected as invalid (sizes, paths, names)."""

    code = "INVALID_ARGUMENT"


class AlreadyExistsError(SomnaError):
    """What the call would create already exists."""

    code = "ALREADY_EXISTS"


class FailedPreconditionError(SomnaError):
    """The sandbox is not in a state that allows the call (e.g. it failed)."""

    code = "FAILED_PRECONDITION"


class ResourceExhaustedError(SomnaError):
    """No capacity or quota left for the request."""

    code = "RESOURCE_EXHAUSTED"


class RequestTimeoutError(SomnaError, TimeoutError):
    """The call did not complete within its deadline (``request_timeout``)."""

    code = "DEADLINE_EXCEEDED"


class UnavailableError(SomnaError):
    """The server is up but could not serve the request right now."""

    code = "UNAVAILABLE"


class UnimplementedError(SomnaError, NotImplementedError):
    """The server does not implement this call (it is older than the SDK)."""

    code = "UNIMPLEMENTED"


class CommandTimeoutError(SomnaError, TimeoutError):
    """A command ran longer than its ``timeout`` and was killed.

    Attributes:
        result: The :class:`~somna.ExecResult` with the output printed
            before it was killed.
    """

    def __init__(self, message: str, result: "ExecResult") -> None:
        super().__init__(message)
        self.result = result


class CommandExitError(SomnaError):
    """``check=True`` and the command exited with a non-zero code.

    Attributes:
        result: The :class:`~somna.ExecResult` (stdout, stderr, exit code).
    """

    def __init__(self, message: str, result: "ExecResult") -> None:
        super().__init__(message)
        self.result = result

    @property
    def exit_code(self) -> int:
        return self.result.exit_code
