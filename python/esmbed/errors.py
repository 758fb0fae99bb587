"""The exceptions esmbed raises: one class per kind of failure the library tells apart.

Each carries the library's message: what was wrong, where (file, record, id) and what to do.
"""

from __future__ import annotations


class EsmbedError(Exception):
    """Base class of every esmbed error."""


class BadInputError(EsmbedError, ValueError):
    """The input is at fault: an unreadable record, a bad sequence (with ``strict=True``),
    duplicate ids, a missing column."""


class StorageError(EsmbedError, OSError):
    """Reading or writing a file or an object-store object failed."""


class ModelError(EsmbedError, RuntimeError):
    """The model could not be loaded or run: a missing tensor, a device failure, out of
    memory."""


class UsageError(EsmbedError, ValueError):
    """Options contradict each other or name nothing esmbed knows; or an output is in the way
    (pass ``overwrite=True`` or ``resume=True``)."""


class Interrupted(EsmbedError, KeyboardInterrupt):
    """The job was stopped by Ctrl-C. Finished parts are kept: the same ``embed_file`` call with
    ``resume=True`` continues it."""


class InternalError(EsmbedError, RuntimeError):
    """A bug in esmbed: please report it with the message."""


__all__ = [
    "EsmbedError",
    "BadInputError",
    "StorageError",
    "ModelError",
    "UsageError",
    "Interrupted",
    "InternalError",
]
