"""Loading a model + tokenizer for inference tools (`hatlm serve`, `hatlm lm-eval`, `hatlm show`).

One place that turns "a checkpoint folder or a preset name, a device, a dtype" into a ready model in
eval mode and its tokenizer, with the user-facing error messages. When the package's own loader
(`hatlm.loader.load_model_and_tokenizer`, planned by the restructuring) exists, it is used.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from hatlm.errors import UserError


def resolve_device(device: str | None) -> torch.device:
    """`device` or the default (cuda when available, else cpu), refusing CUDA where there is none."""
    name = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; expected cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name}: no CUDA device is available here")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """`dtype` or the default: float32 on the CPU, bfloat16 on accelerators."""
    if dtype is None or dtype == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    from hatlm.checkpoint import parse_dtype

    return parse_dtype(dtype)


def load_for_inference(
    name: str | Path,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    arm: str | None = None,
    seed: int = 0,
) -> tuple[Any, Any]:
    """(model in eval mode on `device`/`dtype`, tokenizer) for a checkpoint folder or a preset name.

    A preset has random weights; `seed` makes them the same in every process (so that a server and
    a client-side oracle, or two runs of `hatlm show`, see the same model).
    """
    import hatlm
    from hatlm.config import PRESETS
    from hatlm.tokenizer import ByteTokenizer, load_tokenizer

    dev = device if isinstance(device, torch.device) else resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    name = str(name)
    if name in PRESETS:
        overrides: dict[str, Any] = {} if arm is None else {"arm": arm}
        torch.manual_seed(seed)
        model = hatlm.load(name, **overrides)
        tok = ByteTokenizer() if model.config.vocab_size == ByteTokenizer.vocab_size else load_tokenizer(None)
    else:
        path = Path(name).expanduser()
        if not path.exists():
            raise UserError(f"{name!r} is neither a checkpoint folder nor a preset (presets: {', '.join(PRESETS)})")
        if arm is not None:
            raise UserError("--arm applies to presets only; a checkpoint carries its own arm")
        model = hatlm.load(path)  # the checkpoint loader explains what is wrong with a folder
        tok = load_tokenizer(path)
    if tok.vocab_size > model.config.vocab_size:
        raise UserError(
            f"the tokenizer has {tok.vocab_size} tokens but the model only {model.config.vocab_size}; "
            "put the checkpoint's own tokenizer file in its folder"
        )
    model = model.to(device=dev, dtype=dt)
    model.eval()
    return model, tok


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The positional model argument and --device/--dtype/--arm shared by the inference tools."""
    parser.add_argument("model", metavar="CHECKPOINT_OR_PRESET", help="checkpoint folder or preset name")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: fp32 on CPU, bf16 on GPU)")
    parser.add_argument("--arm", choices=("causal", "pause", "hybrid"), default=None, help="arm (presets only)")
