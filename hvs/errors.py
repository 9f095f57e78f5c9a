"""The one base class of every error hvs expects and explains.

An :class:`HVSError` is a problem with what the user asked for or gave (a missing file, a corrupt
model folder, a query model made for another gallery): its message is one line that names the
problem, and the CLI prints just that line. Any other exception is a bug in hvs and keeps its
traceback. Each area of the library has its own subclass (``DataError``, ``CheckpointError``,
``IndexStoreError``, ...); they stay ``ValueError``\\ s for callers that catch that.
"""

from __future__ import annotations


class HVSError(ValueError):
    """An expected, explained failure (one-line message)."""


class SearchError(HVSError):
    """A search that cannot run as asked (one-line message)."""


class ExportError(HVSError):
    """An export (or an exported file) that cannot be used: one-line message."""


__all__ = ["ExportError", "HVSError", "SearchError"]
