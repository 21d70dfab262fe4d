"""`hatlm compare`: train the three arms the same way and report whether thinking helps.

    hatlm compare --train FILE --eval FILE [--eval FILE ...] --out DIR [--steps N] [--seeds N]
                  [--arms causal,pause,hybrid] [--config FILE] [--set KEY=VALUE ...]

Every arm (DESIGN.md §2: `causal`, `pause`, `hybrid`, parameter-matched by construction in
`ModelConfig`) is trained by `hatlm.train.train` on the same data, for the same steps, with the
same seeds and hyper-parameters; only `arm` differs. Each trained model is then evaluated on every
eval file: greedy exact-match accuracy for prompt/answer data (the `hatlm eval` measure), loss per
token for plain text. The hybrid is also evaluated with more (and fewer) thinking iterations than
it was trained with.

DIR/
  results.json          {"records": [one per arm/seed/eval file], "summary": ..., "chance": ..., "config": ...}
  results.md            the table: mean and 95% CI (Student t over seeds) per arm, parameters, FLOPs,
                        wall time, the hybrid's accuracy vs thinking iterations, the chance floor,
                        and a plain statement of who won and whether the CIs separate them
  learning_curves.png   eval accuracy (or loss) against training step per arm, with the chance floor
  think_iters.png       the hybrid's accuracy against test-time thinking iterations
  predictions.jsonl     the first greedy predictions of every run on every eval file
  runs/ARM-seedS/       each training run (metrics.jsonl, checkpoints, model); finished runs are
                        reused when compare is run again with the same settings
"""

from __future__ import annotations

import argparse
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
from hatlm.errors import UserError
from hatlm.train import (
    EvalSet,
    TrainConfig,
    apply_overrides,
    check_data_path,
    forced_eval,
    load_config,
    load_eval_set,
    read_metrics,
    train,
)

DEFAULT_THINK_SWEEP = (1, 2, 4, 8, 16)


# ------------------------------------------------------------------------------------ statistics


def _t_cdf(x: float, df: int) -> float:
    """Student t CDF by Simpson integration of the density (accurate to ~1e-9 for |x| < 100)."""
    if x < 0:
        return 1.0 - _t_cdf(-x, df)
    logc = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def pdf(t: float) -> float:
        return math.exp(logc - (df + 1) / 2 * math.log1p(t * t / df))

    n = 2000  # even
    h = x / n
    s = pdf(0.0) + pdf(x) + sum((4 if i % 2 else 2) * pdf(i * h) for i in range(1, n))
    return 0.5 + s * h / 3


def t_quantile(p: float, df: int) -> float:
    """The p-quantile (p > 0.5) of Student's t with df degrees of freedom (no scipy needed)."""
    if not 0.5 < p < 1 or df < 1:
        raise ValueError(f"t_quantile needs 0.5 < p < 1 and df >= 1; got p={p}, df={df}")
    lo, hi = 0.0, 1.0
    while _t_cdf(hi, df) < p:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        if _t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Mean and the half-width of its `level` confidence interval (t-distribution over seeds);
    the half-width is NaN with a single value (no spread to estimate)."""
    v = np.asarray(values, dtype=float)
    if len(v) == 0:
        return float("nan"), float("nan")
    m = float(v.mean())
    if len(v) < 2:
        return m, float("nan")
    sem = float(v.std(ddof=1)) / math.sqrt(len(v))
    return m, t_quantile(0.5 + level / 2, len(v) - 1) * sem


# ------------------------------------------------------------------------------------ floors


def chance_floor(ev: EvalSet) -> tuple[float, str]:
    """The accuracy a model gets without solving the task, and how it was computed.

    Built-in tasks (labels NAME/dK): the task's own chance (a uniform guess among the answers the
    prompt makes possible), averaged over the examples. Other files: always answering the most
    frequent answer of the file."""
    from hatlm import tasks as T

    exs = ev.examples or []
    labels = [e.task for e in exs]
    try:
        vals = []
        for lab in labels:
            name, d = lab.split("/d")
            vals.append(T.chance_accuracy(name, int(d)))
        if vals:
            return float(np.mean(vals)), "uniform guess among the answers the prompt allows"
    except (ValueError, UserError, KeyError):
        pass
    if not exs:
        return float("nan"), "n/a"
    counts = Counter(e.answer.strip() for e in exs)
    answer, c = counts.most_common(1)[0]
    return c / len(exs), f"always answering the most frequent answer ({answer!r})"


# ------------------------------------------------------------------------------------ evaluation


def evaluate_model(model, tokenizer, ev: EvalSet, *, think_iters: int | None, max_examples: int | None,
                   batch_size: int = 64) -> dict[str, Any]:
    """Greedy exact-match accuracy (prompt/answer) or loss per token (text) of one model on one set."""
    if ev.examples is None:
        rows = ev.rows if not max_examples else ev.rows[:max_examples]
        r = forced_eval(model, rows, tokenizer.pad_id, batch_size=batch_size, think_iters=think_iters)
        return {"metric": "loss", "loss": r["loss"], "perplexity": r["perplexity"], "n": r["n"], "tokens": r["tokens"]}
    from hatlm.evaluate import evaluate_examples

    exs = ev.examples if not max_examples else ev.examples[:max_examples]
    r = evaluate_examples(model, tokenizer, exs, batch_size=batch_size, think_iters=think_iters)
    out = {"metric": "accuracy", "accuracy": float(r["accuracy"]), "n": int(r["n"]),
           "per_task": {k: dict(v) for k, v in r.get("per_task", {}).items()}}
    out["predictions"] = r.get("predictions", [])
    return out


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
    model, tokenizer = _load_run(res["model_dir"])
    eval_sets = {e: load_eval_set(e, tokenizer, cfg.max_len, cfg.data_seed, say) for e in job["eval_specs"]}
    from hatlm.train import build_sources

    src, _ = build_sources(apply_overrides(cfg, {"eval": []}), tokenizer, lambda s: None)
    train_rows = [src.get(i, 0)[:2] for i in range(min(len(src), 2000))]
    train_it = cfg.think_iters if cfg.think_iters is not None else model.config.hybrid.max_think_iters
    tf, inf = _flops(model.config, train_rows, train_it if arm == "hybrid" else None)
    params = model.num_parameters()
    run_info = {"arm": arm, "seed": seed, "run_dir": str(run_dir), "wall_time_s": res["wall_time_s"],
                "final_train_loss": res["final_loss"], "params": params["total"],
                "think_iters_train": train_it if arm == "hybrid" else None}
    records = []
    for name, ev in eval_sets.items():
        r = evaluate_model(model, tokenizer, ev, think_iters=None, max_examples=job["max_eval_examples"],
                           batch_size=cfg.eval_batch_size)
        rec = {"arm": arm, "seed": seed, "eval_file": name, "metric": r["metric"], r["metric"]: r[r["metric"]]}
        rec.update({"n": r["n"], "params": params["total"], "params_detail": params,
                    "train_flops_per_example": tf,
                    "train_flops_total": tf * cfg.steps * cfg.batch_size * cfg.grad_accum,
                    "inference_flops_per_example": inf, "wall_time_s": res["wall_time_s"], "steps": res["steps"],
                    "final_train_loss": res["final_loss"], "think_iters": run_info["think_iters_train"],
                    "run_dir": str(run_dir)})
        if len(r.get("per_task", {})) > 1:  # a per-task breakdown only where there are several tasks
            rec["per_task"] = r["per_task"]
        if arm == "hybrid" and job["think_sweep"]:
            by_t = {}
            for t in job["think_sweep"]:
                rt = evaluate_model(model, tokenizer, ev, think_iters=t, max_examples=job["max_eval_examples"],
                                    batch_size=cfg.eval_batch_size)
                by_t[str(t)] = rt[rt["metric"]]
            rec[f"{r['metric']}_by_think_iters"] = by_t
        rec["_predictions"] = r.get("predictions", [])[:50]
        records.append(rec)
    return {"run": run_info, "records": records}


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
    max_eval_examples: int | None = None,
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
    results do not depend on the machine's core count. Returns the content of results.json (also
    written, with results.md and the plots, into out_dir)."""
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
             "threads": threads}
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
    from hatlm.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(Path(runs[0]["run_dir"]) / "model")
    eval_sets = {e: load_eval_set(e, tokenizer, base.max_len, base.data_seed, lambda s: None) for e in eval_specs}
    chance = {name: dict(zip(("accuracy", "how"), chance_floor(ev), strict=True))
              for name, ev in eval_sets.items() if ev.metric == "accuracy"}
    summary = summarize(records, arms, list(eval_specs))
    verdicts = verdict(summary, chance, arms, list(eval_specs))
    predictions = {f"{r['arm']}|{r['seed']}|{r['eval_file']}": r.pop("_predictions") for r in records}
    curves = learning_curves(runs, list(eval_specs))
    result = {
        "records": records,
        "summary": summary,
        "chance": chance,
        "verdict": verdicts,
        "runs": runs,
        "curves": curves,
        "think_sweep": list(think_sweep),
        "config": base.to_dict(),
        "arms": arms,
        "seeds": seed_list,
        "total_wall_time_s": time.perf_counter() - t_start,
    }
    _write_json(out / "results.json", result)
    _write_text(out / "results.md", render_markdown(result))
    _write_text(out / "predictions.jsonl", "".join(
        json.dumps({"arm": k.split("|")[0], "seed": int(k.split("|")[1]), "eval_file": k.split("|", 2)[2], **p},
                   ensure_ascii=False) + "\n" for k, ps in predictions.items() for p in ps))
    plots = make_plots(result, out)
    result["plots"] = [str(p) for p in plots]
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
            cost = {"hybrid": 2, "pause": 1, "causal": 0}
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


def _load_run(model_dir: str):
    from hatlm.checkpoint import load_model
    from hatlm.tokenizer import load_tokenizer

    model = load_model(model_dir)
    model.eval()
    return model, load_tokenizer(model_dir)


def _write_text(path: Path, text: str) -> None:
    # Atomic: a reader never sees half a report.
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_json(path: Path, obj: Any) -> None:
    _write_text(path, json.dumps(obj, indent=1, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


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


# ------------------------------------------------------------------------------------ report


def _fmt_metric(metric: str, m: float, ci: float) -> str:
    if metric == "accuracy":
        return f"{100 * m:.1f} ± {100 * ci:.1f}" if not math.isnan(ci) else f"{100 * m:.1f}"
    return f"{m:.4f} ± {ci:.4f}" if not math.isnan(ci) else f"{m:.4f}"


def _fmt_flops(x: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= div:
            return f"{x / div:.2f} {unit}"
    return f"{x:.0f}"


def render_markdown(res: dict[str, Any]) -> str:
    cfg = res["config"]
    arms, seeds = res["arms"], res["seeds"]
    lines = ["# hatlm compare", ""]
    lines.append(f"Training data: `{', '.join(cfg['data'])}`; {cfg['steps']} steps × batch {cfg['batch_size']}"
                 f"{' × ' + str(cfg['grad_accum']) if cfg['grad_accum'] > 1 else ''}, lr {cfg['lr']:g} "
                 f"(warm-up {cfg['warmup']}, cosine to {cfg['min_lr']:g}); seeds {', '.join(map(str, seeds))}; "
                 f"model `{cfg['init_from'] or cfg['preset']}` with "
                 f"{json.dumps(cfg['model']) if cfg['model'] else 'no overrides'}.")
    lines.append("Accuracy: greedy exact match in % (mean ± 95% CI half-width, Student t over seeds); "
                 "loss: per answer/continuation token. FLOPs per example at the training data's mean lengths.")
    lines.append("")
    for e, per_arm in res["summary"].items():
        if not per_arm:
            continue
        metric = next(iter(per_arm.values()))["metric"]
        lines.append(f"## `{e}`")
        lines.append("")
        ch = res["chance"].get(e)
        head = f"| arm | {metric} | per seed | params | train FLOPs/ex | inference FLOPs/ex | train time/run |"
        lines += [head, "| --- | ---: | --- | ---: | ---: | ---: | ---: |"]
        for a in arms:
            if a not in per_arm:
                continue
            s = per_arm[a]
            per_seed = ", ".join(f"{100 * v:.1f}" if metric == "accuracy" else f"{v:.3f}" for v in s["values"])
            flops = f"{_fmt_flops(s['train_flops_per_example'])} | {_fmt_flops(s['inference_flops_per_example'])}"
            lines.append(f"| {a} | {_fmt_metric(metric, s['mean'], s['ci95'])} | {per_seed} | {s['params']:,} | "
                         f"{flops} | {s['wall_time_s']:.0f} s |")
        if ch:
            lines.append(f"| *chance floor* | {100 * ch['accuracy']:.1f} | {ch['how']} | | | | |")
        lines.append("")
        sweep_key = f"{metric}_by_think_iters"
        if "hybrid" in per_arm and sweep_key in per_arm["hybrid"]:
            sw = per_arm["hybrid"][sweep_key]
            trained = next((r["think_iters_train"] for r in res["runs"] if r["arm"] == "hybrid"), None)
            lines.append(f"Hybrid with T thinking iterations at test time (trained with T = {trained}):")
            lines.append("")
            lines.append("| T | " + " | ".join(sw) + " |")
            lines.append("| --- |" + " ---: |" * len(sw))
            lines.append(f"| {metric} | " + " | ".join(_fmt_metric(metric, m, ci) for m, ci in sw.values()) + " |")
            lines.append("")
        lines.append(_verdict_text(e, res))
        lines.append("")
    lines.append("## Verdict")
    lines.append("")
    lines.append(overall_statement(res))
    lines.append("")
    lines.append(f"Total wall time: {res['total_wall_time_s'] / 60:.1f} min. Plots: `learning_curves.png` (eval "
                 "metric, teacher-forced, against training step; dashed: chance floor), `think_iters.png`.")
    return "\n".join(lines) + "\n"


def _verdict_text(e: str, res: dict[str, Any]) -> str:
    v = res["verdict"]["per_eval"].get(e)
    if not v:
        return ""
    s = res["summary"][e]
    best = v["best"]
    metric = v["metric"]
    parts = []
    if "learned" in v:
        learned = [a for a, ok in v["learned"].items() if ok]
        if not learned:
            parts.append("**No arm learned**: no arm's accuracy is above the chance floor beyond its CI.")
            return " ".join(parts)
        not_l = [a for a in s if a not in learned]
        parts.append(f"Above the chance floor (CI clear of it): {', '.join(learned)}"
                     + (f"; not clearly above it (CI reaches the floor): {', '.join(not_l)}." if not_l else "."))
    others = []
    for a, sep in v["separated_from"].items():
        if sep is None:
            others.append(f"{a} (one seed: no CI)")
        elif sep:
            others.append(f"{a} (CIs separate)")
        else:
            others.append(f"{a} (within the CIs: not a reliable difference)")
    if best == "tie":
        parts.append(f"Every arm scores the same ({_fmt_metric(metric, s[v['ranking'][0]]['mean'], float('nan'))}): "
                     "no arm won.")
        return " ".join(parts)
    word = "highest accuracy" if metric == "accuracy" else "lowest loss"
    parts.append(f"**{best}** has the {word} ({_fmt_metric(metric, s[best]['mean'], s[best]['ci95'])}); "
                 f"against {', '.join(others)}.")
    return " ".join(parts)


def overall_statement(res: dict[str, Any]) -> str:
    v = res["verdict"]
    if v["no_arm_learned"]:
        return ("No arm learned: on every eval file every arm stayed at the chance floor (within its CI), so "
                "this run says nothing about whether thinking helps; train longer, on an easier level, or larger.")
    parts = []
    wins = {a: n for a, n in v["wins"].items() if a != "tie"}
    parts.append("Best arm per eval file: " + ", ".join(
        f"`{e}`: {x['best'] if x['best'] != 'tie' else 'none (all arms equal)'}" for e, x in v["per_eval"].items())
        + ".")
    floor_only = [e for e, x in v["per_eval"].items() if "learned" in x and not any(x["learned"].values())]
    if floor_only:
        parts.append("No arm learned (all at the chance floor) on: " + ", ".join(f"`{e}`" for e in floor_only) + ".")
    if len(wins) == 1 and "tie" not in v["wins"]:
        parts.append(f"{next(iter(wins))} is best on every eval file.")
    # The question the tool exists for: hybrid against pause (extra positions without thinking).
    hp = []
    for e, s in res["summary"].items():
        if "hybrid" in s and "pause" in s:
            h, p = s["hybrid"], s["pause"]
            better_high = h["metric"] == "accuracy"
            diff = h["mean"] - p["mean"]
            win = diff > 0 if better_high else diff < 0
            if math.isnan(h["ci95"]) or math.isnan(p["ci95"]):
                sig = "one seed, no CI"
            else:
                overlap = not (h["mean"] - h["ci95"] > p["mean"] + p["ci95"] or
                               p["mean"] - p["ci95"] > h["mean"] + h["ci95"])
                sig = "within the CIs" if overlap else "CIs separate"
            word = "ties with" if diff == 0 else ("beats" if win else "does not beat")
            hp.append(f"`{e}`: hybrid {word} pause ({sig})")
    if hp:
        parts.append("Hybrid vs pause (thinking vs merely extra positions): " + "; ".join(hp) + ".")
    return " ".join(parts)


def make_plots(res: dict[str, Any], out: Path) -> list[Path]:
    """learning_curves.png and (when the hybrid was swept) think_iters.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"causal": "tab:blue", "pause": "tab:orange", "hybrid": "tab:green"}
    evals = list(res["summary"])
    arms = res["arms"]
    paths = []
    fig, axes = plt.subplots(1, len(evals) + 1, figsize=(4.2 * (len(evals) + 1), 3.4), squeeze=False)
    for j, e in enumerate(evals):
        ax = axes[0, j]
        metric = "accuracy"
        for a in arms:
            runs = [c for c in res["curves"].values() if c["arm"] == a and e in c["eval"]]
            if not runs:
                continue
            steps = [p[0] for p in runs[0]["eval"][e]]
            vals = np.array([[p[1] for p in c["eval"][e]] for c in runs if len(c["eval"][e]) == len(steps)])
            summ = res["summary"][e].get(a)
            metric = summ["metric"] if summ else metric
            scale = 100 if metric == "accuracy" else 1
            ax.plot(steps, scale * vals.mean(0), color=colors.get(a), label=a)
            if len(vals) > 1:
                ax.fill_between(steps, scale * vals.min(0), scale * vals.max(0), color=colors.get(a), alpha=0.2)
        if e in res["chance"]:
            ax.axhline(100 * res["chance"][e]["accuracy"], color="gray", ls="--", label="chance")
        ax.set_title(Path(e).name if not e.startswith("task:") else e, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("accuracy % (teacher-forced)" if metric == "accuracy" else "loss / token")
        if metric == "accuracy":
            ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
        if j == 0:
            ax.legend(fontsize=8)
    ax = axes[0, -1]
    for a in arms:
        runs = [c for c in res["curves"].values() if c["arm"] == a and c["train_loss"]]
        if not runs:
            continue
        n = min(len(c["train_loss"]) for c in runs)
        steps = np.array([p[0] for p in runs[0]["train_loss"][:n]])
        vals = np.array([[p[1] for p in c["train_loss"][:n]] for c in runs]).mean(0)
        k = max(1, n // 50)  # moving average: per-step losses are noisy
        sm = np.convolve(vals, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1 :], sm, color=colors.get(a), label=a)
    ax.set_title("training loss (mean over seeds)", fontsize=9)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    p = out / "learning_curves.png"
    _save_fig(fig, p)
    plt.close(fig)
    paths.append(p)

    sweep = [(e, s["hybrid"]) for e, s in res["summary"].items()
             if "hybrid" in s and f"{s['hybrid']['metric']}_by_think_iters" in s["hybrid"]]
    if sweep:
        fig, axes = plt.subplots(1, len(sweep), figsize=(4.2 * len(sweep), 3.4), squeeze=False)
        for j, (e, h) in enumerate(sweep):
            ax = axes[0, j]
            metric = h["metric"]
            scale = 100 if metric == "accuracy" else 1
            sw = h[f"{metric}_by_think_iters"]
            ts = [int(t) for t in sw]
            ms = np.array([m for m, _ in sw.values()])
            cis = np.array([0.0 if math.isnan(c) else c for _, c in sw.values()])
            ax.errorbar(ts, scale * ms, yerr=scale * cis, color=colors["hybrid"], marker="o", capsize=3, label="hybrid")
            for a in ("causal", "pause"):
                if a in res["summary"][e]:
                    ax.axhline(scale * res["summary"][e][a]["mean"], color=colors[a], ls=":", label=a)
            if e in res["chance"]:
                ax.axhline(100 * res["chance"][e]["accuracy"], color="gray", ls="--", label="chance")
            if metric == "accuracy":
                ax.set_ylim(-3, 103)
            ax.set_xscale("log", base=2)
            ax.set_xticks(ts, [str(t) for t in ts])
            ax.set_xlabel("thinking iterations at test time")
            ax.set_ylabel("accuracy %" if metric == "accuracy" else "loss / token")
            ax.set_title(Path(e).name if not e.startswith("task:") else e, fontsize=9)
            ax.grid(alpha=0.3)
            if j == 0:
                ax.legend(fontsize=8)
        fig.tight_layout()
        p = out / "think_iters.png"
        _save_fig(fig, p)
        plt.close(fig)
        paths.append(p)
    return paths


def _save_fig(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def print_table(res: dict[str, Any], file=None) -> None:
    """The results table in the terminal (plain text)."""
    file = file or sys.stdout
    for e, per_arm in res["summary"].items():
        if not per_arm:
            continue
        metric = next(iter(per_arm.values()))["metric"]
        print(f"\n{e}", file=file)
        print(f"  {'arm':<8} {metric + ' (95% CI)':>22} {'params':>10} {'train FLOPs/ex':>15} {'infer FLOPs/ex':>15}",
              file=file)
        for a, s in per_arm.items():
            print(f"  {a:<8} {_fmt_metric(metric, s['mean'], s['ci95']):>22} {s['params']:>10,} "
                  f"{_fmt_flops(s['train_flops_per_example']):>15} {_fmt_flops(s['inference_flops_per_example']):>15}",
                  file=file)
        ch = res["chance"].get(e)
        if ch:
            print(f"  {'chance':<8} {100 * ch['accuracy']:>22.1f}", file=file)
        sw = per_arm.get("hybrid", {}).get(f"{metric}_by_think_iters")
        if sw:
            print("  hybrid by test-time thinking iterations: " + ", ".join(
                f"T={t}: {_fmt_metric(metric, m, ci)}" for t, (m, ci) in sw.items()), file=file)
    print("\n" + overall_statement(res), file=file)


# ------------------------------------------------------------------------------------ CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train", required=True, metavar="FILE", help="training data (file or task:NAME)")
    p.add_argument("--eval", action="append", required=True, metavar="FILE", help="eval file (repeatable)")
    p.add_argument("--out", required=True, metavar="DIR", help="report folder")
    p.add_argument("--steps", type=int, help="training steps per run")
    p.add_argument("--seeds", type=int, default=3, help="seeds per arm (default 3)")
    p.add_argument("--arms", default=",".join(ARMS), help="comma-separated arms (default causal,pause,hybrid)")
    p.add_argument("--config", metavar="FILE", help="YAML training config shared by every run")
    p.add_argument("--preset", metavar="NAME", help="model preset (default tiny-bytes)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any other config key")
    p.add_argument("--think-sweep", default=",".join(map(str, DEFAULT_THINK_SWEEP)),
                   help="test-time thinking iterations for the hybrid (default 1,2,4,8,16; empty: none)")
    p.add_argument("--max-eval", type=int, help="evaluate on at most N examples per eval file")
    p.add_argument("--workers", type=int,
                   help="runs trained at once, each in its own process (default: one per available CPU core)")
    p.add_argument("--threads", type=int, default=1, metavar="N", help="torch threads per run (default 1)")
    p.add_argument("--no-progress", action="store_true")


def _int_list(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{flag} {text!r}: expected comma-separated integers, e.g. 1,2,4,8") from None


def run(args: argparse.Namespace) -> int:
    from hatlm.train import _parse_value

    base = load_config(args.config) if args.config else TrainConfig(data=[args.train])
    over: dict[str, Any] = {}
    for item in args.set:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected KEY=VALUE")
        k, v = item.split("=", 1)
        over[k.strip()] = _parse_value(v)
    if args.preset:
        over["preset"] = args.preset
    over["data"] = [args.train]
    base = apply_overrides(base, over, source="command line")
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    res = compare(args.train, args.eval, args.out, steps=args.steps, seeds=args.seeds, arms=arms, base=base,
                  think_sweep=_int_list(args.think_sweep, "--think-sweep"), max_eval_examples=args.max_eval,
                  workers=args.workers, threads=args.threads, progress=not args.no_progress)
    print_table(res)
    print(f"\nreport: {Path(args.out) / 'results.md'}  (results.json, learning_curves.png, think_iters.png)")
    return 0
