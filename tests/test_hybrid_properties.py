"""The properties of docs/design.md §4 that make the hybrid (and its baselines) trustworthy.

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


@pytest.mark.parametrize("arm", ["pause", "hybrid"])
@pytest.mark.parametrize("m", [1, 4])
def test_fresh_model_equals_its_base_for_any_number_of_slots(arm, m):
    """A fresh pause or hybrid model (thought gates at their zero init, zero prompt projection) gives
    the logits of the causal base with the same decoder weights, for m > 0 extra positions too; once the
    gates open, the extras reach the logits (so the equality is not because they are never read)."""
    model = _model(arm, thought_slots=m)
    # The base has the arm's decoder: pause keeps the thinker-sized layer as a decoder layer, hybrid does not.
    base = HatLM(make_config(arm="causal", num_hidden_layers=model.config.decoder_layers, thinker_layers=0)).eval()
    base.decoder.load_state_dict(model.decoder.state_dict())
    base.lm_head.load_state_dict(model.lm_head.state_dict())
    ids, pl, lengths = _batch()
    valid = _valid(lengths, ids.shape[1])
    with torch.no_grad():
        out = model(ids, prompt_lengths=pl, lengths=lengths).logits
        ref = base(ids, lengths=lengths)
        # float tolerance: the attention runs over L + m keys here, L in the base (sums in another order)
        assert (out - ref)[valid].abs().max().item() <= 1e-5
        _open_gates(model)
        moved = model(ids, prompt_lengths=pl, lengths=lengths).logits
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


@pytest.mark.parametrize("arm,backend", [("causal", "sdpa"), ("pause", "sdpa"), ("hybrid", "sdpa"),
                                         pytest.param("hybrid", "flex", marks=pytest.mark.slow)])
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


def _relative_changes(runs, pl: torch.Tensor) -> torch.Tensor:
    """[B, T]: ‖z_t − z_{t−1}‖ / ‖z_{t−1}‖ of each row over its own positions (prompt + M thoughts),
    recomputed here from the iterates z_0 … z_T that think() returned for T = 0, 1, …"""
    out = []
    for b in range(len(pl)):
        n = int(pl[b]) + M
        zs = [r.z[b, :n].double() for r in runs]
        out.append([float((zs[t] - zs[t - 1]).norm() / zs[t - 1].norm()) for t in range(1, len(zs))])
    return torch.tensor(out, dtype=torch.float64)


def test_halting_stops_each_row_once_the_change_falls_under_the_threshold():
    """Halting decisions against an oracle that never reads the code's own `final_change`: the iterates
    of runs with T = 0..T_max and halting off give each row's relative changes, from which the test
    derives the iteration at which each row must stop."""
    T = 6
    model = _model("hybrid", trained_refinement=True, max_think_iters=T)
    ids, pl, lengths = _batch()
    with torch.no_grad():
        runs = [model.think(ids, pl, think_iters=t, halting_threshold=0.0) for t in range(0, T + 1)]
    changes = _relative_changes(runs, pl)  # changes[b, t-1]: change of row b at iteration t

    def stops(eps: float) -> list[int]:  # the iteration at which each row must stop under eps
        return [next((t + 1 for t in range(T) if changes[b, t].item() < eps), T) for b in range(3)]

    # A threshold half-way between two neighbouring recorded changes (>1% apart, so that float noise
    # cannot flip a decision) under which rows stop at different iterations, some before T.
    vals = sorted(changes.flatten().tolist())
    cands = [(a + b) / 2 for a, b in zip(vals, vals[1:]) if b > a * 1.01]
    eps = next(e for e in cands if len(set(stops(e))) > 1 and min(stops(e)) < T)
    expected = stops(eps)
    print(f"eps {eps:.4g}: rows stop at {expected}")

    with torch.no_grad():
        halted = model.think(ids, pl, halting_threshold=eps)
        fwd = model(ids, prompt_lengths=pl, lengths=lengths, halting_threshold=eps)
    assert halted.iterations.tolist() == expected
    assert fwd.iterations.tolist() == expected
    for b, t in enumerate(expected):
        # The halted row's vectors are its t-th iterate and its reported change is that iteration's.
        assert torch.allclose(halted.z[b], runs[t].z[b], atol=1e-6, rtol=0)
        assert halted.final_change[b].item() == pytest.approx(changes[b, t - 1].item(), rel=1e-4)
        # … and a row halts after the same number of iterations when it is alone.
        with torch.no_grad():
            alone = model.think(ids[b : b + 1, : int(pl[b])], pl[b : b + 1], halting_threshold=eps)
        assert alone.iterations.tolist() == [t]


# ------------------------------------------------------------------------------ pause arm, encoder


def reference_decoder(model: HatLM, x: torch.Tensor, n: int, m: int, window: int | None = None) -> torch.Tensor:
    """An independent, loop-by-loop statement of the decoder over one row x [n + m + k, d] laid out as
    [prompt ; m extras ; text] (docs/design.md): tokens keep positions 0..n+k−1 and causal attention
    among themselves; extras sit at positions n..n+m−1, attend causally to the prompt and to earlier
    extras; the text and the last prompt token read all extras through a second softmax scaled per
    layer and head by `thought_gate`. Plain tensor arithmetic from the weights, no hatlm code."""
    cfg = model.config
    H, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    N = x.shape[0]
    is_extra = [n <= j < n + m for j in range(N)]
    pos = [j - m if j >= n + m else j for j in range(N)]
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, D, 2).float() / D))
    ang = torch.tensor(pos).float()[:, None] * inv[None, :]
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)

    def rope(t):  # [N, D]
        return t * cos + torch.cat([-t[:, D // 2 :], t[:, : D // 2]], -1) * sin

    def norm(t, w):
        return w * t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps)

    def softmax_over(scores, allowed):
        s = scores.masked_fill(~allowed, float("-inf"))
        return torch.softmax(s, -1)

    def in_window(q, kv):  # between tokens only: an extra reads the whole prompt
        return window is None or is_extra[q] or pos[q] - pos[kv] < window

    base_ok = torch.tensor([[(kv <= q) and not is_extra[kv] and in_window(q, kv) for kv in range(N)]
                            for q in range(N)])  # fmt: skip
    extra_ok = torch.tensor([[is_extra[kv] and (q >= n + m or kv <= q or q == n - 1) for kv in range(N)]
                             for q in range(N)])  # fmt: skip
    reads = extra_ok.any(-1)
    for i, blk in enumerate(model.decoder.layers):
        a = blk.self_attn
        h = norm(x, blk.input_layernorm.weight)
        q, k, v = h @ a.q_proj.weight.T, h @ a.k_proj.weight.T, h @ a.v_proj.weight.T
        gate = model.thought_gate[i] if model.thought_gate is not None else torch.zeros(H)
        heads = []
        for hh in range(H):
            g = hh // (H // Hkv)
            qh, kh, vh = rope(q[:, hh * D : (hh + 1) * D]), rope(k[:, g * D : (g + 1) * D]), v[:, g * D : (g + 1) * D]
            sc = qh @ kh.T / D**0.5
            out = softmax_over(sc, base_ok) @ vh
            if reads.any():
                ex = torch.nan_to_num(softmax_over(sc, extra_ok)) @ vh
                out = out + gate[hh] * ex * reads[:, None]
            heads.append(out)
        x = x + torch.cat(heads, -1) @ a.o_proj.weight.T
        hm = norm(x, blk.post_attention_layernorm.weight)
        mlp = blk.mlp
        act = torch.nn.functional.silu(hm @ mlp.gate_proj.weight.T) * (hm @ mlp.up_proj.weight.T)
        x = x + act @ mlp.down_proj.weight.T
    return model.lm_head(norm(x, model.decoder.norm.weight))


def _open_gates(model: HatLM) -> None:
    with torch.no_grad():  # as after training: the decoder reads the extra positions
        for g in model.thought_gate:
            g.normal_(0.0, 1.0)


@pytest.mark.parametrize("window", [None, 3])
def test_pause_arm_equals_a_hand_written_decoder_over_the_slots(window):
    """The pause arm's logits equal `reference_decoder` over [prompt ; pause slots ; text]."""
    model = _model("pause", sliding_window=window)
    _open_gates(model)
    ids, pl, lengths = _batch()
    with torch.no_grad():
        out = model(ids, prompt_lengths=pl, lengths=lengths)
        for b in range(3):
            p, n = int(pl[b]), int(lengths[b])
            emb = model.decoder.embed_tokens(ids[b, :n])
            x = torch.cat([emb[:p], model.thought_slots, emb[p:]])
            ref = reference_decoder(model, x, p, M, window)
            expected = torch.cat([ref[:p], ref[p + M :]])  # read back at the token positions
            assert (out.logits[b, :n] - expected).abs().max().item() <= 1e-5
    assert out.iterations.tolist() == [0, 0, 0]


def test_hybrid_decoder_input_built_by_hand():
    """The hybrid decodes [e_p + P(z_p − z0_p) ; thoughts z_T ; e_text]: built here from the think
    result and the weights, run through `reference_decoder`, it gives the model's logits — and feeding
    the un-thought slots or P(z) instead of P(z − z0) would not."""
    model = _model("hybrid", trained_refinement=True)
    _open_gates(model)
    ids, pl, lengths = _batch()
    with torch.no_grad():
        out = model(ids, prompt_lengths=pl, lengths=lengths)
        for b in range(3):
            p, n = int(pl[b]), int(lengths[b])
            th = model.think(ids[b : b + 1, :p], pl[b : b + 1])
            z, z0 = th.z[0], th.z0[0]
            emb = model.decoder.embed_tokens(ids[b, :n])
            P = model.prompt_refine.weight
            x = torch.cat([emb[:p] + (z[:p] - z0[:p]) @ P.T, z[p : p + M], emb[p:]])
            ref = reference_decoder(model, x, p, M)
            expected = torch.cat([ref[:p], ref[p + M :]])
            assert (out.logits[b, :n] - expected).abs().max().item() <= 1e-5
            wrong_slots = torch.cat([emb[:p] + (z[:p] - z0[:p]) @ P.T, z0[p : p + M], emb[p:]])
            wrong_refine = torch.cat([emb[:p] + z[:p] @ P.T, z[p : p + M], emb[p:]])
            for wrong in (wrong_slots, wrong_refine):
                bad = reference_decoder(model, wrong, p, M)
                assert (out.logits[b, :n] - torch.cat([bad[:p], bad[p + M :]])).abs().max().item() > 1e-3


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
