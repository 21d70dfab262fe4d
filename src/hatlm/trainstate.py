"""A training run's folder on disk: checkpoints with trainer state, the `latest` pointer, RNG states,
and the metrics log — what exact resume reads and writes. (Model weights themselves: hatlm.checkpoint.)

    OUT/checkpoints/step-N/   model + tokenizer + trainer_state.pt (optimizer, scheduler, RNGs, data order)
    OUT/checkpoints/latest    names the newest complete checkpoint
    OUT/metrics.jsonl         one JSON record per training step and per evaluation
    OUT/model/                the final model
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hatlm.errors import UserError
from hatlm.util import atomic_write_text

STATE_FILE = "trainer_state.pt"
CHECKPOINTS = "checkpoints"
LATEST = "latest"
METRICS = "metrics.jsonl"


# ------------------------------------------------------------------------------------ RNG


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------ checkpoints


def _ckpt_root(out: Path) -> Path:
    return out / CHECKPOINTS


def latest_checkpoint(out: str | Path) -> Path | None:
    """The newest complete checkpoint of a run folder, or None when it has none."""
    root = _ckpt_root(Path(out))
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    path = root / name
    if not (path / STATE_FILE).is_file():
        raise UserError(f"{pointer} names {name}, which is not a complete checkpoint; delete {pointer} to restart")
    return path


def load_state(ckpt: Path) -> dict[str, Any]:
    return torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=False)


def save_checkpoint(out: Path, model, tokenizer, state: dict[str, Any], step: int, keep: int) -> Path:
    """Write checkpoints/step-N atomically (save_model writes a temp folder, trainer_state.pt
    included, and renames it into place), then replace the `latest` pointer. A kill at any moment
    leaves the previous checkpoint and pointer intact."""
    from hatlm.checkpoint import save_model

    root = _ckpt_root(out)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}"
    final = root / name
    from hatlm.lora import has_lora, save_adapter_checkpoint

    save = save_adapter_checkpoint if has_lora(model) else save_model  # a LoRA run checkpoints its adapter only
    save(model, final, tokenizer=tokenizer, write_extra=lambda tmp: torch.save(state, tmp / STATE_FILE))
    atomic_write_text(root / LATEST, name + "\n")
    # Older checkpoints go only after the pointer moved on.
    older = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and p.name != name)
    for p in older[: max(0, len(older) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def save_final_model(out: Path, model, tokenizer) -> Path:
    """OUT/model; a LoRA run also writes OUT/adapter (PEFT format) and then merges into OUT/model."""
    from hatlm.checkpoint import save_model
    from hatlm.lora import has_lora, merge_lora, save_adapter_checkpoint

    if has_lora(model):
        save_adapter_checkpoint(model, out / "adapter", tokenizer=tokenizer)
        model = merge_lora(model)
    return save_model(model, out / "model", tokenizer=tokenizer)


def clean_stale_temps(out: Path) -> None:
    """Remove temporary files and folders left by a process killed while writing."""
    for root in (out, _ckpt_root(out)):
        if root.is_dir():
            for p in root.iterdir():
                if p.name.startswith(".") and (".tmp" in p.name or ".old" in p.name):
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------ metrics


def truncate_metrics(path: Path, step: int) -> None:
    """Keep only records up to `step`: those after the checkpoint will be produced again."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            break  # a line cut short by the kill
        if rec.get("step", 0) <= step:
            keep.append(line)
    atomic_write_text(path, "".join(k + "\n" for k in keep))


def read_metrics(out: str | Path) -> list[dict[str, Any]]:
    path = Path(out) / METRICS
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsLog:
    """Appends records to OUT/metrics.jsonl (flushed per record) and, when installed, TensorBoard."""

    def __init__(self, out: Path, tensorboard: bool) -> None:
        self.path = out / METRICS
        self.f = open(self.path, "a")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tb"))
            except ImportError:  # tensorboard is optional
                self.tb = None

    def write(self, rec: dict[str, Any]) -> None:
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()  # a killed process must not lose records that precede its checkpoint
        if self.tb is not None:
            prefix = rec["split"] + ("/" + rec["eval_file"] if "eval_file" in rec else "")
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k != "step" and v is not None:
                    self.tb.add_scalar(f"{prefix}/{k}", v, rec["step"])

    def close(self) -> None:
        self.f.close()
        if self.tb is not None:
            self.tb.close()
