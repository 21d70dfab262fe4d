import json, sys
tag = sys.argv[1] if len(sys.argv) > 1 else None
for l in open(__import__("pathlib").Path(__file__).resolve().parent / "runs.jsonl"):
    r = json.loads(l)
    if tag and not r["tag"].startswith(tag):
        continue
    acc = " ".join(f"{k}:" + "/".join(f"{v:.2f}" for v in d.values()) for k, d in r["acc"].items())
    st = r.get("stats", {})
    print(f"{r['tag']:10s} {r['task']:8s} {r['arm']:7s} s{r['seed']} L={r['loss']:.3f} {r['wall_s']:5.0f}s τ={st.get('reweight_temperature', 0):.2f} | {acc}")
