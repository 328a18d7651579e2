"""What a run tells its user: `summary.json` in the workdir and a printed results table."""

from __future__ import annotations

import io
import os

import numpy as np

from dfa_jax import files

SUMMARY_FILE = "summary.json"
_LABELS = {"distill/none": "student alone", "distill/dfa": "student + DFA"}


def write_summary(workdir: str, summary: dict) -> str:
    path = os.path.join(workdir, SUMMARY_FILE)
    files.write_json_atomic(path, summary)
    return path


def results_table(stages: dict) -> str:
    """A markdown table: one row per trained network with its best and last test accuracy (%)."""
    lines = [
        "| stage | best acc (%) | best epoch | last acc (%) | epochs | wall time (s) |",
        "|---|---|---|---|---|---|",
    ]
    for name, result in stages.items():
        if "best_accuracy" not in result:
            continue
        stage, _, seed = name.partition("/seed")
        name = _LABELS.get(stage, stage.replace("distill/", "student + "))
        if seed:
            name += f" (seed {seed})"
        best_epoch = result.get("best_epoch", "-")
        epochs = result.get("epochs", "-")
        wall = result.get("wall_time_s")
        lines.append(
            f"| {name} | {100 * result['best_accuracy']:.2f} | {best_epoch} |"
            f" {100 * result['last_accuracy']:.2f} | {epochs} | {'-' if wall is None else f'{wall:.0f}'} |"
        )
    return "\n".join(lines)


def load_summary(workdir: str) -> dict:
    return files.read_json(os.path.join(workdir, SUMMARY_FILE))


def alpha_table(record: list[dict]) -> str:
    """The searched alpha per group, one line each: `g1: g1_b1 0.12, g1_b2 0.88`."""
    return "\n".join(
        f"g{r['group']}: " + ", ".join(f"{n} {a:.3f}" for n, a in zip(r["layers"], r["alpha"]))
        for r in record
    )


def _pyplot():
    import matplotlib  # pylint: disable=g-import-not-at-top

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

    return plt


def _save_png(fig, path: str) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    _pyplot().close(fig)
    files.write_bytes_atomic(path, buffer.getvalue())


def plot_alpha_heatmap(record: list[dict], path: str) -> None:
    """Groups x teacher layers heatmap of alpha (the paper's Fig. 4, left); blank = no layer."""
    plt = _pyplot()
    width = max(len(r["alpha"]) for r in record)
    grid = np.full((len(record), width), np.nan)
    for i, r in enumerate(record):
        grid[i, : len(r["alpha"])] = r["alpha"]
    fig, ax = plt.subplots(figsize=(2.5 + 0.9 * width, 1.2 + 0.7 * len(record)))
    image = ax.imshow(grid, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    for i, r in enumerate(record):
        for j, a in enumerate(r["alpha"]):
            ax.text(j, i, f"{a:.2f}", ha="center", va="center", color="w" if a < 0.6 else "k")
    ax.set_yticks(range(len(record)), [f"group {r['group']}" for r in record])
    ax.set_xticks(range(width), [f"layer {j + 1}" for j in range(width)])
    ax.set_title("aggregation weights alpha")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    _save_png(fig, path)


def change_axis_limit(changes) -> float:
    """Half the y range of a panel of alpha changes: the largest change, padded by a tenth, at
    least 1e-3. A search often moves alpha by thousandths, which an axis of [0, 1] draws flat."""
    return max(1.1 * max((abs(c) for c in changes), default=0.0), 1e-3)


def plot_alpha_trajectories(history: list[dict], record: list[dict], path: str) -> None:
    """How far the search moved each teacher layer's alpha from its start, against the search
    epoch (0 = the start; `history` has a row for it), one panel per group, each on an axis
    fitted to its changes (`change_axis_limit`); the legend gives each layer's starting alpha,
    and the heatmap the final ones."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(record), figsize=(4 * len(record), 3.2), squeeze=False)
    for ax, r in zip(axes[0], record):
        rows = sorted((h for h in history if h["group"] == r["group"]), key=lambda h: h["epoch"])
        epochs = [h["epoch"] for h in rows]
        drawn = []
        for j, name in enumerate(r["layers"]):
            values = [h[f"alpha/g{r['group']}/{j}"] for h in rows]
            changes = [v - values[0] for v in values] if values else []
            start = f" (start {values[0]:.3f})" if values else ""
            ax.plot(epochs, changes, marker="o", label=f"{name}{start}")
            drawn += changes
        ax.axhline(0.0, color="0.7", linewidth=0.8)
        ax.set_title(f"group {r['group']}")
        ax.set_xlabel("search epoch")
        limit = change_axis_limit(drawn)
        ax.set_ylim(-limit, limit)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("alpha - alpha at the start")
    fig.tight_layout()
    _save_png(fig, path)
