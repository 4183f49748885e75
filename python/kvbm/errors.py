"""Python exceptions for kvbm's errors.

Every ``kvbm::ErrorCode`` that the C++ core returns is raised as one class below; the
extension (src/python/core_bindings.cpp) looks the class up here by name when it raises, so
``except kvbm.errors.ResourceExhaustedError`` always matches what the core raises. Each raised
exception carries ``.code``, the C++ code's name (``"ResourceExhausted"``, ``"Config"``, ...).

Where a built-in exception means the same thing, the class also derives from it, so code that
catches ``ValueError``, ``KeyError``, ``OSError`` or ``TimeoutError`` keeps working.
"""

import builtins

__all__ = [
    "KvbmError",
    "InvalidArgumentError",
    "NotFoundError",
    "ResourceExhaustedError",
    "IoError",
    "CorruptError",
    "TimeoutError",
    "UnavailableError",
    "CancelledError",
    "FailedPreconditionError",
    "InternalError",
    "ConfigError",
    "InvariantError",
]


class KvbmError(Exception):
    """Base of every error kvbm raises."""

    code = "Internal"


class InvalidArgumentError(KvbmError, ValueError):
    """The caller passed something malformed."""

    code = "InvalidArgument"


class NotFoundError(KvbmError, KeyError):
    """A hash, block or request that is not there."""

    code = "NotFound"

    def __str__(self) -> str:  # KeyError quotes its argument; a message reads better plain
        return str(self.args[0]) if self.args else ""


class ResourceExhaustedError(KvbmError):
    """A tier or queue is full."""

    code = "ResourceExhausted"


class IoError(KvbmError, OSError):
    """The OS refused a read or a write."""

    code = "IoError"


class CorruptError(KvbmError):
    """Bytes read back are not the bytes that were stored."""

    code = "Corrupt"


class TimeoutError(KvbmError, builtins.TimeoutError):  # noqa: A001 - kvbm's own, also a builtin one
    """An operation did not finish in time."""

    code = "Timeout"


class UnavailableError(KvbmError):
    """A peer (worker, remote store) is gone."""

    code = "Unavailable"


class CancelledError(KvbmError):
    """The operation was cancelled."""

    code = "Cancelled"


class FailedPreconditionError(KvbmError):
    """The object is in the wrong state for the call."""

    code = "FailedPrecondition"


class InternalError(KvbmError):
    """A failure inside kvbm that has no better code."""

    code = "Internal"


class ConfigError(KvbmError, ValueError):
    """Bad configuration; the message names the setting and the value."""

    code = "Config"


class InvariantError(KvbmError, RuntimeError):
    """A broken invariant: a bug in kvbm, or a caller that broke a documented precondition."""

    code = "Invariant"
