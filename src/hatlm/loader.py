"""One way to get a model and its tokenizer, for every command and the library.

    model, tokenizer = load_model_and_tokenizer("tiny-bytes", arm="hybrid")   # a preset: random weights
    model, tokenizer = load_model_and_tokenizer("runs/hybrid-seed0/model")    # a checkpoint folder

A preset gets deterministic random weights (`seed`, default 0: the same model on every run) and the
tokenizer its vocabulary implies (bytes for the 259-token presets, else Mistral's); a folder is read
by the checkpoint loader with the tokenizer saved beside it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from hatlm.config import PRESETS, ModelConfig
from hatlm.errors import UserError
from hatlm.util import resolve_device


def _default_dtype(device: torch.device) -> torch.dtype:
    # bf16 is what GPUs run fast; on the CPU it is slow and lossy, so float32 there.
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def tokenizer_for(config: ModelConfig, folder: str | Path | None = None):
    """The folder's own tokenizer, or (for a preset) the one its vocabulary size implies; one larger
    than the model's vocabulary is a UserError (its ids would index past the embedding)."""
    from hatlm.tokenizer import ByteTokenizer, load_tokenizer

    if folder is not None:
        tok = load_tokenizer(folder)
    elif config.vocab_size == ByteTokenizer.vocab_size:
        tok = ByteTokenizer()
    else:
        tok = load_tokenizer(None)
    if tok.vocab_size > config.vocab_size:
        hint = "; put the checkpoint's own tokenizer file in its folder" if folder is not None else (
            "; use a preset or vocab_size that fits the tokenizer")
        raise UserError(f"the tokenizer has {tok.vocab_size} tokens but the model only {config.vocab_size}{hint}")
    return tok


def load_model_and_tokenizer(name_or_dir: str | Path, *, arm: str | None = None, device: str | torch.device | None =
                             None, dtype: str | torch.dtype | None = None, seed: int = 0, **overrides: Any):
    """(model, tokenizer) from a preset name or a checkpoint folder (hatlm or Hugging Face Mistral).

    arm / overrides: config fields to change (a Mistral folder loaded with arm="hybrid" becomes a
    hybrid initialised from it). device: "cpu" (None), "cuda", "cuda:N" or "auto"; dtype: as asked,
    else float32 on the CPU and bfloat16 on CUDA. seed: torch's seed before building, so that random
    weights (a preset, or the new parts of a converted folder) are the same on every run."""
    if arm is not None:
        overrides["arm"] = arm
    if isinstance(dtype, str):
        from hatlm.checkpoint import parse_dtype

        dtype = None if dtype == "auto" else parse_dtype(dtype)
    dev = device if isinstance(device, torch.device) else (
        resolve_device(device) if device is not None else torch.device("cpu"))
    if isinstance(name_or_dir, str) and name_or_dir in PRESETS:
        from hatlm.model import HatLM

        torch.manual_seed(seed)
        model = HatLM(ModelConfig.from_name(name_or_dir, **overrides))
        tok = tokenizer_for(model.config)
    else:
        path = Path(name_or_dir).expanduser()
        if not path.is_dir():
            raise UserError(f"{str(name_or_dir)!r} is neither a checkpoint folder nor a preset: no such checkpoint "
                            f"folder (presets: {', '.join(PRESETS)})")
        from hatlm.checkpoint import load_model

        # The checkpoint loader explains what is wrong with a folder, and places tensors one at a time.
        model = load_model(path, dtype=dtype or _default_dtype(dev), device=dev, seed=seed, **overrides)
        return model, tokenizer_for(model.config, path)
    return model.to(device=dev, dtype=dtype or _default_dtype(dev)), tok
