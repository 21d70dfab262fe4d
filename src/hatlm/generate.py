"""Text generation for all three arms: think once, prefill a preallocated KV cache, decode.

    prompt ──(hybrid: think, optional gradient refinement of the thoughts)──► decoder prefill over
    [prompt ; thoughts] writes keys/values at positions 0..n+m−1 ──► the first token comes from the
    logits at the last thought position ──► decode one token per step at position n+m, n+m+1, …
    (hybrid + `rethink_every=R`: every R generated tokens, think again over prompt + text so far and
    prefill the cache afresh from the refreshed sequence)

Every row of a batch has the layout [prompt ; thoughts ; generated] at positions 0, 1, 2, … with no
padding holes, and its own query positions and key length in the attention mask, so a batch of
prompts of different lengths gives each row its single-prompt result (no left padding).

Speed. Prefill and the decode step both go through the model's own layers (`layers.Block`): prefill
as a full pass writing the cache, decode as `Block.decode` for one new position per row — RoPE from a
table, the query heads of a key/value group laid out as that group's queries (no GQA key expansion),
attention over the used part of the cache only, no mask while every row sits at the same position
(the common batch-1 case), and, for plain `nn.Linear` projections of a model small enough, q/k/v and
gate/up multiplied as one matrix each. The tests pin this path to the model's full recomputation
(exact greedy tokens, logits ≤ 1e-5); a LoRA-wrapped projection is called as a module, so decode
honours unmerged adapters. `compile=True` swaps the step for a static-shape one compiled with
torch.compile (CUDA graphs on a GPU), the same layer code; the decode state lives in `hatlm.decoding`.

Two entry points: `generate(model, tokenizer, prompts, …)` (texts, streaming, statistics) and
`generate_ids(model, input_ids, …)`, the transformers-style call behind `model.generate(input_ids, …)`.

Why one ~600-line module: the decode state, sampling, stop strings/streaming and the loop are the
four parts of one loop over tokens and change together; the thinking mechanisms it calls live in
thinking.py, the layer math in layers.py.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from hatlm.decoding import COMPILE_MODES, decode_state
from hatlm.errors import UserError
from hatlm.thinking import check_refine_options, refine_thoughts
from hatlm.tokenizer import StreamDecoder


@dataclass
class GenerationResult:
    """What `generate` returns, one entry per prompt."""

    tokens: list[list[int]]  # generated ids (without the prompt, without the final EOS)
    texts: list[str]  # decoded text (stop strings and what follows them removed)
    stats: list[dict[str, Any]]  # per prompt, see `generate`
    # With output_logits=True: per prompt [k, V] (float32, CPU), the logits each chosen token was picked
    # from (k = new tokens, plus one when the row ended with EOS).
    logits: list[Tensor] | None = None


# ------------------------------------------------------------------------------------ thinking


def _pad_rows(rows: Sequence[Sequence[int]], device) -> tuple[Tensor, Tensor]:
    """Right-pad id lists → ids [B, P] (pad id 0; padding is never attended) and lengths [B]."""
    P = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), P, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = torch.tensor(r, dtype=torch.long)
    return ids.to(device), torch.tensor([len(r) for r in rows], dtype=torch.long, device=device)


# ------------------------------------------------------------------------------------ sampling


def _select(
    logits: Tensor,
    seen: Tensor | None,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    repetition_penalty: float,
    generators: list[torch.Generator] | None,
) -> Tensor:
    """Next tokens [B] from logits [B, V] (Hugging Face's order: penalty, temperature, top-k, top-p)."""
    logits = logits.float()
    if seen is not None:
        # CTRL-style penalty on every token already present (prompt and generated).
        pen = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
        logits = torch.where(seen, pen, logits)
    if temperature == 0.0:
        # max(dim).indices gives the first maximal index like argmax, and is faster on the CPU.
        return logits.max(-1).indices
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token once the more likely ones already reach top_p (the most likely always stays).
        drop = (probs.cumsum(-1) - probs) >= top_p
        drop[:, 0] = False
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    # One generator per row: a row's samples do not depend on the other rows of the batch.
    return torch.cat([torch.multinomial(probs[b], 1, generator=g) for b, g in enumerate(generators)])


class _RowText:
    """Decoded text of one row as it grows: stop strings, and streaming that never shows text that a
    stop string may still swallow (pieces streamed always concatenate to the final text)."""

    def __init__(self, tokenizer, stop: list[str], stream: Callable[[int, str], None] | None, row: int) -> None:
        self.sd = StreamDecoder(tokenizer)
        self.stop = stop
        self.stream = stream
        self.row = row
        self.sent = 0
        self.final: str | None = None

    def push(self, token: int) -> bool:
        """Add a token; True when a stop string has appeared (the text is then final)."""
        piece = self.sd.push(token)
        if not piece:
            return False
        text = self.sd.emitted
        if self.stop:
            start = max(0, len(text) - len(piece) - max(len(s) for s in self.stop) + 1)
            hits = [i for s in self.stop if (i := text.find(s, start)) >= 0]
            if hits:
                self.final = text[: min(hits)]
                self._emit(self.final)
                return True
        self._emit(text, hold=self._held_back(text))
        return False

    def _held_back(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best

    def _emit(self, text: str, hold: int = 0) -> None:
        upto = len(text) - hold
        if self.stream is not None and upto > self.sent:
            self.stream(self.row, text[self.sent : upto])
        self.sent = max(self.sent, upto)

    def finish(self) -> str:
        if self.final is None:
            self.sd.flush()
            self.final = self.sd.emitted
        self._emit(self.final)
        return self.final


# ------------------------------------------------------------------------------------ generate


def _encode_prompts(tokenizer, prompts, vocab_size: int) -> list[list[int]]:
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise UserError("prompts must be a list of strings or a list of token-id lists")
    if len(prompts) == 0:
        raise UserError("no prompts given: pass at least one prompt")
    rows = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if not p.strip():
                raise UserError(f"prompt {i} is empty; give some text to continue")
            if tokenizer is None:
                raise UserError("text prompts need a tokenizer; pass one or give token-id lists")
            ids = list(tokenizer.encode(p, bos=True))
        elif isinstance(p, Sequence) or isinstance(p, Tensor):
            ids = [int(t) for t in p]
            if not ids:
                raise UserError(f"prompt {i} has no tokens")
        else:
            raise UserError(f"prompt {i} must be a string or a list of token ids; got {type(p).__name__}")
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise UserError(f"prompt {i} has token ids outside [0, {vocab_size}): {bad[:5]}")
        rows.append(ids)
    return rows


def _check_options(model, max_new_tokens, temperature, top_k, top_p, repetition_penalty, rethink_every, refine_steps,
                   refine_lr, refine_objective_name, think_iters) -> None:  # fmt: skip
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be a positive integer; got {max_new_tokens!r}")
    if temperature < 0 or not math.isfinite(temperature):
        raise UserError(f"temperature must be >= 0 (0 = greedy); got {temperature}")
    if top_k is not None and top_k < 1:
        raise UserError(f"top_k must be >= 1; got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise UserError(f"top_p must be in (0, 1]; got {top_p}")
    if repetition_penalty <= 0:
        raise UserError(f"repetition_penalty must be > 0 (1 = off); got {repetition_penalty}")
    if think_iters is not None and think_iters < 0:
        raise UserError(f"think_iters must be >= 0; got {think_iters}")
    if rethink_every is not None:
        if rethink_every < 1:
            raise UserError(f"rethink_every must be >= 1 (or None to disable); got {rethink_every}")
        if model.arm != "hybrid":
            raise UserError(f"rethink_every needs the hybrid arm (it re-runs the thinker); this model is {model.arm!r}")
    check_refine_options(model, refine_steps, refine_lr, refine_objective_name)


def _check_compile(compile: Any) -> None:
    if not any(compile is c or (isinstance(c, str) and compile == c) for c in COMPILE_MODES):
        raise UserError(f"compile must be False, True or 'static'; got {compile!r}")


def _sync_every(device: torch.device, needs_text: bool) -> int:
    """How many decode steps run between host reads of the chosen tokens.

    On a GPU, reading the tokens back every step would stall the host until the device is idle, so
    the host checks for EOS every few steps (rows that ended meanwhile compute a few extra tokens that
    are dropped). On the CPU a read costs nothing; streaming and stop strings need every step.
    """
    return 1 if (device.type == "cpu" or needs_text) else 8


def generate(
    model,
    tokenizer,
    prompts: list[str] | list[list[int]],
    max_new_tokens: int = 64,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    seed: int | list[int] | None = None,
    stop: list[str] | None = None,
    think_iters: int | None = None,
    halting_threshold: float | None = None,
    rethink_every: int | None = None,
    refine_steps: int = 0,
    refine_lr: float = 0.1,
    refine_objective: str = "entropy",
    stream: Callable[[int, str], None] | None = None,
    ignore_eos: bool = False,
    output_logits: bool = False,
    eos_token_id: int | None = None,
    compile: bool | str = False,
) -> GenerationResult:
    """Generate continuations of `prompts` with any arm (causal, pause, hybrid).

    prompts: strings (encoded with BOS) or token-id lists (used as they are).
    temperature 0 is greedy; otherwise sampling with optional top_k / top_p. repetition_penalty
    divides positive (multiplies negative) logits of every token already in the row (HF/CTRL rule).
    seed: an int gives every row a generator seeded with it (so a row reproduces its single-prompt
    run), a list gives one seed per row; None draws the seeds from torch's global RNG.
    stop: strings ending a row's generation (checked on the decoded text, excluded from it; the
    row's `tokens` keep the token that completed the stop string). EOS ends a row unless ignore_eos.
    think_iters / halting_threshold override the config for thinking (hybrid).
    rethink_every=R (hybrid): every R generated tokens think again over prompt + text so far and
    rebuild the decoder cache from the refreshed sequence.
    refine_steps=G (hybrid): G steps of gradient refinement of the thoughts after each think, lowering
    `refine_objective` ("entropy" of the first-token distribution, or "reread"; see
    `refine_thoughts`), with relative step size refine_lr.
    stream(row, text_piece) is called as text becomes final; the pieces of a row concatenate to its text.
    compile=True: decode with a static-shape step compiled by torch.compile (CUDA graphs on a GPU;
    see `hatlm.decoding`): the first call with a new batch size / length bucket compiles (seconds to
    a minute), later ones reuse it. "static": the same static-shape step without compiling. Both give
    the tokens and logits of the default eager step (up to float rounding).

    stats per prompt: prompt_tokens, new_tokens, think_iterations and final_change (of the first
    think), rethinks, rethink_iterations, thought_shifts (relative L2 change ‖t_new − t_old‖/‖t_old‖
    of the m thought vectors at each re-think) and thought_shift (their mean, 0.0 if none),
    refine_before / refine_after (objective of the first think; None without refinement),
    time_to_first_token_s, tokens_per_s (tokens after the first / time after the first), stop_reason
    ("eos", "stop" or "length").
    """
    cfg = model.config
    _check_options(model, max_new_tokens, temperature, top_k, top_p, repetition_penalty, rethink_every, refine_steps,
                   refine_lr, refine_objective, think_iters)  # fmt: skip
    _check_compile(compile)
    rows = _encode_prompts(tokenizer, prompts, cfg.vocab_size)
    B = len(rows)
    m = cfg.num_thought_slots
    longest = max(len(r) for r in rows)
    max_len = longest + m + max_new_tokens
    if max_len > cfg.max_position_embeddings:
        raise UserError(
            f"prompt of {longest} tokens + {m} thought slots + {max_new_tokens} new tokens = {max_len} positions "
            f"exceeds the model's context of {cfg.max_position_embeddings}; shorten the prompt or max_new_tokens "
            f"(at most {cfg.max_position_embeddings - m - max_new_tokens} prompt tokens here)"
        )
    stop = [s for s in (stop or []) if s]
    if (stop or stream is not None) and tokenizer is None:
        raise UserError("stop strings and streaming need a tokenizer")
    if isinstance(seed, Sequence):
        if len(seed) != B:
            raise UserError(f"seed list has {len(seed)} entries for {B} prompts")
        seeds = [int(s) for s in seed]
    elif seed is not None:
        seeds = [int(seed)] * B
    else:
        seeds = torch.randint(0, 2**62, (B,)).tolist()
    if eos_token_id is not None:
        eos = int(eos_token_id)
    else:
        eos = cfg.eos_token_id if tokenizer is None else tokenizer.eos_id
    device = model.device
    was_training = model.training
    model.eval()
    t_start = time.perf_counter()
    try:
        with torch.inference_mode():
            return _generate(
                model, tokenizer, rows, max_new_tokens, max_len, eos, device, t_start,
                temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                seeds=seeds, stop=stop, think_iters=think_iters, halting_threshold=halting_threshold,
                rethink_every=rethink_every, refine_steps=refine_steps, refine_lr=refine_lr,
                refine_objective=refine_objective, stream=stream, ignore_eos=ignore_eos,
                output_logits=output_logits, compile=compile,
            )  # fmt: skip
    finally:
        model.train(was_training)


def _generate(model, tokenizer, rows, max_new_tokens, max_len, eos, device, t_start, *, temperature, top_k, top_p,
              repetition_penalty, seeds, stop, think_iters, halting_threshold, rethink_every, refine_steps, refine_lr,
              refine_objective, stream, ignore_eos, output_logits, compile) -> GenerationResult:  # fmt: skip
    cfg = model.config
    B, m, arm = len(rows), cfg.num_thought_slots, model.arm
    dec = decode_state(model, B, max_len, compile)
    stats: list[dict[str, Any]] = [
        dict(
            prompt_tokens=len(r), new_tokens=0, think_iterations=0, final_change=0.0, rethinks=0,
            rethink_iterations=[], thought_shifts=[], thought_shift=0.0, refine_before=None, refine_after=None,
            time_to_first_token_s=None, tokens_per_s=None, stop_reason="length",
        )
        for r in rows
    ]  # fmt: skip
    prev_thoughts: list[Tensor | None] = [None] * B

    def prefill(seqs: list[list[int]], first: bool, active: list[bool] | None = None) -> tuple[Tensor, list[int]]:
        """Think (hybrid) and fill the cache from [seq ; thoughts] → (logits [B, V], next positions)."""
        ids, n = _pad_rows(seqs, device)
        if arm == "causal":
            x = model.decoder.embed_tokens(ids)
        elif arm == "pause":
            x = model.decoder_inputs(ids, n, None)
        else:
            think = model.think(ids, n, think_iters, halting_threshold)
            if refine_steps:
                think, before, after = refine_thoughts(model, ids, n, think, refine_steps, refine_lr, refine_objective)
            x = model.decoder_inputs(ids, n, think)
            thoughts = think.thoughts(m).float()
            for b in range(B):
                it, ch = int(think.iterations[b]), float(think.final_change[b])
                if first:
                    stats[b]["think_iterations"], stats[b]["final_change"] = it, ch
                    if refine_steps:
                        stats[b]["refine_before"], stats[b]["refine_after"] = float(before[b]), float(after[b])
                elif active[b]:
                    stats[b]["rethinks"] += 1
                    stats[b]["rethink_iterations"].append(it)
                    if m:
                        old = prev_thoughts[b]
                        shift = float((thoughts[b] - old).norm() / old.norm().clamp(min=1e-30))
                        stats[b]["thought_shifts"].append(shift)
                prev_thoughts[b] = thoughts[b]
        if arm == "causal":
            logits = dec.prefill(x, None, n, n - 1)
        else:
            logits = dec.prefill(x, n, n + m, n - 1)  # the last token reads the thoughts, not the reverse
        return logits, [len(s) for s in seqs]

    generated: list[list[int]] = [[] for _ in range(B)]
    logit_rows: list[list[Tensor]] | None = [[] for _ in range(B)] if output_logits else None
    texts = [_RowText(tokenizer, stop, stream, b) for b in range(B)] if (stop or stream is not None) else None
    done = [False] * B
    t_first = None
    end_times = [0.0] * B
    seen = None
    if repetition_penalty != 1.0:
        seen = torch.zeros(B, cfg.vocab_size, dtype=torch.bool, device=device)
        for b, r in enumerate(rows):
            seen[b, r] = True
    gens = None
    if temperature > 0:
        gens = [torch.Generator(device=device).manual_seed(s) for s in seeds]

    def process(steps: list[Tensor]) -> None:
        """Host bookkeeping for the tokens [B] of the given steps: EOS, output, stop strings, text."""
        nonlocal t_first
        toks = torch.stack(steps, 1).tolist()  # [B, len(steps)]: one device→host copy
        now = time.perf_counter()
        if t_first is None:
            t_first = now
        for b, row in enumerate(toks):
            for t in row:
                if done[b]:
                    break
                if t == eos and not ignore_eos:
                    done[b], end_times[b] = True, now
                    stats[b]["stop_reason"] = "eos"
                    break
                generated[b].append(t)
                end_times[b] = now
                if texts is not None and texts[b].push(t):
                    done[b] = True
                    stats[b]["stop_reason"] = "stop"

    sync_every = _sync_every(device, texts is not None)
    pending: list[Tensor] = []
    logits, pos = prefill(rows, first=True)
    for i in range(max_new_tokens):
        if logit_rows is not None:
            lg = logits.float().cpu()
            for b in range(B):
                if not done[b]:
                    logit_rows[b].append(lg[b])
        tok = _select(logits, seen, temperature, top_k, top_p, repetition_penalty, gens)
        pending.append(tok)
        last = i == max_new_tokens - 1
        rethink = rethink_every is not None and (i + 1) % rethink_every == 0
        if i == 0 or last or rethink or len(pending) >= sync_every:
            process(pending)
            pending = []
            if all(done):
                break
        if last:
            break
        if seen is not None:
            seen[torch.arange(B, device=device), tok] = True
        if rethink:
            active = [not d for d in done]
            logits, pos = prefill([r + g for r, g in zip(rows, generated)], first=False, active=active)
        else:
            logits = dec.step(tok, pos)
            pos = [p + 1 for p in pos]

    out_texts = []
    for b in range(B):
        if texts is not None:
            out_texts.append(texts[b].finish())
        else:
            out_texts.append(tokenizer.decode(generated[b]) if tokenizer is not None else "")
        s = stats[b]
        s["new_tokens"] = len(generated[b])
        s["time_to_first_token_s"] = (t_first or t_start) - t_start
        n_after = len(generated[b]) - 1
        dt = end_times[b] - (t_first or t_start)
        s["tokens_per_s"] = n_after / dt if n_after > 0 and dt > 0 else None
        if s["thought_shifts"]:
            s["thought_shift"] = sum(s["thought_shifts"]) / len(s["thought_shifts"])
    logits_out = None
    if logit_rows is not None:
        # One row per token chosen, the EOS included (with deferred host reads a row may have computed
        # a few steps past its end: those are dropped).
        logits_out = []
        for b, lr in enumerate(logit_rows):
            k = len(generated[b]) + (stats[b]["stop_reason"] == "eos")
            logits_out.append(torch.stack(lr[:k]) if k else torch.zeros(0, cfg.vocab_size))
    return GenerationResult(generated, out_texts, stats, logits_out)


# ------------------------------------------------------------------------------------ transformers-style entry


def generate_ids(
    model,
    input_ids: Tensor,
    max_new_tokens: int = 20,
    *,
    attention_mask: Tensor | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    seed: int | list[int] | None = None,
    **options: Any,
) -> Tensor:
    """`model.generate(input_ids, ...)` as a transformers user types it → LongTensor [B, L + new].

    input_ids [B, L] with an optional 0/1 `attention_mask` [B, L] (left or right padding: each row's
    tokens must be contiguous). Returns each row's input as given followed by its new tokens (the EOS
    that ended a row included), rows that ended early filled with `pad_token_id` (default: the
    config's pad id, else EOS), like transformers. do_sample=False is greedy whatever the temperature;
    other hatlm options (think_iters, rethink_every, refine_steps, …) pass through to `generate`.
    """
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
        shape = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__
        raise UserError(f"input_ids must be an integer tensor [batch, seq]; got {shape}")
    B, L = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if not isinstance(attention_mask, Tensor) or tuple(attention_mask.shape) != (B, L):
        got = tuple(attention_mask.shape) if isinstance(attention_mask, Tensor) else type(attention_mask).__name__
        raise UserError(f"attention_mask must have the shape of input_ids {(B, L)}; got {got}")
    keep = attention_mask.bool().cpu()
    ids_cpu = input_ids.cpu()
    rows = []
    for b in range(B):
        where = keep[b].nonzero().flatten()
        if where.numel() == 0:
            raise UserError(f"row {b} of attention_mask is all zeros: nothing to continue")
        lo, hi = int(where[0]), int(where[-1]) + 1
        if hi - lo != where.numel():
            raise UserError(f"row {b} of attention_mask has holes; each row's tokens must be contiguous")
        rows.append(ids_cpu[b, lo:hi].tolist())
    if options.pop("eos", None) is not None:
        raise UserError("pass eos_token_id, not eos")
    cfg = model.config
    eos = cfg.eos_token_id if eos_token_id is None else int(eos_token_id)
    pad = pad_token_id if pad_token_id is not None else (cfg.pad_token_id if cfg.pad_token_id is not None else eos)
    res = generate(
        model, None, rows, max_new_tokens, temperature=float(temperature) if do_sample else 0.0, top_k=top_k,
        top_p=top_p, repetition_penalty=repetition_penalty, seed=seed, eos_token_id=eos, **options,
    )  # fmt: skip
    new = [t + ([eos] if st["stop_reason"] == "eos" else []) for t, st in zip(res.tokens, res.stats)]
    width = max(len(t) for t in new)
    out = torch.full((B, L + width), int(pad), dtype=input_ids.dtype, device=input_ids.device)
    out[:, :L] = input_ids
    for b, t in enumerate(new):
        if t:
            out[b, L : L + len(t)] = torch.tensor(t, dtype=input_ids.dtype, device=input_ids.device)
    return out


def dispatch(model, *args: Any, **kwargs: Any):
    """`HatLM.generate`: token-id tensors → `generate_ids`; a tokenizer (or None) and prompts → `generate`."""
    first = args[0] if args else kwargs.get("input_ids", kwargs.get("tokenizer", kwargs.get("prompts")))
    if isinstance(first, Tensor):
        if args:
            return generate_ids(model, *args, **kwargs)
        return generate_ids(model, kwargs.pop("input_ids"), **kwargs)
    if "input_ids" in kwargs:
        raise UserError(f"input_ids must be an integer tensor [batch, seq]; got {type(kwargs['input_ids']).__name__}")
    if first is None or (hasattr(first, "encode") and hasattr(first, "decode") and not isinstance(first, str)):
        return generate(model, *args, **kwargs)
    raise UserError(
        "model.generate takes either a token-id tensor (model.generate(input_ids, max_new_tokens=…)) or a "
        f"tokenizer and prompts (model.generate(tokenizer, ['text', …], …)); got {type(first).__name__} first"
    )


__all__ = [
    "GenerationResult",
    "generate",
    "generate_ids",
]
