"""`hatlm info PATH_OR_PRESET`: parameter counts and memory estimates, without loading weights.

The model is built on the meta device (shapes only, no storage), so `hatlm info mistral-7b` costs
milliseconds and no memory; for a checkpoint folder only config.json is read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from hatlm.config import PRESETS, ModelConfig
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
