"""Reports of `hatlm compare`: the Markdown table (results.md), the terminal table, the verdict in
words and the plots. Pure functions of compare's result dict (results.json): a report can be
re-rendered from a saved results.json without training anything.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from hatlm.util import atomic_write, atomic_write_text

THINKING_ARMS = ("hybrid", "looped")  # the arms with test-time thinking iterations
ARM_COLORS = {"causal": "tab:blue", "pause": "tab:orange", "hybrid": "tab:green", "looped": "tab:purple",
              "deep": "tab:brown"}


def _fmt_metric(metric: str, m: float, ci: float) -> str:
    if metric == "accuracy":
        return f"{100 * m:.1f} ± {100 * ci:.1f}" if not math.isnan(ci) else f"{100 * m:.1f}"
    return f"{m:.4f} ± {ci:.4f}" if not math.isnan(ci) else f"{m:.4f}"


def _fmt_flops(x: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= div:
            return f"{x / div:.2f} {unit}"
    return f"{x:.0f}"


def eval_set_sentence(info: dict[str, Any]) -> str:
    """Which examples the numbers of one eval file are on, and what was left out and why."""
    kept, total = info["n_kept"], info["n_total"]
    s = f"Scored on {info['n_scored']} of the {kept} examples kept"
    s += f" ({info['left_out']})" if info.get("left_out") else f" (all {total} of the file)"
    s += (f"; the learning curves (teacher-forced) on {info['n_curve']} of them, evenly spaced"
          if info["n_curve"] < kept else "; the learning curves (teacher-forced) on all of them")
    return s + ("; the chance floor on the scored ones." if info.get("metric") == "accuracy" else ".")


def render_markdown(res: dict[str, Any]) -> str:
    cfg = res["config"]
    arms, seeds = res["arms"], res["seeds"]
    lines = ["# hatlm compare", ""]
    lines.append(f"Training data: `{', '.join(cfg['data'])}`; {cfg['steps']} steps × batch {cfg['batch_size']}"
                 f"{' × ' + str(cfg['grad_accum']) if cfg['grad_accum'] > 1 else ''}, lr {cfg['lr']:g} "
                 f"(warm-up {cfg['warmup']}, cosine to {cfg['min_lr']:g}); seeds {', '.join(map(str, seeds))}; "
                 f"model `{cfg['init_from'] or cfg['preset']}` with "
                 f"{json.dumps(cfg['model']) if cfg['model'] else 'no overrides'}.")
    lines.append("Accuracy: greedy exact match in % (mean ± 95% CI half-width, Student t over seeds); "
                 "loss: per answer/continuation token. FLOPs per example at the training data's mean lengths.")
    lines.append("")
    for e, per_arm in res["summary"].items():
        if not per_arm:
            continue
        metric = next(iter(per_arm.values()))["metric"]
        lines.append(f"## `{e}`")
        lines.append("")
        if e in res.get("eval_sets", {}):
            lines += [eval_set_sentence(res["eval_sets"][e]), ""]
        ch = res["chance"].get(e)
        head = f"| arm | {metric} | per seed | params | train FLOPs/ex | inference FLOPs/ex | train time/run |"
        lines += [head, "| --- | ---: | --- | ---: | ---: | ---: | ---: |"]
        for a in arms:
            if a not in per_arm:
                continue
            s = per_arm[a]
            per_seed = ", ".join(f"{100 * v:.1f}" if metric == "accuracy" else f"{v:.3f}" for v in s["values"])
            flops = f"{_fmt_flops(s['train_flops_per_example'])} | {_fmt_flops(s['inference_flops_per_example'])}"
            lines.append(f"| {a} | {_fmt_metric(metric, s['mean'], s['ci95'])} | {per_seed} | {s['params']:,} | "
                         f"{flops} | {s['wall_time_s']:.0f} s |")
        if ch:
            lines.append(f"| *chance floor* | {100 * ch['accuracy']:.1f} | {ch['how']} | | | | |")
        lines.append("")
        sweep_key = f"{metric}_by_think_iters"
        swept = [a for a in THINKING_ARMS if a in per_arm and sweep_key in per_arm[a]]
        if swept:
            ts = list(per_arm[swept[0]][sweep_key])
            lines.append("With T thinking iterations at test time (hybrid: thinker iterations; looped: loop "
                         "iterations), inference FLOPs per example at each T:")
            lines.append("")
            lines.append("| arm (trained T) | " + " | ".join(f"T={t}" for t in ts) + " |")
            lines.append("| --- |" + " ---: |" * len(ts))
            for a in swept:
                sw = per_arm[a][sweep_key]
                trained = per_arm[a].get("think_iters_train")
                tr = f"{trained:g}" if isinstance(trained, (int, float)) else "?"
                lines.append(f"| {a} ({tr}) | " + " | ".join(_fmt_metric(metric, *sw[t]) for t in ts) + " |")
                fl = per_arm[a].get("inference_flops_by_think_iters", {})
                if fl:
                    lines.append(f"| {a} FLOPs/ex | " + " | ".join(_fmt_flops(fl[t]) for t in ts) + " |")
            lines.append("")
        halted = [a for a in THINKING_ARMS if a in per_arm and "halting" in per_arm[a]]
        if halted:
            hh = per_arm[halted[0]]["halting"]
            lines.append(f"Adaptive depth (halting: {hh['criterion']} < {hh['threshold']:g}, at most "
                         f"{hh['max_iters']} iterations): " + "; ".join(
                             f"{a} {_fmt_metric(metric, *per_arm[a]['halting']['accuracy'])} with "
                             f"{per_arm[a]['halting']['mean_iterations']:.2f} iterations per example on average"
                             for a in halted) + ".")
            lines.append("")
        lines += refine_rethink_lines(res, e)
        lines.append(_verdict_text(e, res))
        lines.append("")
    lines.append("## Verdict")
    lines.append("")
    lines.append(overall_statement(res))
    lines.append("")
    lines += show_pages_section(res.get("show_pages") or [])
    lines.append(f"Total wall time: {res['total_wall_time_s'] / 60:.1f} min. Plots: `learning_curves.png` (eval "
                 "metric, teacher-forced, against training step; dashed: chance floor), `think_iters.png`.")
    return "\n".join(lines) + "\n"


def _md_cell(text: str, limit: int = 80) -> str:
    """Text for one Markdown table cell: one line, pipes escaped, long text clipped."""
    t = " ".join(str(text).split()).replace("|", "\\|").replace("`", "'")
    return t if len(t) <= limit else t[: limit - 1] + "…"


def show_pages_section(entries: list[dict[str, Any]]) -> list[str]:
    """'## What the thinker does': the first examples, each arm's greedy prediction, links to `hatlm show` pages."""
    if not entries:
        return []
    arms = list(dict.fromkeys(a for ent in entries for a in ent["predictions"]))
    lines = ["## What the thinker does", "",
             f"The first {len(entries)} examples of `{entries[0]['eval_file']}`, each arm's greedy prediction (first "
             "seed; ✓ correct) and, for the arms `hatlm show` draws, a link to its page (the thinker's change per "
             "iteration, re-weighting, attention and nearest tokens of each thought).", "",
             "| # | prompt | answer | " + " | ".join(arms) + " |", "| --- | --- | --- |" + " --- |" * len(arms)]
    for ent in entries:
        cells = []
        for a in arms:
            p = ent["predictions"].get(a)
            cell = f"`{_md_cell(p['prediction'], 30)}` {'✓' if p['correct'] else '✗'}" if p else ""
            if a in ent["pages"]:
                cell += f" ([show]({ent['pages'][a]}))"
            cells.append(cell)
        lines.append(f"| {ent['example']} | `{_md_cell(ent['prompt'])}` | `{_md_cell(ent['answer'], 30)}` | "
                     + " | ".join(cells) + " |")
    return lines + [""]


def refine_rethink_lines(res: dict[str, Any], e: str) -> list[str]:
    """The table "effect of refinement / re-thinking" of eval file e (hybrid), or nothing: accuracy
    with each test-time setting (mean ± 95% CI over seeds) and its difference to the plain setting,
    paired per seed (mean ± 95% CI of the per-seed differences, in points)."""
    tt = res.get("test_time", {}).get(e)
    if not tt or not tt.get("settings"):
        return []
    n = len(tt["seeds"])
    lines = [f"Effect of refinement / re-thinking (hybrid, {n} seed{'s' * (n != 1)}; difference to plain paired "
             "per seed, in points; G: gradient steps on the thoughts, R: think again every R answer tokens):", "",
             "| setting | accuracy | per seed | Δ vs plain | Δ per seed |", "| --- | ---: | --- | ---: | --- |"]
    p = tt["plain"]
    lines.append(f"| plain | {_fmt_metric('accuracy', p['mean'], p['ci95'])} | "
                 f"{', '.join(f'{100 * v:.1f}' for v in p['values'])} | | |")
    for name, st in tt["settings"].items():
        o = st["options"]
        label = name + (f" (lr {o['refine_lr']:g}, {o['refine_objective']})" if "refine_lr" in o else "")
        d = f"{100 * st['diff_mean']:+.1f}" + (f" ± {100 * st['diff_ci95']:.1f}" if not math.isnan(st["diff_ci95"])
                                                else "")
        lines.append(f"| {label} | {_fmt_metric('accuracy', st['mean'], st['ci95'])} | "
                     f"{', '.join(f'{100 * v:.1f}' for v in st['values'])} | {d} | "
                     f"{', '.join(f'{100 * v:+.1f}' for v in st['diffs'])} |")
    return [*lines, ""]


def _verdict_text(e: str, res: dict[str, Any]) -> str:
    v = res["verdict"]["per_eval"].get(e)
    if not v:
        return ""
    s = res["summary"][e]
    best = v["best"]
    metric = v["metric"]
    parts = []
    if "learned" in v:
        learned = [a for a, ok in v["learned"].items() if ok]
        if not learned:
            parts.append("**No arm learned**: no arm's accuracy is above the chance floor beyond its CI.")
            return " ".join(parts)
        not_l = [a for a in s if a not in learned]
        parts.append(f"Above the chance floor (CI clear of it): {', '.join(learned)}"
                     + (f"; not clearly above it (CI reaches the floor): {', '.join(not_l)}." if not_l else "."))
    others = []
    for a, sep in v["separated_from"].items():
        if sep is None:
            others.append(f"{a} (one seed: no CI)")
        elif sep:
            others.append(f"{a} (CIs separate)")
        else:
            others.append(f"{a} (within the CIs: not a reliable difference)")
    if best == "tie":
        parts.append(f"Every arm scores the same ({_fmt_metric(metric, s[v['ranking'][0]]['mean'], float('nan'))}): "
                     "no arm won.")
        return " ".join(parts)
    word = "highest accuracy" if metric == "accuracy" else "lowest loss"
    parts.append(f"**{best}** has the {word} ({_fmt_metric(metric, s[best]['mean'], s[best]['ci95'])}); "
                 f"against {', '.join(others)}.")
    return " ".join(parts)


def overall_statement(res: dict[str, Any]) -> str:
    v = res["verdict"]
    if v["no_arm_learned"]:
        return ("No arm learned: on every eval file every arm stayed at the chance floor (within its CI), so "
                "this run says nothing about whether thinking helps; train longer, on an easier level, or larger.")
    parts = []
    wins = {a: n for a, n in v["wins"].items() if a != "tie"}
    parts.append("Best arm per eval file: " + ", ".join(
        f"`{e}`: {x['best'] if x['best'] != 'tie' else 'none (all arms equal)'}" for e, x in v["per_eval"].items())
        + ".")
    floor_only = [e for e, x in v["per_eval"].items() if "learned" in x and not any(x["learned"].values())]
    if floor_only:
        parts.append("No arm learned (all at the chance floor) on: " + ", ".join(f"`{e}`" for e in floor_only) + ".")
    if len(wins) == 1 and "tie" not in v["wins"]:
        parts.append(f"{next(iter(wins))} is best on every eval file.")
    # The question the tool exists for: hybrid against pause (extra positions without thinking).
    hp = []
    for e, s in res["summary"].items():
        if "hybrid" in s and "pause" in s:
            h, p = s["hybrid"], s["pause"]
            better_high = h["metric"] == "accuracy"
            diff = h["mean"] - p["mean"]
            win = diff > 0 if better_high else diff < 0
            if math.isnan(h["ci95"]) or math.isnan(p["ci95"]):
                sig = "one seed, no CI"
            else:
                overlap = not (h["mean"] - h["ci95"] > p["mean"] + p["ci95"] or
                               p["mean"] - p["ci95"] > h["mean"] + h["ci95"])
                sig = "within the CIs" if overlap else "CIs separate"
            word = "ties with" if diff == 0 else ("beats" if win else "does not beat")
            hp.append(f"`{e}`: hybrid {word} pause ({sig})")
    if hp:
        parts.append("Hybrid vs pause (thinking vs merely extra positions): " + "; ".join(hp) + ".")
    return " ".join(parts)


def make_plots(res: dict[str, Any], out: Path) -> list[Path]:
    """learning_curves.png and (when the hybrid was swept) think_iters.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = ARM_COLORS
    evals = list(res["summary"])
    arms = res["arms"]
    paths = []
    fig, axes = plt.subplots(1, len(evals) + 1, figsize=(4.2 * (len(evals) + 1), 3.4), squeeze=False)
    for j, e in enumerate(evals):
        ax = axes[0, j]
        metric = "accuracy"
        for a in arms:
            runs = [c for c in res["curves"].values() if c["arm"] == a and e in c["eval"]]
            if not runs:
                continue
            steps = [p[0] for p in runs[0]["eval"][e]]
            vals = np.array([[p[1] for p in c["eval"][e]] for c in runs if len(c["eval"][e]) == len(steps)])
            summ = res["summary"][e].get(a)
            metric = summ["metric"] if summ else metric
            scale = 100 if metric == "accuracy" else 1
            ax.plot(steps, scale * vals.mean(0), color=colors.get(a), label=a)
            if len(vals) > 1:
                ax.fill_between(steps, scale * vals.min(0), scale * vals.max(0), color=colors.get(a), alpha=0.2)
        _finish_axes(ax, res, e, metric, j == 0, "step", "accuracy % (teacher-forced)")
    ax = axes[0, -1]
    for a in arms:
        runs = [c for c in res["curves"].values() if c["arm"] == a and c["train_loss"]]
        if not runs:
            continue
        n = min(len(c["train_loss"]) for c in runs)
        steps = np.array([p[0] for p in runs[0]["train_loss"][:n]])
        vals = np.array([[p[1] for p in c["train_loss"][:n]] for c in runs]).mean(0)
        k = max(1, n // 50)  # moving average: per-step losses are noisy
        sm = np.convolve(vals, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1 :], sm, color=colors.get(a), label=a)
    ax.set_title("training loss (mean over seeds)", fontsize=9)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    paths.append(_save_fig(fig, out / "learning_curves.png"))

    sweep = [e for e, s in res["summary"].items()
             if any(a in s and f"{s[a]['metric']}_by_think_iters" in s[a] for a in THINKING_ARMS)]
    if sweep:
        fig, axes = plt.subplots(1, len(sweep), figsize=(4.2 * len(sweep), 3.4), squeeze=False)
        for j, e in enumerate(sweep):
            ax = axes[0, j]
            metric = next(iter(res["summary"][e].values()))["metric"]
            scale = 100 if metric == "accuracy" else 1
            for a in THINKING_ARMS:
                h = res["summary"][e].get(a)
                if not h or f"{metric}_by_think_iters" not in h:
                    continue
                sw = h[f"{metric}_by_think_iters"]
                ts = [int(t) for t in sw]
                ms = np.array([m for m, _ in sw.values()])
                cis = np.array([0.0 if math.isnan(c) else c for _, c in sw.values()])
                ax.errorbar(ts, scale * ms, yerr=scale * cis, color=colors[a], marker="o", capsize=3, label=a)
            for a in ("causal", "pause", "deep"):
                if a in res["summary"][e]:
                    ax.axhline(scale * res["summary"][e][a]["mean"], color=colors[a], ls=":", label=a)
            ax.set_xscale("log", base=2)
            ax.set_xticks(ts, [str(t) for t in ts])
            _finish_axes(ax, res, e, metric, j == 0, "thinking iterations at test time", "accuracy %")
        paths.append(_save_fig(fig, out / "think_iters.png"))
    return paths


def _finish_axes(ax, res: dict[str, Any], e: str, metric: str, legend: bool, xlabel: str, acc_label: str) -> None:
    """The chance floor, labels, limits and title every panel of one eval file shares."""
    if e in res["chance"]:
        ax.axhline(100 * res["chance"][e]["accuracy"], color="gray", ls="--", label="chance")
    if metric == "accuracy":
        ax.set_ylim(-3, 103)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(acc_label if metric == "accuracy" else "loss / token")
    ax.set_title(Path(e).name if not e.startswith("task:") else e, fontsize=9)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=8)


def _save_fig(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    # Atomic: a viewer never shows half a plot (the temporary keeps the .png suffix for matplotlib).
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110))
    plt.close(fig)
    return path


def print_table(res: dict[str, Any], file=None) -> None:
    """The results table in the terminal (plain text)."""
    file = file or sys.stdout
    for e, per_arm in res["summary"].items():
        if not per_arm:
            continue
        metric = next(iter(per_arm.values()))["metric"]
        print(f"\n{e}", file=file)
        info = res.get("eval_sets", {}).get(e)
        if info and info.get("left_out"):
            print(f"  {info['left_out']}; every metric is on the {info['n_kept']} kept", file=file)
        print(f"  {'arm':<8} {metric + ' (95% CI)':>22} {'params':>10} {'train FLOPs/ex':>15} {'infer FLOPs/ex':>15}",
              file=file)
        for a, s in per_arm.items():
            print(f"  {a:<8} {_fmt_metric(metric, s['mean'], s['ci95']):>22} {s['params']:>10,} "
                  f"{_fmt_flops(s['train_flops_per_example']):>15} {_fmt_flops(s['inference_flops_per_example']):>15}",
                  file=file)
        ch = res["chance"].get(e)
        if ch:
            print(f"  {'chance':<8} {100 * ch['accuracy']:>22.1f}", file=file)
        for a in THINKING_ARMS:
            sw = per_arm.get(a, {}).get(f"{metric}_by_think_iters")
            if sw:
                print(f"  {a} by test-time thinking iterations: " + ", ".join(
                    f"T={t}: {_fmt_metric(metric, m, ci)}" for t, (m, ci) in sw.items()), file=file)
        for name, st in res.get("test_time", {}).get(e, {}).get("settings", {}).items():
            print(f"  hybrid with {name}: {_fmt_metric('accuracy', st['mean'], st['ci95'])} "
                  f"({100 * st['diff_mean']:+.1f} ± {100 * st['diff_ci95']:.1f} points vs plain, paired)", file=file)
    print("\n" + overall_statement(res), file=file)


def write_report(res: dict[str, Any], out: str | Path) -> list[Path]:
    """results.md and the plots of a compare result into `out`; returns their paths."""
    out = Path(out)
    md = atomic_write_text(out / "results.md", render_markdown(res))
    plots = make_plots(res, out)
    res["plots"] = [str(p) for p in plots]
    return [md, *plots]
