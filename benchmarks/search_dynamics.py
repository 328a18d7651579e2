"""Where alpha goes in a search and what moves it: a table and plots over search workdirs.

    python -m benchmarks.search_dynamics RUNS/lambda* --out RUNS

For every workdir (its `search/g{i}/metrics.jsonl`) and group: alpha at the start (softmax of the
initial beta) and after every epoch, how far beta moved (from `alpha.json`) against lr x steps
(Adam's move under a steady one-signed gradient; no bound: a gradient that grows after a quieter
stretch moves beta further), and, averaged over the steps (each metrics.jsonl row, the mean of
the steps since the previous one, weighted by their number), the two forces on beta that the
search logs: |dL_val/dbeta_j| (`train/beta_grad/j`, the bridge loss's gradient) and
|lambda * beta_j| (`train/val/beta_l2_pull/j`, the coupled L2's pull toward beta = 0, i.e.
uniform alpha), with the net push (the loss's gradient averaged with its sign, where the run
logged it) and the ST path's share of the loss gradient. Writes `search_dynamics.md` (the
table), `search_dynamics.jsonl` (one line per workdir and group), `alpha_trajectories.png` and
`beta_forces.png` into --out. A search still running, or killed, is read up to its last row.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from dfa_jax import files
from dfa_jax import reporting


def _rows(path: str) -> list[dict]:
    return [json.loads(line) for line in files.read_text(path).splitlines() if line.strip()]


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def _row_weights(train_rows: list[dict]) -> np.ndarray:
    """How many steps each train row of a stage's metrics.jsonl averages: the training loop logs,
    at step s, the mean of the steps since its previous train row (the first, since the stage's
    step 0). Epoch ends and checkpoints cut intervals short, so rows cover unequal step counts."""
    steps = np.array([r["step"] for r in train_rows])
    return np.diff(steps, prepend=0)


def group_dynamics(workdir: str) -> list[dict]:
    """Per group of one search workdir: steps, alpha start / per epoch / end, mean forces.

    A group without its result.json (its search still running, or killed) counts the steps of
    its last row, has `finished` False and no `beta_end`."""
    config = files.read_json(os.path.join(workdir, "config.json"))
    search = config["search"]
    alpha_file = os.path.join(workdir, "alpha.json")
    final = files.read_json(alpha_file)["groups"] if os.path.exists(alpha_file) else []
    out, group = [], 1
    while os.path.exists(path := os.path.join(workdir, "search", f"g{group}", "metrics.jsonl")):
        rows = _rows(path)
        train = [r for r in rows if "epoch" not in r]
        if not train or "train/beta_grad/0" not in train[0]:
            # A group of one map (alpha = 1, its beta is not searched), or one with no row yet.
            group += 1
            continue
        epochs = [r for r in rows if "epoch" in r]
        n = sum(1 for k in train[0] if k.startswith("train/beta_grad/"))
        beta0 = np.zeros(n)
        beta0[-1] = search["init_last_logit"]
        weights = _row_weights(train)
        result_path = os.path.join(os.path.dirname(path), "result.json")
        finished = os.path.exists(result_path)
        if finished:
            steps = files.read_json(result_path)["steps"]
        else:
            steps = train[-1]["step"]
            print(
                f"{workdir}: search group {group} has no result.json (running or killed):"
                f" read up to its step {steps}"
            )

        def mean(key):
            return float(np.average([r[key] for r in train], weights=weights))

        grad = [mean(f"train/beta_grad/{j}") for j in range(n)]
        pull = [mean(f"train/val/beta_l2_pull/{j}") for j in range(n)]
        # The net push (mean signed gradient) where the run logged it.
        signed = (
            [mean(f"train/beta_grad_signed/{j}") for j in range(n)]
            if "train/beta_grad_signed/0" in train[0]
            else None
        )
        out.append(
            {
                "workdir": os.path.basename(os.path.normpath(workdir)),
                "group": group,
                "beta_lr": search["beta_lr"],
                "lambda": search["beta_weight_decay"],
                "w_schedule": search.get("w_schedule", "global"),
                "steps": steps,
                "finished": finished,
                "alpha_start": _softmax(beta0).tolist(),
                "alpha_epochs": [[r[f"alpha/g{group}/{j}"] for j in range(n)] for r in epochs],
                "beta_grad": grad,
                "beta_l2_pull": pull,
                "beta_grad_signed": signed,
                "share_st": mean("train/beta_share_st"),
                "beta_start": beta0.tolist(),
                "beta_end": final[group - 1]["beta"] if finished and len(final) >= group else None,
            }
        )
        group += 1
    return out


def table(records: list[dict]) -> str:
    """A markdown table: one row per workdir and group."""
    lines = [
        "| run | group | steps | alpha start | alpha end | beta moved (first / last map) | lr*steps "
        "(a steady push's move) | mean abs dL/dbeta (last map) | mean abs lambda*beta (last map) "
        "| pull / grad | mean dL/dbeta, signed (first / last map) | ST share of the gradient |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        fmt = " / ".join
        pull, grad = r["beta_l2_pull"][-1], r["beta_grad"][-1]
        ratio = f"{pull / grad:.3g}" if grad > 0 else "inf"
        moved = (
            "–"
            if r["beta_end"] is None
            else fmt(
                f"{e - b:+.3f}"
                for b, e in (
                    (r["beta_start"][0], r["beta_end"][0]),
                    (r["beta_start"][-1], r["beta_end"][-1]),
                )
            )
        )
        # The net push (the loss's gradient averaged with its sign): runs that logged it.
        signed = r.get("beta_grad_signed")
        push = "–" if signed is None else fmt(f"{g:+.2e}" for g in (signed[0], signed[-1]))
        # A search still running or killed: its steps so far, alpha after its last epoch, if any.
        steps = f"{r['steps']}" if r.get("finished", True) else f"{r['steps']} (unfinished)"
        end = fmt(f"{a:.3f}" for a in r["alpha_epochs"][-1]) if r["alpha_epochs"] else "–"
        lines.append(
            f"| {r['workdir']} | {r['group']} | {steps} "
            f"| {fmt(f'{a:.3f}' for a in r['alpha_start'])} "
            f"| {end} "
            f"| {moved} | {r['beta_lr'] * r['steps']:.3f} "
            f"| {grad:.3g} | {pull:.3g} | {ratio} | {push} | {r['share_st']:.3f} |"
        )
    return "\n".join(lines)


def plot(records: list[dict], out: str) -> None:
    """alpha_trajectories.png (alpha of every map but the last per epoch, epoch 0 = start) and
    beta_forces.png (mean |dL/dbeta_j| against mean |lambda beta_j| per group), one row per run."""
    plt = reporting._pyplot()  # noqa: SLF001  (the package's headless matplotlib)
    runs = sorted({r["workdir"] for r in records})
    groups = max(r["group"] for r in records)
    for name, draw in (("alpha_trajectories", _draw_alpha), ("beta_forces", _draw_forces)):
        fig, axes = plt.subplots(
            len(runs), groups, figsize=(3.6 * groups, 2.6 * len(runs)), squeeze=False
        )
        for r in records:
            ax = axes[runs.index(r["workdir"])][r["group"] - 1]
            draw(ax, r)
            ax.set_title(f"{r['workdir']} g{r['group']}", fontsize=8)
        fig.tight_layout()
        reporting._save_png(fig, os.path.join(out, f"{name}.png"))  # noqa: SLF001


def _draw_alpha(ax, r):
    # The earlier maps' alpha, on an axis fitted to them: at the paper's beta lr a few hundred
    # steps move alpha by thousandths, invisible on [0, 1]. (The last map's is 1 minus their sum.)
    alphas = np.array([r["alpha_start"]] + r["alpha_epochs"])
    for j in range(alphas.shape[1] - 1):
        ax.plot(range(len(alphas)), alphas[:, j], marker="o", label=f"map {j + 1}")
    ax.set_xlabel("search epoch", fontsize=7)
    ax.set_ylabel("alpha", fontsize=7)
    ax.legend(fontsize=6)


def _draw_forces(ax, r):
    x = np.arange(len(r["beta_grad"]))
    ax.bar(x - 0.2, r["beta_grad"], 0.4, label="|dL/dbeta|")
    ax.bar(x + 0.2, r["beta_l2_pull"], 0.4, label="|lambda beta|")
    ax.set_yscale("log")
    # A fixed span of decades: equal bars must look equal, and a zero pull (lambda = 0) absent.
    top = max(r["beta_grad"] + r["beta_l2_pull"])
    ax.set_ylim(top / 1e3, top * 3)
    ax.set_xticks(x, [f"map {j + 1}" for j in x], fontsize=7)
    ax.legend(fontsize=6)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdirs", nargs="+", help="search workdirs")
    parser.add_argument("--out", required=True, help="directory for the table and plots")
    args = parser.parse_args(argv)
    records = [r for w in args.workdirs for r in group_dynamics(w)]
    os.makedirs(args.out, exist_ok=True)
    text = table(records)
    print(text)
    files.write_text_atomic(os.path.join(args.out, "search_dynamics.md"), text + "\n")
    files.write_text_atomic(
        os.path.join(args.out, "search_dynamics.jsonl"),
        "".join(json.dumps(r) + "\n" for r in records),
    )
    plot(records, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
