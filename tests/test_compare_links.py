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


MC = [{"question": "r1 c3 r", "choices": [" 1", " 3", " c"], "answer": 0},
      {"question": "c9 t4 t", "choices": [" 4", " 9"], "answer": 0},
      {"question": "a2 b5 b", "choices": [" 2", " 5", " a", " b"], "answer": 1}]
GEN = [{"q": "r1 c3 c", "a": " 3"}, {"q": "x7 y2 x", "a": " 7"}]


def _write_tasks(folder: Path) -> None:
    common = ("dataset_path: json\ndataset_kwargs:\n  cache_dir: {cache}\n  data_files:\n    test: {file}\n"
              "test_split: test\n")
    for name, rows in (("mc", MC), ("gen", GEN)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "mc.yaml").write_text(
        "task: hatcmp_mc\n" + common.format(cache=folder / "cache", file=folder / "mc.jsonl")
        + "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: choices\ndoc_to_target: answer\n"
        "target_delimiter: ''\nmetric_list:\n  - metric: acc\n")
    (folder / "gen.yaml").write_text(
        "task: hatcmp_gen\n" + common.format(cache=folder / "cache", file=folder / "gen.jsonl")
        + "output_type: generate_until\ndoc_to_text: '{{q}}'\ndoc_to_target: '{{a}}'\n"
        "generation_kwargs:\n  until: ['\\n']\nmetric_list:\n  - metric: exact_match\n")


def test_compare_takes_lm_eval_tasks(files, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from hatlm.data import Example
    from hatlm.evaluate import evaluate_examples
    from hatlm.loader import load_model_and_tokenizer

    train, _ = files
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    _write_tasks(tasks)
    out = tmp_path / "cmp"
    assert _cli(train, ["lm-eval:hatcmp_mc", "lm-eval:hatcmp_gen"], out, "--lm-eval-include-path", str(tasks),
                "--show-examples", "1") == 0
    res = json.loads((out / "results.json").read_text())
    # Chance: a uniform guess among each question's choices (multiple choice); the most frequent answer else.
    assert res["chance"]["lm-eval:hatcmp_mc"]["accuracy"] == pytest.approx((1 / 3 + 1 / 2 + 1 / 4) / 3)
    assert res["chance"]["lm-eval:hatcmp_gen"]["accuracy"] == pytest.approx(1 / 2)
    assert res["eval_sets"]["lm-eval:hatcmp_mc"]["n_total"] == 3
    # Greedy accuracy equals a direct evaluation of the trained model on the documents themselves.
    oracle = {"lm-eval:hatcmp_mc": [Example(d["question"], d["choices"][d["answer"]].strip()) for d in MC],
              "lm-eval:hatcmp_gen": [Example(d["q"], d["a"].strip()) for d in GEN]}
    for rec in res["records"]:
        run = next(r for r in res["runs"] if r["arm"] == rec["arm"])
        model, tok = load_model_and_tokenizer(run["model_dir"])
        model.eval()
        want = evaluate_examples(model, tok, oracle[rec["eval_file"]], think_iters=None)
        assert rec["accuracy"] == pytest.approx(want["accuracy"]) and rec["n"] == len(oracle[rec["eval_file"]])
    md = (out / "results.md").read_text()
    assert "## `lm-eval:hatcmp_mc`" in md and "uniform guess among the choices" in md


def test_compare_lm_eval_errors(files, tmp_path, capsys, monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    train, _ = files
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    _write_tasks(tasks)
    assert _cli(train, ["lm-eval:"], tmp_path / "a") == 2
    assert "name the task" in capsys.readouterr().err
    assert _cli(train, ["lm-eval:hatcmp_mc"], tmp_path / "b", "--lm-eval-include-path", str(tmp_path / "nope")) == 2
    assert "no such folder" in capsys.readouterr().err
