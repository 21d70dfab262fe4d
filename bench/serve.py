"""Serving benchmark: `hatlm serve` under concurrent load against the same requests sent one at a time.

    .venv/bin/python bench/serve.py                       # prints the table, writes bench/results/serve.md
    .venv/bin/python bench/serve.py --model tiny --clients 16 --requests 8 --max-tokens 32 --no-write

The server runs in its own process (`python -m hatlm serve MODEL`, OMP_NUM_THREADS=--threads) on
127.0.0.1; clients are threads using the official `openai` client. The same list of greedy
completion requests (varied prompts) is sent twice: sequentially by one client (each request decoded
alone: the baseline), then by --clients clients with --requests each at once (the worker batches
whatever queued). Reported: requests/s and completion tokens/s of both, their ratio, and the mean
batch size the server reported. Every concurrent answer is checked to equal its sequential twin.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from hardware import cpu_name  # bench/hardware.py (this script's folder is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "serve.md"


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny", help="preset or checkpoint folder (default tiny)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=8, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the server (default 1)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    import openai
    import torch

    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(ROOT / "src"))
    cmd = [sys.executable, "-m", "hatlm", "serve", args.model, "--port", str(port), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise SystemExit(f"server did not start: {proc.stderr.read() if proc.stderr else ''}") from None
                time.sleep(0.2)
        base = f"http://127.0.0.1:{port}/v1"
        model_id = openai.OpenAI(base_url=base, api_key="x").models.list().data[0].id
        n = args.clients * args.requests
        words = ["alpha", "beta gamma", "the quick brown fox", "once upon a time", "42 is", "in the beginning"]
        prompts = [f"{words[i % len(words)]} {i}" for i in range(n)]

        def send(c, p: str):
            r = c.completions.create(model=model_id, prompt=p, max_tokens=args.max_tokens, temperature=0)
            return r.choices[0].text, r.usage.completion_tokens, r.model_extra["hatlm"]["batch_size"]

        c = openai.OpenAI(base_url=base, api_key="x", max_retries=0, timeout=600)
        send(c, "warm up")
        t0 = time.perf_counter()
        seq = [send(c, p) for p in prompts]
        t_seq = time.perf_counter() - t0

        def client(k: int):
            cc = openai.OpenAI(base_url=base, api_key="x", max_retries=0, timeout=600)
            return [send(cc, prompts[k * args.requests + j]) for j in range(args.requests)]

        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            conc = [r for chunk in pool.map(client, range(args.clients)) for r in chunk]
        t_conc = time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    mismatches = sum(a[0] != b[0] for a, b in zip(seq, conc))
    tok_seq, tok_conc = sum(r[1] for r in seq), sum(r[1] for r in conc)
    mean_batch = sum(r[2] for r in conc) / len(conc)
    import fastapi
    import uvicorn

    rows = [
        ("sequential (1 client)", n / t_seq, tok_seq / t_seq, 1.0),
        (f"concurrent ({args.clients} clients x {args.requests})", n / t_conc, tok_conc / t_conc, mean_batch),
    ]
    lines = [
        "# hatlm serve: concurrent vs sequential",
        "",
        f"Command: `python bench/serve.py --model {args.model} --clients {args.clients} --requests {args.requests} "
        f"--max-tokens {args.max_tokens} --threads {args.threads}`",
        "",
        f"Hardware: {cpu_name()}, {os.cpu_count()} logical CPUs (shared); server torch threads {args.threads}. "
        f"Versions: Python {platform.python_version()}, torch {torch.__version__}, fastapi {fastapi.__version__}, "
        f"uvicorn {uvicorn.__version__}, openai {openai.__version__}.",
        "",
        f"{n} greedy completion requests, max_tokens {args.max_tokens}, model {args.model}.",
        "",
        "| mode | requests/s | tokens/s | mean batch |",
        "|---|---:|---:|---:|",
        *[f"| {name} | {rps:.2f} | {tps:.1f} | {mb:.1f} |" for name, rps, tps, mb in rows],
        "",
        f"Ratio concurrent/sequential: requests/s x{rows[1][1] / rows[0][1]:.2f}, "
        f"tokens/s x{rows[1][2] / rows[0][2]:.2f}."
        f" Answers differing from their sequential twin: {mismatches} of {n}.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(text)
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
