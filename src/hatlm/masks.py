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
