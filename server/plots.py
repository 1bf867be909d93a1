"""Accuracy-per-round plot of a run's history."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_history(rows: list[dict], path: Path, title: str) -> None:
    """Plot site-mean, worst-site and global accuracy per round to `path`."""
    if not rows:
        return
    rounds = [r["round"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    series = [
        ("eval", "acc", "site mean (local test)"),
        ("eval", "worst_site_acc", "worst site"),
        ("global", "acc", "global test"),
        ("eval", "teacher_acc", "teacher probe (site mean)"),
    ]
    for section, key, label in series:
        ys = [r.get(section, {}).get(key) for r in rows]
        if any(y is not None for y in ys):
            ax.plot(
                rounds,
                [y if y is not None else float("nan") for y in ys],
                marker="o",
                label=label,
            )
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
