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
from torch import Tensor, nn

from hatlm.config import ModelConfig
from hatlm.layers import Block, CacheIndex, ExtraAttention, KVCache, RMSNorm, RotaryEmbedding
from hatlm.masks import (
    MaskFn,
    bidirectional_mask,
    decoder_mask,
    extra_position_masks,
    to_block_mask,
    to_sdpa_mask,
)
from hatlm.thinking import Thinker, ThinkResult

__all__ = ["Decoder", "HatLM", "HybridOutput", "KVCache", "RMSNorm", "RotaryEmbedding", "ThinkResult", "Thinker"]

class Decoder(nn.Module):
    """The Mistral backbone: embeddings, layers, final norm (HF's `model.*` tensors)."""

    def __init__(self, config: ModelConfig, n_layers: int) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(n_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


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
        # Per decoder layer and head: how much of the gated attention to the extra positions (thoughts
        # or pause slots) enters the layer's output. Zero at a fresh start, so the decoder begins as
        # its base model for any number of slots (see layers.Attention.forward).
        self.thought_gate = None
        if self.arm != "causal":
            H = config.num_attention_heads
            self.thought_gate = nn.ParameterList(torch.zeros(H) for _ in range(config.decoder_layers))
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
            for gate in self.thought_gate:
                gate.fill_(self.config.hybrid.thought_gate_init)
        if self.arm == "hybrid":
            self.prompt_refine.weight.zero_()
            self.thinker.gate.weight.zero_()
            self.thinker.gate.bias.fill_(self.config.hybrid.gate_bias_init)
            self.thinker.reweight_temperature.fill_(self.config.hybrid.reweight_temperature)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each layer (and each thinking iteration) in the backward pass instead of keeping
        its activations: activation memory per layer instead of per position·layer."""
        self.gradient_checkpointing = bool(enabled)
        if self.thinker is not None:
            self.thinker.gradient_checkpointing = bool(enabled)

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
        other = count(self.thought_slots) + count(self.thought_gate) + count(self.prompt_refine)
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
        cache_index: CacheIndex | None = None,
        extra: ExtraAttention | None = None,
    ) -> Tensor:
        """x [B, N, d] through `layers` at RoPE `positions` [B, N]. With `extra`, each layer also reads
        the extra positions through its row of `thought_gate`; with `caches`, keys/values are stored."""
        rope = self.rope(positions, x.dtype)
        for i, layer in enumerate(layers):
            cache = caches[i] if caches is not None else None
            gate = self.thought_gate[i] if extra is not None else None
            if self.gradient_checkpointing and self.training and cache is None:
                x = torch.utils.checkpoint.checkpoint(
                    layer, x, rope, mask, None, None, None, extra, gate, use_reentrant=False
                )
            else:
                x = layer(x, rope, mask, cache, cache_index, None, extra, gate)
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
        """Refine [prompt ; thought slots] with the bidirectional thinker (docs/design.md §1, "Think").

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
        z, iterations, final_change = self.thinker.iterate(z, rope, mask, valid, T, eps)
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

    def decoder_pass(
        self,
        x: Tensor,
        prompt_lengths: Tensor | None,
        seq_lengths: Tensor,
        caches: list[KVCache] | None = None,
    ) -> Tensor:
        """The decoder over x [B, N, d] → hidden states [B, N, d] (before the final norm).

        Without extras (causal arm, or no prompt_lengths) x holds tokens at positions 0..N−1. Otherwise
        x is laid out [prompt ; m extras ; text] per row (see `layout`): the tokens keep the base
        model's positions and attention, and the extras are read through the gated extra attention
        (`masks.extra_position_masks`). Row b has seq_lengths[b] valid entries (extras included). With
        `caches`, a prefill: token keys/values go to cache index = position, the extras' apart.
        """
        B, N, _ = x.shape
        j = torch.arange(N, device=x.device).expand(B, N)
        m = self.config.num_thought_slots if prompt_lengths is not None else 0
        prefix = self.config.hybrid.decoder_prefix == "bidirectional" and prompt_lengths is not None
        if m == 0:
            fn = decoder_mask(j, seq_lengths, self.config.sliding_window, prompt_lengths if prefix else None)
            index = CacheIndex(j) if caches is not None else None
            return self.run_layers(self.decoder.layers, x, j, self.build_mask(fn, B, N, N), caches, index)
        n = prompt_lengths[:, None]
        is_extra = (j >= n) & (j < n + m)
        positions = torch.where(j >= n + m, j - m, j)  # extras share the numbers of the first text tokens
        base, extra_fn, has_extra = extra_position_masks(
            prompt_lengths, m, seq_lengths, self.config.sliding_window, prefix
        )
        rows = has_extra(torch.arange(B, device=x.device)[:, None], j).to(x.dtype)[:, None, :, None]  # [B,1,N,1]
        extra = ExtraAttention(self.build_mask(extra_fn, B, N, N), rows)
        index = None
        if caches is not None:
            index = CacheIndex(torch.where(is_extra, -1, positions), torch.where(is_extra, j - n, -1))
        return self.run_layers(self.decoder.layers, x, positions, self.build_mask(base, B, N, N), caches, index, extra)

    def token_index(self, prompt_lengths: Tensor, L: int) -> Tensor:
        """[B, L]: where token t of each row sits in the decoder's [prompt ; m extras ; text] layout."""
        t = torch.arange(L, device=prompt_lengths.device)[None, :]
        return torch.where(t < prompt_lengths[:, None], t, t + self.config.num_thought_slots)

    def decoder_hidden(
        self, input_ids: Tensor, prompt_lengths: Tensor, think: ThinkResult | None, seq_lengths: Tensor
    ) -> Tensor:
        """The decoder over [prompt (+ refinement) ; thoughts or pause slots ; text] → hidden [B, L+m, d]
        (before the final norm); row b has seq_lengths[b] valid entries."""
        return self.decoder_pass(self.decoder_inputs(input_ids, prompt_lengths, think), prompt_lengths, seq_lengths)

    def decoder_mask_fn(self, positions: Tensor, kv_lengths: Tensor) -> MaskFn:
        """The decoder's token mask for queries at `positions` over cached token keys (decoding)."""
        return decoder_mask(positions, kv_lengths, self.config.sliding_window)

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
        m = self.config.num_thought_slots
        h = self.decoder_hidden(input_ids, prompt_lengths, think, lengths + m)  # [B, L+m, d]
        # Back to token positions (the extras are only read, never read out): token t's hidden state
        # predicts token t+1, the last prompt token's included — as in the base model.
        src = self.token_index(prompt_lengths, L)
        h = h.gather(1, src[..., None].expand(B, L, h.shape[-1]))
        logits = self.logits_from_hidden(h)
        if think is None:
            return HybridOutput(logits, zeros.long(), zeros)
        return HybridOutput(logits, think.iterations, think.final_change, think)

    # ------------------------------------------------------------------ KV caches
    def setup_caches(self, batch: int, max_len: int) -> list[KVCache]:
        c = self.config
        m = c.num_thought_slots
        return [
            KVCache(batch, c.num_key_value_heads, max_len, c.head_dim, self.dtype, self.device, extra_len=m)
            for _ in self.decoder.layers
        ]

    # ------------------------------------------------------------------ generation
    def generate(self, *args, **kwargs):
        """Generate with any arm. Two entry points (see `hatlm.generate`):

        * `model.generate(input_ids, max_new_tokens=…, do_sample=…, temperature=…, attention_mask=…)`,
          the transformers call: returns a LongTensor [B, L + new] (input ids, then new tokens);
        * `model.generate(tokenizer, prompts, max_new_tokens, …)`: texts and thinking statistics.
        """
        # Generation is built on the model, not part of it: generate.py imports nothing from this
        # module, and this method only forwards to it (deferred so that importing the model stays light).
        from hatlm import generate as generation

        return generation.dispatch(self, *args, **kwargs)
