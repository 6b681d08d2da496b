"""PNG figures of harp-bench results (matplotlib, headless Agg backend). One function per figure."""

from __future__ import annotations

import os
from typing import Any

from harp.io import atomic_writer

CURVE_TITLES = {"linf": "PGD L-inf", "l2": "PGD L2", "l0": "greedy L0 (pixels)"}
CURVE_XLABELS = {"linf": "eps (L-inf, pixel scale)", "l2": "eps (L2)", "l0": "pixels changed"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def latency_plot(result: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """p50 latency per backend (bars) with the p50..p90 spread, one panel per thread count, log scale."""
    plt = _pyplot()
    rows = result["results"]
    threads = sorted({r["threads"] for r in rows})
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(threads), figsize=(4 + 2.5 * len(batches) * len(threads), 4), squeeze=False)
    width = 0.8 / len(backends)
    for ax, t in zip(axes[0], threads):
        for i, backend in enumerate(backends):
            cells = {r["batch"]: r for r in rows if r["threads"] == t and r["backend"] == backend}
            xs = [j + i * width for j, b in enumerate(batches) if b in cells]
            p50 = [cells[b]["p50_ms"] for b in batches if b in cells]
            p90 = [cells[b]["p90_ms"] - cells[b]["p50_ms"] for b in batches if b in cells]
            ax.bar(xs, p50, width, yerr=[[0] * len(p50), p90], capsize=3, label=backend)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(batches))], [f"batch {b}" for b in batches])
        ax.set_yscale("log")
        ax.set_ylabel("latency per call, ms (p50, bar to p90)")
        ax.set_title(f"{t} thread{'s' if t > 1 else ''}")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{result['artifact']['name']}: latency by backend")
    fig.tight_layout()
    _save(fig, path)


def curves_plot(curves: dict[str, dict[str, Any]], path: str | os.PathLike[str]) -> None:
    """Accuracy vs budget, one panel per threat model, one line per artifact (`{name: curves}`)."""
    plt = _pyplot()
    kinds = [k for k in CURVE_TITLES if any(k in c for c in curves.values())]
    fig, axes = plt.subplots(1, max(1, len(kinds)), figsize=(4.5 * max(1, len(kinds)), 3.8), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for name, c in curves.items():
            if kind in c:
                ax.plot(c[kind]["budgets"], c[kind]["accuracy"], marker="o", label=name)
        ax.set_title(CURVE_TITLES[kind])
        ax.set_xlabel(CURVE_XLABELS[kind])
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def sparsity_plot(layers: list[dict[str, Any]], overall: float, title: str, path: str | os.PathLike[str]) -> None:
    """Density (nonzero / params) per prunable layer, log scale, with the overall density as a line."""
    plt = _pyplot()
    names = [layer["name"] for layer in layers]
    density = [max(layer["density"], 1e-6) for layer in layers]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.45 * len(names) + 2), 4))
    ax.bar(range(len(names)), density, color="tab:blue")
    ax.axhline(1 - overall, color="tab:red", linestyle="--", label=f"overall {1 - overall:.2%} dense")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("density (nonzero / params)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path: str | os.PathLike[str]) -> None:
    """Write the figure as PNG atomically (a temp file renamed into place), then free it."""
    with atomic_writer(path) as f:
        fig.savefig(f, dpi=120, format="png")
    _pyplot().close(fig)
