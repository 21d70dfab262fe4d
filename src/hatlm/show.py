"""`hatlm show`: pictures of what the thinker does on one prompt — a self-contained HTML page + PNGs.

    hatlm show CHECKPOINT_OR_PRESET "prompt" [--out DIR] [--think-iters N] [--rethink-every R]

Figures (PNG files in DIR, the same images inlined as base64 in DIR/index.html, which needs no
network and opens from file://):
  change.png     relative change ‖z_t − z_{t−1}‖/‖z_{t−1}‖ per iteration, with the halting threshold;
  reweight.png   per position and iteration: the gate a = sigmoid(gate(u)) times the relevance r
                 (the weight with which a position moves toward its update), and r alone;
  attention.png  the thinker's attention per iteration (rows) and layer/head (columns);
  thoughts.png   cosine similarity of each final thought vector to each prompt position's input
                 embedding; the page also lists each thought's nearest prompt tokens and vocabulary
                 items (cosine against the input embedding matrix);
  rethink.png    for generation with re-thinking: how far each re-think moved each thought slot, and
                 the thought vectors' path in their first two principal components.

How it is measured, without touching the model code: `model.think` runs as usual while hooks record
each thinker step's input/output (a wrapper around `thinker.step` on the instance), the gate's output
(a forward hook) and each thinker attention layer's input, from which the attention probabilities
are recomputed as softmax(q kᵀ/√d + mask) with the layer's own q/k projections and RoPE. Re-thinks
are re-run with `model.think` on the prompt plus the text generated up to each re-think.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from hatlm.errors import UserError

FIGURES = ("change", "reweight", "attention", "thoughts", "rethink")


@dataclass
class Trace:
    """What the thinker did on one prompt (batch of one)."""

    ids: list[int]
    labels: list[str]  # one per position: prompt tokens, then "T1".."Tm"
    n: int  # prompt length
    m: int  # thought slots
    threshold: float
    changes: list[float] = field(default_factory=list)  # per iteration
    gate: list[Tensor] = field(default_factory=list)  # per iteration [N] (a, before relevance)
    relevance: list[Tensor] = field(default_factory=list)  # per iteration [N] (empty without re-weighting)
    attention: list[list[Tensor]] = field(default_factory=list)  # per iteration, per layer [H, N, N]
    z: list[Tensor] = field(default_factory=list)  # z_0 .. z_T, each [N, d]


def token_label(tok: Any, i: int) -> str:
    """A short printable label of one token id."""
    if i == tok.bos_id:
        return "<s>"
    if i == tok.eos_id:
        return "</s>"
    sp = getattr(tok, "sp", None)
    # Spaces made visible: SentencePiece's word-start mark as a middle dot, a byte space as an open box.
    s = sp.id_to_piece(i).replace("\u2581", "\u00b7") if sp is not None else tok.decode([i]).replace(" ", "\u2423")
    if not s or "\ufffd" in s or not s.isprintable():
        s = s.encode("unicode_escape").decode("ascii") if s and "\ufffd" not in s else f"<{i}>"
    return s


def attention_probs(attn: Any, x: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor,
                    score_bias: Tensor | None = None) -> Tensor:  # fmt: skip
    """softmax(q kᵀ/√d + bias + mask) of an Attention module for its input x [B, T, d] → [B, H, T, T]."""
    try:
        from hatlm.layers import apply_rope
    except ImportError:  # before the layers/model split
        from hatlm.model import apply_rope

    B, T, _ = x.shape
    q = attn.q_proj(x).view(B, T, attn.n_heads, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(B, T, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
    cos, sin = rope
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k = k.repeat_interleave(attn.n_heads // attn.n_kv_heads, dim=1)  # GQA: each query head's KV group
    scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(attn.head_dim)
    if score_bias is not None:
        scores = scores + score_bias.float()
    if mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, float("-inf"))
    else:
        scores = scores + mask.float()
    return torch.softmax(scores, dim=-1)


@torch.no_grad()
def trace_thinking(model: Any, tok: Any, prompt_ids: list[int], think_iters: int | None = None,
                   halting_threshold: float | None = None) -> Trace:  # fmt: skip
    """Run `model.think` on one prompt and record every iteration (see the module docstring)."""
    if model.arm != "hybrid":
        raise UserError(f"hatlm show needs the hybrid arm (it draws the thinker); this model is the {model.arm!r} arm")
    thinker = model.thinker
    m = model.config.num_thought_slots
    n = len(prompt_ids)
    eps = model.config.hybrid.halting_threshold if halting_threshold is None else float(halting_threshold)
    labels = [token_label(tok, i) for i in prompt_ids] + [f"T{j + 1}" for j in range(m)]
    trace = Trace(list(prompt_ids), labels, n, m, eps)
    current: dict[str, list] = {"attn": [], "gate": []}

    def pre_attn(mod, args):
        x, rope, mask = args[0], args[1], args[2]
        bias = args[5] if len(args) > 5 else None
        current["attn"].append(attention_probs(mod, x, rope, mask, bias)[0].cpu())

    def gate_out(mod, args, out):
        current["gate"].append(torch.sigmoid(out.float())[0, :, 0].cpu())

    orig_step = thinker.step

    def step(z, e0, rope, mask, valid, focus=None):
        current["attn"], current["gate"] = [], []
        out = orig_step(z, e0, rope, mask, valid, focus)
        v = valid[0]
        num = (out[0][v] - z[0][v]).float().norm()
        den = z[0][v].float().norm().clamp(min=1e-12)
        if not trace.z:
            trace.z.append(z[0].float().cpu())
        trace.z.append(out[0].float().cpu())
        trace.changes.append(float(num / den))
        trace.attention.append(current["attn"])
        if current["gate"]:
            trace.gate.append(current["gate"][-1])
        if thinker.use_reweight or thinker.use_reweight_attention:
            trace.relevance.append(thinker.relevance(z, valid, focus)[0].float().cpu())
        return out

    handles = [layer.self_attn.register_forward_pre_hook(pre_attn) for layer in thinker.layers]
    if thinker.gate is not None:
        handles.append(thinker.gate.register_forward_hook(gate_out))
    backend = model.config.attn_backend
    model.config.attn_backend = "sdpa"  # a boolean mask we can read (FlexAttention's BlockMask is opaque)
    thinker.step = step  # instance attribute: shadows the method for this call only
    was_training = model.training
    model.eval()
    try:
        ids = torch.tensor([prompt_ids], device=model.device)
        model.think(ids, torch.tensor([n], device=model.device), think_iters, halting_threshold)
    finally:
        del thinker.step
        model.config.attn_backend = backend
        for h in handles:
            h.remove()
        model.train(was_training)
    return trace


def nearest(trace: Trace, model: Any, tok: Any, k: int = 5) -> list[dict[str, Any]]:
    """Per final thought vector: the nearest prompt tokens and vocabulary items by cosine similarity."""
    emb = model.decoder.embed_tokens.weight.detach().float().cpu()
    z = trace.z[-1]
    thoughts = F.normalize(z[trace.n : trace.n + trace.m], dim=-1)
    prompt_sim = thoughts @ F.normalize(emb[trace.ids], dim=-1).T  # [m, n]
    vocab_sim = thoughts @ F.normalize(emb, dim=-1).T  # [m, V]
    out = []
    for j in range(trace.m):
        ps = prompt_sim[j].topk(min(k, trace.n))
        vs = vocab_sim[j].topk(min(k, emb.shape[0]))
        out.append({
            "thought": j + 1,
            "prompt": [(int(p), trace.labels[int(p)], float(s)) for s, p in zip(ps.values, ps.indices)],
            "vocab": [(int(i), token_label(tok, int(i)), float(s)) for s, i in zip(vs.values, vs.indices)],
        })  # fmt: skip
    return out


@torch.no_grad()
def rethink_path(model: Any, tok: Any, prompt_ids: list[int], rethink_every: int, max_new_tokens: int,
                 think_iters: int | None, halting_threshold: float | None) -> dict[str, Any]:  # fmt: skip
    """Generate greedily with re-thinking and re-run each think: thoughts [K+1, m, d] and their moves."""
    from hatlm.generate import generate

    res = generate(model, tok, [prompt_ids], max_new_tokens, temperature=0.0, rethink_every=rethink_every,
                   think_iters=think_iters, halting_threshold=halting_threshold)  # fmt: skip
    gen, st = res.tokens[0], res.stats[0]
    m = model.config.num_thought_slots
    points = [0] + [rethink_every * (k + 1) for k in range(st["rethinks"])]
    thoughts = []
    for p in points:
        seq = prompt_ids + gen[:p]
        ids = torch.tensor([seq], device=model.device)
        th = model.think(ids, torch.tensor([len(seq)], device=model.device), think_iters, halting_threshold)
        thoughts.append(th.thoughts(m)[0].float().cpu())
    t = torch.stack(thoughts)  # [K+1, m, d]
    per_slot = [((t[k] - t[k - 1]).norm(dim=-1) / t[k - 1].norm(dim=-1).clamp(min=1e-30)).tolist()
                for k in range(1, len(t))]  # fmt: skip
    overall = [float((t[k] - t[k - 1]).norm() / t[k - 1].norm().clamp(min=1e-30)) for k in range(1, len(t))]
    return {"text": res.texts[0], "tokens": gen, "points": points, "thoughts": t, "per_slot": per_slot,
            "shifts": overall, "reported_shifts": list(st["thought_shifts"])}  # fmt: skip


# ------------------------------------------------------------------------------------ figures


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def _safe(labels: list[str]) -> list[str]:
    return [s.replace("$", r"\$") for s in labels]  # matplotlib would read $…$ as math


def figures(trace: Trace, near: list[dict[str, Any]], rethink: dict[str, Any] | None) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: dict[str, bytes] = {}
    T, N = len(trace.changes), trace.n + trace.m
    labels = _safe(trace.labels)

    fig, ax = plt.subplots(figsize=(6, 3.2))
    if T:
        ax.plot(range(1, T + 1), trace.changes, "o-", label="relative change")
        ax.set_yscale("log")
    if trace.threshold > 0:
        ax.axhline(trace.threshold, color="C3", ls="--", label=f"halting threshold {trace.threshold:g}")
    else:
        ax.text(0.98, 0.95, "halting disabled (threshold 0)", ha="right", va="top", transform=ax.transAxes)
    ax.set_xlabel("thinking iteration")
    ax.set_ylabel("‖z_t − z_{t−1}‖ / ‖z_{t−1}‖")
    ax.set_xticks(range(1, max(T, 1) + 1))
    ax.legend(loc="lower left", fontsize=8)
    out["change"] = _png(fig)

    rows = [("gate × relevance" if trace.relevance else "gate a", None)]
    if trace.relevance:
        rows.append(("relevance r", None))
    fig, axes = plt.subplots(
        len(rows), 1, figsize=(max(6, 0.35 * N), 1.6 + 0.55 * T * len(rows)), squeeze=False, layout="constrained"
    )
    mats = []
    if T:
        g = torch.stack(trace.gate)
        r = torch.stack(trace.relevance) if trace.relevance else None
        mats.append(g * r if r is not None else g)
        if r is not None:
            mats.append(r)
    for ax, (title, _), mat in zip(axes[:, 0], rows, mats or [torch.zeros(1, N)] * len(rows)):
        im = ax.imshow(mat.numpy(), aspect="auto", cmap="viridis")
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("iteration")
        ax.set_yticks(range(mat.shape[0]), [str(i + 1) for i in range(mat.shape[0])])
        ax.set_xticks(range(N), labels, rotation=90, fontsize=7)
        ax.axvline(trace.n - 0.5, color="w", lw=1)
        fig.colorbar(im, ax=ax, fraction=0.03)
    out["reweight"] = _png(fig)

    L = len(trace.attention[0]) if T else 0
    H = trace.attention[0][0].shape[0] if L else 0
    cols = max(L * H, 1)
    fig, axes = plt.subplots(max(T, 1), cols, figsize=(1.9 * cols + 0.5, 1.9 * max(T, 1) + 0.5), squeeze=False)
    for t in range(T):
        for li in range(L):
            for h in range(H):
                ax = axes[t, li * H + h]
                ax.imshow(trace.attention[t][li][h].numpy(), cmap="magma", vmin=0)
                ax.set_xticks([])
                ax.set_yticks([])
                if t == 0:
                    ax.set_title(f"layer {li + 1} head {h + 1}", fontsize=7)
                if li == 0 and h == 0:
                    ax.set_ylabel(f"iter {t + 1}", fontsize=8)
    fig.suptitle("thinker attention (query rows × key columns; last m = thoughts)", fontsize=9)
    out["attention"] = _png(fig)

    z = trace.z[-1]
    th = F.normalize(z[trace.n : trace.n + trace.m], dim=-1)
    pr = F.normalize(trace.z[0][: trace.n], dim=-1)
    fig, ax = plt.subplots(figsize=(max(5, 0.35 * trace.n + 1.5), 0.35 * trace.m + 1.5))
    im = ax.imshow((th @ pr.T).numpy(), cmap="coolwarm", vmin=-1, vmax=1, aspect="auto")
    ax.set_xticks(range(trace.n), labels[: trace.n], rotation=90, fontsize=7)
    ax.set_yticks(range(trace.m), labels[trace.n :], fontsize=7)
    ax.set_title("cosine: final thoughts × prompt positions (before thinking)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.03)
    out["thoughts"] = _png(fig)

    if rethink is not None:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.8), layout="constrained")
        ps = rethink["per_slot"]
        if ps:
            mat = torch.tensor(ps)
            im = a1.imshow(mat.T.numpy(), aspect="auto", cmap="viridis")
            a1.set_xticks(range(len(ps)), [f"@{p}" for p in rethink["points"][1:]], fontsize=7)
            a1.set_yticks(range(mat.shape[1]), [f"T{j + 1}" for j in range(mat.shape[1])], fontsize=7)
            fig.colorbar(im, ax=a1, fraction=0.04)
        a1.set_title("relative move of each thought per re-think\n(@k: after k generated tokens)", fontsize=9)
        t = rethink["thoughts"]  # [K+1, m, d]
        flat = t.reshape(-1, t.shape[-1])
        centred = flat - flat.mean(0)
        if flat.shape[0] > 2:
            _, _, v = torch.pca_lowrank(centred, q=2, center=False)
            pts = (centred @ v[:, :2]).reshape(t.shape[0], t.shape[1], 2)
            for j in range(t.shape[1]):
                a2.plot(pts[:, j, 0], pts[:, j, 1], "-o", ms=3, label=f"T{j + 1}")
                a2.annotate("", xy=pts[-1, j].tolist(), xytext=pts[0, j].tolist(),
                            arrowprops=dict(arrowstyle="->", alpha=0.4))  # fmt: skip
        a2.set_title("thought vectors across re-thinks (first 2 principal components)", fontsize=9)
        a2.legend(fontsize=6, ncol=2)
        out["rethink"] = _png(fig)
    return out


# ------------------------------------------------------------------------------------ page

_CSS = """body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1200px;color:#222}
h1{font-size:1.4em}h2{font-size:1.1em;margin-top:1.6em;border-bottom:1px solid #ddd}
img{max-width:100%;border:1px solid #eee}table{border-collapse:collapse;font-size:.85em}
td,th{border:1px solid #ddd;padding:2px 6px;text-align:left}code{background:#f4f4f4;padding:0 3px}
.note{color:#666;font-size:.9em}"""

# Marks the page as rendered once every figure has decoded (the browser test reads #status).
_JS = """window.addEventListener('load',function(){var imgs=document.querySelectorAll('img.figure');
var ok=Array.prototype.every.call(imgs,function(i){return i.complete&&i.naturalWidth>0;});
var s=document.getElementById('status');s.textContent=ok?'rendered':'broken';
s.setAttribute('data-figures',String(imgs.length));});"""


def _esc(s: Any) -> str:
    return html.escape(str(s))


def render_html(info: dict[str, Any], trace: Trace, near: list[dict[str, Any]], pngs: dict[str, bytes],
                rethink: dict[str, Any] | None) -> str:  # fmt: skip
    def img(name: str, alt: str) -> str:
        data = base64.b64encode(pngs[name]).decode("ascii")
        return f'<img class="figure" id="fig-{name}" alt="{_esc(alt)}" src="data:image/png;base64,{data}">'

    rows = []
    for t in near:
        pr = ", ".join(f"<code>{_esc(lbl)}</code> ({s:+.2f})" for _, lbl, s in t["prompt"])
        vo = ", ".join(f"<code>{_esc(lbl)}</code> ({s:+.2f})" for _, lbl, s in t["vocab"])
        rows.append(f"<tr><td>T{t['thought']}</td><td>{pr}</td><td>{vo}</td></tr>")
    table = ("<table id=\"nearest\"><tr><th>thought</th><th>nearest prompt tokens (cosine)</th>"
             f"<th>nearest vocabulary items (cosine)</th></tr>{''.join(rows)}</table>")  # fmt: skip
    meta = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in info.items())
    if rethink is not None:
        shifts = ", ".join(f"{s:.4f}" for s in rethink["shifts"]) or "none (generation ended first)"
        rethink_html = (f"<p>Generated: <code>{_esc(rethink['text'])}</code></p><p>Relative move of all thoughts "
                        f"at each re-think: {shifts}</p>" + (img("rethink", "re-think moves") if "rethink" in pngs
                                                              else ""))  # fmt: skip
    else:
        rethink_html = '<p class="note">Run with <code>--rethink-every R</code> to see re-thinking in generation.</p>'
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>hatlm show: {_esc(info["prompt"])[:60]}</title>
<style>{_CSS}</style></head><body>
<h1>What the thinker did</h1>
<table id="meta">{meta}</table>
<p>Status: <span id="status">loading</span></p>
<section id="change"><h2>Relative change per iteration</h2>{img("change", "relative change per iteration")}
<p class="note">The thinker stops early once the change falls below the halting threshold (if one is set).</p>
</section>
<section id="reweight"><h2>Re-weighting of each position per iteration</h2>{img("reweight", "re-weighting")}
<p class="note">How strongly each position moved toward its update: gate a = sigmoid(gate(u)) times the cosine
relevance r (r &gt; 1: agrees with the context). The white line separates the prompt from the thought slots.</p>
</section>
<section id="attention"><h2>Thinker attention per iteration and head</h2>{img("attention", "attention")}</section>
<section id="thoughts"><h2>Thought vectors</h2>{img("thoughts", "thoughts vs prompt")}{table}</section>
<section id="rethink"><h2>Re-thinking during generation</h2>{rethink_html}</section>
<script>{_JS}</script>
</body></html>
"""


def show(model: Any, tok: Any, prompt: str, out: str | Path, think_iters: int | None = None,
         halting_threshold: float | None = None, rethink_every: int | None = None, max_new_tokens: int = 32,
         model_name: str = "") -> Path:  # fmt: skip
    """Write DIR/index.html, the PNGs and DIR/show.json for `prompt`; returns the page's path."""
    if not prompt.strip():
        raise UserError("the prompt is empty; give some text for the thinker to think over")
    ids = tok.encode(prompt, bos=True)
    m = model.config.num_thought_slots
    if len(ids) + m + (max_new_tokens if rethink_every else 0) > model.config.max_position_embeddings:
        ctx = model.config.max_position_embeddings
        raise UserError(f"prompt of {len(ids)} tokens (+{m} slots) is too long for the model's {ctx} positions")
    if rethink_every is not None and rethink_every < 1:
        raise UserError(f"--rethink-every must be >= 1; got {rethink_every}")
    trace = trace_thinking(model, tok, ids, think_iters, halting_threshold)
    near = nearest(trace, model, tok)
    rethink = None
    if rethink_every is not None:
        rethink = rethink_path(model, tok, ids, rethink_every, max_new_tokens, think_iters, halting_threshold)
    pngs = figures(trace, near, rethink)
    folder = Path(out).expanduser()
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--out {folder}: exists and is not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in pngs.items():
        (folder / f"{name}.png").write_bytes(data)
    info = {"model": model_name, "arm": model.arm, "prompt": prompt, "prompt tokens": len(ids), "thought slots": m,
            "iterations": len(trace.changes), "final change": f"{trace.changes[-1]:.4g}" if trace.changes else "-",
            "halting threshold": trace.threshold}  # fmt: skip
    page = folder / "index.html"
    page.write_text(render_html(info, trace, near, pngs, rethink), encoding="utf-8")
    data = {"info": info, "labels": trace.labels, "changes": trace.changes,
            "gate": [g.tolist() for g in trace.gate], "relevance": [r.tolist() for r in trace.relevance],
            "nearest": near}  # fmt: skip
    if rethink is not None:
        data["rethink"] = {k: v for k, v in rethink.items() if k != "thoughts"}
    (folder / "show.json").write_text(json.dumps(data, indent=1) + "\n")
    return page


SHOW_ARMS = ("hybrid",)  # the arms `hatlm show` can draw (it traces the hybrid's thinker)


def compare_show_pages(out: Path, runs: list[dict[str, Any]], predictions: dict[str, list[dict[str, Any]]],
                     evals: list[str], k: int, say: Callable[[str], None]) -> list[dict[str, Any]]:
    """`hatlm show` pages of the first `k` greedy-evaluated examples of the first prompt/answer eval
    file, one per arm that `show` can draw (the first seed's model), in OUT/show/ARM-exampleN/.

    Returns one entry per example: its prompt and answer, every arm's prediction (first seed) and the
    pages' paths relative to OUT, for results.md to link. Arms show cannot draw get no page: their
    predictions stand in the table next to the drawn arms'."""
    from hatlm.loader import load_model_and_tokenizer

    if not isinstance(k, int) or k < 0:
        raise UserError(f"--show-examples must be a non-negative integer; got {k!r}")
    first = {}
    for r in runs:  # the first seed of each arm
        first.setdefault(r["arm"], r)
    # The first eval file with greedy predictions (text files are scored by loss: no prompt to show).
    e = next((e for e in evals for a in first if predictions.get(f"{a}|{first[a]['seed']}|{e}")), None)
    if e is None:
        return []
    preds = {a: predictions.get(f"{a}|{r['seed']}|{e}", [])[:k] for a, r in first.items()}
    n = max(len(p) for p in preds.values())
    entries = [{"eval_file": e, "example": i, "prompt": next(p[i]["prompt"] for p in preds.values() if len(p) > i),
                "answer": next(p[i]["answer"] for p in preds.values() if len(p) > i),
                "predictions": {a: {"prediction": p[i]["prediction"], "correct": p[i]["correct"]}
                                for a, p in preds.items() if len(p) > i}, "pages": {}}
               for i in range(n)]
    for a in (a for a in first if a in SHOW_ARMS):
        model_dir = first[a].get("model_dir") or str(Path(first[a]["run_dir"]) / "model")
        model, tok = load_model_and_tokenizer(str(model_dir))
        model.eval()
        for ent in entries:
            rel = f"show/{a}-example{ent['example']}"
            try:
                show(model, tok, ent["prompt"], out / rel, model_name=f"{a} seed {first[a]['seed']} ({model_dir})")
            except UserError as err:  # e.g. a prompt too long for the model: the report says so, the rest goes on
                say(f"show page for {a} example {ent['example']} not written: {err}")
                continue
            ent["pages"][a] = f"{rel}/index.html"
    return entries


__all__ = ["Trace", "attention_probs", "compare_show_pages", "nearest", "rethink_path", "show", "trace_thinking"]
