"""GPU check of the training paths that the CPU tests cannot reach (one GPU, about a minute).

    PYTHONPATH=src python3 bench/gpu_train_check.py            # writes $OUT/gpu_train_check.md when OUT is set
    PYTHONPATH=src python bench/gpu_train_check.py --device cpu --small   # the same code on a CPU (tested)

(1) `hatlm train --lora` on CUDA: bf16 frozen base, fp32 adapters + thinking path, bf16 autocast, gradient
    checkpointing, adapter checkpoints, stop after a checkpoint + resume, OUT/adapter and the merged OUT/model
    (merged vs unmerged logits compared).
(2) FSDP2 on CUDA with NCCL (one process, world size 1): MixedPrecisionPolicy(bf16, fp32 reduce), the thinker's
    `step` registered as a forward method, summed reductions, activation checkpointing; losses against the same
    model unsharded under bf16 autocast; torch.distributed.checkpoint save → load into a fresh sharded model →
    the next step's loss; export to HF safetensors → reload → logits.
Numbers are reported, not asserted: bf16 on a GPU is not bitwise reproducible across these paths. Each part runs
in its own try/except. Needs no tokenizer package (byte vocabulary, built-in task data).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

try:
    import hatlm  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import hatlm  # noqa: E402
from hatlm.model import HatLM  # noqa: E402

BIG = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
           num_key_value_heads=4, thinker_layers=2, thought_slots=8, max_think_iters=3)  # fmt: skip
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, thinker_layers=1, thought_slots=4, max_think_iters=2)  # fmt: skip


def part_lora(dev: str, dims: dict, tmp: Path, steps: int) -> dict:
    from hatlm.checkpoint import save_model
    from hatlm.loader import load_model_and_tokenizer
    from hatlm.lora import load_with_adapter
    from hatlm.train import TrainConfig, train

    # The base: a saved checkpoint, as a pretrained Mistral folder would be.
    base, tok = load_model_and_tokenizer("tiny-bytes", arm="hybrid", seed=0, **dims)
    save_model(base, tmp / "base", tokenizer=tok)
    del base
    cfg = dict(init_from=str(tmp / "base"), arm="hybrid", data=["task:recall"], steps=steps, batch_size=16,
               lr=1e-3, warmup=2, eval_every=0, save_every=steps // 2, max_len=96, task_train_size=400,
               task_eval_size=16, lora="r=8,alpha=16", dtype="bfloat16", gradient_checkpointing=True, device=dev,
               tensorboard=False)  # fmt: skip
    t0 = time.perf_counter()
    res = train(TrainConfig(**cfg), tmp / "lora", progress=False)
    wall = time.perf_counter() - t0

    def stop(step, loss):
        if step == steps // 2 + 1:
            raise KeyboardInterrupt
        return loss

    try:
        train(TrainConfig(**cfg), tmp / "lora_stop", progress=False, loss_hook=stop)
    except KeyboardInterrupt:
        pass
    train(TrainConfig(**cfg), tmp / "lora_stop", resume=True, progress=False)
    a = hatlm.load(tmp / "lora" / "model").state_dict()
    b = hatlm.load(tmp / "lora_stop" / "model").state_dict()
    resume_diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    merged = hatlm.load(tmp / "lora" / "model").to(dev).eval()
    unmerged = load_with_adapter(tmp / "lora" / "adapter").to(dev).eval()
    ids = torch.randint(3, 250, (2, 24), generator=torch.Generator().manual_seed(0)).to(dev)
    pl = torch.tensor([8, 12], device=dev)
    with torch.no_grad(), torch.autocast(device_type=torch.device(dev).type, dtype=torch.bfloat16):
        lm = merged(ids, prompt_lengths=pl).logits.float()
        lu = unmerged(ids, prompt_lengths=pl).logits.float()
    curve = [json.loads(x)["loss"] for x in open(tmp / "lora" / "metrics.jsonl") if '"train"' in x]
    return dict(steps=steps, wall_s=wall, loss_first=curve[0], loss_last=res["final_loss"],
                adapter_files=sorted(p.name for p in (tmp / "lora" / "adapter").iterdir()),
                resume_max_weight_diff=resume_diff, merged_vs_unmerged_logit_diff=float((lm - lu).abs().max()),
                logit_std=float(lu.std()))  # fmt: skip


def part_fsdp(dev: str, dims: dict, tmp: Path, steps: int) -> dict:
    import torch.distributed as dist

    from hatlm.config import ModelConfig
    from hatlm.distributed import DistEnv, export_hf, load_checkpoint, save_checkpoint, shard_model

    device = torch.device(dev)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29533"), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0")  # fmt: skip
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    env = DistEnv(0, 1, 0, device)
    cfg = ModelConfig.from_name("tiny-bytes", arm="hybrid", **dims)

    def fresh(seed: int = 0) -> HatLM:
        torch.manual_seed(seed)
        m = HatLM(cfg).to(device)
        with torch.no_grad():  # open the zero-initialised gates so that thinking matters
            m.prompt_refine.weight.normal_(0, 0.02)
            for g in m.thought_gate:
                g.normal_(0, 0.5)
        return m

    def batch(step: int):
        g = torch.Generator().manual_seed(step)
        return torch.randint(3, 250, (8, 64), generator=g).to(device), torch.full((8,), 24, device=device)

    def step_loss(m, s: int, autocast: bool) -> torch.Tensor:
        ids, pl = batch(s)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = m(ids, prompt_lengths=pl).logits
        return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))

    def run(m, opt, s0: int, s1: int, autocast: bool) -> list[float]:
        out = []
        for s in range(s0, s1):
            loss = step_loss(m, s, autocast)
            loss.backward()
            opt.step()
            opt.zero_grad()
            out.append(float(loss.detach()))
        return out

    ref = fresh()
    ref.set_gradient_checkpointing(True)
    ref_losses = run(ref, torch.optim.AdamW(ref.parameters(), lr=1e-3), 0, steps, autocast=device.type == "cuda")
    t0 = time.perf_counter()
    sh = shard_model(fresh(), env, checkpointing=True)
    opt = torch.optim.AdamW(sh.parameters(), lr=1e-3)
    half = steps // 2
    losses = run(sh, opt, 0, half, autocast=False)
    save_checkpoint(tmp / "dcp", sh, opt, step=half)
    cont = run(sh, opt, half, steps, autocast=False)
    wall = time.perf_counter() - t0
    sh2 = shard_model(fresh(seed=7), env, checkpointing=True)
    opt2 = torch.optim.AdamW(sh2.parameters(), lr=1e-3)
    meta = load_checkpoint(tmp / "dcp", sh2, opt2)
    resumed = run(sh2, opt2, meta["step"], steps, autocast=False)
    export_hf(sh, tmp / "export", env)
    plain = hatlm.load(tmp / "export").to(device).eval()
    sh.eval()
    with torch.no_grad():
        ids, pl = batch(999)
        a = sh(ids, prompt_lengths=pl).logits.float()
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            b = plain(ids, prompt_lengths=pl).logits.float()
    dist.destroy_process_group()
    rel = [abs(x - y) / abs(y) for x, y in zip(losses + cont, ref_losses)]
    return dict(steps=steps, wall_s=wall, losses_sharded=losses + cont, losses_unsharded_autocast=ref_losses,
                max_rel_loss_diff_vs_unsharded=max(rel), resumed_losses=resumed,
                resume_max_loss_diff=max(abs(x - y) for x, y in zip(resumed, cont)),
                export_logit_max_diff=float((a - b).abs().max()), logit_std=float(b.std()))  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true", help="tiny dimensions (CPU test)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--out", default=os.environ.get("OUT"))
    args = ap.parse_args(argv)
    dims = SMALL if args.small else BIG
    steps = args.steps or (4 if args.small else 20)
    info = f"torch {torch.__version__}"
    if torch.device(args.device).type == "cuda":
        info = f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}); " + info
    results: dict = {"device": info, "dims": dims}
    ok = True
    with tempfile.TemporaryDirectory() as d:
        for name, fn in (("lora", part_lora), ("fsdp", part_fsdp)):
            t0 = time.perf_counter()
            try:
                results[name] = {"status": "ok", **fn(args.device, dims, Path(d), steps)}
            except Exception as e:  # keep the other part's results
                ok = False
                results[name] = {"status": "failed", "error": f"{type(e).__name__}: {e}",
                                 "traceback": traceback.format_exc()[-3000:]}  # fmt: skip
            results[name]["seconds"] = time.perf_counter() - t0
            if torch.device(args.device).type == "cuda":
                results[name]["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
                torch.cuda.reset_peak_memory_stats()
    text = "# GPU training-path check (`bench/gpu_train_check.py`)\n\n```json\n" + json.dumps(
        results, indent=1, default=str) + "\n```\n"  # fmt: skip
    print(text)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gpu_train_check.md").write_text(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
