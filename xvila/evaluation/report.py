"""Tables (Markdown) and plots (PNG, matplotlib) of benchmark summaries."""

from __future__ import annotations

import os

from xvila.evaluation.stats import cell
from xvila.fileio import atomic_path

TYPES = ("VID2IMG", "VID2VID", "IMG2VID", "AUD2VID", "IMG+AUD2VID", "VID2AUD")  # the paper's column order
MODE_LABELS = {"text": "Text-Aligned", "ta": "TA", "veh": "TA+VEH"}
# Paper Table 2 (ActivityNet Captions), X²A: VID2IMG, VID2VID, IMG2VID.
PAPER_TABLE2 = {
    "Next-GPT": (27.85, 10.47, 13.08),
    "X-VILA w/ X2X text (TA)": (36.09, 46.18, 45.93),
    "X-VILA + VEH (img)": (44.06, 46.68, 45.94),
    "X-VILA + VEH (img+vid), final": (43.95, 49.76, 48.81),
}


def _find(summary: list[dict], **match) -> dict:
    for s in summary:
        if all(s.get(k) == v for k, v in match.items()):
            return s
    return {"n": 0}


def _types(summary: list[dict]) -> list[str]:
    present = {s["type"] for s in summary}
    return [t for t in TYPES if t in present] + sorted(present - set(TYPES))


def modes_table(summary: list[dict], modes: list[str]) -> str:
    """Rows: decoding modes; columns: conversation types; cells "mean [low, high]"."""
    types = _types(summary)
    lines = ["| decoding | " + " | ".join(types) + " |", "|---|" + "---|" * len(types)]
    for mode in modes:
        row = [cell(_find(summary, type=t, mode=mode)) for t in types]
        lines.append(f"| {MODE_LABELS.get(mode, mode)} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def alpha_table(summary: list[dict], alphas: list[float]) -> str:
    """Rows: conditioning rate α; columns: conversation types."""
    types = _types(summary)
    lines = ["| α | " + " | ".join(types) + " |", "|---|" + "---|" * len(types)]
    for a in alphas:
        lines.append(f"| {a:g} | " + " | ".join(cell(_find(summary, type=t, alpha=a)) for t in types) + " |")
    return "\n".join(lines)


def counts_line(summary: list[dict]) -> str:
    n = {}
    for s in summary:
        n[s["type"]] = max(n.get(s["type"], 0), s["n"])
    return "Samples per type: " + ", ".join(f"{t} {n[t]}" for t in _types(summary)) + "."


def paper_table2() -> str:
    lines = ["| paper, Table 2 (ActivityNet) | VID2IMG | VID2VID | IMG2VID |", "|---|---|---|---|"]
    lines += [f"| {name} | " + " | ".join(f"{v:.2f}" for v in values) + " |" for name, values in PAPER_TABLE2.items()]
    return "\n".join(lines)


def _save(fig, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, safe in threads and on servers
    import matplotlib.pyplot as plt

    return plt


def plot_modes(summary: list[dict], modes: list[str], path: str | os.PathLike, title: str) -> None:
    """Grouped bars: one group per conversation type, one bar per decoding mode, 95 % intervals."""
    plt = _pyplot()
    types = _types(summary)
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(types), 4.2))
    width = 0.8 / max(1, len(modes))
    for i, mode in enumerate(modes):
        xs, ys, err = [], [], [[], []]
        for j, t in enumerate(types):
            s = _find(summary, type=t, mode=mode)
            if s.get("n"):
                xs.append(j + (i - (len(modes) - 1) / 2) * width)
                ys.append(s["mean"])
                err[0].append(s["mean"] - s["low"])
                err[1].append(s["high"] - s["mean"])
        ax.bar(xs, ys, width, yerr=err, capsize=3, label=MODE_LABELS.get(mode, mode))
    ax.set_xticks(range(len(types)), types)
    ax.set_ylabel("X²A score (ImageBind cosine ×100)")
    ax.set_xlabel("conversation type (error bars: 95 % bootstrap interval)")
    ax.set_title(title)
    ax.legend(title="decoding")
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)
    plt.close(fig)


def plot_alpha(summary: list[dict], alphas: list[float], path: str | os.PathLike, title: str) -> None:
    """Mean X²A against the conditioning rate α, one line per type, 95 % intervals shaded."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for t in _types(summary):
        pts = [(a, _find(summary, type=t, alpha=a)) for a in alphas]
        pts = [(a, s) for a, s in pts if s.get("n")]
        if not pts:
            continue
        xs = [a for a, _ in pts]
        line, = ax.plot(xs, [s["mean"] for _, s in pts], marker="o", label=t)
        ax.fill_between(xs, [s["low"] for _, s in pts], [s["high"] for _, s in pts], color=line.get_color(), alpha=0.2)
    ax.set_xlabel("VEH conditioning rate α (share of denoising steps with the highway)")
    ax.set_ylabel("X²A score (ImageBind cosine ×100)")
    ax.set_title(title)
    ax.legend(title="type (band: 95 % interval)")
    ax.grid(alpha=0.3)
    _save(fig, path)
    plt.close(fig)
