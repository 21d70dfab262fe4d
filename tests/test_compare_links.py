"""`hatlm compare` extras: links to `hatlm show` pages, lm-eval tasks as eval sets."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from hatlm.cli import main
from hatlm.data import write_jsonl
from hatlm.tasks import make_split

TINY_SET = ["hidden_size=32", "intermediate_size=64", "num_hidden_layers=1",
            "num_attention_heads=2", "num_key_value_heads=1", "thinker_layers=1",
            "thought_slots=2", "max_think_iters=2", "batch_size=4", "warmup=1", "eval_every=2",
            "eval_max_examples=4", "save_every=0", "max_len=48", "tensorboard=false"]


def _cli(train: str, evals: list[str], out: Path, *extra: str) -> int:
    args = ["compare", "--train", train, "--out", str(out), "--steps", "2", "--seeds", "1", "--arms",
            "causal,hybrid", "--think-sweep", "", "--workers", "1", "--no-progress", *extra]
    for e in evals:
        args += ["--eval", e]
    for s in TINY_SET:
        args += ["--set", s]
    return main(args)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[str, str]:
    d = tmp_path_factory.mktemp("data")
    train_ex, evals = make_split("recall", seed=0, n_train=16, n_eval=4, train_difficulties=[2],
                                 eval_difficulties=[2])
    write_jsonl(train_ex, d / "train.jsonl")
    write_jsonl(next(iter(evals.values())), d / "eval.jsonl")
    return str(d / "train.jsonl"), str(d / "eval.jsonl")


def test_compare_links_show_pages(files, tmp_path):
    train, ev = files
    out = tmp_path / "cmp"
    assert _cli(train, [ev], out, "--show-examples", "2") == 0
    md = (out / "results.md").read_text()
    links = re.findall(r"\]\(([^)]+)\)", md)
    pages = [x for x in links if x.startswith("show/")]
    # The hybrid (the arm show draws) gets a page per example; causal only its predictions in the table.
    assert sorted(pages) == ["show/hybrid-example0/index.html", "show/hybrid-example1/index.html"]
    for p in pages:
        page = (out / p).read_text()
        assert page.startswith("<!DOCTYPE html>") or "<html" in page[:200]
        assert "data:image/png;base64," in page
    assert not (out / "show" / "causal-example0").exists()
    res = json.loads((out / "results.json").read_text())
    preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    for ent in res["show_pages"]:
        for arm in ("causal", "hybrid"):
            want = next(p for p in preds if p["arm"] == arm and p["prompt"] == ent["prompt"])
            assert ent["predictions"][arm]["prediction"] == want["prediction"]
        # the page is about that example's prompt
        assert json.loads((out / ent["pages"]["hybrid"]).with_name("show.json").read_text())["info"]["prompt"] \
            == ent["prompt"]


def test_compare_show_examples_off(files, tmp_path):
    train, ev = files
    out = tmp_path / "cmp"
    assert _cli(train, [ev], out, "--show-examples", "0") == 0
    assert not (out / "show").exists()
    assert "show/" not in (out / "results.md").read_text()
