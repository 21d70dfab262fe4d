"""GPU benchmark on random Mistral-7B-shaped weights: decode, prefill + thinking, LoRA training, memory.

    PYTHONPATH=src python3 bench/gpu.py                            # one H100/H200, bf16, < 6 minutes
    PYTHONPATH=src python bench/gpu.py --preset tiny --device cpu  # the same code path on a CPU, seconds

Prints a markdown report; with $OUT set (or --out DIR) also writes DIR/gpu.md and DIR/gpu.json.
It needs only torch, transformers and peft (no tokenizer: prompts are random token ids) and builds the
weights itself, directly on the device (no checkpoint is read). Every section runs inside its own
try/except, so a failing section is reported and the others still run; a time budget skips what is
left once it is spent.

Sections
  (a) batch-1 greedy decode. Engines: hatlm `generate` on the causal arm (32 decoder layers), on the
      hybrid arm (the same decoder object, plus 2 thinker layers and 16 thought slots), and transformers
      `MistralForCausalLM.generate` whose parameters are the causal arm's tensors themselves (shared,
      not copied). Each engine is timed for 1 new token and for N new tokens (EOS ignored / min_new_tokens
      = N); decode tokens/s = (N − 1) / (t_N − t_1), so prefill and first-token work cancel out. Achieved
      GB/s = weight bytes a step reads (decoder layers, final norm, LM head, one embedding row) × tokens/s,
      next to a measured device copy bandwidth. Greedy tokens of hatlm causal and transformers are
      compared token by token (bf16 rounding differs between the two implementations, so on random
      weights with small logit margins they may part after a while; float32 on the CPU must agree).
  (b) time to first token against prompt length P and thinking iterations T (halting off): thinking
      alone (`model.think`), and hybrid `generate` with one new token (think + prefill + first token),
      against the causal arm's prefill of the same prompt.
  (c) one LoRA training step: PEFT LoRA (r=16, alpha=32) on q/k/v/o/gate/up/down of every decoder layer,
      base frozen in bf16, gradient checkpointing on, AdamW on the adapters, cross-entropy on random
      tokens, sequence length S, batch 1..4. MFU uses model FLOPs (see `lora_step_flops`):
          forward   2·N_lin·tokens + A                 (N_lin: decoder projections + LM head; A: attention)
          backward  2·N_lin·tokens + 2·A − 2·N_qkv0·tokens  (input gradients only; the base is frozen, and the
                    first layer's q/k/v need none because the embeddings are frozen)
          + LoRA    6·r·(d_in + d_out) per adapted projection and token (forward, both weight grads, input grad)
          A = Σ_layers 4·heads·head_dim·(causal query/key pairs);
      the recomputation of gradient checkpointing (one more forward) is excluded from MFU and included
      in HFU. Peak: 989 TFLOP/s dense bf16 for H100/H200 SXM (override with --peak-tflops).
  (d) peak device memory of each section (torch.cuda.max_memory_allocated, reset per section).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

try:  # run from the repository root without installing hatlm
    import hatlm  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from hatlm.config import ModelConfig  # noqa: E402
from hatlm.generate import generate  # noqa: E402
from hatlm.model import HatLM  # noqa: E402

LORA_TARGETS = r".*decoder\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"

PRESETS: dict[str, dict[str, Any]] = {
    # Mistral-7B-v0.1 shapes; the hybrid adds 2 thinker layers and 16 thought slots.
    "7b": dict(
        base="mistral-7b", dtype="bfloat16", slots=16, thinker_layers=2, prompt=128, new_tokens=128,
        repeats=3, prompt_lens=[128, 512, 2048], think_iters=[1, 4, 8], lora_seq=2048, lora_batches=[1, 2, 4],
        lora_r=16, lora_steps=3,
    ),
    # hatlm's `tiny` preset (4 layers, hidden 128, vocab 32000): the same code path in seconds on a CPU.
    "tiny": dict(
        base="tiny", dtype="float32", slots=4, thinker_layers=1, prompt=16, new_tokens=12, repeats=1,
        prompt_lens=[16, 48], think_iters=[1, 2], lora_seq=48, lora_batches=[1, 2], lora_r=4, lora_steps=1,
    ),
}  # fmt: skip


# ------------------------------------------------------------------------------------ helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def fmt_gib(x: float | None) -> str:
    return "n/a (CPU)" if x is None else f"{x:.2f} GiB"


def weight_bytes_per_token(model: HatLM) -> int:
    """Bytes of weights one decode step reads: decoder layers, final norm, LM head, one embedding row."""
    n = sum(p.numel() * p.element_size() for p in model.decoder.layers.parameters())
    n += sum(p.numel() * p.element_size() for p in model.decoder.norm.parameters())
    n += model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    return n + model.config.hidden_size * model.lm_head.weight.element_size()


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """GB/s of read + write traffic copying a tensor of nbytes on the device (best of 5)."""
    x = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).fill_(1.0)
    y = torch.empty_like(x)
    best = math.inf
    for _ in range(5):
        dt, _ = timed(lambda: y.copy_(x), device)
        best = min(best, dt)
    return 2 * nbytes / best / 1e9


def configs(p: dict[str, Any]) -> tuple[ModelConfig, ModelConfig]:
    """(causal, hybrid) configs with the same decoder depth: the causal arm gets no extra layers."""
    causal = ModelConfig.from_name(p["base"], arm="causal", thinker_layers=0, thought_slots=0)
    hybrid = ModelConfig.from_name(
        p["base"], arm="hybrid", thinker_layers=p["thinker_layers"], thought_slots=p["slots"],
        max_think_iters=max(p["think_iters"]), halting_threshold=0.0,
    )  # fmt: skip
    return causal, hybrid


def build_models(p: dict[str, Any], device: torch.device, dtype: torch.dtype) -> tuple[HatLM, HatLM]:
    """Random causal and hybrid models created on the device in `dtype`, sharing one decoder + LM head."""
    c_cfg, h_cfg = configs(p)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are created (and initialised) directly in dtype
    try:
        with torch.device(device):
            torch.manual_seed(0)
            causal = HatLM(c_cfg).eval()
            hybrid = HatLM(h_cfg).eval()
    finally:
        torch.set_default_dtype(old)
    # One set of backbone weights: the hybrid speaks with the causal arm's decoder (its own is freed).
    hybrid.decoder = causal.decoder
    hybrid.lm_head = causal.lm_head
    with torch.no_grad():  # a thinker that does real work (the default gate/refinement init is near-identity)
        g = torch.Generator(device=device).manual_seed(1)
        for name, prm in hybrid.named_parameters():
            if not name.startswith(("decoder.", "lm_head.")):  # thinker, slots, gates, prompt refinement
                prm.add_(torch.randn(prm.shape, generator=g, device=device, dtype=torch.float32).to(prm.dtype) * 0.02)
    gc.collect()
    return causal, hybrid


def build_hf(causal: HatLM, device: torch.device, dtype: torch.dtype):
    """transformers' MistralForCausalLM whose parameters are the causal arm's tensors (no copy)."""
    from transformers import MistralConfig, MistralForCausalLM

    d = causal.config.to_hf_dict()
    d.pop("hatlm", None)
    d.pop("torch_dtype", None)
    cfg = MistralConfig(**d)
    cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        hf = MistralForCausalLM(cfg)
    sd = {k.replace("decoder.", "model.", 1): v for k, v in causal.state_dict().items()}
    missing, unexpected = hf.load_state_dict(sd, strict=False, assign=True)
    if unexpected or any("rotary" not in k for k in missing):
        raise RuntimeError(f"weight names do not match transformers': missing {missing}, unexpected {unexpected}")
    with torch.device(device):  # the rotary tables are buffers computed at construction
        hf.model.rotary_emb = type(hf.model.rotary_emb)(config=cfg)
    left = [n for n, t in [*hf.named_parameters(), *hf.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"tensors left on the meta device: {left[:5]}")
    hf.config.dtype = dtype
    hf.generation_config.eos_token_id = None  # decode exactly max_new_tokens
    hf.generation_config.pad_token_id = 0
    return hf.eval()


def random_prompt(n: int, vocab: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [1] + torch.randint(3, vocab, (n - 1,), generator=g).tolist()


def hatlm_generate(model: HatLM, prompt: list[int], new: int, **kw: Any) -> list[int]:
    return generate(model, None, [prompt], new, ignore_eos=True, **kw).tokens[0]


def hf_generate(hf, prompt: list[int], new: int, device: torch.device) -> list[int]:
    ids = torch.tensor([prompt], device=device)
    with torch.inference_mode():
        out = hf.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new, do_sample=False
        )
    return out[0, len(prompt) :].tolist()


# ------------------------------------------------------------------------------------ (a) decode


def section_decode(ctx: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    p, device, dtype = ctx["p"], ctx["device"], ctx["dtype"]
    causal, hybrid = ctx["causal"], ctx["hybrid"]
    vocab = causal.config.vocab_size
    prompt = random_prompt(p["prompt"], vocab, seed=123)
    N = p["new_tokens"]
    T = p["think_iters"][min(1, len(p["think_iters"]) - 1)]
    hyb_name = f"hatlm hybrid (m={p['slots']}, T={T})"
    errors: dict[str, str] = {}
    hf = None
    try:
        hf = build_hf(causal, device, dtype)
    except Exception as e:  # keep hatlm's numbers even if the baseline cannot be built
        errors["transformers"] = f"{type(e).__name__}: {e}"
        print(traceback.format_exc(), file=sys.stderr, flush=True)
    mode = ctx["compile_mode"]
    comp = True if mode == "compile" else "static"
    hyb_comp = f"hatlm hybrid compiled (m={p['slots']}, T={T})"
    candidates: dict[str, Callable[[int], list[int]]] = {
        "transformers": lambda n: hf_generate(hf, prompt, n, device),
        "hatlm causal": lambda n: hatlm_generate(causal, prompt, n),
        hyb_name: lambda n: hatlm_generate(hybrid, prompt, n, think_iters=T),
    }
    compiled_names = []
    if mode != "off":
        compiled_names = ["hatlm causal compiled", hyb_comp]
        candidates["hatlm causal compiled"] = lambda n: hatlm_generate(causal, prompt, n, compile=comp)
        candidates[hyb_comp] = lambda n: hatlm_generate(hybrid, prompt, n, think_iters=T, compile=comp)
    engines = {}
    warmup_s: dict[str, float] = {}
    for name, fn in candidates.items():
        if name in errors:
            continue
        try:  # warm-up: kernels, allocator, caches; a compiled engine compiles for the timed lengths here
            lengths = (1, N) if name in compiled_names else (min(N, 4),)
            warmup_s[name] = sum(timed(lambda fn=fn, n=n: fn(n), device)[0] for n in lengths)
            engines[name] = fn
        except Exception as e:
            errors[name] = f"{type(e).__name__}: {e}"
            print(traceback.format_exc(), file=sys.stderr, flush=True)
    compile_errors = {
        f"{arm} arm": st.compile_error
        for arm, model in (("causal", causal), ("hybrid", hybrid))
        for st in model.__dict__.get("_hatlm_static_decode", {}).values()
        if st.compile_error
    }
    if not engines:
        raise RuntimeError(f"every engine failed: {errors}")
    times: dict[str, dict[int, list[float]]] = {k: {1: [], N: []} for k in engines}
    tokens: dict[str, list[int]] = {}
    for _ in range(p["repeats"]):
        for name, fn in engines.items():  # alternate engines so load changes hit all alike
            for n in (1, N):
                dt, toks = timed(lambda fn=fn, n=n: fn(n), device)
                times[name][n].append(dt)
                if n == N:
                    tokens[name] = toks
    wb = weight_bytes_per_token(causal)
    bw = copy_bandwidth(device, min(wb, 2 * 2**30))
    res: dict[str, dict[str, float]] = {}
    for name in engines:
        t1, tn = statistics.median(times[name][1]), statistics.median(times[name][N])
        tps = (N - 1) / (tn - t1) if tn > t1 else float("nan")
        res[name] = dict(first_token_s=t1, total_s=tn, decode_tokens_per_s=tps, gb_per_s=wb * tps / 1e9)

    def speed(name: str) -> float:
        return res[name]["decode_tokens_per_s"] if name in res else float("nan")

    rows = [
        f"| {name} | {1e3 * r['first_token_s']:.1f} | {r['decode_tokens_per_s']:.1f} | "
        f"{r['decode_tokens_per_s'] / speed('transformers'):.2f}x | {r['gb_per_s']:.0f} | "
        f"{100 * r['gb_per_s'] / bw:.0f}% |"
        for name, r in res.items()
    ]
    rows += [f"| {name} | FAILED: `{err.splitlines()[0][:200]}` | | | | |" for name, err in errors.items()]
    for name in res:
        res[name]["warmup_s"] = warmup_s[name]
    out: dict[str, Any] = dict(
        engines=res, errors=errors, new_tokens=N, prompt_tokens=len(prompt), weight_bytes_per_token=wb,
        copy_gb_per_s=bw, ratio_hatlm_over_hf=speed("hatlm causal") / speed("transformers"),
        hybrid_cost_over_causal=speed("hatlm causal") / speed(hyb_name), compile_mode=mode,
        compile_errors=compile_errors,
    )  # fmt: skip
    notes = [
        f"- hatlm causal / transformers decode tokens/s: **{out['ratio_hatlm_over_hf']:.2f}x** (target >= 1)",
        f"- hybrid per-token decode time / causal: **{out['hybrid_cost_over_causal']:.3f}** (target <= 1.10)",
    ]
    if compiled_names:
        out.update(
            ratio_compiled_over_hf=speed("hatlm causal compiled") / speed("transformers"),
            ratio_compiled_over_eager=speed("hatlm causal compiled") / speed("hatlm causal"),
            hybrid_compiled_cost_over_causal_compiled=speed("hatlm causal compiled") / speed(hyb_comp),
        )
        what = {
            "compile": 'torch.compile(mode="reduce-overhead" on CUDA (CUDA graphs), "default" on a CPU, fullgraph) '
            "of the static-shape step",
            "static": "the static-shape step run eagerly (not compiled: --compile-mode static)",
        }[mode]
        notes += [
            f"- compiled engines: `generate(..., compile={comp!r})`, {what}; warm-up incl. compilation: "
            + ", ".join(f"{k} {warmup_s[k]:.1f} s" for k in compiled_names if k in warmup_s),
            f"- hatlm causal compiled: **{speed('hatlm causal compiled'):.1f} tokens/s** (target >= 160 on an H100), "
            f"**{out['ratio_compiled_over_hf']:.2f}x** transformers, {out['ratio_compiled_over_eager']:.2f}x eager",
            "- hybrid compiled per-token decode time / causal compiled: "
            f"**{out['hybrid_compiled_cost_over_causal_compiled']:.3f}** (target <= 1.10)",
        ]
        for a, b in (("hatlm causal", "hatlm causal compiled"), (hyb_name, hyb_comp)):
            if a in tokens and b in tokens:
                ta, tb = tokens[a], tokens[b]
                lead = next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), min(len(ta), len(tb)))
                out.setdefault("compiled_leading_agree", {})[b] = lead
                notes.append(f"- greedy tokens, {b} vs eager: first {lead} of {N} identical")
        if compile_errors:
            notes.append(f"- **torch.compile failed, those engines ran uncompiled**: {compile_errors}")
    if "transformers" in tokens and "hatlm causal" in tokens:
        a, b = tokens["hatlm causal"], tokens["transformers"]
        lead = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        same = sum(x == y for x, y in zip(a, b))
        with torch.inference_mode():  # prefill logits of the two implementations on the same prompt
            ids = torch.tensor([prompt], device=device)
            la, lb = causal(ids).float(), hf(ids).logits.float()
            diff, scale = float((la - lb).abs().max()), float(lb.std())
            agree = float((la.argmax(-1) == lb.argmax(-1)).float().mean())
        out.update(greedy_leading_agree=lead, greedy_agree=same, prefill_logits_max_abs_diff=diff,
                   prefill_logits_std=scale, prefill_argmax_agree=agree)  # fmt: skip
        notes += [
            f"- greedy tokens, hatlm causal vs transformers: first {lead} of {N} identical, {same}/{N} equal "
            "position by position",
            f"- prefill logits on the prompt: max |diff| {diff:.3g} (logit std {scale:.3g}), argmax agreement "
            f"{100 * agree:.1f}% of positions",
        ]
    md = "\n".join(
        [
            f"Batch 1, {len(prompt)}-token random prompt, {N} greedy new tokens, median of {p['repeats']} "
            f"repeats; decode tokens/s = (N − 1)/(t_N − t_1). Weights read per token: {wb / 1e9:.2f} GB; "
            f"device copy bandwidth (read + write, {min(wb, 2 * 2**30) / 2**30:.1f} GiB copy): {bw:.0f} GB/s.",
            "",
            "| engine | time to first token (ms) | decode tokens/s | vs transformers | achieved GB/s | % of copy BW |",
            "|---|---:|---:|---:|---:|---:|",
            *rows,
            "",
            *notes,
        ]
    )
    if errors:
        raise PartialFailure(md, out)
    return md, out


class PartialFailure(Exception):
    """A section that has results but where some part failed (reported as failed, results kept)."""

    def __init__(self, md: str, data: dict[str, Any]) -> None:
        super().__init__(f"partly failed: {data.get('errors')}")
        self.md, self.data = md, data


# ------------------------------------------------------------------------------------ (b) prefill + thinking


def section_prefill(ctx: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    from hatlm.flops import think_flops

    p, device = ctx["p"], ctx["device"]
    causal, hybrid = ctx["causal"], ctx["hybrid"]
    vocab = causal.config.vocab_size
    rows, res = [], []
    for P in p["prompt_lens"]:
        prompt = random_prompt(P, vocab, seed=P)
        ids = torch.tensor([prompt], device=device)
        n = torch.tensor([P], device=device)
        hatlm_generate(causal, prompt, 1)  # warm-up at this shape
        t_causal = min(timed(lambda prompt=prompt: hatlm_generate(causal, prompt, 1), device)[0] for _ in range(2))
        for T in p["think_iters"]:
            if time.perf_counter() > ctx["deadline"]:
                rows.append(f"| {P} | {T} | skipped (time budget) | | | | |")
                continue

            def think(ids=ids, n=n, T=T):
                with torch.inference_mode():
                    return hybrid.think(ids, n, think_iters=T, halting_threshold=0.0)

            think()
            t_think = min(timed(think, device)[0] for _ in range(2))
            t_hyb = min(
                timed(lambda prompt=prompt, T=T: hatlm_generate(hybrid, prompt, 1, think_iters=T), device)[0]
                for _ in range(2)
            )
            try:
                fl = think_flops(hybrid.config, P, T)
            except Exception:  # an analytic count is a nicety; the timings are the point
                fl = float("nan")
            r = dict(prompt=P, T=T, think_s=t_think, hybrid_ttft_s=t_hyb, causal_ttft_s=t_causal,
                     think_tflops=fl / t_think / 1e12)  # fmt: skip
            res.append(r)
            rows.append(
                f"| {P} | {T} | {1e3 * t_think:.1f} | {r['think_tflops']:.1f} | {1e3 * t_hyb:.1f} | "
                f"{1e3 * t_causal:.1f} | {t_hyb / t_causal:.2f} |"
            )
    md = "\n".join(
        [
            f"Batch 1, random prompts, halting off (exactly T iterations), m = {p['slots']} thought slots, "
            f"{p['thinker_layers']} thinker layers; best of 2. Time to first token = `generate(..., "
            "max_new_tokens=1)` (hybrid: think + decoder prefill over prompt and thoughts + first token).",
            "",
            "| prompt P | T | thinking (ms) | thinking TFLOP/s | hybrid TTFT (ms) | causal TTFT (ms) | hybrid/causal |",
            "|---:|---:|---:|---:|---:|---:|---:|",
            *rows,
        ]
    )
    return md, dict(rows=res)


# ------------------------------------------------------------------------------------ (c) LoRA step


def lora_step_flops(cfg: ModelConfig, batch: int, seq: int, r: int, attention: str = "causal") -> dict[str, int]:
    """Model FLOPs of one LoRA training step of the causal arm (frozen base; see the module docstring).

    attention="causal" counts the query/key pairs the causal (sliding-window) mask allows, what an ideal
    kernel computes; "dense" every pair, what SDPA with an explicit mask computes; "none" leaves attention
    out (what torch's FlopCounterMode sees on a CPU, where SDPA is not counted). → forward, backward,
    recompute (one more forward of the checkpointed layers) and model (forward + backward).
    """
    d, H, Hkv, D = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    n_layers, inter, tok = cfg.decoder_layers, cfg.intermediate_size, batch * seq
    # (d_in, d_out) of q k v o gate up down
    shapes = [(d, H * D), (d, Hkv * D), (d, Hkv * D), (H * D, d), (d, inter), (d, inter), (inter, d)]
    n_layer = sum(a * b for a, b in shapes)
    n_qkv = sum(a * b for a, b in shapes[:3])
    head = d * cfg.vocab_size
    # LoRA y += B(A x): forward 2r(d_in + d_out); backward: grad of B (2r·d_out), grad of A's output
    # (2r·d_out), grad of A (2r·d_in), and the input gradient through A (2r·d_in) where one is needed.
    lora_fwd = sum(a + b for a, b in shapes) * r
    lora_wgrad = sum(a + 2 * b for a, b in shapes) * r
    lora_in, lora_in_qkv = sum(a for a, _ in shapes) * r, sum(a for a, _ in shapes[:3]) * r
    if attention == "none":
        pairs = 0
    elif attention == "dense":
        pairs = seq * seq
    elif attention == "causal":
        w = cfg.sliding_window or seq
        pairs = sum(min(q + 1, w) for q in range(seq))
    else:
        raise ValueError(f"attention must be 'causal', 'dense' or 'none'; got {attention!r}")
    attn = n_layers * 4 * H * D * pairs * batch  # scores and weighted values, per layer
    fwd = 2 * (n_layers * (n_layer + lora_fwd) + head) * tok + attn
    # Backward: input gradients only through the frozen projections and the LM head, except the first
    # layer's q/k/v, whose input depends on nothing trainable (frozen embeddings); attention backward is
    # twice its forward.
    bwd = 2 * (n_layers * n_layer - n_qkv + head) * tok + 2 * attn
    bwd += 2 * (n_layers * (lora_wgrad + lora_in) - lora_in_qkv) * tok
    return dict(forward=fwd, backward=bwd, recompute=fwd - 2 * head * tok, model=fwd + bwd)


def add_lora(model: HatLM, r: int) -> list[torch.nn.Parameter]:
    """PEFT LoRA adapters on the decoder projections; everything else frozen. → the trainable parameters."""
    from peft import LoraConfig, inject_adapter_in_model

    cfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=LORA_TARGETS, bias="none")
    inject_adapter_in_model(cfg, model)
    params = []
    for name, prm in model.named_parameters():
        prm.requires_grad_("lora_" in name)
        if "lora_" in name:
            params.append(prm)
    if not params:
        raise RuntimeError("LoRA matched no module")
    return params


def lora_step(model: HatLM, opt: torch.optim.Optimizer, ids: torch.Tensor) -> float:
    logits = model(ids)
    loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def section_lora(ctx: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    p, device = ctx["p"], ctx["device"]
    model: HatLM = ctx["causal"]  # mutated (adapters injected): this section runs last
    params = add_lora(model, p["lora_r"])
    n_train = sum(q.numel() for q in params)
    model.train()
    model.gradient_checkpointing = True
    opt = torch.optim.AdamW(params, lr=1e-4)
    S, peak = p["lora_seq"], ctx["peak_tflops"]
    rows, res = [], []
    g = torch.Generator().manual_seed(7)
    for B in p["lora_batches"]:
        if time.perf_counter() > ctx["deadline"]:
            rows.append(f"| {B} | {S} | skipped (time budget) | | | | | |")
            continue
        reset_peak(device)
        try:
            ids = torch.randint(3, model.config.vocab_size, (B, S), generator=g).to(device)
            loss0 = lora_step(model, opt, ids)  # warm-up (allocations, kernel choice, optimizer state)
            dts = []
            for _ in range(p["lora_steps"]):
                dt, loss = timed(lambda ids=ids: lora_step(model, opt, ids), device)
                dts.append(dt)
        except torch.OutOfMemoryError as e:
            rows.append(f"| {B} | {S} | out of memory | | | | | |")
            res.append(dict(batch=B, seq=S, error=str(e).splitlines()[0]))
            opt.zero_grad(set_to_none=True)
            break
        dt = statistics.median(dts)
        fl = lora_step_flops(model.config, B, S, p["lora_r"])
        mfu = fl["model"] / dt / (peak * 1e12)
        hfu = (fl["model"] + fl["recompute"]) / dt / (peak * 1e12)
        r = dict(batch=B, seq=S, step_s=dt, tokens_per_s=B * S / dt, model_tflop=fl["model"] / 1e12,
                 mfu=mfu, hfu=hfu, loss_first=loss0, loss_last=loss, peak_gib=peak_gib(device))  # fmt: skip
        res.append(r)
        rows.append(
            f"| {B} | {S} | {1e3 * dt:.0f} | {r['tokens_per_s']:.0f} | {r['model_tflop']:.4g} | "
            f"{100 * mfu:.1f}% | {100 * hfu:.1f}% | {fmt_gib(r['peak_gib'])} |"
        )
    model.gradient_checkpointing = False
    model.eval()
    md = "\n".join(
        [
            f"PEFT LoRA r={p['lora_r']}, alpha={2 * p['lora_r']} on q/k/v/o/gate/up/down of all "
            f"{model.config.decoder_layers} decoder layers ({n_train / 1e6:.1f} M trainable parameters), frozen base "
            f"in {ctx['dtype_name']}, gradient checkpointing on, AdamW; median of {p['lora_steps']} steps after "
            f"one warm-up. Peak for MFU: {peak:.0f} TFLOP/s. Model FLOPs = 4·N_lin·tokens + 3·A − 2·N_qkv0·tokens "
            "+ LoRA terms (see the script's docstring); HFU adds the checkpointing recompute (one more forward).",
            "",
            "| batch | seq | step (ms) | tokens/s | model TFLOP/step | MFU | HFU | peak memory |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
            *rows,
        ]
    )
    return md, dict(trainable_params=n_train, rows=res)


# ------------------------------------------------------------------------------------ main


def device_info(device: torch.device) -> str:
    import transformers

    try:
        import peft

        peft_v = peft.__version__
    except ImportError:
        peft_v = "not installed"
    if device.type == "cuda":
        name = f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}, " + (
            f"{torch.cuda.get_device_properties(device).total_memory / 2**30:.0f} GiB)"
        )
    else:
        name = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs)"
    return (
        f"{name}; torch {torch.__version__}, transformers {transformers.__version__}, peft {peft_v}, "
        f"Python {platform.python_version()}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="7b")
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    ap.add_argument("--sections", default="decode,prefill,lora", help="comma-separated subset to run")
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--lora-batches", type=int, nargs="+", default=None)
    ap.add_argument("--lora-seq", type=int, default=None)
    ap.add_argument(
        "--dtype",
        choices=["bfloat16", "float16", "float32"],
        default=None,
        help="weights' dtype (default: bfloat16 on a GPU, float32 on a CPU)",
    )
    ap.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="dense bf16 peak for MFU (default: 989 for H100/H200 SXM, 756 for H100 PCIe)",
    )
    ap.add_argument(
        "--compile-mode",
        choices=["compile", "static", "off"],
        default=None,
        help="the 'compiled' decode engines: torch.compile (default on a GPU), the static-shape step uncompiled "
        "(default on a CPU, where compiling takes a minute), or off",
    )
    ap.add_argument("--time-budget", type=float, default=300.0, help="seconds; later work is skipped past it")
    ap.add_argument("--out", default=os.environ.get("OUT"), help="folder for gpu.md and gpu.json (default $OUT)")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    p = dict(PRESETS[args.preset])
    for key in ("new_tokens", "repeats", "lora_batches", "lora_seq"):
        if getattr(args, key) is not None:
            p[key] = getattr(args, key)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.dtype is not None:
        dtype = getattr(torch, args.dtype)
    elif device.type == "cpu":
        dtype = torch.float32  # bf16 matrix products on a CPU are slow and not what this measures
    else:
        dtype = getattr(torch, p["dtype"])
    if device.type == "cpu":
        torch.set_num_threads(min(torch.get_num_threads(), 2))
    peak = args.peak_tflops
    if peak is None:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
        peak = 756.0 if "PCIe" in name else 989.0
    info = device_info(device)
    print(f"[gpu.py] {info}", file=sys.stderr, flush=True)
    compile_mode = args.compile_mode or ("compile" if device.type == "cuda" else "static")
    ctx: dict[str, Any] = dict(p=p, device=device, dtype=dtype, dtype_name=str(dtype).replace("torch.", ""),
                               peak_tflops=peak, deadline=t_start + args.time_budget,
                               compile_mode=compile_mode)  # fmt: skip
    report: dict[str, Any] = dict(device=info, preset=args.preset, dtype=ctx["dtype_name"], sections={})
    reset_peak(device)
    t0 = time.perf_counter()
    ctx["causal"], ctx["hybrid"] = build_models(p, device, dtype)
    report["build_s"] = time.perf_counter() - t0
    report["build_peak_gib"] = peak_gib(device)
    report["params"] = dict(causal=sum(q.numel() for q in ctx["causal"].parameters()),
                            hybrid=sum(q.numel() for q in ctx["hybrid"].parameters()))  # fmt: skip
    print(f"[gpu.py] models built in {report['build_s']:.1f} s", file=sys.stderr, flush=True)
    sections = {
        "decode": ("(a) Batch-1 decode: hatlm vs transformers", section_decode),
        "prefill": ("(b) Prefill + thinking against prompt length and T", section_prefill),
        "lora": ("(c) One LoRA training step", section_lora),
    }
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(wanted) - set(sections)
    if unknown:
        ap.error(f"unknown section(s) {', '.join(sorted(unknown))}; choose from {', '.join(sections)}")
    parts = []
    for key in sections:  # fixed order: the LoRA section mutates the model, so it runs last
        if key not in wanted:
            continue
        title, fn = sections[key]
        entry: dict[str, Any] = {}
        if time.perf_counter() > ctx["deadline"]:
            entry["status"] = "skipped (time budget spent)"
            parts.append(f"## {title}\n\nSkipped: time budget spent.\n")
            report["sections"][key] = entry
            continue
        print(f"[gpu.py] section {key} ...", file=sys.stderr, flush=True)
        reset_peak(device)
        t0 = time.perf_counter()
        try:
            md, data = fn(ctx)
            entry.update(status="ok", **data)
        except PartialFailure as e:
            md = e.md
            entry.update(status="failed", error=str(e), **e.data)
        except Exception as e:  # one broken section must not lose the others' results
            tb = traceback.format_exc()
            print(tb, file=sys.stderr, flush=True)
            md = f"**FAILED**: `{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}`\n\n```\n{tb[-3000:]}```"
            entry.update(status="failed", error=f"{type(e).__name__}: {e}", traceback=tb)
        entry["seconds"] = time.perf_counter() - t0
        entry["peak_gib"] = peak_gib(device)
        report["sections"][key] = entry
        parts.append(f"## {title}\n\n{md}\n\nSection time {entry['seconds']:.1f} s, peak device memory "
                     f"{fmt_gib(entry['peak_gib'])}.\n")  # fmt: skip
        print(f"[gpu.py] section {key}: {entry['status']} in {entry['seconds']:.1f} s", file=sys.stderr, flush=True)
    report["total_s"] = time.perf_counter() - t_start
    cmd = " ".join(["python3 bench/gpu.py", *(argv if argv is not None else sys.argv[1:])])
    c = ctx["causal"].config
    text = "\n".join(
        [
            "# GPU benchmark (`bench/gpu.py`)\n",
            f"Command: `{cmd}`\n",
            f"- Device: {info}",
            f"- Model: random weights, {c.decoder_layers} layers, hidden {c.hidden_size}, intermediate "
            f"{c.intermediate_size}, {c.num_attention_heads} heads / {c.num_key_value_heads} KV heads, vocab "
            f"{c.vocab_size}, {ctx['dtype_name']}; causal arm {report['params']['causal'] / 1e9:.3f} B parameters, "
            f"hybrid arm {report['params']['hybrid'] / 1e9:.3f} B (shares the causal decoder and LM head).",
            f"- Built on the device in {report['build_s']:.1f} s (peak {fmt_gib(report['build_peak_gib'])}); "
            f"total run {report['total_s']:.0f} s.",
            "",
            *parts,
        ]
    )
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu.md").write_text(text)
        (out / "gpu.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"[gpu.py] wrote {out / 'gpu.md'} and {out / 'gpu.json'}", file=sys.stderr)
    return 0 if all(s.get("status") == "ok" for s in report["sections"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
