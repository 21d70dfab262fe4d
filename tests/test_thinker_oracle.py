"""The thinker's bidirectional attention against an outside oracle.

transformers 5.x builds a bidirectional mask for a Mistral config with `is_causal=False`
(masking_utils.create_causal_mask falls back to create_bidirectional_mask). `MistralModel` with the
thinker's weights copied in is therefore an independent implementation of "K Mistral layers, every
valid position sees every valid position". Its `output_hidden_states[-1]` is taken *after* the final
norm in 5.x (it equals last_hidden_state), so the oracle's final norm is replaced by the identity to
expose the pre-norm hidden states that the thinker produces.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_config, make_hf_config
from torch import nn

from hatlm.masks import bidirectional_mask, to_sdpa_mask
from hatlm.model import HatLM

TOL = 1e-5
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def _model(backend: str = "sdpa", **hybrid) -> HatLM:
    # The decoder's sliding window (4) is shorter than the sequence: the thinker must ignore it.
    # initializer_range 0.1 keeps the hidden states O(1) (std ≈ 1.2), so 1e-5 is a few float32 ulps.
    cfg = make_config(
        initializer_range=0.1,
        hidden_size=64,
        intermediate_size=128,
        sliding_window=4,
        attn_backend=backend,
        hybrid=dict(thinker_layers=2, thought_slots=3, **hybrid),
    )
    return HatLM(cfg).eval()


def _oracle(model: HatLM, is_causal: bool = False):
    from transformers import MistralModel

    K = len(model.thinker.layers)
    hf = MistralModel(make_hf_config(model.config, num_hidden_layers=K, sliding_window=None, is_causal=is_causal))
    for i, layer in enumerate(model.thinker.layers):
        hf.layers[i].load_state_dict(layer.state_dict())
    hf.norm = nn.Identity()  # pre-norm hidden states (see the module docstring)
    return hf.eval()


def _padded_inputs(lengths: list[int], d: int = 64):
    N, B = max(lengths), len(lengths)
    lengths = torch.tensor(lengths)
    z = torch.randn(B, N, d)
    valid = torch.arange(N)[None, :] < lengths[:, None]
    positions = torch.arange(N).expand(B, N)
    return z, lengths, valid, positions


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_thinker_layers_match_bidirectional_transformers(backend):
    """One pass through model.thinker.layers with the thinker's mask == MistralModel(is_causal=False),
    on a right-padded batch, at every valid position."""
    model = _model(backend)
    hf = _oracle(model)
    z, lengths, valid, positions = _padded_inputs([12, 7, 2])
    B, N, _ = z.shape
    with torch.no_grad():
        mask = model.build_mask(bidirectional_mask(lengths), B, N, N)
        ours = model.run_layers(model.thinker.layers, z, positions, mask)
        ref = hf(inputs_embeds=z, attention_mask=valid.long(), position_ids=positions).last_hidden_state
    diff = (ours - ref)[valid].abs().max().item()
    print(f"max|thinker layers - transformers is_causal=False| backend={backend}: {diff:.3g}")
    assert diff <= TOL

    # Negative control: the causal oracle is far away, so the comparison does detect the mask.
    causal = _oracle(model, is_causal=True)
    with torch.no_grad():
        ref_causal = causal(inputs_embeds=z, attention_mask=valid.long(), position_ids=positions).last_hidden_state
    assert (ours - ref_causal)[valid].abs().max().item() > 1e-2


def test_think_one_iteration_uses_the_bidirectional_layers():
    """think() with one iteration (re-weighting, injection and state norm off: the plain gated step)
    is z0 + a ⊙ (u − z0) where u is the oracle's output over each row's [prompt ; thought slots] at
    positions 0 … n_b+m−1. (tests/test_thinking.py checks what each of those ingredients adds.)"""
    model = _model(reweight=False, reweight_attention=False, injection="none", state_norm=False)
    with torch.no_grad():
        model.thinker.gate.weight.normal_(0.0, 0.5)  # a differs per position
    hf = _oracle(model)
    ids = torch.randint(3, 97, (3, 9))
    prompt_lengths = torch.tensor([9, 5, 1])
    with torch.no_grad():
        res = model.think(ids, prompt_lengths, think_iters=1)
        z0 = res.z0
        B, N, _ = z0.shape
        valid = torch.arange(N)[None, :] < (prompt_lengths + 3)[:, None]
        positions = torch.arange(N).expand(B, N)
        u = hf(inputs_embeds=z0, attention_mask=valid.long(), position_ids=positions).last_hidden_state
        expected = z0 + torch.sigmoid(model.thinker.gate(u)) * (u - z0)
    # z0 itself is [Embed(prompt) ; slots] per row
    for b, n in enumerate(prompt_lengths.tolist()):
        assert torch.equal(z0[b, :n], model.decoder.embed_tokens(ids[b, :n]))
        assert torch.equal(z0[b, n : n + 3], model.thought_slots)
    diff = (res.z - expected)[valid].abs().max().item()
    print(f"max|think(1 iteration) - oracle update|: {diff:.3g}")
    assert diff <= TOL
    assert res.iterations.tolist() == [1, 1, 1]


def test_thinker_mask_is_the_explicit_full_mask():
    z, lengths, valid, positions = _padded_inputs([6, 4, 1])
    B, N, _ = z.shape
    mask = to_sdpa_mask(bidirectional_mask(lengths), B, N, N, torch.device("cpu"))
    explicit = torch.zeros(B, 1, N, N, dtype=torch.bool)
    for b, n in enumerate(lengths.tolist()):
        explicit[b, 0, :, :n] = True  # every query (even padding) sees all of the row's valid keys
    assert torch.equal(mask, explicit)

    # Both backends' masks give the same thinker output as the hand-built one.
    for backend in ("sdpa", "flex"):
        model = _model(backend)
        with torch.no_grad():
            mask = model.build_mask(bidirectional_mask(lengths), B, N, N)
            built = model.run_layers(model.thinker.layers, z, positions, mask)
            by_hand = model.run_layers(model.thinker.layers, z, positions, explicit)
        assert (built - by_hand)[valid].abs().max().item() <= TOL
