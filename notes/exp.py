"""Lean experiment runner for issue 8 ablations: train arms with hatlm.train.train (in-process, one
thread), evaluate teacher-forced exact match on every eval level at several test-time T, print and
append JSON lines. Randomised depth: in training the model is called with think_iters=None so that it
draws T from `think_iters_train` (train.py does this since the issue-8 wiring)."""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

import hatlm.train as tr
from hatlm.util import resolve_device
from hatlm.checkpoint import load_model

from hatlm.evaluate import teacher_forced


def parse_set(items):
    out = {}
    for it in items:
        k, _, v = it.partition("=")
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--task", required=True)
    p.add_argument("--arms", default="hybrid")
    p.add_argument("--seeds", default="0")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--sweep", default="1,2,4,8")
    p.add_argument("--train-d", default=None)
    p.add_argument("--eval-d", default=None)
    p.add_argument("--model", nargs="*", default=[])
    p.add_argument("--train", nargs="*", default=[])
    p.add_argument("--tag", default="")
    p.add_argument("--log", default=str(Path(__file__).resolve().parent / "runs.jsonl"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model_over = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, thinker_layers=1, thought_slots=4, max_think_iters=2)
    model_over.update(parse_set(a.model))
    train_over = dict(batch_size=32, lr=3e-3, min_lr=3e-4, warmup=50, eval_every=0, save_every=0,
                      task_train_size=4000, task_eval_size=200, tensorboard=False, weight_decay=0.01)
    train_over["device"] = a.device
    train_over.update(parse_set(a.train))
    if a.train_d:
        train_over["task_train_difficulties"] = [int(x) for x in a.train_d.split(",")]
    if a.eval_d:
        train_over["task_eval_difficulties"] = [int(x) for x in a.eval_d.split(",")]
    sweep = [int(x) for x in a.sweep.split(",")]
    for arm in a.arms.split(","):
        for seed in [int(s) for s in a.seeds.split(",")]:
            cfg = tr.TrainConfig(data=[f"task:{a.task}"], arm=arm, steps=a.steps, seed=seed, model=dict(model_over),
                                 **train_over)
            t0 = time.time()
            with tempfile.TemporaryDirectory() as d:
                res = tr.train(cfg, d, progress=False, log=lambda s: None)
                model = load_model(res["model_dir"]).eval().to(resolve_device(a.device))
                from hatlm.loader import load_model_and_tokenizer
                from hatlm.datasets import build_sources
                _, tok = load_model_and_tokenizer(res["model_dir"])
                _, evals = build_sources(cfg, tok, lambda s: None)
                rec = {"tag": a.tag, "task": a.task, "arm": arm, "seed": seed, "steps": a.steps, "model": model_over,
                       "train": train_over, "params": res["params"]["total"], "loss": round(res["final_loss"], 4),
                       "acc": {}, "stats": model.thinking_stats()}
                rec["change"] = {}
                for ev in evals:
                    lvl = ev.name.split("/")[-1]
                    if arm in ("hybrid", "looped"):
                        from hatlm.data import collate
                        b = collate(list(ev.rows[:128]), tok.pad_id)
                        with torch.no_grad():
                            rec["change"][lvl] = {str(t): float(model(b.input_ids, prompt_lengths=b.prompt_lengths,
                                                                    lengths=b.lengths, think_iters=t,
                                                                    halting_threshold=0.0).final_change.mean())
                                                  for t in sweep}
                    ts = sweep if arm in ("hybrid", "looped") else [None]
                    rec["acc"][lvl] = {str(t): round(teacher_forced(model, ev.rows, tok.pad_id, think_iters=t)
                                                     ["accuracy_tf"], 3) for t in ts}
            rec["wall_s"] = round(time.time() - t0, 1)
            line = json.dumps(rec)
            print(line, flush=True)
            with open(a.log, "a") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    sys.exit(main())
