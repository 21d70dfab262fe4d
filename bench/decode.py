"""Decode benchmark: hatlm's generation against Hugging Face `generate` on the same weights.

    .venv/bin/python bench/decode.py                 # prints the table, writes bench/results/decode.md
    .venv/bin/python bench/decode.py --repeats 3 --no-write

One random tiny Mistral (6 layers, hidden 256, 8 heads / 4 KV heads, vocab 32000), batch 1, a
32-token prompt, 128 new greedy tokens (EOS ignored so every run decodes exactly 128). Timed
alternately in one process, several repeats, median:

  * transformers `MistralForCausalLM.generate(do_sample=False)` on the copied weights;
  * hatlm causal arm (same weights, 6 decoder layers) through `hatlm.generate`;
  * hatlm hybrid arm (the same 6-layer decoder plus 2 thinker layers, 8 thought slots, 4 iterations):
    time to first token (thinking + prefill) and decode tokens/s after it;
  * the matrix-vector products of a decode step alone (every decoder weight and the LM head): the
    ceiling of any eager float32 engine here, since a batch-1 step must read every weight once.

Decode tokens/s counts the tokens after the first over the time after the first (prefill excluded),
for every engine alike. Achieved GB/s = bytes of weights read per decoded token (all decoder layers,
the final norm and the LM head; the embedding contributes one row) x tokens/s, against a measured
memory-copy bandwidth (read + write traffic) at the weights' size and at 256 MiB. Greedy tokens of
hatlm's causal path and of transformers are checked to be identical.

Threads: 1 by default. This machine's 2 cores are shared with other jobs; with 2 threads a parallel
region waits for whichever core is busy elsewhere and timings swing by 10x.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from hatlm.config import ModelConfig  # noqa: E402
from hatlm.generate import generate  # noqa: E402
from hatlm.model import HatLM  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "decode.md"


def make_config(arm: str) -> ModelConfig:
    return ModelConfig(
        vocab_size=32000,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        sliding_window=None,
        # The causal arm gets thinker_layers=0 so its decoder has the same 6 layers as the others
        # (the parameter-matched baseline of the experiments would have 8).
        hybrid=dict(arm=arm, thinker_layers=0 if arm == "causal" else 2, thought_slots=8, max_think_iters=4),
    )


def build_models(seed: int = 0):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    causal = HatLM(make_config("causal")).eval()
    hybrid = HatLM(make_config("hybrid")).eval()
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        # Random but not degenerate: perturb the thinker path so thinking does real work.
        for p in hybrid.thinker.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        # The hybrid speaks with the causal model's decoder (same per-token work).
        hybrid.decoder.load_state_dict(causal.decoder.state_dict())
        hybrid.lm_head.load_state_dict(causal.lm_head.state_dict())
    d = causal.config.to_hf_dict()
    d.pop("hatlm")
    hf = MistralForCausalLM(MistralConfig(**d)).eval()
    sd = {k.replace("decoder.", "model.", 1): v for k, v in causal.state_dict().items()}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    hf.generation_config.eos_token_id = None  # decode exactly max_new_tokens, like ignore_eos
    hf.generation_config.pad_token_id = 0
    return causal, hybrid, hf


class StepTimer:
    """Records when each new token appears (HF streamer protocol) → prefill and decode times."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def time_hf(hf, prompt: list[int], new: int) -> tuple[float, float, list[int]]:
    """(time to first token s, decode tokens/s after the first, tokens) for HF generate."""
    timer = StepTimer()
    ids = torch.tensor([prompt])
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                          streamer=timer)  # fmt: skip
    # The streamer is called once with the prompt, then once per new token.
    tok_times = timer.times[1:]
    assert len(tok_times) == new, len(tok_times)
    return tok_times[0] - t0, (new - 1) / (tok_times[-1] - tok_times[0]), out[0, len(prompt) :].tolist()


def time_hatlm(model, prompt: list[int], new: int) -> tuple[float, float, list[int]]:
    res = generate(model, None, [prompt], new, ignore_eos=True)
    s = res.stats[0]
    assert s["new_tokens"] == new
    return s["time_to_first_token_s"], s["tokens_per_s"], res.tokens[0]


def copy_bandwidth(nbytes: int, repeats: int = 7) -> float:
    """GB/s of read + write traffic when copying a float32 tensor of nbytes (median of several)."""
    x = torch.empty(nbytes // 4, dtype=torch.float32).fill_(1.0)
    y = x.clone()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        y.copy_(x)
        times.append(time.perf_counter() - t0)
    return 2 * x.numel() * 4 / statistics.median(times) / 1e9


def gemv_floor(model: HatLM, new: int) -> tuple[float, float, list[int]]:
    """Tokens/s if a decode step did nothing but its matrix-vector products (every decoder weight
    and the LM head, batch 1, float32): a ceiling for any eager engine on this CPU. Same return
    shape as the engines (time to first token is not applicable → 0)."""
    import torch.nn.functional as F

    ws = [m.weight for m in model.decoder.layers.modules() if isinstance(m, torch.nn.Linear)] + [model.lm_head.weight]
    xs = [torch.randn(1, w.shape[1]) for w in ws]
    with torch.inference_mode():
        t0 = time.perf_counter()
        for _ in range(new):
            for w, x in zip(ws, xs):
                F.linear(x, w)
        dt = time.perf_counter() - t0
    return 0.0, new / dt, []


def weight_bytes_per_token(model: HatLM) -> int:
    """Bytes of weights a decode step reads: decoder layers, final norm, LM head, one embedding row."""
    n = sum(p.numel() * p.element_size() for p in model.decoder.layers.parameters())
    n += sum(p.numel() * p.element_size() for p in model.decoder.norm.parameters())
    n += model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    return n + model.config.hidden_size * model.lm_head.weight.element_size()


def hardware() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "?")
    except (OSError, subprocess.CalledProcessError):
        model = platform.processor() or "?"
    return f"{model}, {os.cpu_count()} logical CPUs"


def measure(threads: int, repeats: int, prompt: list[int], new: int, models) -> tuple[str, str, str]:
    """One full measurement at a thread count → (markdown table, summary lines, a paragraph)."""
    torch.set_num_threads(threads)
    causal, hybrid, hf = models
    # Warm-up (first calls allocate and pick kernels), then check the outputs agree.
    _, _, hf_tokens = time_hf(hf, prompt, new)
    _, _, our_tokens = time_hatlm(causal, prompt, new)
    time_hatlm(hybrid, prompt, new)
    same = hf_tokens == our_tokens

    engines = {
        "hf": lambda: time_hf(hf, prompt, new),
        "causal": lambda: time_hatlm(causal, prompt, new),
        "hybrid": lambda: time_hatlm(hybrid, prompt, new),
        "floor": lambda: gemv_floor(causal, new),
    }
    wb = weight_bytes_per_token(causal)
    rows: dict[str, list[tuple[float, float]]] = {k: [] for k in engines}
    bws: list[float] = []
    for r in range(repeats):
        # Alternate the engines inside each repeat so that a change in machine load hits all of them.
        for name, fn in engines.items():
            ttft, tps, _ = fn()
            rows[name].append((ttft, tps))
        bws.append(copy_bandwidth(wb, repeats=3))  # the weights' size (it fits in L3, as the weights do)
        line = ", ".join(f"{k} {v[-1][1]:.1f} tok/s" for k, v in rows.items())
        print(f"threads {threads}, repeat {r + 1}/{repeats}: {line}, copy {bws[-1]:.1f} GB/s", file=sys.stderr)

    med = {k: (statistics.median(t for t, _ in v), statistics.median(s for _, s in v)) for k, v in rows.items()}
    bw = statistics.median(bws)
    bw_dram = copy_bandwidth(256 * 2**20)
    ratio = med["causal"][1] / med["hf"][1]
    hybrid_cost = med["causal"][1] / med["hybrid"][1]  # per-token decode time of hybrid / causal
    lines = [
        "| engine | time to first token (ms) | decode tokens/s | ratio vs transformers | achieved GB/s "
        "| % of copy bandwidth |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    labels = {
        "hf": "transformers `generate` (causal)",
        "causal": "hatlm causal",
        "hybrid": "hatlm hybrid (4 think iterations, 8 slots)",
        "floor": "matrix-vector products alone (ceiling)",
    }
    for k in ("hf", "causal", "hybrid", "floor"):
        ttft, tps = med[k]
        gbs = wb * tps / 1e9
        ttft_ms = "-" if k == "floor" else f"{ttft * 1e3:.1f}"
        lines.append(
            f"| {labels[k]} | {ttft_ms} | {tps:.1f} | {tps / med['hf'][1]:.2f}x | {gbs:.2f} | {100 * gbs / bw:.1f}% |"
        )
    spread = {k: (min(s for _, s in v), max(s for _, s in v)) for k, v in rows.items()}
    summary = (
        f"hatlm causal / transformers decode tokens/s: {ratio:.2f}x (target >= 3x)\n"
        f"hybrid per-token decode time / causal: {hybrid_cost:.3f} (target <= 1.10)\n"
        f"hatlm causal reaches {100 * med['causal'][1] / med['floor'][1]:.0f}% of the matrix-vector ceiling, "
        f"which is itself {med['floor'][1] / med['hf'][1]:.2f}x transformers\n"
        f"greedy tokens identical (hatlm causal vs transformers): {same}\n"
        f"weights read per token: {wb / 1e6:.1f} MB; copy bandwidth (read+write traffic, median over repeats) "
        f"at that size: {bw:.1f} GB/s, at 256 MiB (once, at the end): {bw_dram:.1f} GB/s\n"
        "decode tokens/s min..max over repeats: "
        + ", ".join(f"{k} {lo:.0f}..{hi:.0f}" for k, (lo, hi) in spread.items())
    )
    ceiling = med["floor"][1] / med["hf"][1]
    reading = (
        f"Reading the numbers: a batch-1 step must read all {wb / 1e6:.0f} MB of weights once; the matrix-vector "
        f"products alone run at {med['floor'][1]:.0f} tokens/s here, {ceiling:.2f}x transformers. "
        + (
            "So no eager float32 engine can reach 3x transformers under these conditions; "
            if ceiling < 3
            else "The 3x target is within the ceiling here; "
        )
        + f"hatlm's causal decode reaches {100 * med['causal'][1] / med['floor'][1]:.0f}% of that ceiling "
        "(the rest is the per-step work around the matrix products: norms, RoPE, cache writes, attention, "
        "token choice)."
    )
    return "\n".join(lines), summary + "\n", reading


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--threads", type=int, nargs="+", default=[1], help="torch thread counts to measure (default 1)")
    ap.add_argument("--no-write", action="store_true", help="do not write bench/results/decode.md")
    ap.add_argument("--note", default="", help="conditions to record with the results (e.g. machine load)")
    args = ap.parse_args(argv)
    import transformers

    models = build_models()
    g = torch.Generator().manual_seed(123)
    prompt = [1] + torch.randint(3, 32000, (args.prompt_len - 1,), generator=g).tolist()
    sections = []
    for threads in args.threads:
        t0 = time.strftime("%Y-%m-%d %H:%M:%S")
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        table, summary, reading = measure(threads, args.repeats, prompt, args.new_tokens, models)
        print(f"\n## torch threads: {threads}\n{table}\n{summary}{reading}")
        sections.append(
            f"## torch threads: {threads}\n\nStarted {t0}, 1-minute load average {load:.2f} on "
            f"{os.cpu_count()} CPUs.\n\n{table}\n\n```\n{summary}```\n\n{reading}\n"
        )
    if not args.no_write:
        cmd = " ".join(["python", "bench/decode.py", *(argv if argv is not None else sys.argv[1:])])
        text = "\n".join(
            [
                "# Decode benchmark (`bench/decode.py`)\n",
                f"Command: `{cmd}`\n",
                f"- Hardware: {hardware()}",
                f"- torch {torch.__version__}, transformers {transformers.__version__}, "
                f"Python {platform.python_version()}",
                "- Model: random Mistral, 6 layers, hidden 256, intermediate 768, 8 heads / 4 KV heads, "
                "vocab 32000, float32; the hybrid adds 2 thinker layers, 8 thought slots, 4 thinking iterations.",
                f"- Batch 1, {args.prompt_len}-token prompt, {args.new_tokens} new greedy tokens (EOS ignored), "
                f"median of {args.repeats} repeats, engines alternated within each repeat. Decode tokens/s "
                "excludes the first token (prefill).",
                *([f"- Conditions: {args.note}"] if args.note else []),
                "",
                *sections,
            ]
        )
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        # Atomic write: a temp file in the same folder, then rename over the old results.
        fd, tmp = tempfile.mkstemp(dir=RESULTS.parent, prefix=".decode.", suffix=".md")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, RESULTS)
        print(f"wrote {RESULTS}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
