"""Progressive (deep-thinking) loss wired into training: `progressive_alpha` in TrainConfig.

α = 0 takes the plain path (progressive_loss never called); α > 0 gives (1 − α)·L(T) + α·L(n detached,
k differentiated) recomputed here from independent model calls, with gradients that reach the thinker
and differ from full backprop; the draws are a function of (seed, step) and resume stays exact."""

from __future__ import annotations

import pytest
import torch
from conftest import as_if_trained

import hatlm.train as train_mod
from hatlm.data import collate, encode_example, write_jsonl
from hatlm.errors import ConfigError, UserError
from hatlm.evaluate import answer_loss
from hatlm.loader import load_model_and_tokenizer
from hatlm.tasks import make_split
from hatlm.train import TrainConfig, step_loss, train
from hatlm.trainstate import read_metrics

TINY_MODEL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, thinker_layers=1, thought_slots=2, max_think_iters=4)
RUN = dict(preset="tiny-bytes", arm="hybrid", model=TINY_MODEL, batch_size=8, grad_accum=2, lr=3e-3, warmup=2,
           min_lr=3e-4, think_iters=4, eval_every=0, max_len=48, tensorboard=False, steps=6, save_every=3)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    train_ex, _ = make_split("recall", seed=0, n_train=48, n_eval=8, train_difficulties=[2, 3],
                             eval_difficulties=[3])
    write_jsonl(train_ex, d / "train.jsonl")
    return d / "train.jsonl"


def _batch(arm: str = "hybrid"):
    model, tok = load_model_and_tokenizer("tiny-bytes", arm=arm, seed=0, **TINY_MODEL)
    if arm == "hybrid":
        as_if_trained(model)
    model.train()
    ex, _ = make_split("recall", seed=1, n_train=6, n_eval=1, train_difficulties=[2, 3], eval_difficulties=[3])
    return model, collate([encode_example(e, tok) for e in ex], tok.pad_id)


def _loss(model, batch, T: int, bp: int | None = None) -> torch.Tensor:
    kw = {} if bp is None else {"backprop_iters": bp}
    out = model(batch.input_ids, prompt_lengths=batch.prompt_lengths, lengths=batch.lengths, think_iters=T, **kw)
    return answer_loss(out.logits, batch.input_ids, batch.target_mask)[0]


def _grads(model) -> dict[str, torch.Tensor]:
    g = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return g


@pytest.mark.parametrize("arm", ["hybrid", "looped"])
def test_progressive_loss_matches_independent_forwards_and_reaches_the_thinker(arm):
    model, batch = _batch(arm)
    cpu = torch.device("cpu")
    T = 4
    # A seed whose draw has n > 0 (detached iterations) and n + k < T (a different depth, so the
    # loss value differs too): found by scanning, the draw is returned.
    for seed in range(50):
        loss, out, draw = step_loss(model, batch, cpu, T, False, 0.5, seed)
        if draw["n"] > 0 and sum(draw.values()) < T:
            break
        model.zero_grad(set_to_none=True)
    n, k = draw["n"], draw["k"]
    assert 1 <= n < T and 1 <= k < T - n
    assert int(out.iterations[0]) == T  # the metrics see T, the step's depth
    loss.backward()
    g_prog = _grads(model)
    want = 0.5 * _loss(model, batch, T) + 0.5 * _loss(model, batch, n + k, bp=k)
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-6)
    want.backward()
    g_want = _grads(model)
    assert g_prog.keys() == g_want.keys()
    for name in g_want:
        torch.testing.assert_close(g_prog[name], g_want[name], rtol=1e-5, atol=1e-7)
    thinker = [nm for nm in g_prog if nm.startswith("thinker.") and g_prog[nm].abs().sum() > 0]
    assert thinker, "no gradient reached the thinker"
    # α = 0 is the plain loss at T; the progressive term changes the loss and the thinker's gradients
    # (its first n iterations are detached: full backprop through n + k would differ again).
    plain, _, none = step_loss(model, batch, cpu, T, False, 0.0, seed)
    assert none == {}
    assert float(plain.detach()) != float(loss.detach())
    plain.backward()
    g_plain = _grads(model)
    assert any(not torch.allclose(g_plain[nm], g_prog[nm]) for nm in thinker)
    (_loss(model, batch, n + k, bp=0)).backward()
    g_full = _grads(model)
    (_loss(model, batch, n + k, bp=k)).backward()
    g_trunc = _grads(model)
    assert any(not torch.allclose(g_full[nm], g_trunc[nm]) for nm in thinker)


def test_alpha_zero_never_calls_the_progressive_loss(tmp_path, data_file, monkeypatch):
    """α = 0 leaves the training step as it was: the progressive code is not on its path, so the
    weights are those of a run made before the option existed (checked against main at merge time)."""
    def boom(*a, **k):
        raise AssertionError("progressive_loss called with alpha = 0")

    monkeypatch.setattr(train_mod, "progressive_loss", boom)
    cfg = TrainConfig(**{**RUN, "data": [str(data_file)], "steps": 2, "save_every": 0})
    train(cfg, tmp_path / "run", progress=False)
    recs = [r for r in read_metrics(tmp_path / "run") if r["split"] == "train"]
    assert len(recs) == 2 and not any(k.startswith("progressive_") for k in recs[0])


def test_progressive_training_is_reproducible_and_resumes_exactly(tmp_path, data_file):
    from safetensors.torch import load_file

    cfg = TrainConfig(**{**RUN, "data": [str(data_file)], "progressive_alpha": 0.5})
    full = train(cfg, tmp_path / "full", progress=False)
    recs = [r for r in read_metrics(tmp_path / "full") if r["split"] == "train"]
    draws = [(r["progressive_n"], r["progressive_k"]) for r in recs]
    assert all(0 <= n < 4 and 1 <= k <= 4 - n for n, k in draws) and len(set(draws)) > 1

    def stop_at_5(step, loss):
        if step == 5:
            raise KeyboardInterrupt
        return loss

    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "cut", progress=False, loss_hook=stop_at_5)
    resumed = train(cfg, tmp_path / "cut", resume=True, progress=False)
    a = load_file(f"{full['model_dir']}/model.safetensors")
    b = load_file(f"{resumed['model_dir']}/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    cut = [r for r in read_metrics(tmp_path / "cut") if r["split"] == "train"]
    assert [(r["loss"], r["progressive_n"], r["progressive_k"]) for r in cut] == \
        [(r["loss"], r["progressive_n"], r["progressive_k"]) for r in recs]
    # α > 0 trains differently from α = 0 (same seed, same data).
    plain = train(TrainConfig(**{**RUN, "data": [str(data_file)]}), tmp_path / "plain", progress=False)
    c = load_file(f"{plain['model_dir']}/model.safetensors")
    assert any(not torch.equal(a[k], c[k]) for k in a if k.startswith("thinker."))
    assert "progressive_alpha: 0.5" in (tmp_path / "full" / "train_config.yaml").read_text()


@pytest.mark.parametrize("extra, message", [
    ({"progressive_alpha": 1.5}, r"progressive_alpha must be a number in \[0, 1\]"),
    ({"progressive_alpha": -0.1}, r"progressive_alpha must be a number in \[0, 1\]"),
    ({"progressive_alpha": 0.5, "arm": "causal"}, "progressive_alpha needs an arm with thinking iterations"),
])
def test_bad_progressive_alpha(extra, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**{**RUN, "data": ["x"], **extra}).validate()


def test_progressive_needs_an_iteration():
    model, batch = _batch()
    with pytest.raises(UserError, match="at least 1 thinking iteration"):
        step_loss(model, batch, torch.device("cpu"), 0, False, 0.5, 0)
