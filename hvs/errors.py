"""The one base class of every error hvs expects and explains.

An :class:`HVSError` is a problem with what the user asked for or gave (a missing file, a corrupt
model folder, a query model made for another gallery): its message is one line that names the
problem, and the CLI prints just that line. Any other exception is a bug in hvs and keeps its
traceback. Each area of the library has its own subclass (``DataError``, ``CheckpointError``,
``IndexStoreError``, ...); they stay ``ValueError``\\ s for callers that catch that.
"""

from __future__ import annotations

import warnings


class HVSError(ValueError):
    """An expected, explained failure (one-line message)."""


class SearchError(HVSError):
    """A search that cannot run as asked (one-line message)."""


class ExportError(HVSError):
    """An export (or an exported file) that cannot be used: one-line message."""


class ConfigError(HVSError):
    """An option that names nothing registered (model, loss) or takes a value it cannot have."""


class UsageError(HVSError):
    """A command used in a way that cannot work: a malformed ``KEY=VALUE``, flags that need each
    other, an optional dependency that is not installed."""


class HVSWarning(UserWarning):
    """Something that deserves the user's attention; printed as one line ``hvs: warning: ...``
    (no Python source line), and still a normal warning for ``pytest.warns`` and ``-W error``."""


_format_default = warnings.formatwarning


def _formatwarning(message, category, filename, lineno, line=None) -> str:
    if isinstance(category, type) and issubclass(category, HVSWarning):
        return f"hvs: warning: {' '.join(str(message).split())}\n"
    return _format_default(message, category, filename, lineno, line)


warnings.formatwarning = _formatwarning

__all__ = ["ConfigError", "ExportError", "HVSError", "HVSWarning", "SearchError", "UsageError"]
