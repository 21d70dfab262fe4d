"""Evaluation (exact match, text loss, `hatlm eval`) and the analytic FLOP counts."""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import counted_flops

import hatlm
from hatlm.cli import main
from hatlm.data import Example, collate, encode_example, write_jsonl
from hatlm.evaluate import evaluate_examples, evaluate_text
from hatlm.flops import forward_flops, inference_flops_per_example, train_flops_per_example
from hatlm.generate import generate
from hatlm.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
TRAIN = [Example("ab?", "x", "t1"), Example("cd?", "yz", "t2")]


def tiny(arm: str, seed: int = 0, **kw) -> hatlm.HatLM:
    base = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, arm=arm, thinker_layers=1, thought_slots=2, max_think_iters=2)  # fmt: skip
    return hatlm.load("tiny-bytes", seed=seed, **{**base, **kw})


def memorise(model: hatlm.HatLM, examples: list[Example], max_steps: int = 300) -> hatlm.HatLM:
    """Train until the model reproduces `examples` (loss on answer + EOS, as in training)."""
    batch = collate([encode_example(e, TOK) for e in examples], TOK.pad_id)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sel = batch.target_mask[:, 1:]
    for _ in range(max_steps):
        out = model(batch.input_ids, prompt_lengths=batch.prompt_lengths, lengths=batch.lengths)
        loss = F.cross_entropy(out.logits[:, :-1][sel], batch.input_ids[:, 1:][sel])
        if loss.item() < 0.02:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    # The oracle for every greedy text these tests expect: a mean answer loss under 0.02 over these
    # ≤ 5 answer tokens (EOS included) puts each token's probability above e^-0.1 > 1/2, so it is the
    # argmax, and greedy decoding reproduces the answers exactly.
    assert loss.item() < 0.02
    return model.eval()


@functools.cache
def trained_model(arm: str) -> hatlm.HatLM:
    torch.manual_seed(0)
    return memorise(tiny(arm), TRAIN)


@pytest.fixture(params=["causal", "hybrid"])
def trained(request):
    return trained_model(request.param)


def test_exact_match_right_and_wrong(trained):
    r = evaluate_examples(trained, TOK, TRAIN, batch_size=2)
    assert r["accuracy"] == 1.0 and r["n"] == 2
    T = trained.config.hybrid.max_think_iters if trained.arm == "hybrid" else 0  # iterations per example
    assert r["per_task"] == {"t1": {"accuracy": 1.0, "n": 1, "mean_iterations": T},
                             "t2": {"accuracy": 1.0, "n": 1, "mean_iterations": T}}
    assert r["mean_iterations"] == T
    assert [p["prediction"] for p in r["predictions"]] == ["x", "yz"]
    # the same prompts with other answers are all wrong; whitespace around an answer does not matter
    wrong = [Example("ab?", "yz", "t1"), Example("cd?", "x", "t1"), Example("ab?", " x\n", "t3")]
    r = evaluate_examples(trained, TOK, wrong, batch_size=1)
    assert r["accuracy"] == pytest.approx(1 / 3)
    assert r["per_task"]["t1"] == {"accuracy": 0.0, "n": 2, "mean_iterations": T}
    assert [p["correct"] for p in r["predictions"]] == [False, False, True]
    assert trained.training is False


def test_halting_reports_the_iterations_each_example_used():
    model = trained_model("hybrid")
    exs = TRAIN + [Example("zz?", "q", "t3")]
    with torch.no_grad():
        ids = [TOK.encode(e.prompt) for e in exs]
        # each prompt alone: the iterations its own halting decision takes (an independent count)
        alone = [int(model.think(torch.tensor([i]), torch.tensor([len(i)]), think_iters=6,
                                 halting_threshold=0.05).iterations[0]) for i in ids]
    assert 1 < min(alone) < 6 and len(set(alone)) > 1  # rows halt at different depths, before the cap
    r = evaluate_examples(model, TOK, exs, batch_size=3, think_iters=6, halting_threshold=0.05)
    assert [p["iterations"] for p in r["predictions"]] == alone
    assert r["mean_iterations"] == pytest.approx(sum(alone) / len(alone))
    assert r["per_task"]["t3"]["mean_iterations"] == alone[-1]
    full = evaluate_examples(model, TOK, exs, batch_size=3, think_iters=6)
    assert full["mean_iterations"] == 6


def test_predictions_are_greedy_generation(trained):
    exs = TRAIN + [Example("zz?", "q"), Example("a", "q")]
    for think in (None, 0, 3) if trained.arm == "hybrid" else (None,):
        r = evaluate_examples(trained, TOK, exs, batch_size=3, think_iters=think, max_new_tokens=4)
        direct = generate(trained, TOK, [e.prompt for e in exs], max_new_tokens=4, temperature=0.0, think_iters=think)
        assert [p["prediction"] for p in r["predictions"]] == direct.texts


def test_evaluate_text_matches_per_row_cross_entropy():
    torch.manual_seed(1)
    model = tiny("pause").eval()
    rows = [encode_example(Example("hello", "world"), TOK), ([TOK.bos_id, 5, 6, 7, 8], 2), ([TOK.bos_id, 9, 10], 1)]
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, p in rows:  # one row at a time: no padding involved
            logits = model(torch.tensor([ids]), prompt_lengths=torch.tensor([p])).logits[0]
            total += F.cross_entropy(logits[p - 1 : -1], torch.tensor(ids[p:]), reduction="sum").item()
            count += len(ids) - p
    for bs in (1, 3):
        r = evaluate_text(model, TOK, rows, batch_size=bs)
        assert r["tokens"] == count == 6 + 3 + 2
        assert r["loss"] == pytest.approx(total / count, rel=1e-5)
        assert r["perplexity"] == pytest.approx(torch.tensor(total / count).exp().item(), rel=1e-5)


def test_answer_loss_against_per_token_cross_entropy():
    """answer_loss on hand-made logits: the summed cross-entropy, the count and the per-row exact match
    equal a loop over the answer tokens with F.cross_entropy on one position at a time."""
    g = torch.Generator().manual_seed(0)
    B, L, V = 3, 7, 11
    ids = torch.randint(0, V, (B, L), generator=g)
    logits = torch.randn(B, L, V, generator=g)
    mask = torch.zeros(B, L, dtype=torch.bool)
    mask[0, 3:7] = True  # row 0: 4 answer tokens, all predicted right (made so below)
    mask[1, 2:5] = True  # row 1: 3 answer tokens, the middle one predicted wrong
    mask[2, 6] = True  # row 2: 1 answer token, right; its other positions are wrong but not answers
    for b in range(B):
        for t in range(1, L):
            if mask[b, t]:
                logits[b, t - 1, ids[b, t]] += 20.0  # the target becomes the argmax
    logits[1, 2, ids[1, 3]] -= 40.0
    logits[2, :5] = -logits[2, :5]
    from hatlm.evaluate import answer_loss

    loss_sum, count, hit = answer_loss(logits, ids, mask)
    ref, n = 0.0, 0
    for b in range(B):
        for t in range(1, L):
            if mask[b, t]:
                ref += F.cross_entropy(logits[b, t - 1][None], ids[b, t][None]).item()
                n += 1
    assert int(count) == n == 8
    assert float(loss_sum) == pytest.approx(ref, rel=1e-6)
    assert hit.tolist() == [True, False, True]


def test_teacher_forced_exact_match_is_the_argmax_on_every_answer_token():
    """teacher_forced's accuracy_tf and loss against the model run one row at a time: a row counts when
    the argmax at every answer position (EOS included) is the answer token."""
    from hatlm.evaluate import teacher_forced

    model = trained_model("hybrid")
    exs = TRAIN + [Example("ab?", "yz"), Example("cd?", "x"), Example("zz?", "q")]
    rows = [encode_example(e, TOK) for e in exs]
    right, total, count = [], 0.0, 0
    with torch.no_grad():
        for ids, p in rows:
            lg = model(torch.tensor([ids]), prompt_lengths=torch.tensor([p])).logits[0, p - 1 : -1]
            tgt = torch.tensor(ids[p:])
            right.append(bool((lg.argmax(-1) == tgt).all()))
            total += F.cross_entropy(lg, tgt, reduction="sum").item()
            count += len(tgt)
    assert right[:2] == [True, True] and right[2:4] == [False, False]  # memorised; swapped answers
    for bs in (1, 2, 5):
        r = teacher_forced(model, rows, TOK.pad_id, batch_size=bs)
        assert r["accuracy_tf"] == pytest.approx(sum(right) / len(rows))
        assert r["loss"] == pytest.approx(total / count, rel=1e-5) and r["tokens"] == count


# ------------------------------------------------------------------------------ CLI


def test_eval_cli(tmp_path, capsys):
    from hatlm.checkpoint import save_model

    model = trained_model("hybrid")
    ckpt = tmp_path / "ckpt"
    save_model(model, ckpt, tokenizer=TOK)
    data = tmp_path / "d.jsonl"
    write_jsonl(TRAIN, data)

    assert main(["eval", str(ckpt), "--data", str(data), "--json", "--think-iters", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["accuracy"] == 1.0 and out["n"] == 2 and out["think_iters"] == 2 and out["arm"] == "hybrid"
    assert set(out["per_task"]) == {"t1", "t2"}

    preds = tmp_path / "p.jsonl"
    assert main(["eval", str(ckpt), "--data", str(data), "--predictions", str(preds)]) == 0
    assert "accuracy 100.0%" in capsys.readouterr().out
    assert [json.loads(line)["prediction"] for line in preds.read_text().splitlines()] == ["x", "yz"]

    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 5)
    assert main(["eval", str(ckpt), "--data", str(text), "--json", "--window", "16"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["format"] == "text" and out["tokens"] > 0
    assert out["perplexity"] == pytest.approx(math.exp(out["loss"]))

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "answer": "b"}\n{"prompt": "a"}\n')
    assert main(["eval", str(ckpt), "--data", str(bad)]) == 2
    assert f"{bad}, line 2: missing key(s) answer" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "nope"), "--data", str(data)]) == 2
    assert "no such checkpoint folder" in capsys.readouterr().err

    causal = tmp_path / "causal"
    save_model(tiny("causal"), causal, tokenizer=TOK)
    assert main(["eval", str(causal), "--data", str(data), "--think-iters", "3"]) == 2
    assert "--think-iters applies to the hybrid arm" in capsys.readouterr().err

    # --device / --dtype: float64 on the CPU gives the same answers; a device that is not here is refused.
    assert main(["eval", str(ckpt), "--data", str(data), "--json", "--device", "cpu", "--dtype", "float64"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == 1.0
    if not torch.cuda.is_available():
        assert main(["eval", str(ckpt), "--data", str(data), "--device", "cuda"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err


# ------------------------------------------------------------------------------ FLOPs


@pytest.mark.parametrize("arm", ["causal", "pause", "hybrid"])
@pytest.mark.parametrize(
    "extra", [{}, {"encoder_layers": 1, "decoder_prefix": "bidirectional", "sliding_window": 5, "num_hidden_layers": 2}]
)
def test_flops_match_counted_matmuls(arm, extra, monkeypatch):
    model = tiny(arm, thought_slots=3, **extra)
    for n, k, t in ((7, 4, 3), (3, 1, 1)):
        counted = counted_flops(model, n, k, t, monkeypatch)
        # SDPA with a boolean mask computes every (query, key) pair: compare with the "dense" count
        assert forward_flops(model.config, n, k, t, attention="dense") == pytest.approx(counted, rel=0.01)
        causal = forward_flops(model.config, n, k, t)
        assert causal < counted
        assert train_flops_per_example(model.config, n, k, t) == 3 * causal


def test_flops_arms_and_iterations():
    cfg = {arm: tiny(arm).config for arm in ("causal", "pause", "hybrid")}
    n, k = 20, 2
    f = {arm: inference_flops_per_example(c, n, k) for arm, c in cfg.items()}
    assert f["causal"] < f["pause"]  # pause adds m positions to the same decoder
    # each thinking iteration adds the same amount
    h = [inference_flops_per_example(cfg["hybrid"], n, k, t) for t in (0, 1, 2, 4)]
    assert h[2] - h[1] == h[1] - h[0] > 0 and h[3] - h[0] == 4 * (h[1] - h[0])
    # generation evaluates the LM head only where a token is chosen, training at every position
    assert inference_flops_per_example(cfg["causal"], n, k) < forward_flops(cfg["causal"], n, k)


def test_flops_mistral_7b_is_two_flops_per_parameter_per_token():
    config = hatlm.ModelConfig.from_name("mistral-7b", arm="causal", thinker_layers=0)
    with torch.device("meta"):
        params = hatlm.HatLM(config).num_parameters()["total"]
    assert params == 7_241_732_096
    embed = config.vocab_size * config.hidden_size  # a lookup, not a product
    L = 16  # short: attention is negligible next to the weights
    assert forward_flops(config, 8, L - 8) == pytest.approx(2 * (params - embed) * L, rel=0.001)
