"""`hatlm compare`: train the arms the same way and report whether thinking helps.

    hatlm compare --train FILE --eval FILE [--eval FILE ...] --out DIR [--steps N] [--seeds N]
                  [--arms causal,pause,hybrid,looped,deep] [--config FILE] [--set KEY=VALUE ...]
                  [--halting-threshold EPS] [--refine-steps G,...] [--rethink-every R,...]

Every arm (docs/design.md §3: `causal`, `pause`, `hybrid`, `looped`, `deep`, built in `ModelConfig`:
causal/pause/looped parameter-matched to the hybrid, deep FLOP-matched at the training depth) is
trained by `hatlm.train.train` on the same data, for the same steps, with the same seeds and
hyper-parameters; only `arm` differs. Each trained model is then evaluated on every eval file:
greedy exact-match accuracy for prompt/answer data (the `hatlm eval` measure), loss per token for
plain text. The arms that think (hybrid, looped) are also evaluated with more (and fewer)
thinking iterations than they were trained with (accuracy and inference FLOPs per T), and with
`halting_threshold` at adaptive depth (accuracy and mean iterations per example, per eval file: easy
vs hard levels). With `refine_steps` / `rethink_every` every hybrid run is also evaluated with each
setting (gradient refinement of the thoughts, re-thinking during generation): accuracy per record
and, in the summary, mean ± 95% CI over seeds and the paired (per seed) difference to the plain setting.

`compare()` computes and writes the numbers (results.json, predictions.jsonl, runs/);
`hatlm.reports.write_report` renders them (results.md and the plots), as `hatlm compare` does.

DIR/
  results.json          {"records": [one per arm/seed/eval file], "summary": ..., "chance": ..., "eval_sets":
                        which examples each file's metrics are on and what was left out, "test_time": the
                        hybrid's refinement / re-thinking settings vs plain, "config": ...}
  results.md            the table: mean and 95% CI (Student t over seeds) per arm, parameters, FLOPs,
                        wall time, the hybrid's accuracy vs thinking iterations, the chance floor,
                        and a plain statement of who won and whether the CIs separate them
  learning_curves.png   eval accuracy (or loss) against training step per arm, with the chance floor
  think_iters.png       the hybrid's and the looped arm's accuracy against test-time thinking iterations
  predictions.jsonl     the first greedy predictions of every run on every eval file
  runs/ARM-seedS/       each training run (metrics.jsonl, checkpoints, model); finished runs are
                        reused when compare is run again with the same settings
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hatlm.config import ARMS
from hatlm.datasets import build_sources, check_data_path, load_eval_set
from hatlm.errors import UserError
from hatlm.evaluate import chance_floor, evaluate_set
from hatlm.loader import load_model_and_tokenizer
from hatlm.train import TrainConfig, apply_overrides, train
from hatlm.trainstate import read_metrics
from hatlm.util import atomic_write_json, atomic_write_text

DEFAULT_THINK_SWEEP = (1, 2, 4, 8, 16)


# ------------------------------------------------------------------------------------ statistics


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Mean and the half-width of its `level` confidence interval (t-distribution over seeds);
    the half-width is NaN with a single value (no spread to estimate)."""
    v = np.asarray(values, dtype=float)
    if len(v) == 0:
        return float("nan"), float("nan")
    m = float(v.mean())
    if len(v) < 2:
        return m, float("nan")
    from scipy import stats  # imported here: `hatlm --help` builds compare's flags from this module

    sem = float(v.std(ddof=1)) / math.sqrt(len(v))
    return m, float(stats.t.ppf(0.5 + level / 2, len(v) - 1)) * sem


# ------------------------------------------------------------------------------------ FLOPs


def _mean_lengths(rows: Sequence[tuple[list[int], int]]) -> tuple[float, float]:
    if not rows:
        return 0.0, 0.0
    p = float(np.mean([n for _, n in rows]))
    a = float(np.mean([len(ids) - n for ids, n in rows]))
    return p, a


def _flops(config, rows, think_iters: int | None) -> tuple[int, int]:
    from hatlm.flops import inference_flops_per_example, train_flops_per_example

    p, a = _mean_lengths(rows)
    p, a = max(1, round(p)), max(1, round(a))
    return (int(train_flops_per_example(config, p, a, think_iters=think_iters)),
            int(inference_flops_per_example(config, p, a, think_iters=think_iters)))


# ------------------------------------------------------------------------------------ one run


def run_job(job: dict[str, Any], on_step: Callable[[int], None] | None = None, progress: bool = False,
            log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train one (arm, seed) run — or reuse it when finished — and evaluate it on every eval file.

    A plain dict in, a plain dict out, so that it runs the same in-process or in a worker process."""
    import torch

    threads_before = torch.get_num_threads()
    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    try:
        return _run_job(job, on_step, progress, log or (lambda s: print(s, file=sys.stderr)))
    finally:
        torch.set_num_threads(threads_before)


def _run_job(job: dict[str, Any], on_step, progress: bool, say: Callable[[str], None]) -> dict[str, Any]:
    cfg = TrainConfig(**job["config"])
    arm, seed, run_dir = cfg.arm, cfg.seed, Path(job["run_dir"])
    # resume=True: a finished run is reused, an interrupted one continues from its last checkpoint
    # (or starts over when it had none).
    res = train(cfg, run_dir, resume=True, progress=progress, log=say, on_step=on_step)
    model, tokenizer = load_model_and_tokenizer(res["model_dir"])
    model.eval()
    eval_sets = {e: load_eval_set(e, tokenizer, cfg.max_len, cfg.data_seed, say,
                                  lm_eval_include_path=cfg.lm_eval_include_path) for e in job["eval_specs"]}
    src, _ = build_sources(apply_overrides(cfg, {"eval": []}), tokenizer, lambda s: None)
    train_rows = [src.get(i, 0)[:2] for i in range(min(len(src), 2000))]
    thinks = model.thinker is not None  # hybrid and looped
    h = model.config.hybrid
    # The training depth: fixed by the run config, else the mean of the model's think_iters_train
    # distribution (FLOPs per training example are counted at that mean, rounded).
    train_it = cfg.think_iters if cfg.think_iters is not None else h.iters_spec().mean
    tf, inf = _flops(model.config, train_rows, max(1, round(train_it)) if thinks else None)
    params = model.num_parameters()
    run_info = {"arm": arm, "seed": seed, "run_dir": str(run_dir), "model_dir": str(res["model_dir"]),
                "wall_time_s": res["wall_time_s"],
                "final_train_loss": res["final_loss"], "params": params["total"],
                "think_iters_train": train_it if thinks else None,
                "think_iters_train_spec": (h.think_iters_train or f"fixed:{h.max_think_iters}") if thinks else None,
                "thinking_stats": model.thinking_stats()}
    records = []
    for name, ev in eval_sets.items():
        r = evaluate_set(model, tokenizer, ev, think_iters=None, max_examples=job["max_eval_examples"],
                         batch_size=cfg.eval_batch_size)
        rec = {"arm": arm, "seed": seed, "eval_file": name, "metric": r["metric"], r["metric"]: r[r["metric"]]}
        if thinks and "mean_iterations" in r:
            rec["mean_iterations"] = r["mean_iterations"]
        # Every metric of the record is on ev's kept examples (the curves on an evenly spaced subset).
        rec["eval_set"] = eval_set_info(ev, r["n"], cfg.eval_max_examples)
        if ev.metric == "accuracy":
            rec["chance"] = dict(zip(("accuracy", "how"), chance_floor(ev, job["max_eval_examples"]), strict=True))
        rec.update({"n": r["n"], "params": params["total"], "params_detail": params,
                    "train_flops_per_example": tf,
                    "train_flops_total": tf * cfg.steps * cfg.batch_size * cfg.grad_accum,
                    "inference_flops_per_example": inf, "wall_time_s": res["wall_time_s"], "steps": res["steps"],
                    "final_train_loss": res["final_loss"], "think_iters": run_info["think_iters_train"],
                    "run_dir": str(run_dir)})
        if len(r.get("per_task", {})) > 1:  # a per-task breakdown only where there are several tasks
            rec["per_task"] = r["per_task"]
        if thinks and job["think_sweep"]:
            by_t, flops_t = {}, {}
            for t in job["think_sweep"]:
                rt = evaluate_set(model, tokenizer, ev, think_iters=t, max_examples=job["max_eval_examples"],
                                  batch_size=cfg.eval_batch_size)
                by_t[str(t)] = rt[rt["metric"]]
                flops_t[str(t)] = _flops(model.config, ev.rows, t)[1]
            rec[f"{r['metric']}_by_think_iters"] = by_t
            rec["inference_flops_by_think_iters"] = flops_t
        if thinks and job.get("halting_threshold") and r["metric"] == "accuracy":
            # Adaptive depth: up to the largest swept T, each example stops once its criterion
            # (hybrid.halting: relative change or readout KL) falls under the threshold.
            t_max = max(job["think_sweep"] or [h.max_think_iters])
            rh = evaluate_set(model, tokenizer, ev, think_iters=t_max, max_examples=job["max_eval_examples"],
                              batch_size=cfg.eval_batch_size, halting_threshold=job["halting_threshold"])
            rec["halting"] = {"threshold": job["halting_threshold"], "criterion": h.halting, "max_iters": t_max,
                              "accuracy": rh["accuracy"], "mean_iterations": rh["mean_iterations"]}
        if arm == "hybrid" and job.get("test_time") and r["metric"] == "accuracy":
            rec["test_time"] = evaluate_test_time(model, tokenizer, ev, job["test_time"], job["max_eval_examples"],
                                                  cfg.eval_batch_size)
        rec["_predictions"] = r.get("predictions", [])[:50]
        records.append(rec)
    return {"run": run_info, "records": records}


# ------------------------------------------------------------------------------------ refinement / re-thinking


def refine_rethink_settings(refine_steps: Sequence[int] = (), rethink_every: Sequence[int] = (),
                            refine_lr: float = 0.1, refine_objective: str = "entropy") -> list[dict[str, Any]]:
    """The extra test-time settings a hybrid run is evaluated with: each G of refine_steps (gradient
    refinement of the thoughts, `refine_lr`, `refine_objective`) and each R of rethink_every, one at a
    time (not combined). → [{"name": "refine_steps=G", "options": {generate's keyword arguments}}, ...]."""
    from hatlm.thinking import REFINE_OBJECTIVES

    def positive(values: Sequence[int], flag: str) -> list[int]:
        vals = list(values)
        if any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in vals):
            raise UserError(f"{flag}: expected positive integers (0 is the plain setting, always evaluated); got "
                            f"{vals}")
        if len(set(vals)) != len(vals):
            raise UserError(f"{flag}: a value is listed twice ({vals})")
        return vals

    gs, rs = positive(refine_steps, "--refine-steps"), positive(rethink_every, "--rethink-every")
    if gs:
        if not isinstance(refine_lr, (int, float)) or not refine_lr > 0 or not math.isfinite(refine_lr):
            raise UserError(f"--refine-lr must be > 0; got {refine_lr}")
        if refine_objective not in REFINE_OBJECTIVES:
            raise UserError(f"--refine-objective must be one of {', '.join(REFINE_OBJECTIVES)}; got "
                            f"{refine_objective!r}")
    return ([{"name": f"refine_steps={g}", "options": {"refine_steps": g, "refine_lr": float(refine_lr),
                                                      "refine_objective": refine_objective}} for g in gs]
            + [{"name": f"rethink_every={r}", "options": {"rethink_every": r}} for r in rs])


def evaluate_test_time(model, tokenizer, ev, settings: list[dict[str, Any]], max_examples: int | None,
                       batch_size: int) -> dict[str, dict[str, Any]]:
    """Greedy accuracy of one hybrid on one eval set under each test-time setting (same examples and
    thinking depth as the record's plain accuracy) → {name: {"accuracy", "options"[, "refine_before",
    "refine_after"]}}."""
    out = {}
    for st in settings:
        r = evaluate_set(model, tokenizer, ev, think_iters=None, max_examples=max_examples, batch_size=batch_size,
                         **st["options"])
        out[st["name"]] = {"accuracy": r["accuracy"], "options": dict(st["options"]),
                           **{k: r[k] for k in ("refine_before", "refine_after") if k in r}}
    return out


def summarize_test_time(records: list[dict[str, Any]], evals: list[str]) -> dict[str, Any]:
    """Per eval file, for the hybrid: the plain accuracy and, per test-time setting, its mean ± 95% CI
    over seeds and the difference to the plain setting paired per seed (mean ± CI of the per-seed
    differences: the seed-to-seed spread the two share cancels)."""
    out: dict[str, Any] = {}
    for e in evals:
        rs = sorted((r for r in records if r["arm"] == "hybrid" and r["eval_file"] == e and "test_time" in r),
                    key=lambda r: r["seed"])
        if not rs:
            continue
        plain = [r["accuracy"] for r in rs]
        entry: dict[str, Any] = {"seeds": [r["seed"] for r in rs], "plain": {"values": plain,
                                                                            **dict(zip(("mean", "ci95"),
                                                                                       mean_ci(plain)))}}
        settings = {}
        for name in rs[0]["test_time"]:
            vals = [r["test_time"][name]["accuracy"] for r in rs]
            diffs = [v - p for v, p in zip(vals, plain, strict=True)]
            m, ci = mean_ci(vals)
            dm, dci = mean_ci(diffs)
            settings[name] = {"values": vals, "mean": m, "ci95": ci, "diffs": diffs, "diff_mean": dm,
                              "diff_ci95": dci, "options": rs[0]["test_time"][name]["options"]}
        entry["settings"] = settings
        out[e] = entry
    return out


def eval_set_info(ev, n_scored: int, curve_max: int) -> dict[str, Any]:
    """Which examples of an eval file a record's metrics are on, and what was left out and why."""
    kept = len(ev.rows)
    return {"metric": ev.metric, "n_total": ev.n_total or kept, "n_kept": kept, "n_scored": n_scored,
            "n_curve": kept if not curve_max else min(kept, curve_max), "left_out": ev.left_out}


_QUEUE = None


def _worker_init(queue) -> None:
    global _QUEUE
    _QUEUE = queue


def _worker_job(job: dict[str, Any]) -> dict[str, Any]:
    key = f"{job['config']['arm']}-{job['config']['seed']}"

    def on_step(step: int) -> None:
        _QUEUE.put((key, step))

    return run_job(job, on_step=on_step, progress=False, log=lambda s: _QUEUE.put((key, s)))


# ------------------------------------------------------------------------------------ compare


def compare(
    train_spec: str,
    eval_specs: Sequence[str],
    out_dir: str | Path,
    *,
    steps: int | None = None,
    seeds: int = 3,
    arms: Sequence[str] = ARMS,
    base: TrainConfig | None = None,
    think_sweep: Sequence[int] = DEFAULT_THINK_SWEEP,
    halting_threshold: float | None = None,
    refine_steps: Sequence[int] = (),
    rethink_every: Sequence[int] = (),
    refine_lr: float = 0.1,
    refine_objective: str = "entropy",
    max_eval_examples: int | None = None,
    show_examples: int = 0,
    workers: int | None = None,
    threads: int = 1,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train `arms` × `seeds` runs on train_spec and evaluate each on every eval file.

    `base` holds every other training setting (model size, lr, batch, ...); seeds are base.seed,
    base.seed+1, ... `workers` runs train at once in worker processes (None: one per available
    CPU core), each with `threads` torch threads (default 1). For models this small one thread per
    core beats one process using every core, it degrades gracefully on a machine shared with other
    work (a multi-threaded process whose threads get descheduled can slow down a hundredfold), and
    results do not depend on the machine's core count. `show_examples` > 0 writes `hatlm show` pages
    of that many examples per thinking arm (`hatlm.show.compare_show_pages`). Returns the content of
    results.json (also written, with predictions.jsonl, into out_dir; `hatlm.reports.write_report` adds
    results.md and the plots)."""
    from tqdm.auto import tqdm

    say = log or (lambda s: tqdm.write(s, file=sys.stderr))
    arms = list(arms)
    bad = [a for a in arms if a not in ARMS]
    if bad or not arms:
        raise UserError(f"--arms: unknown arm(s) {', '.join(bad) or '(none given)'}; choose from {', '.join(ARMS)}")
    if len(set(arms)) != len(arms):
        raise UserError(f"--arms: an arm is listed twice ({', '.join(arms)})")
    if not isinstance(seeds, int) or seeds < 1:
        raise UserError(f"--seeds must be a positive integer; got {seeds!r}")
    if workers is None:
        workers = available_cpus()
    if not isinstance(workers, int) or workers < 1:
        raise UserError(f"--workers must be a positive integer; got {workers!r}")
    if not isinstance(threads, int) or threads < 1:
        raise UserError(f"--threads must be a positive integer; got {threads!r}")
    if not eval_specs:
        raise UserError("give at least one --eval FILE")
    if any((not isinstance(t, int)) or t < 0 for t in think_sweep):
        raise UserError(f"thinking iterations to sweep must be non-negative integers; got {list(think_sweep)}")
    settings = refine_rethink_settings(refine_steps, rethink_every, refine_lr, refine_objective)
    if settings and "hybrid" not in arms:
        raise UserError("--refine-steps / --rethink-every evaluate the hybrid arm (they act on its thoughts); "
                        f"--arms has no hybrid ({', '.join(arms)})")
    check_data_path(train_spec, "--train")
    for e in eval_specs:
        check_data_path(e, "--eval")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = base or TrainConfig()
    over: dict[str, Any] = {"data": [train_spec], "eval": list(eval_specs)}
    if steps is not None:
        over["steps"] = steps
    base = apply_overrides(base, over, source="compare")
    seed_list = [base.seed + i for i in range(seeds)]
    # Seeds outermost: after the first seed every arm has a result.
    jobs = [{"config": apply_overrides(base, {"arm": arm, "seed": seed}, source="compare").to_dict(),
             "run_dir": str(out / "runs" / f"{arm}-seed{seed}"), "eval_specs": list(eval_specs),
             "think_sweep": list(think_sweep), "max_eval_examples": max_eval_examples,
             "halting_threshold": halting_threshold, "threads": threads, "test_time": settings}
            for seed in seed_list for arm in arms]
    t_start = time.perf_counter()
    if workers > 1 and len(jobs) > 1:
        outputs = _run_parallel(jobs, min(workers, len(jobs)), base.steps, progress, say)
    else:
        outputs = []
        bar = tqdm(total=len(jobs), desc="compare", unit="run", disable=not progress, dynamic_ncols=True,
                   file=sys.stderr)
        try:
            for job in jobs:
                bar.set_postfix_str(f"{job['config']['arm']} seed {job['config']['seed']}")
                outputs.append(run_job(job, progress=progress, log=say))
                bar.update(1)
        finally:
            bar.close()
    runs = [o["run"] for o in outputs]
    records = [r for o in outputs for r in o["records"]]
    # Every run scores the same examples of a file, so the first record of each says it for all.
    chance = {r["eval_file"]: r["chance"] for r in reversed(records) if "chance" in r}
    eval_info = {r["eval_file"]: r["eval_set"] for r in reversed(records)}
    summary = summarize(records, arms, list(eval_specs))
    verdicts = verdict(summary, chance, arms, list(eval_specs))
    predictions = {f"{r['arm']}|{r['seed']}|{r['eval_file']}": r.pop("_predictions") for r in records}
    curves = learning_curves(runs, list(eval_specs))
    if show_examples:
        from hatlm.show import compare_show_pages

        pages = compare_show_pages(out, runs, predictions, list(eval_specs), show_examples, say)
    else:
        pages = []
    result = {
        "records": records,
        "summary": summary,
        "chance": chance,
        "eval_sets": eval_info,
        "verdict": verdicts,
        "runs": runs,
        "curves": curves,
        "think_sweep": list(think_sweep),
        "halting_threshold": halting_threshold,
        "show_pages": pages,
        "test_time_settings": settings,
        "test_time": summarize_test_time(records, list(eval_specs)),
        "config": base.to_dict(),
        "arms": arms,
        "seeds": seed_list,
        "total_wall_time_s": time.perf_counter() - t_start,
    }
    atomic_write_json(out / "results.json", result)
    atomic_write_text(out / "predictions.jsonl", "".join(
        json.dumps({"arm": k.split("|")[0], "seed": int(k.split("|")[1]), "eval_file": k.split("|", 2)[2], **p},
                   ensure_ascii=False) + "\n" for k, ps in predictions.items() for p in ps))
    result["predictions"] = predictions
    return result


def available_cpus() -> int:
    """CPU cores this process may use (the affinity mask, not the host's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _run_parallel(jobs: list[dict[str, Any]], workers: int, steps: int, progress: bool,
                  say: Callable[[str], None]) -> list[dict[str, Any]]:
    """Run jobs in `workers` spawned processes; one progress bar over all their training steps."""
    import multiprocessing as mp
    import queue as queue_mod
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    from tqdm.auto import tqdm

    ctx = mp.get_context("spawn")  # fork after torch has started its thread pools can hang
    q = ctx.Manager().Queue()
    done_steps: dict[str, int] = {}
    bar = tqdm(total=len(jobs) * steps, desc=f"training {len(jobs)} runs on {workers} workers", unit="step",
               disable=not progress, dynamic_ncols=True, file=sys.stderr)
    results: dict[int, dict[str, Any]] = {}
    finished = 0

    def drain() -> None:
        while True:
            try:
                key, msg = q.get_nowait()
            except queue_mod.Empty:
                return
            if isinstance(msg, int):
                bar.update(msg - done_steps.get(key, 0))
                done_steps[key] = msg
            else:
                say(f"[{key}] {msg}")

    try:
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init,
                                 initargs=(q,)) as ex:
            # Longest first (the hybrid thinks, so it is the slowest; causal the fastest): the last
            # runs then finish together instead of one run keeping a single worker busy at the end.
            cost = {"hybrid": 3, "looped": 3, "deep": 2, "pause": 1, "causal": 0}
            order = sorted(range(len(jobs)), key=lambda i: -cost.get(jobs[i]["config"]["arm"], 0))
            futures = {ex.submit(_worker_job, jobs[i]): i for i in order}
            pending = set(futures)
            try:
                while pending:
                    done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                    drain()
                    for f in done:
                        out = f.result()  # re-raises a worker's error (UserError, TrainingDiverged, ...)
                        results[futures[f]] = out
                        finished += 1
                        key = f"{out['run']['arm']}-{out['run']['seed']}"
                        bar.update(steps - done_steps.get(key, 0))  # a reused run reports no steps
                        done_steps[key] = steps
                        bar.set_postfix_str(f"{finished}/{len(jobs)} runs done")
            except BaseException:
                for f in pending:
                    f.cancel()
                raise
    finally:
        drain()
        bar.close()
    return [results[i] for i in range(len(jobs))]


def summarize(records: list[dict[str, Any]], arms: list[str], evals: list[str]) -> dict[str, dict[str, Any]]:
    """Per eval file and arm: mean, 95% CI half-width, per-seed values, parameters, FLOPs, time."""
    out: dict[str, dict[str, Any]] = {}
    for e in evals:
        out[e] = {}
        for a in arms:
            rs = [r for r in records if r["arm"] == a and r["eval_file"] == e]
            if not rs:
                continue
            metric = rs[0]["metric"]
            vals = [r[metric] for r in rs]
            m, ci = mean_ci(vals)
            s = {"metric": metric, "mean": m, "ci95": ci, "values": vals, "seeds": [r["seed"] for r in rs],
                 "params": rs[0]["params"], "train_flops_per_example": rs[0]["train_flops_per_example"],
                 "inference_flops_per_example": rs[0]["inference_flops_per_example"],
                 "wall_time_s": float(np.mean([r["wall_time_s"] for r in rs]))}
            key = f"{metric}_by_think_iters"
            if key in rs[0]:
                s[key] = {t: mean_ci([r[key][t] for r in rs]) for t in rs[0][key]}
                s["inference_flops_by_think_iters"] = rs[0].get("inference_flops_by_think_iters", {})
            if "mean_iterations" in rs[0]:
                s["mean_iterations"] = float(np.mean([r["mean_iterations"] for r in rs]))
            if "halting" in rs[0]:
                hs = [r["halting"] for r in rs]
                s["halting"] = {**{k: hs[0][k] for k in ("threshold", "criterion", "max_iters")},
                                "accuracy": mean_ci([x["accuracy"] for x in hs]),
                                "mean_iterations": float(np.mean([x["mean_iterations"] for x in hs]))}
            if rs[0].get("think_iters") is not None:
                s["think_iters_train"] = rs[0]["think_iters"]
            out[e][a] = s
    return out


def _learned(s: dict[str, Any], floor: float) -> bool:
    """Above the floor beyond noise: the CI's lower end clears it (one seed: 5 points above it)."""
    lo = s["mean"] - s["ci95"] if not math.isnan(s["ci95"]) else s["mean"] - 0.05
    return lo > floor


def verdict(summary: dict[str, Any], chance: dict[str, Any], arms: list[str], evals: list[str]) -> dict[str, Any]:
    """Who won per eval file, whether the CIs separate the winner from the others, who learned."""
    per_eval = {}
    for e in evals:
        s = summary.get(e, {})
        if not s:
            continue
        metric = next(iter(s.values()))["metric"]
        better_high = metric == "accuracy"
        order = sorted(s, key=lambda a: s[a]["mean"], reverse=better_high)
        best = order[0]
        if len(order) > 1 and all(s[a]["mean"] == s[best]["mean"] for a in order):
            best = "tie"  # every arm has the same score: nobody won
        separated = {}
        for a in (order[1:] if best != "tie" else []):
            lo_b, hi_b = s[best]["mean"] - s[best]["ci95"], s[best]["mean"] + s[best]["ci95"]
            lo_a, hi_a = s[a]["mean"] - s[a]["ci95"], s[a]["mean"] + s[a]["ci95"]
            if math.isnan(s[best]["ci95"]) or math.isnan(s[a]["ci95"]):
                separated[a] = None  # one seed: no interval
            else:
                separated[a] = bool(lo_b > hi_a) if better_high else bool(hi_b < lo_a)
        entry: dict[str, Any] = {"metric": metric, "best": best, "ranking": order, "separated_from": separated}
        if metric == "accuracy" and e in chance:
            floor = chance[e]["accuracy"]
            entry["learned"] = {a: _learned(s[a], floor) for a in s}
        per_eval[e] = entry
    learned_any = any(any(v.get("learned", {}).values()) for v in per_eval.values()) if per_eval else False
    acc_evals = [v for v in per_eval.values() if v["metric"] == "accuracy"]
    wins = Counter(v["best"] for v in per_eval.values())
    return {"per_eval": per_eval, "wins": dict(wins), "no_arm_learned": bool(acc_evals) and not learned_any}


def learning_curves(runs: list[dict[str, Any]], evals: list[str]) -> dict[str, Any]:
    """From each run's metrics.jsonl: eval metric per step (teacher-forced) and the train loss."""
    curves: dict[str, Any] = {}
    for run in runs:
        recs = read_metrics(run["run_dir"])
        key = f"{run['arm']}|{run['seed']}"
        ev: dict[str, list[list[float]]] = {}
        for r in recs:
            if r["split"] == "eval" and r["eval_file"] in evals:
                val = r["accuracy_tf"] if r.get("metric") == "accuracy" else r["loss"]
                ev.setdefault(r["eval_file"], []).append([r["step"], val])
        train_loss = [[r["step"], r["loss"]] for r in recs if r["split"] == "train" and r.get("loss") is not None]
        curves[key] = {"arm": run["arm"], "seed": run["seed"], "eval": ev, "train_loss": train_loss}
    return curves
