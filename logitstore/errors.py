"""User-facing errors.

Every error a user can cause (bad flags, bad data, a damaged or hostile store) is raised as a
:class:`LogitStoreError` whose message is one line naming the file or field and what was expected.
The CLIs print that line and exit non-zero; they never show a traceback for these.
"""

from __future__ import annotations


class LogitStoreError(Exception):
    """A problem the user can fix: bad input, bad settings or a damaged store."""


class FormatError(LogitStoreError):
    """A store does not conform to the format spec (``FORMAT.md``), or fails a checksum."""


class ConfigError(LogitStoreError):
    """Settings that cannot work together, or that disagree with an existing store."""


class StorageError(LogitStoreError):
    """Writing to the store's filesystem failed (disk full, permission denied, a remote error)."""
