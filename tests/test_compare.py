"""`hatlm compare` and `hatlm demo`: the report's structure, statistics and error paths."""

from __future__ import annotations

import io
import json
import math
import statistics
from pathlib import Path

import pytest
from scipy import stats

from hatlm.cli import main
from hatlm.compare import compare, mean_ci, summarize, verdict
from hatlm.data import write_jsonl
from hatlm.datasets import EvalSet
from hatlm.errors import UserError
from hatlm.evaluate import chance_floor
from hatlm.reports import overall_statement, write_report
from hatlm.tasks import make_split
from hatlm.train import TrainConfig, load_config

TINY_MODEL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, thinker_layers=1, thought_slots=2, max_think_iters=2)
BASE = TrainConfig(data=["-"], model=TINY_MODEL, steps=4, batch_size=8, lr=3e-3, warmup=1, eval_every=2,
                   eval_max_examples=8, save_every=0, max_len=48, tensorboard=False)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def task_files(tmp_path_factory) -> tuple[str, list[str]]:
    d = tmp_path_factory.mktemp("task")
    train_ex, evals = make_split("recall", seed=0, n_train=64, n_eval=8, train_difficulties=[2],
                                 eval_difficulties=[2, 4])
    write_jsonl(train_ex, d / "train.jsonl")
    files = []
    for label, exs in evals.items():
        files.append(str(d / f"eval-{label.replace('/', '-')}.jsonl"))
        write_jsonl(exs, files[-1])
    return str(d / "train.jsonl"), files


@pytest.fixture(scope="module")
def sequential(tmp_path_factory, task_files) -> tuple[Path, dict]:
    train_file, eval_files = task_files
    out = tmp_path_factory.mktemp("seq") / "cmp"
    res = compare(train_file, eval_files, out, seeds=2, base=BASE, think_sweep=(1, 3), workers=1, progress=False,
                  arms=["causal", "pause", "hybrid"])
    write_report(res, out)
    return out, res


@pytest.mark.slow
def test_compare_tiny_task_writes_full_report(sequential, task_files):
    train_file, eval_files = task_files
    out, res = sequential

    data = json.loads((out / "results.json").read_text())
    recs = data["records"]
    assert len(recs) == 3 * 2 * len(eval_files)
    keys = {(r["arm"], r["seed"], r["eval_file"]) for r in recs}
    assert keys == {(a, s, e) for a in ("causal", "pause", "hybrid") for s in (0, 1) for e in eval_files}
    for r in recs:
        assert r["metric"] == "accuracy" and 0.0 <= r["accuracy"] <= 1.0 and r["n"] == 8
        assert r["params"] > 0 and r["train_flops_per_example"] > r["inference_flops_per_example"] > 0
        assert r["wall_time_s"] > 0 and r["steps"] == 4
        if r["arm"] == "hybrid":
            assert set(r["accuracy_by_think_iters"]) == {"1", "3"}
    # Parameter matching: the baselines take the thinker's layer as an extra decoder layer; the
    # hybrid's extras are the slots, the gate and the zero-initialised prompt projection (d² + d + 2),
    # and the injection and state norms (2d).
    # Pause and hybrid also have one decoder gate per layer and head for reading the extra positions.
    params = {r["arm"]: r["params"] for r in recs}
    d, H = TINY_MODEL["hidden_size"], TINY_MODEL["num_attention_heads"]
    L, K = TINY_MODEL["num_hidden_layers"], TINY_MODEL["thinker_layers"]
    assert params["pause"] - params["causal"] == 2 * d + (L + K) * H  # the pause slots and decoder gates
    assert params["hybrid"] - params["pause"] == d * d + d + 2 + 2 * d - K * H
    # Inference FLOPs: the hybrid spends the most (thinking), causal the least.
    flops = {r["arm"]: r["inference_flops_per_example"] for r in recs}
    assert flops["causal"] < flops["pause"] < flops["hybrid"]

    # The summary's mean/CI are those of the per-seed records.
    for e in eval_files:
        for arm in ("causal", "pause", "hybrid"):
            vals = [r["accuracy"] for r in recs if r["arm"] == arm and r["eval_file"] == e]
            s = data["summary"][e][arm]
            assert s["values"] == vals
            assert s["mean"] == pytest.approx(sum(vals) / 2)
            # t quantile (df 1) times the standard error, from scipy and the formula, not from mean_ci
            assert s["ci95"] == pytest.approx(stats.t.ppf(0.975, 1) * statistics.stdev(vals) / math.sqrt(2), abs=1e-12)
    # Chance floor of the built-in task: 1/pairs.
    assert data["chance"][eval_files[0]]["accuracy"] == pytest.approx(1 / 2)
    assert data["chance"][eval_files[1]]["accuracy"] == pytest.approx(1 / 4)

    md = (out / "results.md").read_text()
    for arm in ("causal", "pause", "hybrid"):
        assert f"| {arm} |" in md
    assert "chance floor" in md and "## Verdict" in md and "With T thinking iterations at test time" in md
    for png in ("learning_curves.png", "think_iters.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC
    # Learning curves come from each run's metrics: an eval point at steps 0, 2 and 4.
    curve = data["curves"]["hybrid|0"]["eval"][eval_files[0]]
    assert [p[0] for p in curve] == [0, 2, 4]
    assert res["predictions"][f"causal|0|{eval_files[0]}"][0].keys() >= {"prompt", "answer", "prediction", "correct"}

    # Running compare again on the same folder reuses the finished runs (resume is a no-op).
    again = compare(train_file, eval_files[:1], out, seeds=1, arms=["causal"], base=BASE, think_sweep=(),
                    workers=1, progress=False)
    first = [r for r in recs if r["arm"] == "causal" and r["seed"] == 0 and r["eval_file"] == eval_files[0]][0]
    assert again["records"][0]["accuracy"] == first["accuracy"]
    assert again["records"][0]["wall_time_s"] == first["wall_time_s"]


@pytest.mark.slow
def test_parallel_workers_give_the_same_results(tmp_path, sequential, task_files):
    """Runs trained in two worker processes equal the same runs trained one after another."""
    train_file, eval_files = task_files
    _, seq = sequential
    par = compare(train_file, eval_files, tmp_path / "par", seeds=2, base=BASE, think_sweep=(1, 3), workers=2,
                  progress=False, arms=["causal", "pause", "hybrid"])

    def key(r):
        return (r["arm"], r["seed"], r["eval_file"], r["accuracy"], r["final_train_loss"],
                json.dumps(r.get("accuracy_by_think_iters")))

    assert [key(r) for r in par["records"]] == [key(r) for r in seq["records"]]
    assert par["curves"]["pause|1"]["train_loss"] == seq["curves"]["pause|1"]["train_loss"]


def test_compare_cli_errors_on_missing_file(tmp_path, task_files, capsys):
    train_file, eval_files = task_files
    missing = str(tmp_path / "nope.jsonl")
    rc = main(["compare", "--train", train_file, "--eval", eval_files[0], "--eval", missing,
               "--out", str(tmp_path / "o"), "--steps", "1", "--seeds", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and f"--eval {missing}: no such file" in err and "Traceback" not in err
    assert not (tmp_path / "o" / "runs").exists()  # checked before any training

    rc = main(["compare", "--train", missing, "--eval", eval_files[0], "--out", str(tmp_path / "o")])
    assert rc == 2 and f"--train {missing}: no such file" in capsys.readouterr().err
    rc = main(["compare", "--train", train_file, "--eval", eval_files[0], "--out", str(tmp_path / "o"),
               "--arms", "causal,thinker"])
    assert rc == 2 and "--arms: unknown arm(s) thinker" in capsys.readouterr().err
    with pytest.raises(UserError, match="--seeds must be a positive integer"):
        compare(train_file, eval_files, tmp_path / "o", seeds=0)


def test_t_quantiles_and_confidence_interval():
    # Reference values of Student's t (two-sided 95%: the 0.975 quantile), from printed tables.
    for df, t in ((1, 12.7062), (2, 4.3027), (4, 2.7764), (10, 2.2281), (30, 2.0423)):
        values = [0.0, 1.0] + [0.5] * (df - 1)  # df + 1 values
        _, ci = mean_ci(values)
        sem = statistics.stdev(values) / math.sqrt(len(values))
        assert ci / sem == pytest.approx(t, abs=2e-4)
    m, ci = mean_ci([0.5, 0.7, 0.6])
    assert m == pytest.approx(0.6) and ci == pytest.approx(4.3027 * 0.1 / math.sqrt(3), abs=1e-4)
    m, ci = mean_ci([0.4])
    assert m == 0.4 and math.isnan(ci)


def _summary(vals: dict[str, list[float]]) -> dict:
    out = {}
    for arm, v in vals.items():
        m, ci = mean_ci(v)
        out[arm] = {"metric": "accuracy", "mean": m, "ci95": ci, "values": v}
    return {"e": out}


def test_verdict_says_when_no_arm_learned_and_when_cis_overlap():
    chance = {"e": {"accuracy": 0.25, "how": "x"}}
    s = _summary({"causal": [0.24, 0.26, 0.25], "pause": [0.22, 0.27, 0.25], "hybrid": [0.26, 0.24, 0.28]})
    v = verdict(s, chance, ["causal", "pause", "hybrid"], ["e"])
    assert v["no_arm_learned"]
    assert "No arm learned" in overall_statement({"verdict": v, "summary": s})

    s = _summary({"causal": [0.30, 0.35, 0.32], "pause": [0.60, 0.75, 0.70], "hybrid": [0.90, 0.92, 0.91]})
    v = verdict(s, chance, ["causal", "pause", "hybrid"], ["e"])
    assert not v["no_arm_learned"] and v["per_eval"]["e"]["best"] == "hybrid"
    assert v["per_eval"]["e"]["separated_from"] == {"pause": True, "causal": True}
    assert v["per_eval"]["e"]["learned"] == {"causal": True, "pause": True, "hybrid": True}
    assert "hybrid beats pause (CIs separate)" in overall_statement({"verdict": v, "summary": s})

    s = _summary({"causal": [0.0, 0.0], "pause": [0.0, 0.0], "hybrid": [0.0, 0.0]})
    v = verdict(s, chance, ["causal", "pause", "hybrid"], ["e"])
    assert v["per_eval"]["e"]["best"] == "tie" and v["no_arm_learned"]

    s = _summary({"pause": [0.5, 0.9, 0.7], "hybrid": [0.6, 0.8, 0.75]})
    v = verdict(s, chance, ["pause", "hybrid"], ["e"])
    assert v["per_eval"]["e"]["best"] == "hybrid" and v["per_eval"]["e"]["separated_from"] == {"pause": False}
    assert "hybrid beats pause (within the CIs)" in overall_statement({"verdict": v, "summary": s})


def _record(arm: str, seed: int, e: str, acc: float, **kw) -> dict:
    return {"arm": arm, "seed": seed, "eval_file": e, "metric": "accuracy", "accuracy": acc, "params": 1000 + len(arm),
            "train_flops_per_example": 30 * len(arm), "inference_flops_per_example": 10 * len(arm),
            "wall_time_s": 2.0 * seed + len(arm), **kw}


def test_summary_and_verdict_on_records_with_known_values():
    """summarize and verdict on hand-made records: means, 95% CIs (Student t, written out here),
    per-seed values, the hybrid's sweep, the winner, separation and who learned."""
    sweep = [{"1": 0.25, "4": 0.5}, {"1": 0.35, "4": 0.7}, {"1": 0.45, "4": 0.9}]
    recs = ([_record("causal", s, "e", v) for s, v in enumerate([0.30, 0.40, 0.35])]
            + [_record("hybrid", s, "e", v, accuracy_by_think_iters=sweep[s]) for s, v in enumerate([0.90, 0.80, 0.85])]
            + [_record("causal", 0, "f", 0.5), _record("hybrid", 0, "f", 0.28)])
    summary = summarize(recs, ["causal", "hybrid"], ["e", "f"])
    t2 = 4.302652729749462  # Student t, 0.975 quantile, 2 degrees of freedom (printed tables: 4.303)
    assert stats.t.ppf(0.975, 2) == pytest.approx(t2, rel=1e-9)
    c, h = summary["e"]["causal"], summary["e"]["hybrid"]
    assert c["values"] == [0.30, 0.40, 0.35] and c["seeds"] == [0, 1, 2]
    assert c["mean"] == pytest.approx(0.35) and h["mean"] == pytest.approx(0.85)
    assert c["ci95"] == pytest.approx(t2 * 0.05 / math.sqrt(3)) and h["ci95"] == pytest.approx(t2 * 0.05 / math.sqrt(3))
    assert c["params"] == 1006 and h["inference_flops_per_example"] == 60 and c["wall_time_s"] == pytest.approx(8.0)
    m1, ci1 = h["accuracy_by_think_iters"]["1"]
    m4, ci4 = h["accuracy_by_think_iters"]["4"]
    assert (m1, m4) == (pytest.approx(0.35), pytest.approx(0.7))
    assert ci1 == pytest.approx(t2 * 0.1 / math.sqrt(3)) and ci4 == pytest.approx(t2 * 0.2 / math.sqrt(3))
    one = summary["f"]["hybrid"]
    assert one["mean"] == 0.28 and math.isnan(one["ci95"])  # one seed: no interval

    chance = {"e": {"accuracy": 0.3, "how": "x"}, "f": {"accuracy": 0.25, "how": "x"}}
    v = verdict(summary, chance, ["causal", "hybrid"], ["e", "f"])
    e = v["per_eval"]["e"]
    assert e["best"] == "hybrid" and e["ranking"] == ["hybrid", "causal"]
    assert e["separated_from"] == {"causal": True}  # 0.85 − 0.107 > 0.35 + 0.107
    # causal: mean 0.35 above the floor 0.3, but the CI's lower end (0.24) is not; hybrid: 0.74 is.
    assert e["learned"] == {"causal": False, "hybrid": True}
    f = v["per_eval"]["f"]
    assert f["best"] == "causal" and f["separated_from"] == {"hybrid": None}
    # One seed: learned when 5 points above the floor: 0.5 − 0.05 > 0.25, but 0.28 − 0.05 < 0.25.
    assert f["learned"] == {"causal": True, "hybrid": False}
    assert v["wins"] == {"hybrid": 1, "causal": 1} and not v["no_arm_learned"]
    # Overlapping intervals: the same means with three times the spread no longer separate.
    wide = [_record("causal", s, "e", v) for s, v in enumerate([0.05, 0.65, 0.35])] + [
        _record("hybrid", s, "e", v) for s, v in enumerate([0.95, 0.55, 1.05])]
    v = verdict(summarize(wide, ["causal", "hybrid"], ["e"]), chance, ["causal", "hybrid"], ["e"])
    assert v["per_eval"]["e"]["separated_from"] == {"causal": False}


def test_chance_floor_for_plain_files_is_the_majority_answer():
    from hatlm.data import Example

    ev = EvalSet("f", [], [], [Example("p", "yes"), Example("q", "no"), Example("r", " yes")])
    floor, how = chance_floor(ev)
    assert floor == pytest.approx(2 / 3) and "'yes'" in how


def test_demo_end_to_end_in_miniature(tmp_path):
    """The demo's whole path (data generation, compare, table, examples, closing summary) at a
    size that takes seconds; the real size is calibrated in hatlm.demo."""
    from hatlm.demo import demo

    buf = io.StringIO()
    res = demo(tmp_path / "demo", steps=2, seeds=1, n_train=64, n_eval=6, think_sweep=(1, 2),
               train_overrides={"model": TINY_MODEL, "eval_every": 1}, workers=1, progress=False, file=buf)
    text = buf.getvalue()
    assert "does thinking help" in text and "A few predictions" in text
    # The printed table shows each arm's own accuracy and parameter count (one seed: the record's value).
    lines = text.splitlines()
    for r in res["records"]:
        want = [r["arm"], f"{100 * r['accuracy']:.1f}", f"{r['params']:,}"]
        assert any(ln.split()[:3] == want for ln in lines), want
    for arm in ("causal", "pause", "hybrid", "looped", "deep"):
        assert arm in text
    assert f"Report: {tmp_path / 'demo' / 'results.md'}" in text
    assert (tmp_path / "demo" / "data" / "train.jsonl").exists()
    assert len(res["records"]) == 5 * len(res["summary"])
    # the arms that think are swept over test-time T, with the inference FLOPs at each T
    for per_arm in res["summary"].values():
        for arm in ("hybrid", "looped"):
            assert set(per_arm[arm]["accuracy_by_think_iters"]) == {"1", "2"}
            fl = per_arm[arm]["inference_flops_by_think_iters"]
            assert fl["2"] > fl["1"] > 0
    assert res["config"]["model"] == TINY_MODEL and res["config"]["steps"] == 2
    # The ablation table: one hybrid run per ablation with that ingredient switched off, its accuracy as
    # recorded in that run's own results.json.
    from hatlm.demo import DEMO_ABLATIONS

    md = (tmp_path / "demo" / "results.md").read_text()
    assert "## Ablation: the hybrid with one thinker ingredient off" in md
    for name, over in DEMO_ABLATIONS.items():
        folder = tmp_path / "demo" / "ablations" / name.split(" (")[0].replace(" ", "-").replace("=", "")
        ab = json.loads((folder / "results.json").read_text())
        assert ab["arms"] == ["hybrid"] and all(ab["config"]["model"][k] == v for k, v in over.items())
        row = next(ln for ln in md.splitlines() if ln.startswith(f"| {name} "))
        for e in ab["summary"]:
            s = ab["summary"][e]["hybrid"]
            assert f"{100 * s['mean']:.1f} ± {100 * s['ci95']:.1f}" in row


def test_shipped_configs_are_valid():
    configs = sorted(Path(__file__).resolve().parents[1].glob("configs/*.yaml"))
    assert configs, "configs/*.yaml missing"
    for f in configs:
        load_config(f)  # raises ConfigError on an unknown key or a bad value (the arm included)


def test_demo_yaml_mirrors_the_demo_settings():
    from hatlm.demo import DEMO_TRAIN
    from hatlm.train import apply_overrides

    shipped = load_config(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml").to_dict()
    demo_cfg = apply_overrides(TrainConfig(data=["-"]), DEMO_TRAIN).to_dict()
    for k in ("data", "arm"):
        shipped.pop(k), demo_cfg.pop(k)
    assert shipped == demo_cfg


def test_every_metric_of_a_record_is_on_the_kept_examples(tmp_path, task_files):
    """Examples longer than max_len are left out of greedy accuracy, the chance floor and the
    learning curves alike, and the record and the report say how many and why."""
    from hatlm.data import Example
    from hatlm.trainstate import read_metrics

    train_file, _ = task_files
    kept = [Example("k1?", "a"), Example("k2?", "a"), Example("k3?", "a"), Example("k4?", "b"), Example("k5?", "b")]
    too_long = [Example("x" * 60 + str(i), "b") for i in range(4)]  # > max_len 48 tokens
    ev = tmp_path / "mixed.jsonl"
    write_jsonl(kept[:2] + too_long[:2] + kept[2:] + too_long[2:], ev)
    out = tmp_path / "cmp"
    res = compare(train_file, [str(ev)], out, seeds=1, arms=["causal"], base=BASE, think_sweep=(), workers=1,
                  progress=False)
    write_report(res, out)
    (rec,) = res["records"]
    assert rec["n"] == 5
    assert rec["eval_set"] == {"metric": "accuracy", "n_total": 9, "n_kept": 5, "n_scored": 5, "n_curve": 5,
                               "left_out": "4 of 9 left out: 4 longer than max_len 48"}
    # Majority answer of the kept five ("a", 3/5), not of the whole file ("b", 6/9).
    assert res["chance"][str(ev)]["accuracy"] == pytest.approx(3 / 5) and "'a'" in res["chance"][str(ev)]["how"]
    curve_ns = {r["n"] for r in read_metrics(rec["run_dir"]) if r["split"] == "eval"}
    assert curve_ns == {5}
    md = (out / "results.md").read_text()
    assert "Scored on 5 of the 5 examples kept (4 of 9 left out: 4 longer than max_len 48)" in md
