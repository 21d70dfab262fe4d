"""The recurrent-depth thinker (issue 8): each ingredient on/off changes what it should and nothing else.

Ingredients: input injection, state norm, slot noise, interpolation α ∈ (0, 1), relevance acting on
the step and on the attention, randomised depth with truncated backprop, halting by change or by
readout KL, the progressive loss.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_config

from hatlm.config import ItersSpec, parse_iters_spec
from hatlm.errors import ConfigError, UserError
from hatlm.model import HatLM
from hatlm.thinking import Thinker, progressive_loss, sample_think_iters

M = 3  # thought slots in the tiny config


def _model(**hybrid) -> HatLM:
    torch.manual_seed(0)
    return HatLM(make_config(**hybrid)).eval()


def _inputs():
    torch.manual_seed(1)
    ids = torch.randint(3, 97, (3, 7))
    return ids, torch.tensor([7, 4, 2])


def _trained_like(model: HatLM) -> HatLM:
    """Non-trivial thinking-path parameters (the fresh gate is constant, the fresh temperature 1, and
    the fresh decoder reads neither the thoughts nor the prompt's refinement)."""
    with torch.no_grad():
        th = model.thinker
        if th.gate is not None:
            th.gate.weight.normal_(0.0, 0.5)
        th.reweight_temperature.fill_(3.0)
        if model.thought_gate is not None:
            for g in model.thought_gate:
                g.fill_(1.0)
        if model.prompt_refine is not None:
            model.prompt_refine.weight.normal_(0.0, 0.2)
    return model


# ------------------------------------------------------------------------------ relevance


def test_relevance_hand_computed():
    th = Thinker(make_config(reweight_temperature=2.0))
    # Focus = the mean of position 2 alone = (1, 1)/√2: cosines 1/√2, 1/√2, 1.
    z = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [5.0, -7.0]]])  # last position is padding
    valid = torch.tensor([[True, True, True, False]])
    focus = torch.tensor([[False, False, True, False]])
    c = torch.tensor([1 / math.sqrt(2), 1 / math.sqrt(2), 1.0])
    expected = 2.0 * (c - c.mean())  # = [−0.19526, −0.19526, 0.39052]
    rho = th.relevance(z, valid, focus)
    assert torch.allclose(rho[0, :3], expected, atol=1e-6)
    assert rho[0, 3].item() == 0.0  # padding gets no relevance ...
    z2 = z.clone()
    z2[0, 3] = torch.tensor([-3.0, 100.0])
    assert torch.equal(th.relevance(z2, valid, focus), rho)  # ... and changes nothing
    assert torch.allclose(rho[0, :3], torch.tensor([-0.19526, -0.19526, 0.39052]), atol=1e-5)

    # No focus given: the focus is the mean of the valid positions, (4/3, 2/3) ∝ (2, 1).
    z = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]]])
    with torch.no_grad():
        th.reweight_temperature.fill_(1.0)
    rho = th.relevance(z, torch.ones(1, 3, dtype=torch.bool))
    assert torch.allclose(rho[0], torch.tensor([0.149071, -0.298142, 0.149071]), atol=1e-5)
    # The learned temperature is exposed for logging.
    assert th.temperature == 1.0


def test_step_size_stays_inside_zero_one_for_any_parameters():
    th = Thinker(make_config())
    u = torch.randn(2, 5, 32) * 100
    for scale in (1e-3, 1.0, 1e3, 1e8):
        with torch.no_grad():
            th.gate.weight.normal_(0.0, scale)
            th.gate.bias.fill_(scale * (1 if scale > 1 else -1))
        for rho in (None, torch.randn(2, 5) * scale, torch.full((2, 5), -scale)):
            a = th.step_size(u, rho)
            assert a.shape == (2, 5, 1)
            assert bool((a > 0).all()) and bool((a < 1).all()), (scale, a.min().item(), a.max().item())


def test_interpolation_lies_between_old_and_new():
    """Without the state norm, z' − z = α (u − z) with α ∈ (0, 1): every refined vector lies on the
    segment from z to u, strictly inside."""
    model = _trained_like(_model(state_norm=False, injection="none"))
    th = model.thinker
    ids, pl = _inputs()
    with torch.no_grad():
        r = model.think(ids, pl, think_iters=1)
        z0 = r.z0
        B, N, _ = z0.shape
        u = z0
        seq = pl + M
        from hatlm.masks import bidirectional_mask

        mask = model.build_mask(bidirectional_mask(seq), B, N, N)
        rope = model.rope(torch.arange(N).expand(B, N), z0.dtype)
        valid = torch.arange(N)[None] < seq[:, None]
        focus = (torch.arange(N)[None] >= pl[:, None]) & valid
        rho = th.relevance(z0, valid, focus)
        bias = rho[:, None, None, :].expand(B, 1, N, N)
        for layer in th.layers:
            u = layer(u, rope, mask, None, None, bias)
    d = r.z - z0
    ratio = (d * (u - z0)).sum(-1) / (u - z0).pow(2).sum(-1)  # α per position
    cos = torch.nn.functional.cosine_similarity(d, u - z0, dim=-1)
    assert bool((ratio[valid] > 0).all()) and bool((ratio[valid] < 1).all())
    assert bool((cos[valid] > 1 - 1e-4).all())
    assert ratio[valid].std() > 1e-3  # the step differs per position


# ------------------------------------------------------------------------------ ingredients on/off


def test_injection_modes():
    ids, pl = _inputs()
    outs = {}
    ref = _trained_like(_model(injection="add")).state_dict()
    for mode in ("none", "add", "concat"):
        model = _model(injection=mode)
        missing, unexpected = model.load_state_dict(ref, strict=False)  # the same weights everywhere
        assert set(missing) <= {"thinker.adapter.weight"} and set(unexpected) <= {"thinker.inject_norm.weight"}
        with torch.no_grad():
            outs[mode] = model.think(ids, pl, think_iters=3)
    # concat starts as no injection: the adapter is [I, 0] at init (it learns to take the input in)
    assert torch.allclose(outs["concat"].z, outs["none"].z, atol=1e-5)
    valid = torch.arange(outs["add"].z.shape[1])[None] < (pl + M)[:, None]
    assert (outs["add"].z - outs["none"].z)[valid].abs().max() > 1e-2
    # the starting point is not what injection changes
    assert torch.equal(outs["add"].z0, outs["none"].z0)
    # parameters: "add" brings one norm (d), "concat" a norm and the 2d → d adapter
    d = 32
    n = {mode: _model(injection=mode).num_parameters()["thinker"] for mode in ("none", "add", "concat")}
    assert n["add"] - n["none"] == d and n["concat"] - n["add"] == 2 * d * d


def test_injection_off_one_iteration_is_the_plain_gated_step():
    """injection, state norm and re-weighting off: one iteration is z0 + sigmoid(gate(u)) (u − z0)
    with u the K layers on z0 (the step before issue 8; test_thinker_oracle checks u itself)."""
    model = _trained_like(
        _model(injection="none", state_norm=False, reweight=False, reweight_attention=False)
    )
    ids, pl = _inputs()
    with torch.no_grad():
        r = model.think(ids, pl, think_iters=1)
        B, N, _ = r.z0.shape
        from hatlm.masks import bidirectional_mask

        mask = model.build_mask(bidirectional_mask(pl + M), B, N, N)
        u = model.run_layers(model.thinker.layers, r.z0, torch.arange(N).expand(B, N), mask)
        expected = r.z0 + torch.sigmoid(model.thinker.gate(u)) * (u - r.z0)
    valid = torch.arange(N)[None] < (pl + M)[:, None]
    assert (r.z - expected)[valid].abs().max() <= 1e-6


def test_state_norm_normalises_each_update_and_nothing_else():
    ids, pl = _inputs()
    on, off = _trained_like(_model(state_norm=True)), _trained_like(_model(state_norm=False))
    with torch.no_grad():
        r_on, r_off = on.think(ids, pl, think_iters=1), off.think(ids, pl, think_iters=1)
    rms = r_on.z.pow(2).mean(-1).sqrt()
    assert torch.allclose(rms, torch.ones_like(rms), atol=1e-3)  # weight 1 at init
    ref = torch.nn.functional.rms_norm(r_off.z, (r_off.z.shape[-1],), eps=on.config.rms_norm_eps)
    assert torch.allclose(r_on.z, ref, atol=1e-6)


def test_interpolate_off_takes_the_block_output():
    ids, pl = _inputs()
    model = _trained_like(_model(interpolate=False, state_norm=False, injection="none", reweight_attention=False))
    assert model.thinker.gate is None
    with torch.no_grad():
        r = model.think(ids, pl, think_iters=1)
        B, N, _ = r.z0.shape
        from hatlm.masks import bidirectional_mask

        mask = model.build_mask(bidirectional_mask(pl + M), B, N, N)
        u = model.run_layers(model.thinker.layers, r.z0, torch.arange(N).expand(B, N), mask)
    valid = torch.arange(N)[None] < (pl + M)[:, None]
    assert (r.z - u)[valid].abs().max() <= 1e-6


def test_relevance_acts_on_attention_only_through_its_temperature():
    ids, pl = _inputs()
    with_bias = _trained_like(_model(reweight=False, reweight_attention=True))
    without = _trained_like(_model(reweight=False, reweight_attention=False))
    valid = torch.arange(ids.shape[1] + M)[None] < (pl + M)[:, None]
    with torch.no_grad():
        a, b = with_bias.think(ids, pl, think_iters=2), without.think(ids, pl, think_iters=2)
        assert (a.z - b.z)[valid[:, : a.z.shape[1]]].abs().max() > 1e-3  # the bias changes attention
        with_bias.thinker.reweight_temperature.fill_(0.0)
        c = with_bias.think(ids, pl, think_iters=2)
    assert torch.allclose(c.z, b.z, atol=1e-6)  # τ = 0: no relevance, the same thinker


def test_slot_noise_only_in_training_and_only_on_slots():
    ids, pl = _inputs()
    model = _model(slot_noise=0.5)
    with torch.no_grad():
        e1, e2 = model.think(ids, pl, think_iters=1), model.think(ids, pl, think_iters=1)
        assert torch.equal(e1.z, e2.z)  # eval: deterministic
        model.train()
        t1 = model.think(ids, pl, think_iters=1, )
        t2 = model.think(ids, pl, think_iters=1)
    B, N, _ = t1.z0.shape
    j = torch.arange(N)[None]
    is_prompt = j < pl[:, None]
    is_slot = (j >= pl[:, None]) & (j < (pl + M)[:, None])
    assert torch.equal(t1.z0[is_prompt], e1.z0[is_prompt])
    assert (t1.z0 - t2.z0)[is_slot].abs().min() > 0  # every slot vector gets its own noise
    assert (t1.z0 - e1.z0)[is_slot].std().item() == pytest.approx(0.5, rel=0.3)


# ------------------------------------------------------------------------------ randomised depth


@pytest.mark.parametrize(
    "spec,lo,hi,mean",
    [("fixed:3", 3, 3, 3.0), ("uniform:2-5", 2, 5, 3.5), ("poisson:3", 1, 9, 3.0), ("poisson:4-6", 1, 6, 4.0),
     ("lognormal-poisson:4", 1, 12, 4.0)],
)
def test_sampled_iterations_stay_in_range_and_are_reproducible(spec, lo, hi, mean):
    s = parse_iters_spec(spec, default=2)
    assert (s.lo, s.hi, s.mean) == (lo, hi, mean)
    draws = [sample_think_iters(s, torch.Generator().manual_seed(7)) for _ in range(3)]
    assert len(set(draws)) == 1  # same seed, same draw
    g = torch.Generator().manual_seed(0)
    many = [sample_think_iters(s, g) for _ in range(3000)]
    assert min(many) >= lo and max(many) <= hi
    if hi > lo:
        assert len(set(many)) > 1
    if spec in ("uniform:2-5", "poisson:3", "lognormal-poisson:4"):
        assert sum(many) / len(many) == pytest.approx(mean, abs=0.15)  # clipping is rare here
    assert parse_iters_spec("", default=4) == ItersSpec("fixed", 4, 4, 4.0)
    assert parse_iters_spec("poisson", default=4) == ItersSpec("poisson", 1, 12, 4.0)  # mean = max_think_iters


@pytest.mark.parametrize("spec", ["poisson:x", "uniform:5-2", "uniform:0-2", "gauss:3", "poisson:0.5", "fixed:x"])
def test_bad_iteration_specs_are_clear_errors(spec):
    with pytest.raises(ConfigError, match="think_iters_train"):
        make_config(think_iters_train=spec)


def test_training_draws_the_depth_from_the_seed_and_eval_uses_max():
    ids, pl = _inputs()
    model = _model(think_iters_train="uniform:1-6", max_think_iters=2)
    model.train()

    def run() -> list[int]:
        torch.manual_seed(123)
        return [int(model(ids, prompt_lengths=pl).iterations[0]) for _ in range(12)]

    a, b = run(), run()
    assert a == b and min(a) >= 1 and max(a) <= 6 and len(set(a)) > 2
    with torch.no_grad():  # no gradient: an evaluation pass, no sampling
        assert model(ids, prompt_lengths=pl).iterations.tolist() == [2, 2, 2]
    model.eval()
    assert model(ids, prompt_lengths=pl).iterations.tolist() == [2, 2, 2]
    model.train()
    assert model(ids, prompt_lengths=pl, think_iters=5).iterations.tolist() == [5, 5, 5]  # explicit wins


@pytest.mark.parametrize("arm", ["hybrid", "looped"])
def test_truncated_backprop_differentiates_only_the_last_k_iterations(arm):
    ids, pl = _inputs()
    model = _trained_like(_model(arm=arm, backprop_iters=2))
    model.train()
    seen: list[bool] = []
    hook = model.thinker.layers[0].register_forward_hook(lambda *_: seen.append(torch.is_grad_enabled()))
    out = model(ids, prompt_lengths=pl, think_iters=5)
    assert seen == [False, False, False, True, True]
    out.logits.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert any(n.startswith("thinker.layers") for n in grads)
    # The forward values do not depend on the truncation; the gradients do.
    model.zero_grad()
    seen.clear()
    full = model(ids, prompt_lengths=pl, think_iters=5, backprop_iters=0)
    assert seen == [True] * 5
    assert (full.logits - out.logits).abs().max().item() <= 1e-5, (full.logits - out.logits).abs().max().item()
    full.logits.sum().backward()
    w = "thinker.layers.0.mlp.down_proj.weight"
    assert (model.get_parameter(w).grad - grads[w]).abs().max() > 1e-6
    # Shorter than k: every iteration has a gradient. Evaluation: none.
    seen.clear()
    model(ids, prompt_lengths=pl, think_iters=1)
    with torch.no_grad():
        model(ids, prompt_lengths=pl, think_iters=2)
    assert seen == [True, False, False]
    hook.remove()


def test_progressive_loss_draws_and_mixes():
    calls = []

    def loss_fn(n: int, k: int) -> torch.Tensor:
        calls.append((n, k))
        return torch.tensor(float(10 * n + k))

    for seed in range(20):
        calls.clear()
        loss, draw = progressive_loss(loss_fn, 5, 0.25, torch.Generator().manual_seed(seed))
        n, k = draw["n"], draw["k"]
        assert 0 <= n < 5 and 1 <= k <= 5 - n
        assert calls == [(0, 5), (n, k)]
        assert loss.item() == pytest.approx(0.75 * 5 + 0.25 * (10 * n + k))
    calls.clear()
    progressive_loss(loss_fn, 5, 1.0)
    assert len(calls) == 1
    with pytest.raises(UserError, match="alpha"):
        progressive_loss(loss_fn, 5, 1.5)


# ------------------------------------------------------------------------------ halting


def test_kl_halting_uses_the_readout_kl_and_reports_iterations():
    """halting="kl": a row stops at the first iteration whose readout (the first answer token's
    distribution) moved by less than ε in KL; final_kl is that KL, computed here independently."""
    T = 6
    model = _trained_like(_model(max_think_iters=T, halting="kl"))
    ids, pl = _inputs()
    with torch.no_grad():
        logps = []
        for t in range(T + 1):
            r = model.think(ids, pl, think_iters=t, halting_threshold=0.0)
            logps.append(model.first_answer_logprobs(ids, r))
    kls = torch.stack([(lp.exp() * (lp - prev)).sum(-1) for prev, lp in zip(logps, logps[1:])], 1)  # [B, T]
    eps = float(kls[0, :-1].min()) * 1.5
    expected = [next((t + 1 for t in range(T) if kls[b, t] < eps), T) for b in range(3)]
    with torch.no_grad():
        r = model.think(ids, pl, halting_threshold=eps)
    assert r.iterations.tolist() == expected
    assert expected[0] < T
    for b, t in enumerate(expected):
        assert r.final_kl[b].item() == pytest.approx(kls[b, t - 1].item(), rel=1e-4, abs=1e-9)


# ------------------------------------------------------------------------------ training wiring


@pytest.mark.parametrize("arm", ["hybrid", "looped"])
def test_training_draws_each_steps_depth_reproducibly_and_logs_the_thinker(arm, tmp_path):
    """hatlm.train: with think_iters unset, every step's T is a draw from think_iters_train (seeded
    by the run's seed and the step), recorded per step; the learned temperature is logged."""
    from hatlm.train import TrainConfig, read_metrics, train

    model = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1, thinker_layers=1, thought_slots=2, max_think_iters=2,
                 think_iters_train="uniform:1-5")
    cfg = dict(data=["task:nearest"], preset="tiny-bytes", arm=arm, model=model, steps=12, batch_size=4,
               eval_every=0, save_every=0, task_train_size=64, task_eval_size=4, tensorboard=False, warmup=1)

    def depths(out, seed=0) -> list[float]:
        train(TrainConfig(**cfg, seed=seed), out, progress=False, log=lambda s: None)
        recs = [r for r in read_metrics(out) if r["split"] == "train"]
        assert all("reweight_temperature" in r for r in recs)
        return [r["think_iters"] for r in recs]

    a, b = depths(tmp_path / "a"), depths(tmp_path / "b")
    assert a == b and set(a) <= {1, 2, 3, 4, 5} and len(set(a)) > 2
    assert depths(tmp_path / "c", seed=1) != a
