"""`hatlm train`: exact resume after a real kill, NaN stop, YAML config and overrides, schedule."""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from hatlm.cli import main, train_arguments
from hatlm.cli import train_config_from_args as config_from_args
from hatlm.data import Example, write_jsonl
from hatlm.errors import ConfigError, UserError
from hatlm.tasks import make_split
from hatlm.train import (
    KILL_AT_STEP_ENV,
    TrainConfig,
    TrainingDiverged,
    apply_overrides,
    load_config,
    make_scheduler,
    train,
)
from hatlm.trainstate import latest_checkpoint, read_metrics

# A tiny hybrid that exercises everything resume has to restore: AdamW moments, the LR schedule,
# gradient accumulation, data order across an epoch boundary (96 examples, 16 per step) and the
# torch RNG (thinking iterations sampled per step from [1, 3]).
TINY_MODEL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, thinker_layers=1, thought_slots=2, max_think_iters=3)
TINY_RUN = dict(preset="tiny-bytes", arm="hybrid", model=TINY_MODEL, batch_size=8, grad_accum=2, lr=3e-3,
                warmup=4, min_lr=3e-4, think_iters=3, think_iters_min=1, eval_every=10, eval_max_examples=16,
                max_len=48, tensorboard=False)


@pytest.fixture(scope="module")
def data_files(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("data")
    train_ex, evals = make_split("recall", seed=0, n_train=96, n_eval=16, train_difficulties=[2, 3],
                                 eval_difficulties=[3])
    write_jsonl(train_ex, d / "train.jsonl")
    write_jsonl(next(iter(evals.values())), d / "eval.jsonl")
    return d / "train.jsonl", d / "eval.jsonl"


def _write_config(path: Path, **extra) -> Path:
    path.write_text(yaml.safe_dump({**TINY_RUN, **extra}))
    return path


def _cmd(cfg: Path, data: Path, ev: Path, out: Path, *more: str) -> list[str]:
    return [sys.executable, "-m", "hatlm", "train", "--config", str(cfg), "--data", str(data), "--eval", str(ev),
            "--out", str(out), "--no-progress", *more]


def _env() -> dict[str, str]:
    # One thread in every process: float reductions then run in the same order in both runs.
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _latest_step(out: Path) -> int:
    try:
        return int((out / "checkpoints" / "latest").read_text().strip().split("-")[1])
    except (FileNotFoundError, ValueError, IndexError):
        return -1


def _curve(out: Path) -> list[tuple]:
    return [(r["step"], r["split"], r.get("eval_file"), r["loss"], r.get("think_iters"), r.get("accuracy_tf"))
            for r in read_metrics(out)]


@pytest.mark.slow
def test_resume_after_kill_is_exact(tmp_path, data_files):
    """A real `hatlm train` process SIGKILLed mid-run and resumed ends bit-identical to an
    uninterrupted run: same final weights, same loss curve (train and eval records)."""
    data, ev = data_files
    steps = 24
    cfg = _write_config(tmp_path / "run.yaml", steps=steps, save_every=4)
    full, killed = tmp_path / "full", tmp_path / "killed"

    subprocess.run(_cmd(cfg, data, ev, full), check=True, env=_env(), capture_output=True, timeout=300)

    # The run SIGKILLs itself at the end of step 10 (train.KILL_AT_STEP_ENV): a hard kill at a chosen
    # step, two steps after its last checkpoint (8), so that the metrics of steps 9-10 must be dropped.
    r = subprocess.run(_cmd(cfg, data, ev, killed), env={**_env(), KILL_AT_STEP_ENV: "10"}, capture_output=True,
                       timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    killed_at = _latest_step(killed)
    assert killed_at == 8
    assert max(rec["step"] for rec in read_metrics(killed)) == 10
    assert not (killed / "model").exists()  # the final model is only written at the end

    # `--resume` alone (no --config/--data) continues from the run's saved config.
    r = subprocess.run([sys.executable, "-m", "hatlm", "train", "--out", str(killed), "--resume", "--no-progress"],
                       env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"from step-{killed_at:08d}" in r.stderr

    a = load_file(str(full / "model" / "model.safetensors"))
    b = load_file(str(killed / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    curve_full, curve_killed = _curve(full), _curve(killed)
    assert curve_full == curve_killed
    assert [s for s, split, *_ in curve_full if split == "train"] == list(range(1, steps + 1))
    # Sampled thinking iterations vary (so the RNG state really had to be restored).
    assert len({it for _, split, _, _, it, _ in curve_full if split == "train"}) > 1


def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path, data_files):
    data, ev = data_files
    cfg = TrainConfig(**{**TINY_RUN, "data": [str(data)], "eval": [str(ev)], "steps": 20, "save_every": 3})

    def inject(step, loss):
        return loss * float("nan") if step == 8 else loss

    with pytest.raises(TrainingDiverged, match=r"step 8: the loss is nan .*step-00000006"):
        train(cfg, tmp_path / "run", progress=False, loss_hook=inject)
    ckpt = latest_checkpoint(tmp_path / "run")
    assert ckpt is not None and ckpt.name == "step-00000006"
    weights = load_file(str(ckpt / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert not (tmp_path / "run" / "model").exists()
    last = read_metrics(tmp_path / "run")[-1]
    assert last["step"] == 8 and last["loss"] is None and "non-finite loss" in last["error"]

    # The kept checkpoint is a good one: resuming from it (without the fault) runs to the end.
    res = train(cfg, tmp_path / "run", resume=True, progress=False)
    assert res["steps"] == 20 and math.isfinite(res["final_loss"])


def test_absurd_learning_rate_stops_with_one_line_error(tmp_path, data_files, capsys):
    data, _ = data_files
    cfg = _write_config(tmp_path / "run.yaml", steps=30, save_every=1, eval_every=0, think_iters_min=None,
                        grad_clip=0.0, lr=1e30, warmup=0, min_lr=0.0)
    rc = main(["train", "--config", str(cfg), "--data", str(data), "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "not finite" in err and "last good checkpoint" in err and "Traceback" not in err
    ckpt = latest_checkpoint(tmp_path / "run")
    assert ckpt is not None
    assert all(torch.isfinite(t).all() for t in load_file(str(ckpt / "model.safetensors")).values())


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    train_arguments(p)
    return p.parse_args(list(argv))


def test_yaml_config_and_overrides(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump({"data": ["task:recall"], "steps": 50, "lr": 0.002, "arm": "pause",
                                        "model": {"hidden_size": 48, "thought_slots": 3}}))
    cfg = config_from_args(_args("--config", str(cfg_file), "--out", str(tmp_path / "o"), "--steps", "7",
                                 "--set", "warmup=3", "--set", "num_hidden_layers=1", "--arm", "hybrid"))
    assert (cfg.steps, cfg.lr, cfg.warmup, cfg.arm) == (7, 0.002, 3, "hybrid")
    assert cfg.model == {"hidden_size": 48, "thought_slots": 3, "num_hidden_layers": 1}
    assert cfg.data == ["task:recall"]
    # Overriding `model` itself replaces the mapping; single model keys merge into it.
    c2 = apply_overrides(cfg, {"model": {"hidden_size": 16}, "thought_slots": 1})
    assert c2.model == {"hidden_size": 16, "thought_slots": 1}
    # --data replaces the file's data; a model key given with --set lands under `model`.
    cfg = config_from_args(_args("--config", str(cfg_file), "--out", "o", "--data", "a.jsonl", "--data", "b.jsonl"))
    assert cfg.data == ["a.jsonl", "b.jsonl"]


@pytest.mark.parametrize(
    "content, message",
    [
        ({"stepz": 3}, "unknown key(s) stepz"),
        ({"steps": -1}, "steps must be a positive integer"),
        ({"arm": "thinky"}, "arm must be one of causal, pause, hybrid"),
        ({"model": {"hidden_sise": 3}}, "model: unknown key(s) hidden_sise"),
        ({"lr": 0.001, "min_lr": 0.01}, "min_lr (0.01) must not exceed lr"),
        ({"think_iters_min": 2}, "think_iters_min needs think_iters"),
    ],
)
def test_bad_config_values_are_named(tmp_path, content, message):
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(content))
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert message in str(e.value) and str(f) in str(e.value)


def test_bad_override_and_missing_inputs(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'bogus'"):
        apply_overrides(TrainConfig(data=["x"]), {"bogus": 1})
    with pytest.raises(UserError, match="--set 'steps': expected KEY=VALUE"):
        config_from_args(_args("--out", "o", "--data", "x", "--set", "steps"))
    with pytest.raises(UserError, match="--config .*nope.yaml: no such file"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(UserError, match="--data .*missing.jsonl: no such file"):
        train(TrainConfig(data=[str(tmp_path / "missing.jsonl")]), tmp_path / "o", progress=False)
    with pytest.raises(UserError, match="unknown built-in task 'nosuch'"):
        train(TrainConfig(data=["task:nosuch"]), tmp_path / "o2", progress=False)


def test_resume_guards(tmp_path, data_files):
    """A finished run is not overwritten by a fresh start, and cannot be resumed with a config
    that would change the trained weights (exactness would silently be lost)."""
    data, ev = data_files
    cfg = TrainConfig(**{**TINY_RUN, "data": [str(data)], "steps": 4, "save_every": 2, "eval_every": 0})
    res = train(cfg, tmp_path / "run", progress=False)
    with pytest.raises(UserError, match="already holds a training run; pass --resume"):
        train(cfg, tmp_path / "run", progress=False)
    with pytest.raises(UserError, match=r"different config \(lr: 0.003 in the checkpoint, 0.01 now\)"):
        train(apply_overrides(cfg, {"lr": 0.01}), tmp_path / "run", resume=True, progress=False)
    # Resuming a finished run is a no-op that reports the same result.
    again = train(cfg, tmp_path / "run", resume=True, progress=False)
    assert again["steps"] == 4 and again["final_loss"] == res["final_loss"]


def _old_lr_at(step: int, cfg: TrainConfig) -> float:
    """The schedule as it was written by hand before it became torch's schedulers (the oracle)."""
    if cfg.warmup and step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(1, cfg.steps - cfg.warmup)
    progress = min(1.0, (step - cfg.warmup) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def _lrs(cfg: TrainConfig, n: int) -> list[float]:
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=cfg.lr)
    sched = make_scheduler(opt, cfg)
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("warmup, steps, min_lr", [(10, 110, 1e-4), (4, 60, 3e-4), (1, 5, 1e-4), (0, 30, 0.0),
                                                   (50, 20, 1e-4), (30, 30, 1e-3)])
def test_lr_schedule_matches_the_old_formula(warmup, steps, min_lr):
    cfg = TrainConfig(data=["x"], steps=steps, warmup=warmup, lr=1e-3, min_lr=min_lr)
    got = _lrs(cfg, steps + 1)
    assert got == pytest.approx([_old_lr_at(s, cfg) for s in range(steps + 1)], rel=1e-12, abs=1e-18)


def test_lr_schedule_warmup_then_cosine_and_resumes_exactly():
    cfg = TrainConfig(data=["x"], steps=110, warmup=10, lr=1e-3, min_lr=1e-4)
    lrs = _lrs(cfg, 111)
    assert lrs[0] == pytest.approx(1e-4)  # first update: 1/warmup of the peak
    assert lrs[9] == pytest.approx(1e-3)
    assert lrs[60] == pytest.approx(0.5 * (1e-3 + 1e-4))  # half-way through the cosine
    assert lrs[110] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    # A scheduler restored from a state saved at step k continues with the very same values.
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=cfg.lr)
    sched = make_scheduler(opt, cfg)
    for _ in range(37):
        opt.step()
        sched.step()
    opt2 = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched2 = make_scheduler(opt2, cfg)
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())
    rest = []
    for _ in range(37, 111):
        rest.append(opt2.param_groups[0]["lr"])
        opt2.step()
        sched2.step()
    assert rest == lrs[37:]


def test_text_data_and_builtin_task_train(tmp_path):
    """Plain text trains on windows (loss on the continuation); `task:NAME` brings its own eval sets."""
    text = tmp_path / "story.txt"
    text.write_text("Once upon a time there was a tiny model that wanted to think before it spoke. " * 20)
    base = {**TINY_RUN, "think_iters_min": None, "steps": 3, "save_every": 0, "eval_every": 0}
    res = train(TrainConfig(**{**base, "data": [str(text)], "eval": [str(text)]}), tmp_path / "t", progress=False)
    (name, r), = res["eval"].items()
    assert name == str(text) and r["metric"] == "loss" and math.isfinite(r["loss"]) and r["tokens"] > 0

    res = train(TrainConfig(**{**base, "data": ["task:chain"], "task_train_size": 40, "task_eval_size": 8,
                               "task_train_difficulties": [1], "task_eval_difficulties": [1, 2]}),
                tmp_path / "k", progress=False)
    assert set(res["eval"]) == {"task:chain/chain/d1", "task:chain/chain/d2"}
    assert all(r["metric"] == "accuracy" and r["n"] == 8 for r in res["eval"].values())


def test_too_long_examples_are_reported(tmp_path, capsys):
    f = tmp_path / "d.jsonl"
    write_jsonl([Example("short?", "a"), Example("x" * 200, "b"), Example("ok?", "c")], f)
    msgs: list[str] = []
    cfg = TrainConfig(**{**TINY_RUN, "think_iters_min": None, "data": [str(f)], "steps": 1, "save_every": 0,
                         "eval_every": 0, "max_len": 32})
    train(cfg, tmp_path / "o", progress=False, log=msgs.append)
    assert any("left out 1 longer than max_len=32" in m for m in msgs)
    rec = json.loads((tmp_path / "o" / "metrics.jsonl").read_text().splitlines()[0])
    assert rec["step"] == 1 and rec["split"] == "train"


@pytest.mark.parametrize("k", [2, 5, 17])
def test_checkpoint_with_the_old_lambda_schedule_resumes_on_the_same_learning_rate(k):
    from hatlm.train import _restore_scheduler

    cfg = TrainConfig(data=["x"], steps=50, warmup=5, lr=1e-3, min_lr=1e-4)
    p = torch.nn.Parameter(torch.zeros(1))
    old_opt = torch.optim.AdamW([p], lr=cfg.lr)
    old = torch.optim.lr_scheduler.LambdaLR(old_opt, lambda s: _old_lr_at(s, cfg) / cfg.lr)  # as written before
    for _ in range(k):
        old_opt.step()
        old.step()
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = make_scheduler(opt, cfg)
    opt.load_state_dict(old_opt.state_dict())  # the order train() restores them in
    _restore_scheduler(sched, old.state_dict(), k)
    for step in range(k, 50):
        assert opt.param_groups[0]["lr"] == pytest.approx(_old_lr_at(step, cfg), rel=1e-12)
        opt.step()
        sched.step()
