"""hatlm.plan: the meta-device memory plan against a tiny model trained for real on the CPU.

Parameter, gradient and optimizer-state bytes must match exactly. Activations are checked against the
bytes of the distinct storages autograd really saves during a real forward (the model's own code path,
the CPU's fused attention kernel, torch's real checkpointing) within 3%: the plan composes measured
pieces (decoder stack, thinker iterations, head) and an analytic estimate of the small glue between them.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from conftest import make_config

from hatlm import plan as P
from hatlm.cli import main
from hatlm.model import HatLM

pytest.importorskip("peft")

F32 = dict(compute_dtype=torch.float32, frozen_dtype=torch.float32, master_dtype=torch.float32)


def real_model(cfg, s: P.Strategy) -> HatLM:
    torch.manual_seed(0)
    model = HatLM(cfg)
    if s.finetune == "lora":
        P.inject_lora(model, s.lora_r)
    model.train()
    return model


def real_saved_bytes(model: HatLM, s: P.Strategy) -> int:
    """Distinct non-parameter storages saved for backward by a real forward + loss, plus what torch's
    checkpoint keeps (its arguments) when activation checkpointing is on."""
    cfg = model.config
    model.set_gradient_checkpointing(s.checkpointing)
    B, S = s.batch, s.seq_len
    ids = torch.randint(3, cfg.vocab_size, (B, S), generator=torch.Generator().manual_seed(1))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}
    keep = []

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
            keep.append(t)
        return t

    original = cp.checkpoint

    def checkpoint(fn, *args, **kwargs):
        for t in P._tensors(args):  # tensors, also inside tuples and dataclasses (ExtraAttention)
            pack(t)
        return original(fn, *args, **kwargs)

    cp.checkpoint = checkpoint
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            if cfg.arm == "causal":
                logits = model(ids)
            else:
                pl = torch.full((B,), s.prompt_len)
                logits = model(ids, prompt_lengths=pl, think_iters=s.think_iters, halting_threshold=0.0).logits
            F.cross_entropy(logits.float().reshape(B * S, -1), ids.reshape(-1))
    finally:
        cp.checkpoint = original
    return sum(seen.values())


@pytest.mark.parametrize("arm", ["causal", "hybrid"])
@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_parameter_gradient_optimizer_bytes_are_exact(arm, finetune):
    cfg = make_config(arm=arm)
    s = P.Strategy(finetune=finetune, lora_r=4, batch=2, seq_len=24, prompt_len=8, think_iters=2, **F32)
    model = real_model(cfg, s)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    ids = torch.randint(3, cfg.vocab_size, (2, 24))
    if arm == "causal":
        logits = model(ids)
    else:
        logits = model(ids, prompt_lengths=torch.tensor([8, 8]), think_iters=2).logits
    F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids.reshape(-1)).backward()
    opt.step()

    def nbytes(ts):
        return sum(t.numel() * t.element_size() for t in ts)

    measured = dict(
        params=nbytes(model.parameters()),
        grads=nbytes(p.grad for p in model.parameters() if p.grad is not None),
        optimizer=nbytes(t for st in opt.state.values() for t in st.values()),
        trainable_params=sum(p.numel() for p in trainable),
        frozen_params=sum(p.numel() for p in model.parameters() if not p.requires_grad),
    )
    planned = P.state_bytes(P.meta_model(cfg, s), s)
    assert planned == measured
    if finetune == "lora":  # the thinking path trains fully, the base only through adapters
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        assert any("lora_A" in n for n in names) and not any(n.startswith("lm_head") for n in names)
        assert all("lora_" in n for n in names if n.startswith("decoder."))
        assert (arm == "hybrid") == any(n.startswith("thinker.") for n in names)


@pytest.mark.parametrize("arm", ["causal", "hybrid"])
@pytest.mark.parametrize("finetune", ["full", "lora"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_bytes_match_real_saved_tensors(arm, finetune, checkpointing):
    cfg = make_config(arm=arm, sliding_window=16)
    s = P.Strategy(finetune=finetune, lora_r=4, batch=2, seq_len=40, prompt_len=12, think_iters=3,
                   checkpointing=checkpointing, **F32)  # fmt: skip
    parts = P.activation_parts(P.meta_model(cfg, s), s)
    planned = P.activation_bytes(cfg, s, parts, transient=False)  # saved tensors only
    if checkpointing:
        # What is kept across the step; the one block recomputed at a time during backward comes on top
        # (and is the block measured in the checkpointing-off case).
        planned -= max(parts["block"], parts["iteration"])
    measured = real_saved_bytes(real_model(cfg, s), s)
    assert planned == pytest.approx(measured, rel=0.03)
    if arm == "causal":  # no glue around the decoder: the composition is exact
        assert planned == measured


def test_fsdp_shard_sizes():
    # FSDP2 splits dim 0 into `world` chunks and pads every rank to the largest chunk.
    assert P.shard_numel(torch.Size([10, 3]), 1) == 30
    assert P.shard_numel(torch.Size([10, 3]), 4) == 9  # ceil(10/4) = 3 rows
    assert P.shard_numel(torch.Size([]), 8) == 1
    cfg = make_config(arm="hybrid")
    s1 = P.Strategy(finetune="full", world=1, **F32)
    s2 = dataclasses.replace(s1, world=2)
    model = P.meta_model(cfg, s1)
    b1, b2 = P.state_bytes(model, s1), P.state_bytes(model, s2)
    assert b1["params"] / 2 <= b2["params"] <= b1["params"] / 2 + 4 * sum(
        p[0].numel() if p.dim() else 1 for p in model.parameters()
    )
    assert P.buffer_bytes(model, s1) == 0 and P.buffer_bytes(model, s2) > 0


def test_cli_plan_mistral_7b(capsys):
    assert main(["info", "mistral-7b", "--plan", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 2 * 3 * 2  # full/LoRA x 1, 2, 8 GPUs x checkpointing off/on
    by = {(r["strategy"]["finetune"], r["strategy"]["world"], r["strategy"]["checkpointing"]): r for r in rows}
    full1, lora1 = by[("full", 1, True)], by[("lora", 1, True)]
    n = full1["trainable_params"]
    assert full1["frozen_params"] == 0
    # fp32 master weights + fp32 gradients + two fp32 AdamW moments (+ 4-byte steps).
    assert (full1["params"], full1["grads"]) == (4 * n, 4 * n)
    assert 8 * n < full1["optimizer"] < 8 * n + 4 * 1000
    assert full1["total"] > 80 * 2**30  # full fine-tuning 7B does not fit one 80 GiB card...
    assert by[("full", 8, True)]["total"] < 40 * 2**30  # ...but does on 8
    assert lora1["total"] < 40 * 2**30  # LoRA fits one card
    # The frozen base is stored in bf16; the LoRA adapters add r * (d_in + d_out) per projection.
    assert lora1["frozen_params"] == 7_241_732_096
    assert by[("lora", 1, False)]["activations"] > 5 * by[("lora", 1, True)]["activations"]
    assert main(["info", "mistral-7b", "--plan", "--gpus", "1"]) == 0
    table = capsys.readouterr().out
    assert "| LoRA r=16" in table and "| full fine-tune" in table


def test_cli_plan_bad_input(capsys):
    assert main(["info", "tiny", "--plan", "--gpus", "0"]) == 2
    assert "world must be a positive integer" in capsys.readouterr().err
    assert main(["info", "tiny", "--plan", "--seq-len", "8", "--prompt-len", "16"]) == 2
    assert "exceeds seq_len" in capsys.readouterr().err
