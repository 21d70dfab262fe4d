"""The Mistral layer, defined once: RMSNorm, RoPE, grouped-query attention, SwiGLU, the pre-norm block,
and the preallocated KV cache.

Every path runs this code: the decoder's full passes, the thinker's bidirectional passes, prefill, and
the single-token decode step (`Block.decode`). The decode step calls the same projection modules as
the full pass, so a projection wrapped by LoRA (PEFT) or replaced by a quantised layer is honoured by
generation too. The one shortcut it takes — multiplying by q/k/v (and gate/up) weights concatenated
into one matrix — is only offered by `Block.fused_weights()` when every projection involved is a
plain `nn.Linear`, and the caller builds those copies for one generation call at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hatlm.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32:
            # Bitwise the same as the float32 arithmetic below, in one kernel (it matters at batch 1).
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # Normalise in float32 like the reference implementation, then cast back.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """RoPE in the Hugging Face (rotate-half) convention that Mistral checkpoints are stored in."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        # positions [B, T] → cos, sin [B, 1, T, head_dim]
        freqs = positions[..., None].float() * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return x * cos + rotate_half(x) * sin


class KVCache(nn.Module):
    """Preallocated keys/values [B, H_kv, S_max, D]; the entry for token position p lives at index p.

    With extra positions (thoughts or pause slots, `extra_len` = m) their keys/values live apart in
    `xk`, `xv` [B, H_kv, m, D]: they are read through the gated extra attention, never as tokens.
    """

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int, dtype, device, extra_len: int = 0):
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        xshape = (batch, n_kv_heads, extra_len, head_dim)
        self.register_buffer("xk", torch.zeros(xshape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("xv", torch.zeros(xshape, dtype=dtype, device=device), persistent=False)

    def store(self, k: Tensor, v: Tensor, index: CacheIndex) -> None:
        """Write a prefill's keys/values k, v [B, H_kv, T, D] where `index` sends each of the T entries."""
        for target_k, target_v, where in ((self.k, self.v, index.token), (self.xk, self.xv, index.extra)):
            if where is None:
                continue
            b, t = (where >= 0).nonzero(as_tuple=True)
            target_k[b, :, where[b, t]] = k[b, :, t]
            target_v[b, :, where[b, t]] = v[b, :, t]


@dataclass
class CacheIndex:
    """Where each entry of a prefill goes: `token` [B, T] cache index (−1: none), `extra` [B, T] index
    into the extra positions' cache (−1: none; None when there are no extras)."""

    token: Tensor
    extra: Tensor | None = None


@dataclass
class ExtraAttention:
    """The gated attention to extra positions of one decoder pass (see `masks.extra_position_masks`):
    its mask (SDPA boolean [B, 1, T, S] or FlexAttention block mask) and which queries read extras
    (`rows` [B, 1, T, 1], 1.0 or 0.0). Each layer scales what it reads per head by its own gate."""

    mask: Any
    rows: Tensor


@dataclass
class DecodePosition:
    """Where one decode step writes and reads, shared by every layer of that step.

    Either every row sits at the same position `p0` (the common batch-1 case: attend over the cache
    slice [lo, hi) with no mask), or rows differ: `index` [B, H_kv, 1, D] scatters each row's new
    key/value to its own position and `mask` [B, 1, 1, hi] hides what a row must not see.
    """

    cos: Tensor  # [D] (uniform) or [B, 1, D]
    sin: Tensor  # same shape; rotate_half(x)·sin = roll(x, D/2)·sin with sin's first half negated
    p0: int | None
    lo: int
    hi: int
    index: Tensor | None = None
    mask: Tensor | None = None


def _linear(x: Tensor, fused: Tensor | None, *modules: nn.Module) -> list[Tensor]:
    """x through several projections: one product with their concatenated weights when given."""
    if fused is None:
        return [m(x) for m in modules]
    return list(F.linear(x, fused).split([m.out_features for m in modules], dim=-1))


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d, hd = config.hidden_size, config.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, hd
        self.q_proj = nn.Linear(d, self.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(self.n_heads * hd, d, bias=False)

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        mask,
        cache: KVCache | None = None,
        cache_index: CacheIndex | None = None,
        score_bias: Tensor | None = None,
        extra: ExtraAttention | None = None,
        gate: Tensor | None = None,
    ) -> Tensor:
        """x [B, T, d] → [B, T, d]. `mask` is a boolean SDPA mask or a FlexAttention block mask;
        `score_bias` [B, 1, T, S] (optional) is added to the attention scores. With `extra`, the
        queries also read the extra positions through a second softmax, scaled per head by `gate` [H]:
        out = attn(tokens) + gate ⊙ attn(extras). A zero gate leaves the token attention exactly as it
        was (the zero-initialised attention of LLaMA-Adapter, Zhang et al. 2023), which is what makes a
        hybrid built from a pretrained model start at that model's logits for any number of thoughts.
        With `cache`, the keys/values are also written there (a prefill)."""
        B, T, _ = x.shape
        # [B, T, H*D] → [B, H, T, D]
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            cache.store(k, v, cache_index)
        out = self._attend(q, k, v, mask, score_bias)
        if extra is not None and gate is not None:
            read = self._attend(q, k, v, extra.mask, None) * extra.rows
            out = out + gate.view(1, -1, 1, 1).to(out.dtype) * read
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask, score_bias: Tensor | None) -> Tensor:
        gqa = self.n_kv_heads != self.n_heads
        if isinstance(mask, Tensor):
            attn_mask = mask
            if score_bias is not None:
                attn_mask = score_bias.masked_fill(~mask, float("-inf")).to(q.dtype)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=gqa)
        from torch.nn.attention.flex_attention import flex_attention

        if score_bias is None:
            return flex_attention(q, k, v, block_mask=mask, enable_gqa=gqa)

        def add_bias(score, b, h, q_idx, kv_idx):
            return score + score_bias[b, 0, q_idx, kv_idx]

        return flex_attention(q, k, v, score_mod=add_bias, block_mask=mask, enable_gqa=gqa)

    def decode(
        self, x: Tensor, at: DecodePosition, cache: KVCache, fused_qkv: Tensor | None = None, gate: Tensor | None = None
    ) -> Tensor:
        """One new position per row: x [B, d] → [B, d], writing its key/value into `cache` (and reading
        the cached extra positions through `gate`, as in `forward`)."""
        B = x.shape[0]
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = _linear(x, fused_qkv, self.q_proj, self.k_proj, self.v_proj)
        qk = torch.cat([q, k], dim=-1).view(B, H + Hkv, D)
        qk = qk * at.cos + qk.roll(D // 2, -1) * at.sin
        # Query head h uses key/value head h // G, so the G heads of a group become G queries of that
        # group: [B, H, D] → [B, Hkv, G, D] (no expansion of the cached keys).
        q = qk[:, :H].reshape(B, Hkv, H // Hkv, D)
        k = qk[:, H:]  # [B, Hkv, D]
        v = v.view(B, Hkv, D)
        if at.p0 is not None:
            cache.k[:, :, at.p0] = k
            cache.v[:, :, at.p0] = v
        else:
            cache.k.scatter_(2, at.index, k[:, :, None])
            cache.v.scatter_(2, at.index, v[:, :, None])
        o = F.scaled_dot_product_attention(
            q, cache.k[:, :, at.lo : at.hi], cache.v[:, :, at.lo : at.hi], attn_mask=at.mask
        )
        if gate is not None and cache.xk.shape[2]:
            # A new token reads every extra position (thoughts or pause slots) of its row.
            read = F.scaled_dot_product_attention(q, cache.xk, cache.xv)
            o = o + gate.view(1, Hkv, H // Hkv, 1).to(o.dtype) * read
        return self.o_proj(o.reshape(B, H * D))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor, fused_gate_up: Tensor | None = None) -> Tensor:
        g, u = _linear(x, fused_gate_up, self.gate_proj, self.up_proj)
        return self.down_proj(F.silu(g) * u)


class Block(nn.Module):
    """One Mistral layer (pre-norm attention + SwiGLU); the mask decides causal or bidirectional."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(
        self,
        x: Tensor,
        rope,
        mask,
        cache: KVCache | None = None,
        cache_index: CacheIndex | None = None,
        score_bias: Tensor | None = None,
        extra: ExtraAttention | None = None,
        gate: Tensor | None = None,
    ) -> Tensor:
        h = self.self_attn(self.input_layernorm(x), rope, mask, cache, cache_index, score_bias, extra, gate)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x))

    def decode(
        self,
        x: Tensor,
        at: DecodePosition,
        cache: KVCache,
        fused: tuple[Tensor, Tensor] | None = None,
        gate: Tensor | None = None,
    ) -> Tensor:
        """The same layer for one new position per row (x [B, d]), reading and extending `cache`."""
        fused_qkv, fused_gate_up = fused if fused is not None else (None, None)
        x = x + self.self_attn.decode(self.input_layernorm(x), at, cache, fused_qkv, gate)
        return x + self.mlp(self.post_attention_layernorm(x), fused_gate_up)

    def fused_weights(self) -> tuple[Tensor, Tensor] | None:
        """Concatenated q/k/v and gate/up weights for `decode`, or None when any of those projections
        is not a plain `nn.Linear` (LoRA-wrapped, quantised…): then decode calls the modules."""
        a, mlp = self.self_attn, self.mlp
        projections = (a.q_proj, a.k_proj, a.v_proj, mlp.gate_proj, mlp.up_proj)
        if any(type(p) is not nn.Linear for p in projections):
            return None
        with torch.no_grad():
            qkv = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight], dim=0)
            gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], dim=0)
        return qkv, gate_up
