"""hatlm.distributed on the CPU with gloo: 2 processes (FSDP2) equal 1 process with the same global batch.

Each run trains the hybrid arm (a weight-shared thinker called T = 3 times per forward) for a few AdamW
steps on batches whose rows have different lengths, so the two ranks see different numbers of tokens.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import as_if_trained, make_config

import hatlm
from hatlm.distributed import (
    DistEnv,
    export_hf,
    full_state_dict,
    init_distributed,
    load_checkpoint,
    per_rank_batch,
    save_checkpoint,
    shard_model,
)
from hatlm.errors import UserError
from hatlm.lora import LoraSpec, add_lora
from hatlm.model import HatLM

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")

GLOBAL_BATCH, SEQ, STEPS = 4, 12, 4


def make_model(lora: bool) -> HatLM:
    torch.manual_seed(0)
    model = HatLM(make_config(arm="hybrid", max_think_iters=3))
    as_if_trained(model)  # open the zero-initialised gates: the thinker matters (and gets gradients) from step 0
    if lora:
        add_lora(model, LoraSpec(r=4, alpha=8))
        torch.manual_seed(1)
        with torch.no_grad():  # non-zero B so that the adapters matter from step 0
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1)
    return model


def batch(step: int, vocab: int):
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(3, vocab, (GLOBAL_BATCH, SEQ), generator=g)
    lengths = torch.randint(7, SEQ + 1, (GLOBAL_BATCH,), generator=g)
    prompts = torch.randint(2, 6, (GLOBAL_BATCH,), generator=g)
    return ids, prompts, lengths


def train(model, opt, steps, rank: int = 0, world: int = 1) -> list[float]:
    """Each rank's loss = its token-loss sum / the global token count; gradients are summed."""
    b = per_rank_batch(GLOBAL_BATCH, world)
    losses = []
    for step in steps:
        ids, prompts, lengths = batch(step, model.config.vocab_size)
        valid = torch.arange(SEQ - 1)[None] < (lengths - 1)[:, None]  # positions predicting a real token
        total = valid.sum()
        rows = slice(rank * b, (rank + 1) * b)
        out = model(ids[rows], prompt_lengths=prompts[rows], lengths=lengths[rows]).logits
        tok = F.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]), ids[rows, 1:].reshape(-1), reduction="none")
        loss = (tok * valid[rows].reshape(-1)).sum() / total
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def make_opt(model, kind: str = "sgd"):
    params = [p for p in model.parameters() if p.requires_grad]
    if kind == "sgd":
        # Linear in the gradients: 1-process vs 2-process differences stay at float32 rounding. (Adam
        # divides by sqrt(v) + eps, so an element whose gradient is rounding noise, ~1e-9, moves by up to lr
        # in either run: Adam is compared 2-process against 2-process, for the resume.)
        return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=0.01)
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)


def reference(lora: bool, steps=range(STEPS)) -> dict[str, torch.Tensor]:
    model = make_model(lora)
    train(model, make_opt(model), steps)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------ spawned workers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, job: str, tmp: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    env = init_distributed("cpu")
    try:
        globals()[job](env, tmp)
    finally:
        dist.destroy_process_group()


def job_train(env: DistEnv, tmp: str) -> None:
    # Full fine-tune with activation checkpointing, through to an HF export.
    model = shard_model(make_model(lora=False), env, checkpointing=True)
    # Per-rank parameter bytes as FSDP2 holds them (padded dim-0 shards), for hatlm.plan's count.
    storages = {p.to_local().untyped_storage().data_ptr(): p.to_local().untyped_storage().nbytes()
                for p in model.parameters()}  # fmt: skip
    torch.save(sum(storages.values()), f"{tmp}/param_bytes_rank{env.rank}.pt")
    train(model, make_opt(model), range(STEPS), env.rank, env.world_size)
    sd = full_state_dict(model)
    if env.is_main:
        torch.save(sd, f"{tmp}/full.pt")
    export_hf(model, f"{tmp}/export", env)
    # LoRA (frozen base, adapters + thinker trained), no checkpointing.
    model = shard_model(make_model(lora=True), env)
    train(model, make_opt(model), range(STEPS), env.rank, env.world_size)
    sd = full_state_dict(model)
    if env.is_main:
        torch.save(sd, f"{tmp}/lora.pt")
    # AdamW: an uninterrupted run, and the first half of an interrupted one (saved after 2 steps, then the
    # processes end).
    model = shard_model(make_model(lora=False), env)
    train(model, make_opt(model, "adamw"), range(STEPS), env.rank, env.world_size)
    sd = full_state_dict(model)
    if env.is_main:
        torch.save(sd, f"{tmp}/adamw.pt")
    model = shard_model(make_model(lora=False), env)
    opt = make_opt(model, "adamw")
    train(model, opt, range(2), env.rank, env.world_size)
    save_checkpoint(f"{tmp}/ckpt", model, opt, step=2)


def job_resume(env: DistEnv, tmp: str) -> None:
    torch.manual_seed(123)  # a different init: everything must come from the checkpoint
    model = HatLM(make_config(arm="hybrid", max_think_iters=3))
    model = shard_model(model, env)
    opt = make_opt(model, "adamw")
    meta = load_checkpoint(f"{tmp}/ckpt", model, opt)
    train(model, opt, range(meta["step"], STEPS), env.rank, env.world_size)
    sd = full_state_dict(model)
    if env.is_main:
        torch.save(sd, f"{tmp}/resumed.pt")


def spawn(job: str, tmp, world: int = 2) -> None:
    mp.spawn(_worker, args=(world, _free_port(), job, str(tmp)), nprocs=world, join=True)


def assert_state_close(got: dict, want: dict, atol=1e-5) -> None:
    assert set(got) == set(want)
    for k in want:  # (FSDP2 holds 0-dim parameters as [1])
        torch.testing.assert_close(got[k].float().reshape(want[k].shape), want[k].float(), atol=atol, rtol=0, msg=k)


@pytest.mark.slow
def test_two_processes_equal_one_and_resume_equals_no_stop(tmp_path):
    spawn("job_train", tmp_path)
    spawn("job_resume", tmp_path)
    full, lora = reference(lora=False), reference(lora=True)
    # The runs did move the weights (the comparison is not between untouched models).
    assert not torch.allclose(full["thinker.layers.0.self_attn.q_proj.weight"],
                              make_model(False).state_dict()["thinker.layers.0.self_attn.q_proj.weight"])  # fmt: skip
    assert_state_close(torch.load(tmp_path / "full.pt"), full)
    assert_state_close(torch.load(tmp_path / "lora.pt"), lora)
    resumed, adamw = torch.load(tmp_path / "resumed.pt"), torch.load(tmp_path / "adamw.pt")
    assert_state_close(resumed, adamw, atol=1e-6)
    # hatlm.plan's per-GPU parameter bytes (computed on the meta device) are what FSDP2 really holds.
    from hatlm import plan as P

    s = P.Strategy(finetune="full", world=2, compute_dtype=torch.float32, frozen_dtype=torch.float32)
    planned = P.state_bytes(P.meta_model(make_model(False).config, s), s)["params"]
    assert [torch.load(tmp_path / f"param_bytes_rank{r}.pt") for r in (0, 1)] == [planned, planned]
    # The HF export is a plain checkpoint with the trained weights.
    exported = hatlm.load(tmp_path / "export").state_dict()
    assert_state_close(exported, full)


def test_world_size_must_divide_the_batch():
    assert per_rank_batch(8, 4) == 2
    with pytest.raises(UserError, match="does not divide among 3 processes"):
        per_rank_batch(8, 3)


def test_shard_model_without_process_group_is_a_clear_error():
    with pytest.raises(UserError, match="torchrun"):
        shard_model(make_model(False), DistEnv())


# ------------------------------------------------------------------------------------ hatlm train under torchrun


def _train_cfg(tmp, **extra):
    from test_train import TINY_RUN

    from hatlm.data import write_jsonl
    from hatlm.tasks import make_split
    from hatlm.train import TrainConfig

    data = f"{tmp}/train.jsonl"
    if not os.path.exists(data):
        train_ex, _ = make_split("recall", seed=0, n_train=64, n_eval=8, train_difficulties=[2], eval_difficulties=[2])
        write_jsonl(train_ex, data)
    return TrainConfig(**{**TINY_RUN, "think_iters_min": None, "data": [data], "steps": 6, "save_every": 3,
                          "eval_every": 0, "device": "cpu", **extra})  # fmt: skip


def job_train_stop(env: DistEnv, tmp: str) -> None:
    from hatlm.train import train

    def stop(step, loss):
        if step == 5:
            raise KeyboardInterrupt  # after the checkpoint at step 3
        return loss

    try:
        train(_train_cfg(tmp, lora="r=2,alpha=4"), f"{tmp}/stopped", progress=False, loss_hook=stop)
    except KeyboardInterrupt:
        pass


def job_train_resume(env: DistEnv, tmp: str) -> None:
    from hatlm.train import train

    train(_train_cfg(tmp, lora="r=2,alpha=4"), f"{tmp}/stopped", resume=True, progress=False)


@pytest.mark.slow
def test_torchrun_train_equals_one_process_and_lora_resume_is_exact(tmp_path):
    import subprocess
    import sys

    import yaml

    from hatlm.train import train

    cfg = _train_cfg(tmp_path)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "hatlm"]
    r = subprocess.run([*torchrun, "train", "--config", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "two"),
                        "--no-progress"], env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("trained hybrid for 6 steps") == 1  # rank 0 reports
    one = train(cfg, tmp_path / "one", progress=False)
    a, b = hatlm.load(tmp_path / "one" / "model").state_dict(), hatlm.load(tmp_path / "two" / "model").state_dict()
    assert_state_close(b, a, atol=1e-5)
    curve = [r["loss"] for r in map(__import__("json").loads, open(tmp_path / "two" / "metrics.jsonl"))]
    assert curve[-1] == pytest.approx(one["final_loss"], rel=1e-5) and len(curve) == 6
    # A global batch the processes cannot share is refused with a clear message.
    odd = [*torchrun, "train", "--config", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "odd"), "--batch-size",
           "7", "--no-progress"]  # fmt: skip
    r = subprocess.run(odd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and "does not divide among 2 processes" in r.stderr

    # LoRA under FSDP: stopped after its step-3 checkpoint, resumed, equals the uninterrupted 1-process run.
    spawn("job_train_stop", tmp_path)
    assert not (tmp_path / "stopped" / "model").exists()
    spawn("job_train_resume", tmp_path)
    train(_train_cfg(tmp_path, lora="r=2,alpha=4"), tmp_path / "lora1", progress=False)
    a = hatlm.load(tmp_path / "lora1" / "model").state_dict()
    assert_state_close(hatlm.load(tmp_path / "stopped" / "model").state_dict(), a, atol=1e-5)
