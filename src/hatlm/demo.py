"""`hatlm demo`: the main job on a fresh machine, in under ten minutes on two CPU cores.

    hatlm demo [--out DIR]

1. generates a built-in reasoning task (no downloads): a training set at easy levels and held-out
   evaluation sets, written as JSONL into DIR/data/;
2. runs `hatlm compare` on it: the five arms (causal, pause, hybrid, looped, deep), same data,
   steps and seeds (3), tiny byte-level models;
3. prints the table (accuracy with 95% CIs, parameters, FLOPs, the hybrid's and the looped arm's
   accuracy as test-time thinking grows, the chance floor), a few predictions of each arm, and where the report is.

The size was calibrated on a 2-core CPU so that the arms visibly leave the chance floor within the
budget; the learning curves in DIR/learning_curves.png show it (or show that they did not).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

# The calibrated demo (see the module docstring). Everything a run needs is here, so the demo works
# from an installed package with no files; configs/demo.yaml mirrors the training part for
# `hatlm compare --config`.
DEMO_TASK = "nearest"
DEMO_TRAIN_DIFFICULTIES = [2, 3, 4]
DEMO_EVAL_DIFFICULTIES = [4, 8, 16]  # a trained level and two held-out ones (2x and 4x the longest trained)
DEMO_N_TRAIN = 20000
DEMO_N_EVAL = 300
DEMO_SEEDS = 3
DEMO_THINK_SWEEP = (1, 2, 4, 8)  # up to 4x the mean training depth (2)
DEMO_HALTING_THRESHOLD = 0.02  # adaptive depth: stop once ‖Δz‖/‖z‖ < 2% (about 3-4 iterations on nearest)
DEMO_TRAIN: dict[str, Any] = dict(
    preset="tiny-bytes",
    # think_iters_train "poisson": T per training step = 1 + Poisson(1), mean max_think_iters = 2 (the
    # test-time default), clipped to 6; the other recurrent-depth ingredients are HybridConfig defaults.
    model=dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, thinker_layers=1, thought_slots=4, max_think_iters=2,
               think_iters_train="poisson"),
    steps=1000,
    batch_size=32,
    lr=1e-3,  # at 3e-3 the hybrid was unstable (seed accuracies 41-95% on the trained level)
    min_lr=1e-4,
    warmup=30,
    weight_decay=0.1,
    eval_every=100,
    eval_max_examples=200,
    save_every=0,
    max_len=64,
    tensorboard=False,
)


# The ablation table of the report: the hybrid with one thinker ingredient switched off at a time (same
# seeds, data and recipe). Measured on this task (docs/issue8-thinking.md), these are the ones that matter;
# the others (sampled depth, interpolation, slot noise, truncation) changed nothing measurable, and each
# ablation costs 3 more hybrid runs of the demo's budget.
DEMO_ABLATIONS: dict[str, dict[str, Any]] = {
    "no state norm": {"state_norm": False},
    "no input injection": {"injection": "none"},
    "no relevance (attention and step)": {"reweight": False, "reweight_attention": False},
}


def demo(out_dir: str | Path = "hatlm-demo", *, steps: int | None = None, seeds: int = DEMO_SEEDS,
         n_train: int = DEMO_N_TRAIN, n_eval: int = DEMO_N_EVAL, think_sweep=DEMO_THINK_SWEEP,
         halting_threshold: float | None = DEMO_HALTING_THRESHOLD,
         train_overrides: dict[str, Any] | None = None, workers: int | None = None, progress: bool = True,
         show: int = 4, ablations: dict[str, dict[str, Any]] | None = None, file=None) -> dict[str, Any]:
    """Generate the task, compare the five arms, print the table and examples; returns compare's result."""
    from hatlm.compare import compare
    from hatlm.data import write_jsonl
    from hatlm.reports import print_table, write_report
    from hatlm.tasks import TASKS, make_split
    from hatlm.train import TrainConfig, apply_overrides

    file = file or sys.stdout
    out = Path(out_dir)
    t0 = time.perf_counter()
    fam = TASKS[DEMO_TASK]
    cfg = apply_overrides(TrainConfig(data=["-"]), {**DEMO_TRAIN, **(train_overrides or {})}, source="demo")
    if steps is not None:
        cfg = apply_overrides(cfg, {"steps": steps}, source="demo")
    print(f"hatlm demo — does thinking help beyond spending more compute?\n"
          f"Task '{DEMO_TASK}': {fam.description}.\n"
          f"Training on levels {DEMO_TRAIN_DIFFICULTIES}, testing on {DEMO_EVAL_DIFFICULTIES} "
          f"(levels above {max(DEMO_TRAIN_DIFFICULTIES)} are held out: harder than anything seen in training).\n"
          f"Arms: causal (plain decoder, thinker's layers as extra decoder layers), pause (+ learned extra "
          f"positions), hybrid (bidirectional thinker + thought slots), looped (the thinker's layers iterated "
          f"causally, shared weights), deep (K·T distinct extra layers); {seeds} seeds each, {cfg.steps} steps.\n"
          f"Report folder: {out}", file=file, flush=True)

    train_ex, evals = make_split(DEMO_TASK, seed=0, n_train=n_train, n_eval=n_eval,
                                 train_difficulties=DEMO_TRAIN_DIFFICULTIES, eval_difficulties=DEMO_EVAL_DIFFICULTIES)
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    train_file = data / "train.jsonl"
    write_jsonl(train_ex, train_file)
    eval_files = []
    for label, exs in evals.items():
        p = data / f"eval-{label.replace('/', '-')}.jsonl"
        write_jsonl(exs, p)
        eval_files.append(str(p))
    example = train_ex[0]
    print(f"Example: prompt {example.prompt!r} → answer {example.answer!r}  ({len(train_ex)} training examples, "
          f"{n_eval} per eval level, in {data})\n", file=file, flush=True)

    res = compare(str(train_file), eval_files, out, seeds=seeds, base=cfg, think_sweep=think_sweep,
                  halting_threshold=halting_threshold, workers=workers, progress=progress)
    write_report(res, out)
    print_table(res, file=file)
    if show:
        _show_predictions(res, eval_files[-1], show, file)
    ablations = DEMO_ABLATIONS if ablations is None else ablations
    if ablations:
        table = _ablate(res, train_file, eval_files, out, cfg, ablations, seeds, workers, progress)
        with open(out / "results.md", "a", encoding="utf-8") as f:
            f.write("\n" + table)
        print("\n" + table, file=file, flush=True)
    total = time.perf_counter() - t0
    print(f"\nDone in {total / 60:.1f} min. Report: {out / 'results.md'}\n"
          f"  learning curves: {out / 'learning_curves.png'}   thinking sweep: {out / 'think_iters.png'}\n"
          f"  raw numbers: {out / 'results.json'}   trained models: {out / 'runs'}/ARM-seedS/model\n"
          f"Try: hatlm generate {out / 'runs' / 'hybrid-seed0' / 'model'} \"{example.prompt}\"", file=file, flush=True)
    res["demo_wall_time_s"] = total
    return res


def _ablate(res: dict[str, Any], train_file: Path, eval_files: list[str], out: Path, cfg, ablations, seeds: int,
            workers: int | None, progress: bool) -> str:
    """Train the hybrid once more per ablation (same seeds), into out/ablations/NAME → a Markdown table."""
    from hatlm.compare import compare
    from hatlm.train import apply_overrides

    rows = [("full recipe", res["summary"])]
    for name, over in ablations.items():
        acfg = apply_overrides(cfg, {"model": {**cfg.model, **over}}, source=f"ablation {name!r}")
        folder = out / "ablations" / name.split(" (")[0].replace(" ", "-").replace("=", "")
        r = compare(str(train_file), eval_files, folder, seeds=seeds, arms=["hybrid"], base=acfg,
                    think_sweep=(), workers=workers, progress=progress)
        rows.append((f"{name} (`{over}`)", r["summary"]))
    head = " | ".join(Path(e).stem.replace("eval-", "") for e in eval_files)
    lines = ["## Ablation: the hybrid with one thinker ingredient off (same seeds; greedy accuracy %)", "",
             f"| hybrid | {head} |", "| --- |" + " --- |" * len(eval_files)]
    for name, summary in rows:
        cells = []
        for e in eval_files:
            s = summary.get(e, {}).get("hybrid")
            cells.append("–" if s is None else f"{100 * s['mean']:.1f} ± {100 * s['ci95']:.1f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _show_predictions(res: dict[str, Any], eval_file: str, k: int, file) -> None:
    print(f"\nA few predictions on {Path(eval_file).name} (seed {res['seeds'][0]}):", file=file)
    for arm in res["arms"]:
        preds = res["predictions"].get(f"{arm}|{res['seeds'][0]}|{eval_file}", [])
        if not preds:
            continue
        shown = []
        for p in preds[:k]:
            ok = "✓" if p.get("correct") else "✗"
            shown.append(f"{p.get('prompt', '')!r} → {p.get('prediction', '')!r} {ok} (gold {p.get('answer', '')!r})")
        print(f"  {arm:<7} " + "\n          ".join(shown), file=file)
