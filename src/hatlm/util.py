"""Small helpers shared by the library and the command line: atomic file writes, `--set KEY=VALUE`
values, device names. Nothing here imports another hatlm module except errors (any layer may use it)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from hatlm.errors import ConfigError, UserError


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` on a temporary file beside `path`, then rename it into place.

    A reader (or a process killed half-way) sees the old file or the new one, never half of one.
    The temporary keeps `path`'s suffix so that writers that pick a format by it (matplotlib) work."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def _json_default(o: Any) -> Any:
    # numpy scalars and paths turn up in results; anything else is a bug worth a clear message.
    if hasattr(o, "item") and callable(o.item) and getattr(o, "shape", None) == ():
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 1) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent, default=_json_default) + "\n")


def parse_value(text: str) -> Any:
    """A `--set KEY=VALUE` value as YAML reads it (numbers, booleans, lists, null); else the text."""
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        # YAML 1.1 reads "1e-3" (no dot) as a string; on a command line it means the number.
        try:
            return float(value)
        except ValueError:
            pass
    return value


def parse_set_items(items: Iterable[str], flag: str = "--set") -> dict[str, Any]:
    """`["KEY=VALUE", ...]` → {KEY: parsed VALUE}; an item without `=` is a UserError."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"{flag} {item!r}: expected KEY=VALUE")
        k, v = item.split("=", 1)
        out[k.strip()] = parse_value(v)
    return out


def resolve_device(name: str | None):
    """A torch.device from "auto"/None (CUDA when available), "cpu", "cuda", "cuda:N", ...;
    asking for CUDA on a machine without it is an error, never a silent fall-back to the CPU."""
    import torch

    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device {name!r} is not a device name (expected auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available on this machine")
    return dev
