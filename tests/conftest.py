"""Shared helpers: tiny configs and their transformers twins.

Tests run in float32 on the CPU with tiny shapes. `initializer_range` is larger than Mistral's 0.02
so that attention is far from uniform and logits are O(1): a wrong mask, RoPE or norm then shows as a
large difference instead of hiding under tiny activations.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from hatlm.config import ModelConfig

TINY: dict[str, Any] = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    sliding_window=None,
    rms_norm_eps=1e-5,
    initializer_range=0.2,
    bos_token_id=1,
    eos_token_id=2,
    hybrid=dict(arm="hybrid", thinker_layers=1, thought_slots=3, max_think_iters=3),
)


def make_config(**overrides: Any) -> ModelConfig:
    """The tiny test config (GQA: 4 heads, 2 KV heads) with ModelConfig/HybridConfig overrides
    (hybrid fields directly, e.g. arm="pause", or as a `hybrid=dict(...)` merged into the default)."""
    base = dict(TINY, hybrid={**TINY["hybrid"], **overrides.pop("hybrid", {})})
    return ModelConfig(**base).replace(**overrides)


def make_hf_config(config: ModelConfig, **overrides: Any):
    """transformers' MistralConfig with the same shapes (eager attention: the plain reference)."""
    from transformers import MistralConfig

    kw = dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.decoder_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        rms_norm_eps=config.rms_norm_eps,
        sliding_window=config.sliding_window,
        tie_word_embeddings=config.tie_word_embeddings,
        initializer_range=config.initializer_range,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        attn_implementation="eager",
    )
    kw.update(overrides)
    return MistralConfig(**kw)


@pytest.fixture
def tiny_config() -> Callable[..., ModelConfig]:
    return make_config


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    # One torch thread for the whole suite: tiny models gain nothing from a second thread, on a shared
    # 2-core machine a parallel region waits for whichever core is busy elsewhere (10x slower), and
    # float reductions then run in one order whatever the machine. Restored at the end.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seed() -> None:
    # Every test starts from the same RNG state, whatever ran before it.
    torch.manual_seed(0)


def as_if_trained(model, std: float = 0.2):
    """Open the paths a fresh hybrid/pause model keeps closed (so that it starts as its base): the prompt
    refinement, the thinker's gate weights and the decoder's gates on the thought/pause positions —
    as after training, so that tests see thinking reach the logits. Returns the model."""
    with torch.no_grad():
        if getattr(model, "prompt_refine", None) is not None:
            model.prompt_refine.weight.normal_(0.0, std)
            model.thinker.gate.weight.normal_(0.0, std)
        if getattr(model, "thought_gate", None) is not None:
            for g in model.thought_gate:
                g.normal_(0.0, 1.0)
    return model


def counted_flops(model, n: int, k: int, think_iters: int | None, monkeypatch) -> int:
    """Matrix-product FLOPs of one real forward pass (prompt n, continuation k): FlopCounterMode for the
    projections and LM head, plus the shapes of every SDPA call (FlopCounterMode does not count the CPU
    SDPA kernel)."""
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    sdpa = F.scaled_dot_product_attention
    attn = []

    def recording_sdpa(q, k_, v, *args, **kwargs):
        B, H, Q, D = q.shape
        attn.append(2 * B * H * Q * k_.shape[2] * D + 2 * B * H * Q * k_.shape[2] * v.shape[3])
        return sdpa(q, k_, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording_sdpa)
    ids = torch.randint(0, model.config.vocab_size, (1, n + k))
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(ids, prompt_lengths=torch.tensor([n]), think_iters=think_iters)
    monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)
    assert attn, "the model no longer calls F.scaled_dot_product_attention: update this counter"
    return fc.get_total_flops() + sum(attn)
