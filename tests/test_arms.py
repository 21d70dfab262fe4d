"""The five comparison arms (issue 8): exact parameter counts, looped(T=1) = causal, deep = a deeper
causal decoder, padding invariance and causality of the new arms, FLOPs = counted matrix products,
and looped generation = recomputation."""

from __future__ import annotations

import pytest
import torch
from conftest import counted_flops, make_config

from hatlm.config import ARMS
from hatlm.flops import forward_flops, inference_flops_per_example
from hatlm.model import HatLM

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def _model(arm: str, **kw) -> HatLM:
    torch.manual_seed(0)
    return HatLM(make_config(arm=arm, **kw)).eval()


def _batch():
    torch.manual_seed(3)
    ids = torch.randint(3, 97, (3, 10))
    return ids, torch.tensor([4, 6, 2]), torch.tensor([10, 8, 5])


def expected_parameters(c) -> int:
    """Parameter count from the config alone, written out per component."""
    d, f, V = c.hidden_size, c.intermediate_size, c.vocab_size
    hq, hkv, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    layer = d * hq * hd + 2 * d * hkv * hd + hq * hd * d + 3 * d * f + 2 * d  # attention, SwiGLU, 2 norms
    h = c.hybrid
    total = V * d + c.decoder_layers * layer + d + (0 if c.tie_word_embeddings else V * d)
    if h.arm in ("hybrid", "looped"):
        total += h.thinker_layers * layer + 1  # the layers and the relevance temperature
        total += (d + 1) if h.interpolate else 0  # gate
        total += d if h.injection != "none" else 0  # injection norm
        total += 2 * d * d if h.injection == "concat" else 0  # adapter
        total += d if h.state_norm else 0
    if h.arm in ("pause", "hybrid"):
        total += h.thought_slots * d + c.decoder_layers * hq  # slots, per-layer per-head extra-attention gate
    if h.arm == "hybrid":
        total += d * d  # prompt refinement projection
    return total


@pytest.mark.parametrize("arm", ARMS)
@pytest.mark.parametrize(
    "extra",
    [{}, {"injection": "concat", "state_norm": False}, {"injection": "none", "interpolate": False},
     {"think_iters_train": "poisson:3"}],
)
def test_parameter_counts_are_exact(arm, extra):
    model = _model(arm, **extra)
    counts = model.num_parameters()
    assert counts["total"] == sum(p.numel() for p in model.parameters()) == expected_parameters(model.config)


def test_decoder_depths():
    c = {arm: make_config(arm=arm, thinker_layers=2, max_think_iters=3, num_hidden_layers=2) for arm in ARMS}
    assert [c[a].decoder_layers for a in ARMS] == [4, 4, 2, 2, 2 + 2 * 3]
    # deep follows the mean *training* depth when T is sampled
    assert make_config(arm="deep", thinker_layers=2, think_iters_train="uniform:2-6").decoder_layers == 2 + 2 * 4
    # the looped arm has the hybrid's thinker parameters minus slots and prompt projection
    hyb, loop = _model("hybrid").num_parameters(), _model("looped").num_parameters()
    assert hyb["thinker"] == loop["thinker"] and hyb["backbone"] == loop["backbone"]


def _looped_as_causal(looped: HatLM) -> HatLM:
    """The causal arm holding the looped arm's weights: loop layers first, then the decoder layers."""
    causal = _model("causal")
    K = len(looped.thinker.layers)
    with torch.no_grad():
        causal.decoder.embed_tokens.weight.copy_(looped.decoder.embed_tokens.weight)
        causal.decoder.norm.weight.copy_(looped.decoder.norm.weight)
        causal.lm_head.weight.copy_(looped.lm_head.weight)
        for i, layer in enumerate(list(looped.thinker.layers) + list(looped.decoder.layers)):
            causal.decoder.layers[i].load_state_dict(layer.state_dict())
    assert len(causal.decoder.layers) == K + len(looped.decoder.layers)
    return causal


def test_looped_with_one_iteration_is_the_causal_arm():
    """With the recipe's state ingredients off (no injection, no interpolation, no state norm), one
    loop iteration is K more causal layers: exactly the causal arm with the same weights."""
    looped = _model("looped", injection="none", interpolate=False, state_norm=False)
    causal = _looped_as_causal(looped)
    ids, pl, lengths = _batch()
    valid = torch.arange(ids.shape[1])[None] < lengths[:, None]
    with torch.no_grad():
        a = looped(ids, prompt_lengths=pl, lengths=lengths, think_iters=1)
        b = causal(ids, prompt_lengths=pl, lengths=lengths)
        assert (a.logits - b.logits)[valid].abs().max().item() <= 1e-5
        assert a.iterations.tolist() == [1, 1, 1]
        assert (looped(ids, think_iters=1) - causal(ids)).abs().max().item() <= 1e-5
        # Negative controls: two iterations, or injection on, are something else.
        two = looped(ids, prompt_lengths=pl, lengths=lengths, think_iters=2).logits
        assert (two - b.logits)[valid].abs().max().item() > 1e-3
    inj = _model("looped", injection="add", interpolate=False, state_norm=False)
    inj.load_state_dict(looped.state_dict(), strict=False)
    with torch.no_grad():
        c = inj(ids, prompt_lengths=pl, lengths=lengths, think_iters=1).logits
    assert (c - b.logits)[valid].abs().max().item() > 1e-3


def test_deep_is_a_deeper_causal_decoder():
    deep = _model("deep", max_think_iters=3)
    ids, pl, lengths = _batch()
    with torch.no_grad():
        out = deep(ids, prompt_lengths=pl, lengths=lengths)
        ref = deep.causal_forward(ids, lengths)
    assert torch.equal(out.logits, ref)
    assert len(deep.decoder.layers) == 2 + 1 * 3 and deep.thinker is None and deep.thought_slots is None


@pytest.mark.parametrize("arm", ["looped", "deep"])
def test_new_arms_are_padding_invariant(arm):
    model = _model(arm)
    ids, pl, lengths = _batch()
    with torch.no_grad():
        out = model(ids, prompt_lengths=pl, lengths=lengths)
        for b in range(3):
            n = int(lengths[b])
            alone = model(ids[b : b + 1, :n], prompt_lengths=pl[b : b + 1])
            assert (alone.logits[0] - out.logits[b, :n]).abs().max().item() <= 1e-5
            assert alone.iterations.tolist() == out.iterations[b : b + 1].tolist()


@pytest.mark.parametrize("arm", ["looped", "deep"])
def test_new_arms_are_causal(arm):
    model = _model(arm, max_think_iters=3)
    ids = torch.randint(3, 97, (1, 10))
    with torch.no_grad():
        base = model(ids, prompt_lengths=torch.tensor([4])).logits
        for j in (1, 4, 9):
            ids2 = ids.clone()
            ids2[0, j] = (ids[0, j] + 1) % 97
            out = model(ids2, prompt_lengths=torch.tensor([4])).logits
            assert (out[0, :j] - base[0, :j]).abs().max().item() <= 1e-6
            assert (out[0, j] - base[0, j]).abs().max().item() > 1e-4


def test_looped_halting_by_change_is_per_row():
    model = _model("looped", max_think_iters=6)
    ids, pl, lengths = _batch()
    with torch.no_grad():
        changes = torch.stack(
            [model(ids, prompt_lengths=pl, lengths=lengths, think_iters=t, halting_threshold=0.0).final_change
             for t in range(1, 7)], 1)  # fmt: skip
        eps = float(changes[0, 1:5].mean())
        out = model(ids, prompt_lengths=pl, lengths=lengths, halting_threshold=eps)
    expected = [next((t + 1 for t in range(6) if changes[b, t] < eps), 6) for b in range(3)]
    assert out.iterations.tolist() == expected


@pytest.mark.parametrize("arm", ["looped", "deep"])
def test_new_arms_save_and_load_exactly(arm, tmp_path):
    from hatlm.checkpoint import load_model, save_model

    model = _model(arm, injection="concat", think_iters_train="uniform:2-4")
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m").eval()
    assert loaded.arm == arm and loaded.config == model.config
    ids, pl, lengths = _batch()
    with torch.no_grad():
        a = model(ids, prompt_lengths=pl, lengths=lengths).logits
        b = loaded(ids, prompt_lengths=pl, lengths=lengths).logits
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------ FLOPs


@pytest.mark.parametrize("arm", ARMS)
@pytest.mark.parametrize("extra", [{}, {"injection": "concat", "interpolate": False}])
def test_flops_equal_counted_matmuls_at_any_depth(arm, extra, monkeypatch):
    model = _model(arm, **extra)
    for n, k, t in ((7, 4, 3), (3, 1, 1), (5, 2, 8)):
        counted = counted_flops(model, n, k, t, monkeypatch)
        assert forward_flops(model.config, n, k, t, attention="dense") == counted, (arm, n, k, t)


def test_flops_per_depth_for_the_five_arms():
    cfg = {arm: make_config(arm=arm, max_think_iters=4) for arm in ARMS}
    n, k = 12, 2
    f = {arm: [inference_flops_per_example(c, n, k, t) for t in (1, 2, 4, 8)] for arm, c in cfg.items()}
    for arm in ("causal", "pause", "deep"):
        assert len(set(f[arm])) == 1  # test-time T changes nothing for these arms
    for arm in ("hybrid", "looped"):
        a = f[arm]
        assert a[1] - a[0] > 0 and a[2] - a[0] == 3 * (a[1] - a[0]) and a[3] - a[0] == 7 * (a[1] - a[0])
    # deep spends (K·T_train) more layers than causal: at T = T_train its layer work equals the loop's
    assert f["deep"][0] > f["causal"][0]


# ------------------------------------------------------------------------------ generation


@pytest.mark.parametrize("arm", ["looped", "deep"])
def test_generation_equals_greedy_recomputation(arm):
    from hatlm.generate import generate
    from hatlm.tokenizer import ByteTokenizer

    model = _model(arm, vocab_size=259, bos_token_id=256, eos_token_id=257, pad_token_id=258)
    tok = ByteTokenizer()
    prompts = ["abc", "hello w"]
    res = generate(model, tok, prompts, max_new_tokens=5, ignore_eos=True)
    for b, p in enumerate(prompts):
        seq = torch.tensor([tok.encode(p)])
        with torch.no_grad():
            for _ in range(5):
                seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], 1)
        assert res.tokens[b] == seq[0, -5:].tolist()
    if arm == "looped":
        assert res.stats[0]["think_iterations"] == model.config.hybrid.max_think_iters
