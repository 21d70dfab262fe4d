"""The hatlm model, top to bottom: a Mistral decoder, the thinker, and the three comparison arms.

    think:  z0 = [Embed(prompt) ; thought_slots]            (per row: n_b prompt positions + m slots)
            repeat t = 1..T:  u  = Thinker(z)                (K bidirectional Mistral layers, shared)
                              r  = re-weighting from cos-similarities of all positions
                              a  = sigmoid(gate(u))          (per position)
                              z ← z + a ⊙ r ⊙ (u − z)        until ‖Δz‖/‖z‖ < ε or T = T_max
    speak:  decoder input = [Embed(prompt) + P(z_prompt − z0_prompt) ; z_thoughts ; Embed(text)]
            P is zero-initialised, so with m = 0 the hybrid *is* the base model at initialisation.

Sequence layout. Rows are right-padded: row b holds `lengths[b]` tokens, its first
`prompt_lengths[b]` being the prompt. The thought slots are inserted right after each row's prompt,
so every row's positions run 0, 1, 2, … with no holes, exactly as if it were alone in the batch
(that is what makes a sequence equal its row in a padded batch). Logits keep the causal convention
`logits[b, t]` predicts `input_ids[b, t + 1]`; for the last prompt token that prediction is read at
the last thought position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hatlm.config import ModelConfig
from hatlm.masks import MaskFn, bidirectional_mask, decoder_mask, to_block_mask, to_sdpa_mask

# ------------------------------------------------------------------------------------ layers


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in float32 like the reference implementation, then cast back.
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


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
    """Preallocated keys/values [B, H_kv, S_max, D]; the entry for position p lives at index p."""

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int, dtype, device) -> None:
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, positions: Tensor, k: Tensor, v: Tensor, kv_len: int) -> tuple[Tensor, Tensor]:
        # positions [B, T]; k, v [B, H_kv, T, D]. Rows may write at different positions.
        if positions.shape[1] == 1:
            rows = torch.arange(k.shape[0], device=k.device)
            self.k[rows, :, positions[:, 0]] = k[:, :, 0]
            self.v[rows, :, positions[:, 0]] = v[:, :, 0]
        else:
            rows = torch.arange(k.shape[0], device=k.device)[:, None]
            self.k[rows, :, positions] = k.transpose(1, 2)
            self.v[rows, :, positions] = v.transpose(1, 2)
        return self.k[:, :, :kv_len], self.v[:, :, :kv_len]


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
        positions: Tensor | None = None,
    ) -> Tensor:
        B, T, _ = x.shape
        # [B, T, H*D] → [B, H, T, D]
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            kv_len = mask.shape[-1]
            k, v = cache.update(positions, k, v, kv_len)
        if isinstance(mask, Tensor):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_kv_heads != self.n_heads)
        else:
            from torch.nn.attention.flex_attention import flex_attention

            out = flex_attention(q, k, v, block_mask=mask, enable_gqa=self.n_kv_heads != self.n_heads)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """One Mistral layer (pre-norm attention + SwiGLU); the mask decides causal or bidirectional."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, rope, mask, cache: KVCache | None = None, positions: Tensor | None = None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, cache, positions)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """The Mistral backbone: embeddings, layers, final norm (HF's `model.*` tensors)."""

    def __init__(self, config: ModelConfig, n_layers: int) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(n_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Thinker(nn.Module):
    """K bidirectional Mistral layers iterated with shared weights, plus re-weighting and gate."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        h = config.hybrid
        self.layers = nn.ModuleList(Block(config) for _ in range(h.thinker_layers))
        # a = sigmoid(gate(u)): one interpolation weight per position.
        self.gate = nn.Linear(config.hidden_size, 1, bias=True)
        # Learned temperature of the cosine-similarity re-weighting (its sign is learned too).
        self.reweight_temperature = nn.Parameter(torch.tensor(float(h.reweight_temperature)))
        self.use_reweight = h.reweight

    def relevance(self, z: Tensor, valid: Tensor) -> Tensor:
        """r ∈ (0, 2) per position from the cosine similarity of every pair of valid positions.

        A position's relevance is its mean similarity to all *other* positions, past and future,
        compared with the row's average: positions that agree with the current context (the focus)
        get r > 1, outliers r < 1 (or the reverse if the learned temperature turns negative).
        """
        zn = F.normalize(z.float(), dim=-1)
        sim = zn @ zn.transpose(1, 2)  # [B, N, N]
        n = z.shape[1]
        pair = valid[:, :, None] & valid[:, None, :] & ~torch.eye(n, dtype=torch.bool, device=z.device)
        pair = pair.to(sim.dtype)
        c = (sim * pair).sum(-1) / pair.sum(-1).clamp(min=1.0)  # [B, N]
        vf = valid.to(sim.dtype)
        c_mean = (c * vf).sum(-1, keepdim=True) / vf.sum(-1, keepdim=True).clamp(min=1.0)
        r = 2.0 * torch.sigmoid(self.reweight_temperature * (c - c_mean))
        return r.to(z.dtype)[..., None]

    def step(self, z: Tensor, rope, mask, valid: Tensor) -> Tensor:
        u = z
        for layer in self.layers:
            u = layer(u, rope, mask)
        a = torch.sigmoid(self.gate(u))  # [B, N, 1]
        if self.use_reweight:
            a = a * self.relevance(z, valid)
        return z + a * (u - z)


@dataclass
class ThinkResult:
    """What thinking produced, per row of the batch."""

    z: Tensor  # [B, P+m, d] refined sequence (row b: prompt_lengths[b] prompt positions, then m thoughts)
    z0: Tensor  # [B, P+m, d] the sequence before thinking
    prompt_lengths: Tensor  # [B]
    iterations: Tensor  # [B] thinking iterations each row used
    final_change: Tensor  # [B] ‖z_T − z_{T−1}‖ / ‖z_{T−1}‖ of each row's last iteration (0 if none)

    def thoughts(self, m: int) -> Tensor:
        """[B, m, d] the thought vectors of each row."""
        idx = self.prompt_lengths[:, None] + torch.arange(m, device=self.z.device)
        return self.z.gather(1, idx[..., None].expand(-1, -1, self.z.shape[-1]))


@dataclass
class HybridOutput:
    logits: Tensor  # [B, L, V]; logits[b, t] predicts input_ids[b, t+1]
    iterations: Tensor  # [B]
    final_change: Tensor  # [B]
    think: ThinkResult | None = None


# ------------------------------------------------------------------------------------ the model


class HatLM(nn.Module):
    """Mistral decoder + (depending on `config.hybrid.arm`) thought slots and the thinker."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        h = config.hybrid
        self.arm = h.arm
        self.decoder = Decoder(config, config.decoder_layers)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rope = RotaryEmbedding(config.head_dim, config.rope_theta)
        m = config.num_thought_slots
        self.thought_slots = nn.Parameter(torch.zeros(m, config.hidden_size)) if self.arm != "causal" else None
        if self.arm == "hybrid":
            self.thinker = Thinker(config)
            self.prompt_refine = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        else:
            self.thinker = None
            self.prompt_refine = None
        self.gradient_checkpointing = False
        self.reset_parameters()
        if config.tie_word_embeddings:
            self.lm_head.weight = self.decoder.embed_tokens.weight

    # ------------------------------------------------------------------ init and bookkeeping
    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.config.initializer_range
        for mod in self.modules():
            if isinstance(mod, nn.Linear):
                mod.weight.normal_(0.0, std)
                if mod.bias is not None:
                    mod.bias.zero_()
            elif isinstance(mod, nn.Embedding):
                mod.weight.normal_(0.0, std)
            elif isinstance(mod, RMSNorm):
                mod.weight.fill_(1.0)
        self.reset_refinement()

    @torch.no_grad()
    def reset_refinement(self) -> None:
        """Fresh thinking path: random thought slots, zero prompt projection, gate at its init."""
        if self.thought_slots is not None:
            self.thought_slots.normal_(0.0, self.config.initializer_range)
        if self.arm == "hybrid":
            self.prompt_refine.weight.zero_()
            self.thinker.gate.weight.zero_()
            self.thinker.gate.bias.fill_(self.config.hybrid.gate_bias_init)
            self.thinker.reweight_temperature.fill_(self.config.hybrid.reweight_temperature)

    @property
    def device(self) -> torch.device:
        return self.decoder.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.embed_tokens.weight.dtype

    def num_parameters(self) -> dict[str, int]:
        """Parameter counts: backbone (the decoder + LM head), thinker, thought slots etc., total."""

        def count(mod) -> int:
            if mod is None:
                return 0
            if isinstance(mod, nn.Parameter):
                return mod.numel()
            return sum(p.numel() for p in mod.parameters())

        backbone = count(self.decoder) + (0 if self.config.tie_word_embeddings else count(self.lm_head))
        thinker = count(self.thinker)
        other = count(self.thought_slots) + count(self.prompt_refine)
        return {"backbone": backbone, "thinker": thinker, "slots_and_gates": other, "total": backbone + thinker + other}

    # ------------------------------------------------------------------ masks
    def build_mask(self, fn: MaskFn, batch: int, q_len: int, kv_len: int):
        """Turn a mask predicate into what the configured attention backend consumes (once per call)."""
        if self.config.attn_backend == "flex":
            return to_block_mask(fn, batch, q_len, kv_len, self.device)
        return to_sdpa_mask(fn, batch, q_len, kv_len, self.device)

    # ------------------------------------------------------------------ pieces
    def run_layers(
        self,
        layers,
        x: Tensor,
        positions: Tensor,
        mask,
        caches: list[KVCache] | None = None,
    ) -> Tensor:
        rope = self.rope(positions, x.dtype)
        for i, layer in enumerate(layers):
            cache = caches[i] if caches is not None else None
            if self.gradient_checkpointing and self.training and cache is None:
                x = torch.utils.checkpoint.checkpoint(layer, x, rope, mask, use_reentrant=False)
            else:
                x = layer(x, rope, mask, cache, positions)
        return x

    def logits_from_hidden(self, h: Tensor) -> Tensor:
        return self.lm_head(self.decoder.norm(h))

    def _lengths(self, input_ids: Tensor, lengths: Tensor | None) -> Tensor:
        B, L = input_ids.shape
        if lengths is None:
            return torch.full((B,), L, dtype=torch.long, device=input_ids.device)
        return lengths.to(device=input_ids.device, dtype=torch.long)

    def _check_tokens(self, input_ids: Tensor) -> None:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq]; got shape {tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be an integer tensor; got {input_ids.dtype}")
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config.vocab_size):
            raise ValueError(
                f"token ids must lie in [0, {self.config.vocab_size}); got min {int(input_ids.min())}, "
                f"max {int(input_ids.max())}"
            )

    def causal_forward(self, input_ids: Tensor, lengths: Tensor | None = None) -> Tensor:
        """Plain causal pass through the decoder → logits [B, L, V]."""
        B, L = input_ids.shape
        lengths = self._lengths(input_ids, lengths)
        positions = torch.arange(L, device=input_ids.device).expand(B, L)
        fn = decoder_mask(positions, lengths, self.config.sliding_window)
        mask = self.build_mask(fn, B, L, L)
        h = self.run_layers(self.decoder.layers, self.decoder.embed_tokens(input_ids), positions, mask)
        return self.logits_from_hidden(h)

    def layout(self, input_ids: Tensor, prompt_lengths: Tensor, extra: Tensor) -> Tensor:
        """Insert `extra` [B, m, d] after each row's prompt: [B, L, d] tokens → [B, L+m, d]."""
        emb = self.decoder.embed_tokens(input_ids)
        B, L, d = emb.shape
        m = extra.shape[1]
        if m == 0:
            return emb
        j = torch.arange(L + m, device=emb.device)[None, :]  # decoder position
        n = prompt_lengths[:, None]
        is_extra = (j >= n) & (j < n + m)
        tok_idx = torch.where(j < n, j, j - m).clamp(0, L - 1)
        slot_idx = (j - n).clamp(0, m - 1)
        x_tok = emb.gather(1, tok_idx[..., None].expand(B, L + m, d))
        x_slot = extra.gather(1, slot_idx[..., None].expand(B, L + m, d))
        return torch.where(is_extra[..., None], x_slot, x_tok)

    def think(
        self,
        input_ids: Tensor,
        prompt_lengths: Tensor,
        think_iters: int | None = None,
        halting_threshold: float | None = None,
    ) -> ThinkResult:
        """Refine [prompt ; thought slots] with the bidirectional thinker (DESIGN.md §1.2).

        input_ids [B, L] holds at least each row's prompt (anything after it is ignored).
        """
        if self.arm != "hybrid":
            raise RuntimeError(f"think() needs the hybrid arm; this model is the {self.arm!r} arm")
        h = self.config.hybrid
        T = h.max_think_iters if think_iters is None else int(think_iters)
        eps = h.halting_threshold if halting_threshold is None else float(halting_threshold)
        if T < 0:
            raise ValueError(f"think_iters must be >= 0; got {T}")
        B = input_ids.shape[0]
        m = self.thought_slots.shape[0]
        P = int(prompt_lengths.max())
        slots = self.thought_slots[None].expand(B, m, -1).to(self.dtype)
        z = self.layout(input_ids[:, :P], prompt_lengths, slots)  # [B, P+m, d]
        N = P + m
        positions = torch.arange(N, device=z.device).expand(B, N)
        seq_len = prompt_lengths + m
        if h.encoder_layers:
            # The first backbone layers encode the prompt causally, as pretrained.
            enc_mask = self.build_mask(decoder_mask(positions, seq_len, self.config.sliding_window), B, N, N)
            enc = self.run_layers(self.decoder.layers[: h.encoder_layers], z, positions, enc_mask)
            is_prompt = (torch.arange(N, device=z.device)[None, :] < prompt_lengths[:, None])[..., None]
            z = torch.where(is_prompt, enc, z)
        z0 = z
        valid = torch.arange(N, device=z.device)[None, :] < seq_len[:, None]  # [B, N]
        mask = self.build_mask(bidirectional_mask(seq_len), B, N, N)
        rope = self.rope(positions, z.dtype)
        vmask = valid[..., None].to(z.dtype)
        iterations = torch.zeros(B, dtype=torch.long, device=z.device)
        final_change = torch.zeros(B, dtype=torch.float32, device=z.device)
        halted = torch.zeros(B, dtype=torch.bool, device=z.device)
        for _ in range(T):
            if self.gradient_checkpointing and self.training:
                z_new = torch.utils.checkpoint.checkpoint(self.thinker.step, z, rope, mask, valid, use_reentrant=False)
            else:
                z_new = self.thinker.step(z, rope, mask, valid)
            with torch.no_grad():
                num = ((z_new - z) * vmask).float().pow(2).sum((1, 2)).sqrt()
                den = (z * vmask).float().pow(2).sum((1, 2)).sqrt().clamp(min=1e-12)
                change = num / den
            active = ~halted
            # Halted rows keep their vectors: each row's result is independent of the batch.
            z = torch.where(active[:, None, None], z_new, z)
            iterations = iterations + active.long()
            final_change = torch.where(active, change, final_change)
            if eps > 0:
                halted = halted | (active & (change < eps))
                if bool(halted.all()):
                    break
        return ThinkResult(z, z0, prompt_lengths, iterations, final_change)

    def decoder_inputs(self, input_ids: Tensor, prompt_lengths: Tensor, think: ThinkResult | None) -> Tensor:
        """[B, L+m, d]: prompt embeddings (+ their zero-initialised refinement), thoughts, text."""
        B = input_ids.shape[0]
        m = self.config.num_thought_slots
        if self.arm == "pause" or think is None:
            extra = self.thought_slots[None].expand(B, m, -1).to(self.dtype)
            return self.layout(input_ids, prompt_lengths, extra)
        x = self.layout(input_ids, prompt_lengths, think.thoughts(m))
        N = think.z.shape[1]
        # Prompt positions read their refinement through the zero-initialised projection.
        delta = self.prompt_refine(think.z - think.z0)  # [B, N, d]
        j = torch.arange(N, device=x.device)[None, :]
        is_prompt = (j < prompt_lengths[:, None])[..., None]
        refined = torch.where(is_prompt, delta, torch.zeros_like(delta))
        return torch.cat([x[:, :N] + refined, x[:, N:]], dim=1)

    def decoder_mask_fn(self, positions: Tensor, kv_lengths: Tensor, prompt_lengths: Tensor | None) -> MaskFn:
        """The decoder's mask: causal, or bidirectional over prompt+thoughts when configured."""
        prefix = None
        if prompt_lengths is not None and self.config.hybrid.decoder_prefix == "bidirectional":
            prefix = prompt_lengths + self.config.num_thought_slots
        return decoder_mask(positions, kv_lengths, self.config.sliding_window, prefix)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: Tensor,
        prompt_lengths: Tensor | None = None,
        lengths: Tensor | None = None,
        think_iters: int | None = None,
        halting_threshold: float | None = None,
    ) -> Tensor | HybridOutput:
        """Logits for `input_ids` [B, L] (right-padded rows of `lengths[b]` tokens).

        Without `prompt_lengths`: a causal pass through the decoder → logits Tensor [B, L, V].
        With `prompt_lengths` [B]: the row's first prompt_lengths[b] tokens are the prompt, the
        rest the continuation; the arm decides what happens in between (nothing / pause slots /
        thinking) → HybridOutput with logits [B, L, V] in the causal convention plus statistics.
        """
        self._check_tokens(input_ids)
        if prompt_lengths is None:
            return self.causal_forward(input_ids, lengths)
        B, L = input_ids.shape
        lengths = self._lengths(input_ids, lengths)
        prompt_lengths = torch.as_tensor(prompt_lengths, device=input_ids.device).long().view(-1)
        if prompt_lengths.shape[0] != B:
            raise ValueError(f"prompt_lengths has {prompt_lengths.shape[0]} entries for a batch of {B}")
        if bool((prompt_lengths < 1).any()) or bool((prompt_lengths > lengths).any()):
            raise ValueError(
                f"each prompt length must be in [1, row length]; got prompt_lengths={prompt_lengths.tolist()} "
                f"for row lengths {lengths.tolist()}"
            )
        zeros = torch.zeros(B, device=input_ids.device)
        if self.arm == "causal":
            logits = self.causal_forward(input_ids, lengths)
            return HybridOutput(logits, zeros.long(), zeros)
        think = self.think(input_ids, prompt_lengths, think_iters, halting_threshold) if self.arm == "hybrid" else None
        x = self.decoder_inputs(input_ids, prompt_lengths, think)
        m = self.config.num_thought_slots
        N = L + m
        positions = torch.arange(N, device=x.device).expand(B, N)
        fn = self.decoder_mask_fn(positions, lengths + m, prompt_lengths)
        h = self.run_layers(self.decoder.layers, x, positions, self.build_mask(fn, B, N, N))
        # Back to token positions: t < n−1 reads itself, t ≥ n−1 reads m positions later (the
        # last prompt token's next-token prediction comes from the last thought).
        t = torch.arange(L, device=x.device)[None, :]
        src = torch.where(t < prompt_lengths[:, None] - 1, t, t + m)
        h = h.gather(1, src[..., None].expand(B, L, h.shape[-1]))
        logits = self.logits_from_hidden(h)
        if think is None:
            return HybridOutput(logits, zeros.long(), zeros)
        return HybridOutput(logits, think.iterations, think.final_change, think)

    # ------------------------------------------------------------------ KV caches
    def setup_caches(self, batch: int, max_len: int) -> list[KVCache]:
        c = self.config
        return [
            KVCache(batch, c.num_key_value_heads, max_len, c.head_dim, self.dtype, self.device)
            for _ in self.decoder.layers
        ]

    # ------------------------------------------------------------------ generation
    def generate(self, *args, **kwargs):
        """Generate text: `hatlm.generate.generate(self, tokenizer, prompts, ...)` (see there)."""
        from hatlm.generate import generate

        return generate(self, *args, **kwargs)
