"""hatlm — hybrid attention transformers on the Mistral architecture (think bidirectionally, then speak)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hatlm.config import PRESETS, ConfigError, HybridConfig, ModelConfig
from hatlm.model import HatLM, HybridOutput, ThinkResult

__version__ = "0.1.0"
__all__ = [
    "PRESETS",
    "ConfigError",
    "HatLM",
    "HybridConfig",
    "HybridOutput",
    "ModelConfig",
    "ThinkResult",
    "load",
]


def load(path_or_preset: str | Path, adapter: str | Path | None = None, **overrides: Any) -> HatLM:
    """A model from a preset name (random init), a Mistral checkpoint folder, or a hatlm checkpoint.

    `overrides` change config fields, including the hybrid ones (e.g. `arm="hybrid"`,
    `thought_slots=4`); loading a plain Mistral folder with `arm="hybrid"` initialises a hybrid
    from it (docs/design.md §2: it then computes the Mistral model exactly).
    `adapter`: a LoRA adapter folder (hatlm.lora / `hatlm train --lora`) applied, unmerged, on top of
    this base (which must be the one it was trained on).
    """
    if adapter is not None:
        from hatlm.lora import load_with_adapter

        return load_with_adapter(adapter, base=path_or_preset, **overrides)
    if isinstance(path_or_preset, str) and path_or_preset in PRESETS:
        import torch

        seed = overrides.pop("seed", None)
        if seed is not None:
            torch.manual_seed(seed)
        return HatLM(ModelConfig.from_name(path_or_preset, **overrides))
    from hatlm.checkpoint import load_model

    return load_model(path_or_preset, **overrides)
