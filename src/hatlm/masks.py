"""Attention masks as predicates `(b, h, q_idx, kv_idx) -> bool`.

A predicate is built once per forward from per-row tensors (lengths, prefix lengths, query
positions) and then turned into whatever the attention backend wants: a boolean SDPA mask
(`to_sdpa_mask`, by broadcasting index tensors) or a FlexAttention `BlockMask` (`to_block_mask`).
Predicates use only tensor indexing and elementwise ops so that both paths (broadcast and vmap)
evaluate the same code. True means "may attend".

Indices: `q_idx` indexes the queries of the current call; `kv_idx` is an absolute position (the
key/value at position p lives at index p, also in the KV cache). `q_positions[b, q_idx]` maps a
query to its absolute position, so one predicate serves a full pass, a prefill and a decode step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

MaskFn = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


def and_masks(*fns: MaskFn) -> MaskFn:
    def mask(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        out = fns[0](b, h, q, kv)
        for fn in fns[1:]:
            out = out & fn(b, h, q, kv)
        return out

    return mask


def or_masks(*fns: MaskFn) -> MaskFn:
    def mask(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        out = fns[0](b, h, q, kv)
        for fn in fns[1:]:
            out = out | fn(b, h, q, kv)
        return out

    return mask


def decoder_mask(
    q_positions: Tensor,
    kv_lengths: Tensor,
    sliding_window: int | None = None,
    prefix_lengths: Tensor | None = None,
) -> MaskFn:
    """Causal (optionally sliding-window) attention over each row's first `kv_lengths[b]` positions.

    q_positions:    [B, Q] absolute position of each query.
    kv_lengths:     [B] number of valid key positions per row (keys at or past it are padding).
    prefix_lengths: [B] or None; positions < prefix_lengths[b] see each other bidirectionally
                    (prefix-LM), everything after stays causal.
    """

    def mask(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        qpos = q_positions[b, q]
        allowed = kv <= qpos
        if prefix_lengths is not None:
            p = prefix_lengths[b]
            allowed = allowed | ((kv < p) & (qpos < p))
        if sliding_window is not None:
            # Mistral/HF semantics: a query sees keys strictly less than `window` positions back.
            allowed = allowed & (qpos - kv < sliding_window)
        return allowed & (kv < kv_lengths[b])

    return mask


def bidirectional_mask(kv_lengths: Tensor) -> MaskFn:
    """Every position sees every valid position of its row, past and future (the thinker)."""

    def mask(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        return (kv < kv_lengths[b]) & (q >= 0)

    return mask


def to_sdpa_mask(fn: MaskFn, batch: int, q_len: int, kv_len: int, device: torch.device) -> Tensor:
    """Evaluate the predicate on broadcast index tensors → boolean mask [B, 1, Q, KV]."""
    b = torch.arange(batch, device=device).view(batch, 1, 1, 1)
    h = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=device)
    q = torch.arange(q_len, device=device).view(1, 1, q_len, 1)
    kv = torch.arange(kv_len, device=device).view(1, 1, 1, kv_len)
    return fn(b, h, q, kv).expand(batch, 1, q_len, kv_len)


def to_block_mask(fn: MaskFn, batch: int, q_len: int, kv_len: int, device: torch.device):
    """A FlexAttention BlockMask (device passed explicitly: the default would be CUDA)."""
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(fn, batch, None, q_len, kv_len, device=str(device))


def extra_position_masks(
    prompt_lengths: Tensor,
    m: int,
    kv_lengths: Tensor,
    sliding_window: int | None = None,
    bidirectional_prefix: bool = False,
) -> tuple[MaskFn, MaskFn, Callable[[Tensor, Tensor], Tensor]]:
    """Masks of a decoder pass over [prompt ; m extra positions ; text] (index space, per row b with
    n = prompt_lengths[b]): the extras (thoughts or pause slots) sit at indices n..n+m−1.

    The token positions keep the base model's numbering (prompt 0..n−1, text n, n+1, …) and the base
    mask sees only them, so the base attention of every token is exactly the pretrained model's. The
    extras are read through a second, gated attention (`layers.Attention`):
      base(b, h, q, kv):  kv is a token, valid, causal (or prompt↔prompt with a bidirectional prefix),
                          within the sliding window counted in token positions (an extra reads the
                          whole prompt);
      extra(b, h, q, kv): kv is an extra, valid; the text and the last prompt token (which predicts the
                          first text token) see all extras, an extra sees the extras up to itself, the
                          rest of the prompt sees them only with a bidirectional prefix (the thoughts
                          hold the whole prompt: an earlier prompt token reading them would see its
                          own future);
      has_extra(b, q):    whether query q reads any extra (rows without: their extra attention is
                          multiplied by 0; the predicate lets them see key 0 so softmax stays finite).
    """

    def is_extra(b: Tensor, j: Tensor) -> Tensor:
        n = prompt_lengths[b]
        return (j >= n) & (j < n + m)

    def position(b: Tensor, j: Tensor) -> Tensor:
        return torch.where(j >= prompt_lengths[b] + m, j - m, j)

    def base(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        n = prompt_lengths[b]
        allowed = kv <= q
        if bidirectional_prefix:
            allowed = allowed | ((kv < n) & (q < n))
        if sliding_window is not None:
            # The window is between tokens; an extra reads the whole prompt (else an extra further
            # than the window from the prompt would see no key at all).
            allowed = allowed & ((position(b, q) - position(b, kv) < sliding_window) | is_extra(b, q))
        return allowed & ~is_extra(b, kv) & (kv < kv_lengths[b])

    def has_extra(b: Tensor, q: Tensor) -> Tensor:
        reads = q >= prompt_lengths[b] - 1
        if bidirectional_prefix:
            reads = reads | (q >= 0)
        return reads

    def extra(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        n = prompt_lengths[b]
        allowed = is_extra(b, kv) & (kv < kv_lengths[b]) & ((q >= n + m) | (kv <= q) | (q < n))  # q < n: see has_extra
        return (allowed & has_extra(b, q)) | (~has_extra(b, q) & (kv == 0))

    return base, extra, has_extra
