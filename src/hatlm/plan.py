"""Training memory plan: bytes per GPU for each strategy, before anyone rents a GPU (`hatlm info X --plan`).

Everything is computed from models built on the meta device (shapes only, no storage, milliseconds for
7B). Per GPU and strategy:

  parameters   every parameter's FSDP2 shard: dim 0 split into `world` chunks of ceil(rows / world) rows
               (FSDP2 pads the last one), in the storage dtype: full fine-tune keeps fp32 master weights;
               LoRA keeps the frozen base in bf16 and the trainable tensors (adapters, thinker, slots,
               gates) in fp32.
  gradients    fp32 shards of the trainable parameters (FSDP2 reduce-scatters into the parameter dtype).
  optimizer    AdamW: exp_avg and exp_avg_sq shards in fp32 plus its 4-byte `step` per tensor.
  activations  bytes of the tensors autograd saves for backward, measured on the meta device with
               `torch.autograd.graph.saved_tensors_hooks` (deduplicated by storage, parameters excluded)
               for one decoder block, one thinker iteration and the head (final norm, LM head, fp32
               cross-entropy) at the real shapes, in the compute dtype (bf16: FSDP2's MixedPrecisionPolicy
               computes with bf16 copies of the parameters, no autocast weight copies), then composed:
                 off: L_dec · block(B, S + m) + T · iteration(B, P + m) + head(B, S)
                 on (activation checkpointing of each block and iteration): the inputs they keep,
                     L_dec · B·(S + m)·d + T · B·(P + m)·d, plus the largest single block/iteration
                     recomputed during backward, plus the head.
               SDPA is modelled as a fused kernel (flash / memory-efficient / CPU flash) that saves q, k, v,
               the output, the fp32 log-sum-exp and its mask converted to the compute dtype — not the
               attention matrix. Batch B is per GPU (data parallel), so activations do not shrink with
               more GPUs.
  buffers      FSDP2 (world > 1): the all-gathered bf16 parameters of the largest unit, twice (the current
               one and the prefetched next), plus that unit's unsharded fp32 gradients before the
               reduce-scatter when it is trainable.

Transient: the float32 gradient of the logits (B·S·vocab·4 bytes) is added to the activations: it is
the largest temporary of a step (1 GiB at B=4, S=2048, vocab 32000). Not counted: the CUDA context and
allocator fragmentation (budget ~1-3 GiB per GPU), smaller temporaries, the KV cache (training has none).
Checked on an H200 (bench/gpu.py, LoRA r=16 on the causal 7B, checkpointing on, seq 2048): measured
peaks 16.0 / 17.4 / 20.2 GiB at B = 1 / 2 / 4 against 16.3 / 17.7 / 20.4 GiB planned (incl. the 0.85 GiB
of the hybrid's thinking path that the benchmark keeps resident).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hatlm.config import ModelConfig
from hatlm.errors import UserError


@dataclass(frozen=True)
class Strategy:
    finetune: str = "lora"  # "full" | "lora"
    lora_r: int = 16
    world: int = 1  # GPUs (FSDP2 shards over all of them)
    checkpointing: bool = True
    batch: int = 1  # sequences per GPU
    seq_len: int = 2048  # text tokens per sequence (prompt + answer)
    prompt_len: int = 512  # tokens the thinker refines (hybrid)
    think_iters: int | None = None  # T; None → the config's max_think_iters
    compute_dtype: torch.dtype = torch.bfloat16
    frozen_dtype: torch.dtype = torch.bfloat16  # LoRA's frozen base
    master_dtype: torch.dtype = torch.float32  # trainable parameters, gradients, optimizer states

    def validate(self) -> None:
        if self.finetune not in ("full", "lora"):
            raise UserError(f"finetune must be 'full' or 'lora'; got {self.finetune!r}")
        for name in ("lora_r", "world", "batch", "seq_len", "prompt_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise UserError(f"{name} must be a positive integer; got {v!r}")
        if self.prompt_len > self.seq_len:
            raise UserError(f"prompt_len ({self.prompt_len}) exceeds seq_len ({self.seq_len})")


@dataclass
class MemoryPlan:
    strategy: Strategy
    trainable_params: int
    frozen_params: int
    params: int  # bytes per GPU
    grads: int
    optimizer: int
    activations: int
    buffers: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations + self.buffers

    def as_dict(self) -> dict[str, Any]:
        s = {
            k: (str(v).replace("torch.", "") if isinstance(v, torch.dtype) else v)
            for k, v in asdict(self.strategy).items()
        }
        return dict(strategy=s, trainable_params=self.trainable_params, frozen_params=self.frozen_params,
                    params=self.params, grads=self.grads, optimizer=self.optimizer, activations=self.activations,
                    buffers=self.buffers, total=self.total)  # fmt: skip


# ------------------------------------------------------------------------------------ the meta model


def meta_model(config: ModelConfig, strategy: Strategy) -> nn.Module:
    """The model on the meta device with the strategy's trainable set (LoRA adapters injected by PEFT)."""
    from hatlm.model import HatLM

    with torch.device("meta"):
        model = HatLM(config)
    if strategy.finetune == "lora":
        inject_lora(model, strategy.lora_r)
    else:
        model.requires_grad_(True)
    return model


def inject_lora(model: nn.Module, r: int) -> None:
    """PEFT LoRA on the decoder projections; base frozen, adapters and the thinking path trainable."""
    from peft import LoraConfig, inject_adapter_in_model

    from hatlm.lora import target_regex

    cfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=target_regex(), bias="none")
    # On the meta device PEFT's initialisation is pure overhead (seconds for 7B): create the adapters
    # without it.
    inject_adapter_in_model(cfg, model, low_cpu_mem_usage=model.decoder.embed_tokens.weight.is_meta)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name or not name.startswith(("decoder.", "lm_head.")))


def shard_numel(shape: torch.Size, world: int) -> int:
    """Elements FSDP2 allocates per rank for a parameter of this shape (dim-0 chunks, padded)."""
    if world == 1:
        return math.prod(shape)
    if len(shape) == 0:
        return 1
    return math.ceil(shape[0] / world) * math.prod(shape[1:])


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP2 wraps one by one (hatlm.distributed does the same): decoder blocks, the thinker."""
    units = list(model.decoder.layers)
    if getattr(model, "thinker", None) is not None:
        units.append(model.thinker)
    return units


def state_bytes(model: nn.Module, strategy: Strategy) -> dict[str, int]:
    """Parameter, gradient and optimizer-state bytes per GPU, and parameter counts."""
    w, master = strategy.world, torch.tensor([], dtype=strategy.master_dtype).element_size()
    frozen_b = torch.tensor([], dtype=strategy.frozen_dtype).element_size()
    out = dict(params=0, grads=0, optimizer=0, trainable_params=0, frozen_params=0)
    seen: set[int] = set()
    for p in model.parameters():  # parameters() yields a tied tensor once
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = shard_numel(p.shape, w)
        if p.requires_grad:
            out["trainable_params"] += p.numel()
            out["params"] += n * master
            out["grads"] += n * master
            out["optimizer"] += 2 * n * master + 4  # exp_avg, exp_avg_sq, step
        else:
            out["frozen_params"] += p.numel()
            out["params"] += n * (master if strategy.finetune == "full" else frozen_b)
    return out


def buffer_bytes(model: nn.Module, strategy: Strategy) -> int:
    if strategy.world == 1:
        return 0
    cb = torch.tensor([], dtype=strategy.compute_dtype).element_size()
    mb = torch.tensor([], dtype=strategy.master_dtype).element_size()
    best = 0
    for unit in fsdp_units(model):
        ps = list(unit.parameters())
        gathered = 2 * sum(p.numel() for p in ps) * cb
        grads = sum(p.numel() for p in ps if p.requires_grad) * mb
        best = max(best, gathered + grads)
    return best


# ------------------------------------------------------------------------------------ activations


class _FusedSDPA(torch.autograd.Function):
    """Shape-only stand-in for a fused attention kernel: saves what flash / memory-efficient attention
    save for backward (q, k, v, output, fp32 log-sum-exp, and the mask in the compute dtype)."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        # Fused kernels lay the output out as [B, S, H, D] (a transposed view), so the caller's
        # transpose + reshape before o_proj is free and shares this storage.
        B, H, S = q.shape[:3]
        out = torch.empty(B, S, H, v.shape[-1], dtype=q.dtype, device=q.device).transpose(1, 2)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        saved = [q, k, v, out, lse]
        if mask is not None:
            saved.append(torch.empty(mask.shape, dtype=q.dtype, device=q.device))
            if mask.requires_grad:
                # A learned additive bias (the thinker's relevance) needs its own gradient: no fused
                # kernel returns one, and the attention that does (PyTorch's math path) keeps the
                # probabilities [B, H, S, S] in fp32.
                saved.append(torch.empty(B, H, S, k.shape[2], dtype=torch.float32, device=q.device))
        ctx.save_for_backward(*saved)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # never run: the plan only counts what is saved
        q, k, v = ctx.saved_tensors[:3]
        mask = ctx.saved_tensors[5] if len(ctx.saved_tensors) > 6 else None
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), (
            None if mask is None else torch.zeros_like(mask))


@contextlib.contextmanager
def fused_sdpa() -> Iterator[None]:
    original = F.scaled_dot_product_attention

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        return _FusedSDPA.apply(q, k, v, attn_mask if isinstance(attn_mask, Tensor) else None)

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def _size(dtype: torch.dtype) -> int:
    return torch.tensor([], dtype=dtype).element_size()


def _tensors(obj: Any) -> Iterator[Tensor]:
    """The tensors in obj: itself, or inside tuples / lists / dataclasses (e.g. layers.ExtraAttention)."""
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            yield from _tensors(o)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from _tensors(getattr(obj, f.name))


@contextlib.contextmanager
def _checkpoint_recorder(record: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """Stand-in for torch.utils.checkpoint.checkpoint while measuring: the tensors a checkpointed call
    keeps are its arguments (recorded); what runs inside saves nothing (no_grad), and the output
    requires grad like the real one."""
    import torch.utils.checkpoint as cp

    original = cp.checkpoint

    def checkpoint(fn, *args, **kwargs):
        for t in _tensors(args):
            record(t)
        with torch.no_grad():
            out = fn(*args)
        return out.requires_grad_()

    cp.checkpoint = checkpoint
    try:
        yield
    finally:
        cp.checkpoint = original


def activation_parts(model: nn.Module, strategy: Strategy) -> dict[str, int]:
    """Saved-for-backward bytes measured on the meta device through the model's own layer code:
    the decoder stack, T thinker iterations and the head, with checkpointing off and on, plus one
    block / one iteration alone (what a checkpointed backward recomputes at a time)."""
    from hatlm.masks import bidirectional_mask

    cfg = model.config
    B, S, d, dt = strategy.batch, strategy.seq_len, cfg.hidden_size, strategy.compute_dtype
    m = cfg.num_thought_slots
    # Parameters in the compute dtype, as FSDP2's mixed precision hands them to the forward.
    model = model.to(dt)
    exclude = {p.untyped_storage()._cdata for p in model.parameters()}
    dev = torch.device("meta")
    was_ckpt, was_training = getattr(model, "gradient_checkpointing", False), model.training
    model.train()

    def measure(fn: Callable[[], Any], ckpt: bool) -> int:
        seen: dict[int, tuple[int, Tensor]] = {}

        def pack(t: Tensor) -> Tensor:
            st = t.untyped_storage()
            if st._cdata not in exclude:  # keep t alive: a freed storage's address could be reused
                seen[st._cdata] = (st.nbytes(), t)
            return t

        model.set_gradient_checkpointing(ckpt)
        with contextlib.ExitStack() as stack:
            stack.enter_context(fused_sdpa())
            if ckpt:
                stack.enter_context(_checkpoint_recorder(pack))
            stack.enter_context(torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t))
            fn()
        return sum(n for n, _ in seen.values())

    n_dec = S + m
    # The decoder's input needs a gradient only if something trainable produced it (embeddings or slots).
    x_grad = model.decoder.embed_tokens.weight.requires_grad or m > 0
    prompt_lengths = torch.full((B,), strategy.prompt_len, device=dev) if m > 0 else None
    seq_lengths = torch.full((B,), n_dec, device=dev)

    def decoder(k: int) -> Callable[[], Any]:
        """The model's own decoder pass (extra-position attention included) over its first k layers."""
        x = torch.empty(B, n_dec, d, dtype=dt, device=dev, requires_grad=x_grad)

        def run() -> Tensor:
            layers = model.decoder.layers
            model.decoder.layers = layers[:k]
            try:
                return model.decoder_pass(x, prompt_lengths, seq_lengths)
            finally:
                model.decoder.layers = layers

        return run

    def stack(ckpt: bool, n: int) -> tuple[int, int]:
        """Bytes for n identical layers from measuring 1 and 2 (the rest is linear), and for 1."""
        one = measure(decoder(1), ckpt)
        if n == 1:
            return one, one
        two = measure(decoder(2), ckpt)
        return one + (n - 1) * (two - one), one

    L = len(model.decoder.layers)
    (decoder_off, block), (decoder_on, _) = stack(False, L), stack(True, L)
    parts = dict(decoder_off=decoder_off, decoder_on=decoder_on, block=block)
    T = think_iters(cfg, strategy)
    if cfg.arm == "hybrid":
        N = strategy.prompt_len + m
        tpos = torch.arange(N, device=dev).expand(B, N)
        rope = model.rope(tpos, dt)
        tmask = model.build_mask(bidirectional_mask(torch.full((B,), N, device=dev)), B, N, N)
        valid = torch.ones(B, N, dtype=torch.bool, device=dev)
        focus = torch.arange(N, device=dev).expand(B, N) >= strategy.prompt_len  # the thought slots

        def think(k: int) -> Callable[[], Any]:
            z = torch.empty(B, N, d, dtype=dt, device=dev, requires_grad=True)
            # as in HatLM.think: the injected input is the starting sequence itself
            return lambda: model.thinker.iterate(z, rope, tmask, valid, k, 0.0, e0=z, focus=focus)

        parts.update(think_off=measure(think(T), False), think_on=measure(think(T), True),
                     iteration=measure(think(1), False))  # fmt: skip
    else:
        parts.update(think_off=0, think_on=0, iteration=0)

    def head() -> None:
        h = torch.empty(B, S, d, dtype=dt, device=dev, requires_grad=True)
        logits = model.logits_from_hidden(h)
        F.cross_entropy(logits.float().reshape(B * S, -1), torch.zeros(B * S, dtype=torch.long, device=dev))

    parts["head"] = measure(head, False)
    # Glue around the stacks (HatLM.layout / decoder_inputs / the readout gather save their sources): the
    # decoder output, the token embeddings, and for the hybrid the prompt embeddings, the refined sequence
    # and its change (the prompt refinement's input). Index and mask tensors are negligible.
    P = strategy.prompt_len
    emb = int(model.decoder.embed_tokens.weight.requires_grad)  # gathers save frozen embeddings not at all
    rows = {"causal": 0, "pause": (S + m) + m + emb * S, "hybrid": (S + m) + m + 2 * (P + m) + emb * (S + P)}[cfg.arm]
    parts["glue"] = B * rows * d * _size(dt)
    model.set_gradient_checkpointing(was_ckpt)
    model.train(was_training)
    return parts


def think_iters(config: ModelConfig, strategy: Strategy) -> int:
    if config.arm != "hybrid":
        return 0
    return config.hybrid.max_think_iters if strategy.think_iters is None else strategy.think_iters


def activation_bytes(
    config: ModelConfig, strategy: Strategy, parts: dict[str, int], transient: bool = True
) -> int:
    """Saved activations (+ with `transient`, the largest temporary of the step: the float32 gradient of
    the logits, B·S·vocab·4 bytes, alive at the start of backward)."""
    extra = strategy.batch * strategy.seq_len * config.vocab_size * 4 if transient else 0
    if not strategy.checkpointing:
        return parts["decoder_off"] + parts["think_off"] + parts["head"] + parts["glue"] + extra
    recompute = max(parts["block"], parts["iteration"])  # one unit's activations during its backward
    return parts["decoder_on"] + parts["think_on"] + recompute + parts["head"] + parts["glue"] + extra


# ------------------------------------------------------------------------------------ plans


def plan(config: ModelConfig, strategy: Strategy) -> MemoryPlan:
    strategy.validate()
    model = meta_model(config, strategy)
    st = state_bytes(model, strategy)
    buffers = buffer_bytes(model, strategy)
    parts = activation_parts(model, strategy)
    return MemoryPlan(strategy, st["trainable_params"], st["frozen_params"], st["params"], st["grads"],
                      st["optimizer"], activation_bytes(config, strategy, parts), buffers)  # fmt: skip


def plan_grid(
    config: ModelConfig,
    *,
    lora_r: int = 16,
    worlds: tuple[int, ...] = (1, 2, 8),
    seq_len: int = 2048,
    batch: int = 1,
    prompt_len: int | None = None,
    think_iters: int | None = None,
) -> list[MemoryPlan]:
    """Full fine-tune and LoRA × GPUs × checkpointing on/off, sharing the meta measurements."""
    prompt_len = prompt_len if prompt_len is not None else max(1, seq_len // 4)
    rows = []
    for finetune in ("full", "lora"):
        base = Strategy(finetune=finetune, lora_r=lora_r, batch=batch, seq_len=seq_len, prompt_len=prompt_len,
                        think_iters=think_iters)  # fmt: skip
        base.validate()
        model = meta_model(config, base)
        parts = activation_parts(model, base)
        model = meta_model(config, base)  # activation_parts cast it to the compute dtype
        for world in worlds:
            for ckpt in (False, True):
                s = Strategy(**{**asdict(base), "world": world, "checkpointing": ckpt})
                s.validate()
                st = state_bytes(model, s)
                act = activation_bytes(config, s, parts)
                rows.append(MemoryPlan(s, st["trainable_params"], st["frozen_params"], st["params"], st["grads"],
                                       st["optimizer"], act, buffer_bytes(model, s)))  # fmt: skip
    return rows


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


def format_plan(config: ModelConfig, rows: list[MemoryPlan], gpu_gib: float = 80.0) -> str:
    s0 = rows[0].strategy
    T = think_iters(config, s0)
    think = (f", thinker {config.hybrid.thinker_layers} layers × T={T} over prompt {s0.prompt_len} + m="
             f"{config.num_thought_slots} slots" if config.arm == "hybrid" else "")  # fmt: skip
    lines = [
        f"Training memory per GPU (GiB), {config.arm} arm: batch {s0.batch} per GPU × {s0.seq_len} tokens{think}.",
        "FSDP2 sharding, bf16 compute, fp32 master weights / gradients / AdamW states; LoRA keeps the frozen "
        "base in bf16.",
        "",
        "| strategy | GPUs | act. ckpt | params | grads | optimizer | activations | FSDP buffers | total | "
        f"fits {gpu_gib:.0f} GiB |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        s = r.strategy
        name = "full fine-tune" if s.finetune == "full" else f"LoRA r={s.lora_r}"
        fits = "yes" if r.total / 2**30 <= gpu_gib * 0.95 else "no"
        lines.append(
            f"| {name} ({r.trainable_params / 1e6:,.1f} M trainable) | {s.world} | "
            f"{'on' if s.checkpointing else 'off'} "
            f"| {_gib(r.params)} | {_gib(r.grads)} | {_gib(r.optimizer)} | {_gib(r.activations)} | {_gib(r.buffers)} "
            f"| {_gib(r.total)} | {fits} |"
        )
    lines += [
        "",
        "Activations: tensors saved for backward, measured on the meta device (fused attention kernel assumed), "
        "plus the fp32 logits gradient; not counted: CUDA context and fragmentation (~1-3 GiB), smaller "
        "temporaries. Fit uses 95% of the card.",
    ]
    return "\n".join(lines)
