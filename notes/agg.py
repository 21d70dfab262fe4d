"""Aggregate notes/runs.jsonl over seeds: mean ± 95% CI (Student t) per tag/arm/level and test-time T."""
import json
import sys
from collections import defaultdict

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "src"))
from hatlm.compare import mean_ci  # noqa: E402

prefix = sys.argv[1] if len(sys.argv) > 1 else ""
groups = defaultdict(list)
for line in open(__import__("pathlib").Path(__file__).resolve().parent / "runs.jsonl"):
    r = json.loads(line)
    if r["tag"].startswith(prefix):
        groups[(r["tag"], r["task"], r["arm"])].append(r)
for (tag, task, arm), rs in groups.items():
    cells = []
    for lvl in rs[0]["acc"]:
        ts = list(rs[0]["acc"][lvl])
        vals = []
        for t in ts:
            m, ci = mean_ci([100 * r["acc"][lvl][t] for r in rs])
            vals.append(f"{m:.0f}±{0 if ci != ci else ci:.0f}")
        cells.append(f"{lvl}: " + " ".join(vals))
    tau = sum(r.get("stats", {}).get("reweight_temperature", 0) for r in rs) / len(rs)
    print(f"{tag:12s} {task:8s} {arm:7s} n={len(rs)} τ={tau:.2f} | " + " | ".join(cells))
