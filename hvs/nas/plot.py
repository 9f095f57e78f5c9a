"""Plots of a search history: reward vs iteration (with the running best) and reward vs MFLOPs.

matplotlib is optional (``pip install 'hvs[plot]'``) and imported only here."""

from __future__ import annotations

import json
from pathlib import Path

from .common import NASError


def plot_history(history: list[dict] | str | Path, out: str | Path, title: str | None = None) -> Path:
    """Write a two-panel PNG of a search's history (records, or a search folder / history.json)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install 'hvs[plot]'") from None
    if not isinstance(history, list):
        path = Path(history)
        history = json.loads((path / "history.json" if path.is_dir() else path).read_text())
    if not history:
        raise NASError("the search history is empty: nothing to plot")
    it = [r["iteration"] for r in history]
    reward = [r["reward"] for r in history]
    mflops = [r["flops"] / 1e6 for r in history]
    best_so_far, best = [], float("-inf")
    for r in reward:
        best = max(best, r)
        best_so_far.append(best)
    top = max(range(len(reward)), key=lambda i: reward[i])
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.scatter(it, reward, s=8, alpha=0.5, label="candidate")
    a.plot(it, best_so_far, color="C3", label="best so far")
    a.set_xlabel("iteration (0 = initial population)")
    a.set_ylabel("reward")
    a.legend(loc="lower right")
    b.scatter(mflops, reward, s=8, alpha=0.5)
    b.scatter([mflops[top]], [reward[top]], color="C3", marker="*", s=120, label="best")
    b.set_xlabel("query MFLOPs")
    b.set_ylabel("reward")
    b.legend(loc="lower right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
