"""`hatlm compare --refine-steps / --rethink-every`: every hybrid run evaluated again with each
setting, the per-seed paired differences, the report table, and the errors."""

from __future__ import annotations

import io
import json
import math
import statistics

import pytest
from scipy import stats

from hatlm.cli import main
from hatlm.compare import compare, refine_rethink_settings, summarize_test_time
from hatlm.data import write_jsonl
from hatlm.datasets import load_eval_set
from hatlm.errors import UserError
from hatlm.evaluate import evaluate_set
from hatlm.loader import load_model_and_tokenizer
from hatlm.reports import print_table, refine_rethink_lines, render_markdown
from hatlm.tasks import make_split
from hatlm.train import TrainConfig

TINY_MODEL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, thinker_layers=1, thought_slots=2, max_think_iters=2)
BASE = TrainConfig(data=["-"], model=TINY_MODEL, steps=3, batch_size=8, lr=3e-3, warmup=1, eval_every=0,
                   save_every=0, max_len=48, tensorboard=False)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("task")
    train_ex, evals = make_split("recall", seed=0, n_train=32, n_eval=6, train_difficulties=[2],
                                 eval_difficulties=[2])
    write_jsonl(train_ex, d / "train.jsonl")
    write_jsonl(next(iter(evals.values())), d / "eval.jsonl")
    return str(d / "train.jsonl"), str(d / "eval.jsonl")


def _ci(values):
    return stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


def test_summary_pairs_each_setting_with_the_plain_accuracy_of_its_seed():
    recs = [
        {"arm": "hybrid", "seed": 1, "eval_file": "e", "accuracy": 0.5,
         "test_time": {"refine_steps=2": {"accuracy": 0.75, "options": {"refine_steps": 2, "refine_lr": 0.1,
                                                                         "refine_objective": "entropy"}}}},
        {"arm": "hybrid", "seed": 0, "eval_file": "e", "accuracy": 0.25,
         "test_time": {"refine_steps=2": {"accuracy": 0.25, "options": {"refine_steps": 2, "refine_lr": 0.1,
                                                                         "refine_objective": "entropy"}}}},
        {"arm": "hybrid", "seed": 2, "eval_file": "e", "accuracy": 0.6,
         "test_time": {"refine_steps=2": {"accuracy": 0.7, "options": {"refine_steps": 2, "refine_lr": 0.1,
                                                                        "refine_objective": "entropy"}}}},
        {"arm": "causal", "seed": 0, "eval_file": "e", "accuracy": 0.9},
    ]
    s = summarize_test_time(recs, ["e", "other"])
    assert list(s) == ["e"] and s["e"]["seeds"] == [0, 1, 2]
    st = s["e"]["settings"]["refine_steps=2"]
    assert st["values"] == [0.25, 0.75, 0.7]
    assert st["diffs"] == pytest.approx([0.0, 0.25, 0.1])
    assert st["diff_mean"] == pytest.approx(0.35 / 3)
    assert st["diff_ci95"] == pytest.approx(_ci([0.0, 0.25, 0.1]))
    assert st["mean"] == pytest.approx(1.7 / 3) and st["ci95"] == pytest.approx(_ci([0.25, 0.75, 0.7]))
    assert s["e"]["plain"]["mean"] == pytest.approx(1.35 / 3)
    lines = refine_rethink_lines({"test_time": s}, "e")
    assert lines[0].startswith("Effect of refinement / re-thinking (hybrid, 3 seeds")
    assert "| plain | 45.0 ± " in lines[4]
    assert lines[5].startswith("| refine_steps=2 (lr 0.1, entropy) | 56.7 ± ")
    assert f"| +11.7 ± {100 * _ci([0.0, 0.25, 0.1]):.1f} | +0.0, +25.0, +10.0 |" in lines[5]
    assert refine_rethink_lines({"test_time": s}, "other") == [] and refine_rethink_lines({}, "e") == []


def test_compare_evaluates_every_hybrid_run_with_each_setting(tmp_path, files):
    train_file, ev = files
    out = tmp_path / "cmp"
    res = compare(train_file, [ev], out, seeds=2, arms=["causal", "hybrid"], base=BASE, think_sweep=(),
                  refine_steps=[2], rethink_every=[1], refine_lr=0.3, workers=1, progress=False)
    hyb = [r for r in res["records"] if r["arm"] == "hybrid"]
    assert len(hyb) == 2
    assert all("test_time" not in r for r in res["records"] if r["arm"] == "causal")
    for r in hyb:
        assert set(r["test_time"]) == {"refine_steps=2", "rethink_every=1"}
        assert r["test_time"]["refine_steps=2"]["options"] == {"refine_steps": 2, "refine_lr": 0.3,
                                                               "refine_objective": "entropy"}
        assert r["test_time"]["refine_steps=2"]["refine_after"] <= r["test_time"]["refine_steps=2"]["refine_before"]
    # The stored accuracy is the greedy accuracy of that run's model with that setting (recomputed here).
    r = hyb[1]
    model, tok = load_model_and_tokenizer(f"{r['run_dir']}/model")
    es = load_eval_set(ev, tok, BASE.max_len, 0, lambda s: None)
    for name, kw in (("refine_steps=2", {"refine_steps": 2, "refine_lr": 0.3}), ("rethink_every=1",
                                                                                  {"rethink_every": 1})):
        want = evaluate_set(model, tok, es, think_iters=None, batch_size=BASE.eval_batch_size, **kw)["accuracy"]
        assert r["test_time"][name]["accuracy"] == want
    saved = json.loads((out / "results.json").read_text())
    assert saved["test_time"][ev]["settings"]["rethink_every=1"]["diffs"] == [
        x["test_time"]["rethink_every=1"]["accuracy"] - x["accuracy"] for x in sorted(hyb, key=lambda x: x["seed"])]
    assert [s["name"] for s in saved["test_time_settings"]] == ["refine_steps=2", "rethink_every=1"]
    md = render_markdown(res)
    assert "Effect of refinement / re-thinking (hybrid, 2 seeds" in md
    assert "| refine_steps=2 (lr 0.3, entropy) |" in md and "| rethink_every=1 |" in md
    buf = io.StringIO()
    print_table(res, file=buf)
    assert "hybrid with refine_steps=2: " in buf.getvalue() and "points vs plain, paired" in buf.getvalue()


@pytest.mark.parametrize("kw, message", [
    ({"refine_steps": [0]}, "--refine-steps: expected positive integers"),
    ({"refine_steps": [-2]}, "--refine-steps: expected positive integers"),
    ({"rethink_every": [0]}, "--rethink-every: expected positive integers"),
    ({"rethink_every": [2, 2]}, "--rethink-every: a value is listed twice"),
    ({"refine_steps": [2], "refine_lr": 0.0}, "--refine-lr must be > 0"),
    ({"refine_steps": [2], "refine_objective": "nope"}, "--refine-objective must be one of entropy, reread"),
])
def test_bad_settings_are_clear_errors(kw, message):
    with pytest.raises(UserError, match=message):
        refine_rethink_settings(**kw)


def test_compare_refuses_settings_without_a_hybrid_and_bad_cli_lists(tmp_path, files, capsys):
    train_file, ev = files
    with pytest.raises(UserError, match="--arms has no hybrid"):
        compare(train_file, [ev], tmp_path / "o", arms=["causal"], base=BASE, refine_steps=[2], workers=1,
                progress=False)
    assert main(["compare", "--train", train_file, "--eval", ev, "--out", str(tmp_path / "o2"),
                 "--refine-steps", "2,x"]) == 2
    assert "--refine-steps '2,x': expected comma-separated integers" in capsys.readouterr().err
    assert main(["compare", "--train", train_file, "--eval", ev, "--out", str(tmp_path / "o3"),
                 "--rethink-every", "0"]) == 2
    assert "--rethink-every: expected positive integers" in capsys.readouterr().err
