"""The speedup plot: per preset and fused provider, one panel per (level, dtype, mode)."""
from __future__ import annotations

from pathlib import Path

from resaspp_ops.bench.providers import FUSED_BACKENDS


def plot_speedups(doc: dict, path: Path) -> None:
    """Grouped bars of speedup_vs_best_baseline (1.0 = as fast as the best PyTorch baseline)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    rows = [r for r in doc["rows"] if r["provider"] in FUSED_BACKENDS and r["speedup_vs_best_baseline"] is not None]
    panels = list(dict.fromkeys((r["level"], r["dtype"], r["mode"]) for r in rows))
    cols = min(3, max(1, len(panels)))
    nrows = max(1, -(-len(panels) // cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(6 * cols, 3.6 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    if not panels:
        ax = axes.flat[0]
        ax.set_visible(True)
        ax.axis("off")
        ax.text(0.5, 0.5, "no fused provider was timed", ha="center", va="center")
    providers = [p for p in FUSED_BACKENDS if any(r["provider"] == p for r in rows)]
    width = 0.8 / max(1, len(providers))
    for ax, (level, dtype, mode) in zip(axes.flat, panels):
        mine = [r for r in rows if (r["level"], r["dtype"], r["mode"]) == (level, dtype, mode)]
        groups = list(dict.fromkeys((r["preset"], tuple(r["rates"])) for r in mine))
        for k, provider in enumerate(providers):
            speedup = {(r["preset"], tuple(r["rates"])): r["speedup_vs_best_baseline"]
                       for r in mine if r["provider"] == provider}
            xs = [i + (k - (len(providers) - 1) / 2) * width for i, g in enumerate(groups) if g in speedup]
            bars = ax.bar(xs, [speedup[g] for g in groups if g in speedup], width, label=provider)
            ax.bar_label(bars, fmt="%.3g", fontsize=6)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")  # ratios: 0.5x and 2x are equally far from 1
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        low, high = ax.get_ylim()
        # Under about a decade there are no major ticks to read: label the minor ones instead.
        label_minor = high / low < 30
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _, show=label_minor: f"{v:g}" if show else ""))
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([f"{p}\n{','.join(map(str, r))}" for p, r in groups], fontsize=7)
        ax.set_title(f"{level}, {dtype}, {mode}", fontsize=9)
        ax.set_ylabel("speedup vs best baseline")
        ax.legend(fontsize=7)
    meta = doc["meta"]
    fig.suptitle(f"resaspp bench: {meta['device']}, {meta['date'][:10]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
