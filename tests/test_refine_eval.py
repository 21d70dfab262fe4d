"""Gradient refinement and re-thinking measured: `evaluate_examples` / `hatlm eval` with
refine_steps / rethink_every, checked against per-prompt `generate` calls (the oracle)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import as_if_trained, make_config

from hatlm.checkpoint import save_model
from hatlm.cli import main
from hatlm.data import Example, write_jsonl
from hatlm.evaluate import evaluate_examples
from hatlm.generate import generate
from hatlm.model import HatLM
from hatlm.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
NEW = 3  # new tokens per answer
G, LR = 3, 0.3
PROMPTS = [f"k{i} v{(7 * i) % 10} q" + "x" * (i % 3) for i in range(10)]


def _hybrid(open_gates: bool = True) -> HatLM:
    torch.manual_seed(0)
    model = HatLM(make_config(vocab_size=259, bos_token_id=256, eos_token_id=257, pad_token_id=258,
                              max_think_iters=2)).eval()
    # Thoughts reach the decoder only through its thought gates (closed in a fresh model).
    return as_if_trained(model) if open_gates else model


def _solo(model, prompt: str, **kw) -> str:
    return generate(model, TOK, [prompt], NEW, temperature=0.0, **kw).texts[0]


def test_refinement_and_rethinking_change_greedy_accuracy_where_the_oracle_says():
    model = _hybrid()
    refined = {p: _solo(model, p, refine_steps=G, refine_lr=LR) for p in PROMPTS}
    plain = {p: _solo(model, p) for p in PROMPTS}
    rethink = {p: _solo(model, p, rethink_every=1) for p in PROMPTS}
    # Answers = what the refined model says alone (non-empty ones): refined accuracy 1, plain accuracy
    # the share of prompts whose plain greedy text is the same.
    ex = [Example(p, refined[p], "t") for p in PROMPTS if refined[p].strip()]
    assert len(ex) >= 6
    changed = [e.prompt for e in ex if plain[e.prompt].strip() != refined[e.prompt].strip()]
    assert changed, "refinement changed no greedy answer: the test model is too weak"
    r0 = evaluate_examples(model, TOK, ex, batch_size=4, max_new_tokens=NEW)
    rg = evaluate_examples(model, TOK, ex, batch_size=4, max_new_tokens=NEW, refine_steps=G, refine_lr=LR)
    rr = evaluate_examples(model, TOK, ex, batch_size=4, max_new_tokens=NEW, rethink_every=1)
    assert [p["prediction"] for p in rg["predictions"]] == [refined[e.prompt] for e in ex]
    assert [p["prediction"] for p in r0["predictions"]] == [plain[e.prompt] for e in ex]
    assert [p["prediction"] for p in rr["predictions"]] == [rethink[e.prompt] for e in ex]
    assert rg["accuracy"] == 1.0
    assert r0["accuracy"] == pytest.approx(1 - len(changed) / len(ex))
    assert rr["accuracy"] == pytest.approx(sum(rethink[e.prompt].strip() == e.answer.strip() for e in ex) / len(ex))
    # The mean objective before / after refinement: lowered, and the per-prompt values averaged.
    stats = [generate(model, TOK, [e.prompt], NEW, refine_steps=G, refine_lr=LR).stats[0] for e in ex]
    assert rg["refine_before"] == pytest.approx(sum(s["refine_before"] for s in stats) / len(ex), rel=1e-5)
    assert rg["refine_after"] == pytest.approx(sum(s["refine_after"] for s in stats) / len(ex), rel=1e-5)
    assert rg["refine_after"] < rg["refine_before"]
    assert "refine_before" not in r0


def test_refinement_cannot_act_with_closed_thought_gates():
    """A fresh hybrid's decoder does not read the thoughts: refinement finds no gradient and changes nothing."""
    model = _hybrid(open_gates=False)
    ex = [Example(p, "1", "t") for p in PROMPTS]
    r0 = evaluate_examples(model, TOK, ex, batch_size=4, max_new_tokens=NEW)
    rg = evaluate_examples(model, TOK, ex, batch_size=4, max_new_tokens=NEW, refine_steps=G, refine_lr=LR)
    assert [p["prediction"] for p in rg["predictions"]] == [p["prediction"] for p in r0["predictions"]]
    assert rg["refine_after"] == rg["refine_before"]


def test_eval_cli_refine_and_rethink(tmp_path, capsys):
    model = _hybrid()
    ckpt = tmp_path / "ckpt"
    save_model(model, ckpt, tokenizer=TOK)
    ex = [Example(p, _solo(model, p, refine_steps=G, refine_lr=LR), "t") for p in PROMPTS]
    data = tmp_path / "d.jsonl"
    write_jsonl(ex, data)
    settings = {
        (): {},
        ("--refine-steps", str(G), "--refine-lr", str(LR)): {"refine_steps": G, "refine_lr": LR},
        ("--rethink-every", "1"): {"rethink_every": 1},
        ("--refine-steps", "2", "--refine-objective", "reread"): {"refine_steps": 2, "refine_objective": "reread"},
    }
    preds = tmp_path / "p.jsonl"
    seen = set()
    for flags, kw in settings.items():
        want = evaluate_examples(model, TOK, ex, **kw)
        assert main(["eval", str(ckpt), "--data", str(data), "--json", "--predictions", str(preds), *flags]) == 0
        out = json.loads(capsys.readouterr().out)
        got = [json.loads(line)["prediction"] for line in preds.read_text().splitlines()]
        assert got == [p["prediction"] for p in want["predictions"]] and out["accuracy"] == want["accuracy"]
        seen.add(tuple(got))
        assert {"refine_steps", "refine_lr", "refine_objective", "rethink_every"} <= set(out)
        assert out["refine_steps"] == kw.get("refine_steps", 0) and out["rethink_every"] == kw.get("rethink_every")
        if "refine_steps" in kw:
            assert out["refine_after"] < out["refine_before"]
            assert out["refine_objective"] == kw.get("refine_objective", "entropy")
    assert len(seen) == len(settings)  # each setting changes the greedy answers on this model
    assert main(["eval", str(ckpt), "--data", str(data), "--refine-steps", "2"]) == 0
    assert "with refine_steps=2 (lr 0.1, entropy); objective" in capsys.readouterr().out

    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 5)
    causal = tmp_path / "causal"
    save_model(HatLM(make_config(arm="causal", vocab_size=259, bos_token_id=256, eos_token_id=257,
                                 pad_token_id=258)), causal, tokenizer=TOK)
    for args, message in [
        (["--refine-steps", "-1"], "--refine-steps must be >= 0; got -1"),
        (["--refine-steps", "2", "--refine-lr", "0"], "--refine-lr must be > 0; got 0.0"),
        (["--rethink-every", "0"], "--rethink-every must be >= 1; got 0"),
        (["--refine-steps", "2", "--data", str(text)], "need prompt/answer data"),
    ]:
        argv = ["eval", str(ckpt), "--data", str(data), *args]
        assert main(argv) == 2
        assert message in capsys.readouterr().err
    assert main(["eval", str(causal), "--data", str(data), "--refine-steps", "2"]) == 2
    assert "refine_steps needs the hybrid arm" in capsys.readouterr().err
    assert main(["eval", str(causal), "--data", str(data), "--rethink-every", "2"]) == 2
    assert "rethink_every needs the hybrid arm" in capsys.readouterr().err
