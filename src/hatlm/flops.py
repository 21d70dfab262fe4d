"""Analytic FLOP counts per example for the three arms (DESIGN.md §2: "FLOPs per example").

Conventions (the usual ones, so figures compare with papers): a multiply-add is 2 FLOPs; only matrix
products count (projections, attention scores and values, the thinker's similarity matrix, the LM
head) — norms, RoPE, activations and softmax are left out (a few % on tiny models, ≪1% at scale).

Per Mistral layer and position: 2 × (q, k, v, o, gate, up, down weights). Attention: 4 · heads ·
head_dim FLOPs per (query, key) pair (scores and weighted values). Which pairs count is `attention`:
"causal" counts the pairs the mask allows (what an ideal kernel computes), "dense" every pair of the
padded square (what SDPA computes with an explicit boolean mask, and what
`torch.utils.flop_counter.FlopCounterMode` reports).

An example is a prompt of n tokens (BOS included) and an answer of k tokens (EOS included):
  causal: N + K decoder layers over n + k positions
  pause:  N + K decoder layers over n + m + k positions (m pause positions, read through the gated
          extra attention: see `_extra_pairs`)
  hybrid: thinker K layers × T iterations over n + m positions (plus the similarity re-weighting and
          gate), the prompt refinement projection, then N decoder layers over n + m + k positions
Training ≈ 3 × forward (the backward pass costs about twice the forward).
"""

from __future__ import annotations

from hatlm.config import ModelConfig

ATTENTION_MODES = ("causal", "dense")


def layer_matmul_flops_per_position(config: ModelConfig) -> int:
    """2 × the weights of one Mistral layer's projections (attention and SwiGLU)."""
    d, hd = config.hidden_size, config.head_dim
    q = d * config.num_attention_heads * hd
    kv = 2 * d * config.num_key_value_heads * hd
    o = config.num_attention_heads * hd * d
    mlp = 3 * d * config.intermediate_size
    return 2 * (q + kv + o + mlp)


def attention_flops_per_pair(config: ModelConfig) -> int:
    """Scores (q·k) and weighted values (p·v) of one query/key pair, all heads."""
    return 4 * config.num_attention_heads * config.head_dim


def _decoder_pairs(n_pos: int, window: int | None, prefix: int = 0) -> int:
    """(query, key) pairs a causal (sliding-window, optionally bidirectional-prefix) mask allows."""
    w = window if window is not None else n_pos + 1
    total = 0
    for q in range(n_pos):
        lo = max(0, q - w + 1)
        hi = prefix - 1 if q < prefix else q  # a prefix query sees the whole prefix
        total += hi - lo + 1
    return total


def _check(config: ModelConfig, prompt_len: int, answer_len: int, think_iters: int | None, attention: str) -> int:
    if prompt_len < 1 or answer_len < 0:
        raise ValueError(f"need prompt_len >= 1 and answer_len >= 0; got {prompt_len}, {answer_len}")
    if attention not in ATTENTION_MODES:
        raise ValueError(f"attention must be one of {ATTENTION_MODES}; got {attention!r}")
    if config.arm != "hybrid":
        return 0
    T = config.hybrid.max_think_iters if think_iters is None else int(think_iters)
    if T < 0:
        raise ValueError(f"think_iters must be >= 0; got {T}")
    return T


def think_flops(config: ModelConfig, prompt_len: int, think_iters: int | None = None, attention: str = "causal") -> int:
    """The hybrid's thinking: (encoder layers,) T thinker iterations and the prompt refinement."""
    T = _check(config, prompt_len, 0, think_iters, attention)
    if config.arm != "hybrid":
        return 0
    h, d = config.hybrid, config.hidden_size
    N = prompt_len + config.num_thought_slots
    per_layer = layer_matmul_flops_per_position(config) * N + attention_flops_per_pair(config) * N * N
    iteration = h.thinker_layers * per_layer + 2 * d * N  # K bidirectional layers + the gate (d → 1)
    if h.reweight:
        iteration += 2 * N * N * d  # cosine-similarity matrix of all positions
    flops = T * iteration + 2 * N * d * d  # prompt_refine over the N thinker positions
    if h.encoder_layers:
        pairs = N * N if attention == "dense" else _decoder_pairs(N, config.sliding_window)
        flops += h.encoder_layers * (layer_matmul_flops_per_position(config) * N
                                     + attention_flops_per_pair(config) * pairs)  # fmt: skip
    return flops


def _extra_pairs(n: int, k: int, m: int, bidirectional_prefix: bool) -> int:
    """(query, key) pairs of a decoder pass over [prompt n ; m extras ; text k] beyond the tokens' own:
    extras reading the prompt, and the gated reads of the extras by the text, the
    last prompt token (all prompt tokens with a bidirectional prefix) and the extras before them."""
    if m == 0:
        return 0
    readers = k + (n if bidirectional_prefix else 1)
    return n * m + readers * m + m * (m + 1) // 2  # extras read the whole prompt (no window for them)


def decoder_flops(config: ModelConfig, n_tokens: int, prompt_len: int, attention: str = "causal") -> int:
    """The decoder layers over `n_tokens` token positions (prompt_len of them the prompt) plus the
    arm's m extra positions (LM head not included)."""
    m = config.num_thought_slots
    n_positions = n_tokens + m
    prefix = config.hybrid.decoder_prefix == "bidirectional" and config.arm != "causal"
    if attention == "dense":
        # Every pair of the padded square, once per attention call (tokens, and the extras' own call).
        pairs = n_positions * n_positions * (2 if m else 1)
    else:
        pairs = _decoder_pairs(n_tokens, config.sliding_window, prompt_len if prefix else 0)
        pairs += _extra_pairs(prompt_len, n_tokens - prompt_len, m, prefix)
    per_layer = layer_matmul_flops_per_position(config) * n_positions + attention_flops_per_pair(config) * pairs
    return config.decoder_layers * per_layer


def lm_head_flops(config: ModelConfig, n_positions: int) -> int:
    return 2 * config.hidden_size * config.vocab_size * n_positions


def forward_flops(
    config: ModelConfig,
    prompt_len: int,
    answer_len: int,
    think_iters: int | None = None,
    *,
    attention: str = "causal",
) -> int:
    """One forward pass as in training: logits at all prompt_len + answer_len token positions."""
    _check(config, prompt_len, answer_len, think_iters, attention)
    L = prompt_len + answer_len
    flops = think_flops(config, prompt_len, think_iters, attention)
    flops += decoder_flops(config, L, prompt_len, attention)
    return flops + lm_head_flops(config, L)


def train_flops_per_example(
    config: ModelConfig,
    prompt_len: int,
    answer_len: int,
    think_iters: int | None = None,
    *,
    attention: str = "causal",
) -> int:
    """Forward + backward ≈ 3 × forward (gradient checkpointing would add one more forward)."""
    return 3 * forward_flops(config, prompt_len, answer_len, think_iters, attention=attention)


def inference_flops_per_example(
    config: ModelConfig,
    prompt_len: int,
    answer_len: int,
    think_iters: int | None = None,
    *,
    attention: str = "causal",
) -> int:
    """Generating an answer of `answer_len` tokens with a KV cache: thinking once, the decoder over
    prompt + slots + the answer tokens fed back (the last chosen token is never fed: answer_len − 1),
    each position once, and the LM head only where a token is chosen."""
    _check(config, prompt_len, answer_len, think_iters, attention)
    flops = think_flops(config, prompt_len, think_iters, attention)
    flops += decoder_flops(config, prompt_len + max(answer_len - 1, 0), prompt_len, attention)
    return flops + lm_head_flops(config, answer_len)


def flops_summary(config: ModelConfig, prompt_len: int, answer_len: int, think_iters: int | None = None) -> dict:
    """Training and inference FLOPs per example, as a dict (for reports)."""
    return {
        "train_flops_per_example": train_flops_per_example(config, prompt_len, answer_len, think_iters),
        "inference_flops_per_example": inference_flops_per_example(config, prompt_len, answer_len, think_iters),
        "prompt_len": prompt_len,
        "answer_len": answer_len,
        "think_iters": (config.hybrid.max_think_iters if think_iters is None else think_iters)
        if config.arm == "hybrid"
        else 0,
    }
