"""The properties of DESIGN.md §1 that make the hybrid (and its baselines) trustworthy.

Rows are right-padded and hold real token ids in their padding, so only the masks keep padding out.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_config, make_hf_config
from torch import nn

from hatlm.model import HatLM

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

M = 3  # thought slots


def _model(arm: str = "hybrid", trained_refinement: bool = False, **kw) -> HatLM:
    model = HatLM(make_config(arm=arm, thought_slots=kw.pop("thought_slots", M), **kw)).eval()
    if trained_refinement and arm == "hybrid":
        # As after training: the prompt positions do read their refinement.
        with torch.no_grad():
            model.prompt_refine.weight.normal_(0.0, 0.2)
    return model


def _batch():
    """3 rows with different prompt and total lengths; padding filled with real ids."""
    lengths = torch.tensor([10, 7, 4])
    prompt_lengths = torch.tensor([4, 6, 2])
    ids = torch.randint(3, 97, (3, 10))
    return ids, prompt_lengths, lengths


def _valid(lengths: torch.Tensor, L: int) -> torch.Tensor:
    return torch.arange(L)[None, :] < lengths[:, None]


# ------------------------------------------------------------------------------ starts as the base


@pytest.mark.parametrize("encoder_layers", [0, 1])
def test_zero_slots_and_fresh_refinement_give_the_base_logits(encoder_layers):
    hyb = _model("hybrid", thought_slots=0, encoder_layers=encoder_layers)
    base = HatLM(make_config(arm="causal", thinker_layers=0)).eval()
    base.decoder.load_state_dict(hyb.decoder.state_dict())
    base.lm_head.load_state_dict(hyb.lm_head.state_dict())
    ids, pl, lengths = _batch()
    with torch.no_grad():
        out = hyb(ids, prompt_lengths=pl, lengths=lengths)
        ref = base(ids, lengths=lengths)
    valid = _valid(lengths, ids.shape[1])
    diff = (out.logits - ref)[valid].abs().max().item()
    print(f"max|hybrid(m=0, fresh gates, encoder_layers={encoder_layers}) - base|: {diff:.3g}")
    assert diff <= 1e-6
    # Thinking did run and did move the sequence: equality is not because nothing happened.
    assert out.iterations.tolist() == [hyb.config.hybrid.max_think_iters] * 3
    assert (out.think.z - out.think.z0).abs().max() > 1e-2
    # Negative control: once the refinement projection is non-zero, the logits move.
    with torch.no_grad():
        hyb.prompt_refine.weight.normal_(0.0, 0.2)
        moved = hyb(ids, prompt_lengths=pl, lengths=lengths).logits
    assert (moved - ref)[valid].abs().max() > 1e-3


# ------------------------------------------------------------------------------ attention directions


@pytest.mark.parametrize("reweight", [True, False])
def test_thinker_is_bidirectional(reweight):
    """Changing the LAST prompt token changes every thought vector and every prompt position,
    the first one included. Without re-weighting (which compares all positions itself) only the
    thinker's attention can carry the change to the first position."""
    model = _model("hybrid", reweight=reweight)
    P = 6
    ids = torch.randint(3, 97, (1, 8))
    ids2 = ids.clone()
    ids2[0, P - 1] = (ids[0, P - 1] + 1) % 97
    with torch.no_grad():
        r1 = model.think(ids, torch.tensor([P]))
        r2 = model.think(ids2, torch.tensor([P]))
    thought_change = (r1.thoughts(M) - r2.thoughts(M)).norm(dim=-1)[0]
    prompt_change = (r1.z[0, :P] - r2.z[0, :P]).norm(dim=-1)
    assert bool((thought_change > 1e-4).all()), thought_change
    assert bool((prompt_change > 1e-4).all()), prompt_change
    # The first prompt token's *input* is unchanged: the change reached it through attention.
    assert torch.equal(r1.z0[0, 0], r2.z0[0, 0])


@pytest.mark.parametrize("prefix", ["causal", "bidirectional"])
@pytest.mark.parametrize("arm", ["causal", "pause", "hybrid"])
def test_decoder_is_causal_over_the_text(arm, prefix):
    """Changing text token j never changes logits at t < j (and does change logits at j)."""
    model = _model(arm, trained_refinement=True, decoder_prefix=prefix)
    P, L = 4, 10
    ids = torch.randint(3, 97, (1, L))
    with torch.no_grad():
        base = model(ids, prompt_lengths=torch.tensor([P])).logits
        for j in (P, P + 3, L - 1):
            ids2 = ids.clone()
            ids2[0, j] = (ids[0, j] + 1) % 97
            out = model(ids2, prompt_lengths=torch.tensor([P])).logits
            assert (out[0, :j] - base[0, :j]).abs().max().item() <= 1e-6, (arm, prefix, j)
            assert (out[0, j] - base[0, j]).abs().max().item() > 1e-4


@pytest.mark.parametrize("arm", ["pause", "hybrid"])
def test_decoder_prefix_setting(arm):
    """Bidirectional prefix: a prompt position sees later prompt positions (the first position's
    logits move when the last prompt token changes); causal prefix: it does not."""
    P = 5
    ids = torch.randint(3, 97, (1, 8))
    ids2 = ids.clone()
    ids2[0, P - 1] = (ids[0, P - 1] + 1) % 97
    moved = {}
    for prefix in ("causal", "bidirectional"):
        torch.manual_seed(0)
        model = _model(arm, decoder_prefix=prefix)  # fresh refinement: only attention can carry it
        with torch.no_grad():
            a = model(ids, prompt_lengths=torch.tensor([P])).logits
            b = model(ids2, prompt_lengths=torch.tensor([P])).logits
        moved[prefix] = (a[0, 0] - b[0, 0]).abs().max().item()
    assert moved["causal"] <= 1e-6
    assert moved["bidirectional"] > 1e-4


# ------------------------------------------------------------------------------ padding


@pytest.mark.parametrize("arm,backend", [("causal", "sdpa"), ("pause", "sdpa"), ("hybrid", "sdpa"), ("hybrid", "flex")])
def test_sequence_alone_equals_its_row_in_a_padded_batch(arm, backend):
    model = _model(arm, trained_refinement=True, attn_backend=backend, sliding_window=5)
    ids, pl, lengths = _batch()
    with torch.no_grad():
        out = model(ids, prompt_lengths=pl, lengths=lengths)
        worst = 0.0
        for b in range(3):
            n = int(lengths[b])
            alone = model(ids[b : b + 1, :n], prompt_lengths=pl[b : b + 1])
            worst = max(worst, (alone.logits[0] - out.logits[b, :n]).abs().max().item())
            assert alone.iterations.tolist() == out.iterations[b : b + 1].tolist()
    print(f"max|alone - row of padded batch| arm={arm} backend={backend}: {worst:.3g}")
    # Padding changes only the order of float32 sums. The hybrid amplifies that through its thinking
    # iterations (logits O(1) here): 2.6e-6 on one CPU, 1.1e-5 on another, so it gets 3e-5. A wrong mask
    # or a pad position leaking in moves logits by > 1e-2.
    assert worst <= (3e-5 if arm == "hybrid" else 1e-5)


# ------------------------------------------------------------------------------ iterations and halting


def test_halting_off_runs_all_iterations_and_more_iterations_change_the_output():
    model = _model("hybrid", trained_refinement=True, max_think_iters=3, halting_threshold=0.0)
    ids, pl, lengths = _batch()
    with torch.no_grad():
        out3 = model(ids, prompt_lengths=pl, lengths=lengths)
        out5 = model(ids, prompt_lengths=pl, lengths=lengths, think_iters=5)
    assert out3.iterations.tolist() == [3, 3, 3]
    assert out5.iterations.tolist() == [5, 5, 5]
    assert bool((out3.final_change > 0).all())
    valid = _valid(lengths, ids.shape[1])
    assert (out5.logits - out3.logits)[valid].abs().max() > 1e-4


def test_halting_stops_each_row_once_the_change_falls_under_the_threshold():
    T = 6
    model = _model("hybrid", trained_refinement=True, max_think_iters=T)
    ids, pl, lengths = _batch()
    with torch.no_grad():
        # changes[b][t-1]: relative change of row b at iteration t, with halting off.
        runs = [model.think(ids, pl, think_iters=t, halting_threshold=0.0) for t in range(1, T + 1)]
    changes = torch.stack([r.final_change for r in runs], dim=1)  # [B, T]
    # A threshold just above row 0's smallest change before T, and far (relatively) from every
    # other recorded change, so that float noise cannot flip a decision.
    c_min = changes[0, : T - 1].min().item()
    above = sorted(v for v in changes.flatten().tolist() if v > c_min * 1.001)
    eps = (c_min + above[0]) / 2 if above else c_min * 2
    expected = []
    for b in range(3):
        under = [t + 1 for t in range(T) if changes[b, t].item() < eps]
        expected.append(under[0] if under else T)
    assert expected[0] < T  # row 0 stops early by construction

    with torch.no_grad():
        halted = model.think(ids, pl, halting_threshold=eps)
        fwd = model(ids, prompt_lengths=pl, lengths=lengths, halting_threshold=eps)
    assert halted.iterations.tolist() == expected
    assert fwd.iterations.tolist() == expected
    for b, t in enumerate(expected):
        # The halted row's vectors are its t-th iterate and its reported change is that iteration's.
        assert torch.allclose(halted.z[b], runs[t - 1].z[b], atol=1e-6, rtol=0)
        assert halted.final_change[b].item() == pytest.approx(changes[b, t - 1].item(), rel=1e-6)
        # … and a row halts after the same number of iterations when it is alone.
        with torch.no_grad():
            alone = model.think(ids[b : b + 1, : int(pl[b])], pl[b : b + 1], halting_threshold=eps)
        assert alone.iterations.tolist() == [t]


# ------------------------------------------------------------------------------ pause arm, encoder


def test_pause_arm_is_the_causal_decoder_over_the_slots_inserted_after_the_prompt():
    """With the pause slots set to the embeddings of three tokens, the pause arm's logits equal a
    plain causal pass over [prompt ; those tokens ; text], read back at the token positions."""
    model = _model("pause")
    pause_ids = torch.tensor([5, 9, 11])
    with torch.no_grad():
        model.thought_slots.copy_(model.decoder.embed_tokens.weight[pause_ids])
    ids, pl, lengths = _batch()
    with torch.no_grad():
        out = model(ids, prompt_lengths=pl, lengths=lengths)
        for b in range(3):
            p, n = int(pl[b]), int(lengths[b])
            seq = torch.cat([ids[b, :p], pause_ids, ids[b, p:n]])[None]
            ref = model(seq)[0]  # causal pass, no prompt_lengths
            expected = torch.cat([ref[: p - 1], ref[p - 1 + M :]])  # token t reads t (< p-1) or t+m
            assert expected.shape[0] == n
            assert (out.logits[b, :n] - expected).abs().max().item() <= 1e-5
    assert out.iterations.tolist() == [0, 0, 0]


def test_encoder_layers_encode_the_prompt_with_the_first_backbone_layers():
    """encoder_layers=1: the thinker starts from the first decoder layer's causal output over the
    prompt (checked against transformers' MistralModel with that layer), slots untouched."""
    from transformers import MistralModel

    model = _model("hybrid", encoder_layers=1, sliding_window=3)
    ids, pl, lengths = _batch()
    with torch.no_grad():
        out = model(ids, prompt_lengths=pl, lengths=lengths)
        z0 = out.think.z0
    assert out.logits.shape == (3, 10, 97) and bool(torch.isfinite(out.logits).all())
    hf = MistralModel(make_hf_config(model.config, num_hidden_layers=1))
    hf.layers[0].load_state_dict(model.decoder.layers[0].state_dict())
    hf.norm = nn.Identity()
    for b in range(3):
        p = int(pl[b])
        with torch.no_grad():
            ref = hf(inputs_embeds=model.decoder.embed_tokens(ids[b : b + 1, :p])).last_hidden_state[0]
        assert (z0[b, :p] - ref).abs().max().item() <= 1e-5
        assert torch.equal(z0[b, p : p + M], model.thought_slots)
