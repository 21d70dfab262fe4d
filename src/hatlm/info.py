"""`hatlm info PATH_OR_PRESET`: parameter counts and memory estimates, without loading weights.

The model is built on the meta device (shapes only, no storage), so `hatlm info mistral-7b` costs
milliseconds and no memory; for a checkpoint folder only config.json is read.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from hatlm.config import ARMS, PRESETS, ModelConfig
from hatlm.errors import UserError

BYTES = {"fp32": 4, "bf16": 2}


def resolve_config(source: str | Path, **overrides: Any) -> tuple[ModelConfig, str]:
    """The config of a preset name or a checkpoint folder (config.json only), and which it was."""
    if isinstance(source, str) and source in PRESETS:
        return ModelConfig.from_name(source, **overrides), "preset"
    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(f"{source!r} is neither a preset ({', '.join(PRESETS)}) nor an existing checkpoint folder")
    from hatlm.checkpoint import apply_overrides, read_config

    config, plain = read_config(path)
    return apply_overrides(config, plain, overrides), "folder"


def describe(source: str | Path, **overrides: Any) -> dict[str, Any]:
    """Parameter counts and memory estimates (bytes) for a preset or checkpoint folder."""
    from hatlm.model import HatLM

    config, kind = resolve_config(source, **overrides)
    with torch.device("meta"):  # shapes only: nothing is allocated, even for 7B
        params = HatLM(config).num_parameters()
    kv_per_token_elems = 2 * config.decoder_layers * config.num_key_value_heads * config.head_dim  # keys + values
    return {
        "source": str(source),
        "kind": kind,
        "arm": config.arm,
        "config": {
            "decoder_layers": config.decoder_layers,
            "thinker_layers": config.hybrid.thinker_layers if config.arm == "hybrid" else 0,
            "thought_slots": config.num_thought_slots,
            "hidden_size": config.hidden_size,
            "intermediate_size": config.intermediate_size,
            "num_attention_heads": config.num_attention_heads,
            "num_key_value_heads": config.num_key_value_heads,
            "head_dim": config.head_dim,
            "vocab_size": config.vocab_size,
            "sliding_window": config.sliding_window,
            "tie_word_embeddings": config.tie_word_embeddings,
        },
        "parameters": params,
        "weights_bytes": {k: params["total"] * b for k, b in BYTES.items()},
        "kv_cache_bytes_per_token": {k: kv_per_token_elems * b for k, b in BYTES.items()},
    }


def _size(n: int) -> str:
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            return f"{n / div:,.2f} {unit}"
    return f"{n} B"


def format_table(info: dict[str, Any]) -> str:
    c, p = info["config"], info["parameters"]
    thinker = f" + {c['thinker_layers']} thinker layers" if c["thinker_layers"] else ""
    slots = f", {c['thought_slots']} thought slots" if c["thought_slots"] else ""
    rows: list[tuple[str, str]] = [
        ("parameters", ""),
        ("  backbone (decoder + LM head)", f"{p['backbone']:,}"),
        ("  thinker", f"{p['thinker']:,}"),
        ("  thought slots + prompt refinement", f"{p['slots_and_gates']:,}"),
        ("  total", f"{p['total']:,}"),
        ("weights", ""),
        *((f"  {k}", f"{_size(v)}  ({v:,} B)") for k, v in info["weights_bytes"].items()),
        (f"KV cache per token ({c['decoder_layers']} decoder layers)", ""),
        *((f"  {k}", f"{_size(v)}  ({v:,} B)") for k, v in info["kv_cache_bytes_per_token"].items()),
    ]
    width = max(len(a) for a, _ in rows) + 2
    head = [
        f"{info['source']} ({info['kind']}, {info['arm']} arm)",
        f"  {c['decoder_layers']} decoder layers{thinker}, hidden {c['hidden_size']}, intermediate "
        f"{c['intermediate_size']}, {c['num_attention_heads']} heads / {c['num_key_value_heads']} KV heads "
        f"(head dim {c['head_dim']}), vocab {c['vocab_size']}, sliding window {c['sliding_window']}"
        f"{', tied embeddings' if c['tie_word_embeddings'] else ''}{slots}",
    ]
    body = [f"{a:<{width}}{b}" if b else a for a, b in rows]
    return "\n".join(head + body)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source", metavar="PATH_OR_PRESET", help=f"a checkpoint folder or a preset ({', '.join(PRESETS)})"
    )
    parser.add_argument("--arm", choices=ARMS, help="count for this arm instead of the configured one")
    parser.add_argument("--thinker-layers", type=int, metavar="K", help="override the thinker depth K")
    parser.add_argument("--thought-slots", type=int, metavar="M", help="override the number of thought slots m")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    plan = parser.add_argument_group("training memory plan (--plan)")
    plan.add_argument(
        "--plan",
        action="store_true",
        help="per-GPU training memory: full fine-tune / LoRA x GPUs x activation checkpointing",
    )
    plan.add_argument("--seq-len", type=int, default=2048, help="tokens per training sequence (default 2048)")
    plan.add_argument("--batch", type=int, default=1, help="sequences per GPU (default 1)")
    plan.add_argument("--lora-r", type=int, default=16, help="LoRA rank (default 16)")
    plan.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 8], help="GPU counts (default 1 2 8)")
    plan.add_argument("--prompt-len", type=int, default=None, help="prompt tokens the thinker sees (default seq/4)")
    plan.add_argument("--think-iters", type=int, default=None, metavar="T", help="thinking iterations (default T_max)")
    plan.add_argument("--gpu-gib", type=float, default=80.0, help="GPU memory for the 'fits' column (default 80)")


def run(args: argparse.Namespace) -> int:
    overrides = {
        k: v
        for k, v in (("arm", args.arm), ("thinker_layers", args.thinker_layers), ("thought_slots", args.thought_slots))
        if v is not None
    }
    if args.plan:
        from hatlm.plan import format_plan, plan_grid

        config, _ = resolve_config(args.source, **overrides)
        rows = plan_grid(config, lora_r=args.lora_r, worlds=tuple(args.gpus), seq_len=args.seq_len, batch=args.batch,
                         prompt_len=args.prompt_len, think_iters=args.think_iters)  # fmt: skip
        print(
            json.dumps([r.as_dict() for r in rows], indent=2) if args.json else format_plan(config, rows, args.gpu_gib)
        )
        return 0
    info = describe(args.source, **overrides)
    print(json.dumps(info, indent=2) if args.json else format_table(info))
    return 0
