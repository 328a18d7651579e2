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
        if name == "search" and "ts_path_best_accuracy" in result:
            # The search trains no network of its own to score: its row is the last group's
            # teacher-to-student path (the student's later groups reading the aggregation).
            last = result["by_group"][f"g{result['groups']}"]
            epochs = f"{result['groups']} x {result['epochs_per_group']}"
            lines.append(
                f"| search (last group's teacher-to-student path) |"
                f" {100 * result['ts_path_best_accuracy']:.2f} | {last['best_epoch']} |"
                f" {100 * result['ts_path_last_accuracy']:.2f} | {epochs} |"
                f" {result['wall_time_s']:.0f} |"
            )
            continue
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


def plot_alpha_heatmap(record: list[dict], path: str, start: list[dict] | None = None) -> None:
    """Groups x teacher maps heatmap of alpha (the paper's Fig. 4, left); blank = no map. With
    `start` (the search's starting `alpha_record`), each cell also gives its starting alpha: on
    a scale of 0 to 1 a search that moved alpha by hundredths looks like its start."""
    plt = _pyplot()
    width = max(len(r["alpha"]) for r in record)
    grid = np.full((len(record), width), np.nan)
    for i, r in enumerate(record):
        grid[i, : len(r["alpha"])] = r["alpha"]
    fig, ax = plt.subplots(figsize=(2.8 + 1.0 * width, 1.5 + 0.7 * len(record)))
    image = ax.imshow(grid, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    for i, r in enumerate(record):
        for j, a in enumerate(r["alpha"]):
            text = f"{a:.3f}" if start is None else f"{a:.3f}\n({start[i]['alpha'][j]:.3f})"
            color = "w" if a < 0.6 else "k"
            ax.text(j, i, text, ha="center", va="center", color=color, fontsize=8)
    ax.set_yticks(range(len(record)), [f"group {r['group']}" for r in record])
    ax.set_xticks(range(width), [f"map {j + 1}" for j in range(width)])
    ax.set_xlabel("teacher map of the group, first to last")
    title = "aggregation weights alpha"
    ax.set_title(title if start is None else f"{title}\n(in brackets: at the search's start)")
    fig.colorbar(image, ax=ax, label="alpha")
    fig.tight_layout()
    _save_png(fig, path)


def change_axis_limit(changes) -> float:
    """Half the y range of a panel of alpha changes: the largest change, padded by a tenth, at
    least 1e-3. A search often moves alpha by thousandths, which an axis of [0, 1] draws flat."""
    return max(1.1 * max((abs(c) for c in changes), default=0.0), 1e-3)


def plot_alpha_trajectories(history: list[dict], record: list[dict], path: str) -> None:
    """How far the search moved each teacher map's alpha from its start, against the search
    epoch (0 = the start; `history` has a row for it), one panel per group, all on one axis
    fitted to the largest change (`change_axis_limit`), so panels compare; the legend gives each
    map's starting alpha, the heatmap the final ones. A group of two maps draws its first: the
    last's change is its mirror image."""
    plt = _pyplot()
    fig, axes = plt.subplots(
        1, len(record), figsize=(4 * len(record), 3.2), squeeze=False, sharey=True
    )
    drawn = []
    for ax, r in zip(axes[0], record):
        rows = sorted((h for h in history if h["group"] == r["group"]), key=lambda h: h["epoch"])
        epochs = [h["epoch"] for h in rows]
        names = r["layers"][:1] if len(r["layers"]) == 2 else r["layers"]
        for j, name in enumerate(names):
            values = [h[f"alpha/g{r['group']}/{j}"] for h in rows]
            changes = [v - values[0] for v in values] if values else []
            start = f" (start {values[0]:.3f})" if values else ""
            mirror = f"; {r['layers'][1]}'s is minus this" if len(r["layers"]) == 2 else ""
            ax.plot(epochs, changes, marker="o", label=f"{name}{start}{mirror}")
            drawn += changes
        ax.axhline(0.0, color="0.7", linewidth=0.8)
        ax.set_title(f"group {r['group']}")
        ax.set_xlabel("search epoch")
        ax.legend(fontsize=7)
    limit = change_axis_limit(drawn)
    axes[0][0].set_ylim(-limit, limit)  # Shared by every panel.
    axes[0][0].set_ylabel("alpha - alpha at the start")
    fig.tight_layout()
    _save_png(fig, path)
