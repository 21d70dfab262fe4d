"""Checkpoints in Hugging Face layout: `config.json` plus `model.safetensors` (or shards
`model-0000x-of-0000y.safetensors` with `model.safetensors.index.json`).

Loading (`load_model`) never holds the weights twice: the model is built on the meta device (no
storage at all), then every tensor is read from disk straight into the buffer that becomes the
parameter. We read the safetensors files ourselves (the format is an 8-byte header length, a JSON
header, then raw little-endian data) because safetensors' own `get_tensor` hands back tensors that
live in a memory map of the file: the model's weights would then stay tied to the file (a later
save over the same folder, or a file on a network disk, would pull them from under it) and a
copy out of the map would count the file's pages and the copy together. Reading with `readinto`
puts each tensor in ordinary memory exactly once; a cast to another dtype holds one extra tensor at
a time. Peak memory is therefore the model's size plus its largest tensor.

Tensor names follow transformers' `MistralForCausalLM` (`model.*`, `lm_head.weight`); hatlm's
own parts keep their names (`thinker.*`, `thought_slots`, `prompt_refine.*`).

Initialising from a plain Mistral folder (no `hatlm` section in config.json) with an `arm`
override (e.g. `load_model(path, arm="hybrid", thought_slots=8)`): the hybrid fields that are not
overridden take `HybridConfig`'s defaults, the decoder weights come from the folder, and the parts
the folder cannot hold are fresh:
  * hybrid: the refinement path (thought slots, zero prompt projection, gate) from
    `HatLM.reset_refinement()`, and the thinker's K layers copied from the first K decoder layers
    (`thinker_init="copy_first"`) or random (`"random"`), and the decoder's gates on the thought
    positions (`thought_gate.*`) at zero. The model's logits are then the base model's for any number
    of thought slots (docs/design.md, "Starts as its base").
  * causal / pause: the K extra decoder layers (`config.decoder_layers = L + K`, the parameter-matched
    baselines) are appended at the end and initialised as the identity: random q/k/v/gate/up
    projections but zero `o_proj` and `down_proj`, so each extra layer adds exactly zero to the
    residual stream and the causal arm starts with the base model's logits. Training moves them away
    from zero (the gradients of o_proj/down_proj are non-zero because q/k/v/gate/up are random).

Saving (`save_model`) writes into a temporary folder next to the target and renames it into place,
so an existing checkpoint is never replaced by a half-written one. A saved causal or pause arm writes
its real decoder depth (L + K) as `num_hidden_layers` (with `hatlm.backbone_layers = L`) so that a
causal-arm checkpoint loads unchanged in transformers' `MistralForCausalLM`.

Why one ~700-line module: loading and saving share the name mapping, the safetensors reader/writer and
the error reporting (which tensor is missing, in which shard); split, each half would import the
other's internals.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from hatlm.config import PRESETS, HybridConfig, ModelConfig
from hatlm.errors import CheckpointError, ConfigError
from hatlm.model import HatLM, RMSNorm, RotaryEmbedding

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# safetensors dtype codes ↔ torch dtypes.
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_DTYPE_CODES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
_DTYPE_NAMES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float64": torch.float64,
}
# A safetensors JSON header larger than this is not a real checkpoint (HF's own limit is 100 MB).
_MAX_HEADER = 100_000_000
# Show a progress bar only when loading/saving is long enough to be worth watching.
_PROGRESS_BYTES = 256 * 2**20


# ----------------------------------------------------------------------------------- names


def hf_name(name: str) -> str:
    """hatlm parameter name → Hugging Face tensor name (`decoder.*` ↔ `model.*`)."""
    return "model." + name[len("decoder.") :] if name.startswith("decoder.") else name


def hatlm_name(name: str) -> str:
    """Hugging Face tensor name → hatlm parameter name."""
    return "decoder." + name[len("model.") :] if name.startswith("model.") else name


def _few(names: list[str], k: int = 5) -> str:
    shown = ", ".join(names[:k])
    return shown + (f", … (+{len(names) - k} more)" if len(names) > k else "")


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """torch dtype from a dtype or a name such as "bf16" / "float32"."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPE_NAMES:
        raise ConfigError(f"unknown dtype {dtype!r}; expected one of {', '.join(_DTYPE_NAMES)}")
    return _DTYPE_NAMES[key]


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like "500MB", "2GiB", "10KB" (Hugging Face's convention)."""
    if isinstance(size, int):
        if size <= 0:
            raise ConfigError(f"max_shard_size must be positive; got {size}")
        return size
    s = str(size).strip().upper()
    units = {"GIB": 2**30, "MIB": 2**20, "KIB": 2**10, "GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1}
    for unit, mult in units.items():
        if s.endswith(unit):
            try:
                value = float(s[: -len(unit)])
            except ValueError:
                break
            if value <= 0:
                break
            return int(value * mult)
    raise ConfigError(f"max_shard_size {size!r} is not a size; expected bytes as an int or e.g. '500MB', '2GiB'")


# ----------------------------------------------------------------------------------- safetensors io


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lies in a safetensors file (absolute byte offsets)."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


def read_safetensors_header(path: str | Path) -> dict[str, TensorEntry]:
    """The tensors of one safetensors file (name → entry), validated against the file's size."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
        n = int.from_bytes(raw, "little")
        if n > min(size - 8, _MAX_HEADER):
            raise CheckpointError(f"{path}: not a safetensors file (header length {n} for a {size}-byte file)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    base = 8 + n
    out: dict[str, TensorEntry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            code, shape, (begin, end) = info["dtype"], tuple(int(x) for x in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors header entry for {name!r}") from None
        if code not in SAFETENSORS_DTYPES:
            raise CheckpointError(
                f"{path}: tensor {name!r} has dtype {code}, which hatlm cannot read "
                f"(supported: {', '.join(SAFETENSORS_DTYPES)})"
            )
        dtype = SAFETENSORS_DTYPES[code]
        numel = 1
        for s in shape:
            numel *= s
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        if end - begin != nbytes or begin < 0 or base + end > size:
            raise CheckpointError(
                f"{path}: tensor {name!r} ({code}, shape {list(shape)}) does not fit the file: the file is "
                "truncated or corrupt (re-download or re-save it)"
            )
        out[name] = TensorEntry(path, dtype, shape, base + begin, base + end)
    return out


def _read_into(f, tensor: Tensor, entry: TensorEntry) -> None:
    """Fill a contiguous CPU tensor with the entry's bytes (no intermediate buffer)."""
    nbytes = entry.end - entry.start
    if nbytes == 0:
        return
    view = memoryview(tensor.reshape(-1).view(torch.uint8).numpy()).cast("B")
    f.seek(entry.start)
    done = 0
    while done < nbytes:
        got = f.readinto(view[done:])
        if not got:
            raise CheckpointError(f"{entry.file}: unexpected end of file while reading a tensor")
        done += got


def write_safetensors(
    path: str | Path, tensors: list[tuple[str, Tensor]], metadata: dict[str, str] | None = None
) -> int:
    """Write tensors to a safetensors file one at a time (no copy of the whole set); returns bytes of data.

    safetensors' own `save_file` first converts every tensor to a Python bytes object, which would
    double the memory of a 7B save.
    """
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, t in tensors:
        if t.dtype not in _DTYPE_CODES:
            raise CheckpointError(f"cannot save tensor {name!r} of dtype {t.dtype} in safetensors")
        nbytes = t.numel() * t.element_size()
        header[name] = {
            "dtype": _DTYPE_CODES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    hb = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hb += b" " * (-len(hb) % 8)  # the data section starts 8-byte aligned, as the format recommends
    with open(path, "wb") as f:
        f.write(len(hb).to_bytes(8, "little"))
        f.write(hb)
        for _, t in tensors:
            if t.numel():
                t = t.detach().to("cpu").contiguous()
                f.write(t.reshape(-1).view(torch.uint8).numpy().data)
        f.flush()
        os.fsync(f.fileno())
    return offset


# ----------------------------------------------------------------------------------- config


def read_config(folder: str | Path) -> tuple[ModelConfig, bool]:
    """The folder's config.json as a ModelConfig, and whether it is a plain Mistral config
    (no `hatlm` section). Reads nothing but config.json."""
    folder = _check_folder(folder)
    path = folder / CONFIG_FILE
    if not path.is_file():
        hint = ""
        if (folder / "params.json").exists():
            hint = (
                " It holds params.json: this looks like a mistral-inference (consolidated.*) folder; convert it "
                "to Hugging Face layout with transformers' models/mistral/convert_mistral_weights_to_hf.py."
            )
        raise CheckpointError(
            f"{folder}: no config.json; expected a Hugging Face-layout Mistral folder (config.json plus "
            f"model.safetensors, or model-0000x-of-0000y.safetensors shards with {INDEX_FILE}).{hint}"
        )
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    plain = not d.get("hatlm")
    config = ModelConfig.from_hf_dict(d, source=str(path))
    if not plain and isinstance(d["hatlm"], dict) and "backbone_layers" in d["hatlm"]:
        if config.decoder_layers != d["num_hidden_layers"]:
            raise ConfigError(
                f"{path}: num_hidden_layers is {d['num_hidden_layers']} but backbone_layers "
                f"{config.num_hidden_layers} + thinker_layers {config.hybrid.thinker_layers} make "
                f"{config.decoder_layers} decoder layers for the {config.arm} arm"
            )
    return config, plain


def hf_config_dict(config: ModelConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """config.json contents for a saved model: transformers-loadable for the causal arm."""
    d = config.to_hf_dict()
    if config.arm != "hybrid" and config.decoder_layers != config.num_hidden_layers:
        # transformers reads num_hidden_layers as the decoder depth; hatlm keeps L separately.
        d["num_hidden_layers"] = config.decoder_layers
        d["hatlm"]["backbone_layers"] = config.num_hidden_layers
    name = str(dtype).removeprefix("torch.")
    d["torch_dtype"] = name
    d["dtype"] = name  # the key transformers 5 writes
    return d


def apply_overrides(config: ModelConfig, plain: bool, overrides: dict[str, Any]) -> ModelConfig:
    """Config with `overrides`; on a plain Mistral config an `arm` starts from HybridConfig's defaults."""
    if not overrides:
        return config
    if plain and "arm" in overrides:
        config = dataclasses.replace(config, hybrid=HybridConfig(arm=overrides["arm"]))
    return config.replace(**overrides)


# ----------------------------------------------------------------------------------- load


def _check_folder(path: str | Path) -> Path:
    folder = Path(path).expanduser()
    if not folder.exists():
        raise CheckpointError(
            f"{folder}: no such folder; expected a checkpoint folder (config.json + *.safetensors) or a preset "
            f"name ({', '.join(PRESETS)})"
        )
    if not folder.is_dir():
        raise CheckpointError(
            f"{folder}: is a file; expected the checkpoint folder that holds config.json and the *.safetensors files"
        )
    return folder


def weight_files(folder: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint folder (the index's shards, or model.safetensors)."""
    folder = _check_folder(folder)
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            d = json.loads(index.read_text())
            weight_map = d["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise TypeError
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            raise CheckpointError(f"{index}: not a valid index (expected a JSON object with a 'weight_map')") from None
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise CheckpointError(
                f"{index}: names {len(missing)} shard file(s) missing from the folder: {_few(missing)}; "
                "the checkpoint is incomplete (re-download or re-save it)"
            )
        return [folder / s for s in shards]
    if (folder / WEIGHTS_FILE).is_file():
        return [folder / WEIGHTS_FILE]
    found = sorted(folder.glob("*.safetensors"))
    if found:
        return found
    pickles = sorted(p.name for pat in ("*.bin", "*.pt", "*.pth") for p in folder.glob(pat))
    if pickles:
        raise CheckpointError(
            f"{folder}: only PyTorch pickle weights ({_few(pickles, 3)}); hatlm reads safetensors only "
            '(loading a pickle can run code). Convert once with: python -c "from transformers import '
            f"AutoModelForCausalLM as M; M.from_pretrained('{folder}').save_pretrained('{folder}')\""
        )
    raise CheckpointError(
        f"{folder}: no weights; expected {WEIGHTS_FILE}, or model-0000x-of-0000y.safetensors shards with {INDEX_FILE}"
    )


def _tensor_index(folder: Path, files: list[Path]) -> dict[str, TensorEntry]:
    entries: dict[str, TensorEntry] = {}
    for file in files:
        for name, e in read_safetensors_header(file).items():
            if name in entries:
                raise CheckpointError(
                    f"{folder}: tensor {name!r} appears in both {entries[name].file.name} and {file.name}"
                )
            entries[name] = e
    index = folder / INDEX_FILE
    if index.is_file():
        wrong = [
            n
            for n, f in json.loads(index.read_text())["weight_map"].items()
            if n not in entries or entries[n].file.name != f
        ]
        if wrong:
            raise CheckpointError(
                f"{index}: lists {len(wrong)} tensor(s) that are not in the shard it names: {_few(sorted(wrong))}"
            )
    return entries


def _fresh_allowed(config: ModelConfig) -> Callable[[str], bool]:
    """Which hatlm parameters a plain Mistral folder cannot hold (they are initialised fresh)."""
    L = config.num_hidden_layers

    def allowed(name: str) -> bool:
        if name.startswith(("thinker.", "prompt_refine.", "thought_gate.")) or name == "thought_slots":
            return True
        if name.startswith("decoder.layers."):
            return int(name.split(".")[2]) >= L
        return False

    return allowed


def _ignorable(name: str, config: ModelConfig) -> bool:
    # Old checkpoints store RoPE frequencies; tied models may store the (identical) LM head too.
    return name.endswith("rotary_emb.inv_freq") or (config.tie_word_embeddings and name == "lm_head.weight")


def _describe(config: ModelConfig) -> str:
    extra = ""
    if config.arm == "hybrid":
        extra = f", {config.hybrid.thinker_layers} thinker layers, {config.num_thought_slots} thought slots"
    elif config.arm == "pause":
        extra = f", {config.num_thought_slots} pause slots"
    elif config.arm == "looped":
        extra = f", a {config.hybrid.thinker_layers}-layer loop (T = {config.hybrid.max_think_iters} at test time)"
    return (
        f"{config.arm} arm: {config.decoder_layers} decoder layers, hidden {config.hidden_size}, "
        f"intermediate {config.intermediate_size}, {config.num_attention_heads} heads / "
        f"{config.num_key_value_heads} KV heads, vocab {config.vocab_size}{extra}"
    )


def _set_param(model: nn.Module, name: str, tensor: Tensor) -> None:
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    old = getattr(mod, attr)
    setattr(mod, attr, nn.Parameter(tensor, requires_grad=old.requires_grad))


def _model_tensors(model: HatLM) -> dict[str, Tensor]:
    """hatlm name → parameter, as stored on disk (a tied LM head is stored once, as the embedding)."""
    sd = model.state_dict(keep_vars=True)
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


def load_model(
    path: str | Path,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    seed: int | None = None,
    **overrides: Any,
) -> HatLM:
    """Load a Mistral (Hugging Face layout) or hatlm checkpoint folder.

    dtype:     cast to this dtype; default: the checkpoint's dtype.
    device:    where the parameters end up (tensors are read on the CPU and moved one at a time).
    seed:      seeds torch before initialising the parts that a plain Mistral folder cannot hold.
    overrides: ModelConfig/HybridConfig fields, e.g. arm="hybrid", thought_slots=8, attn_backend="flex".
    """
    folder = _check_folder(path)
    config, plain = read_config(folder)
    config = apply_overrides(config, plain, overrides)
    target_dtype = parse_dtype(dtype)
    device = torch.device(device)
    entries = _tensor_index(folder, weight_files(folder))

    with torch.device("meta"):
        model = HatLM(config)
    expected = {hf_name(n): t for n, t in _model_tensors(model).items()}
    fresh_ok = _fresh_allowed(config) if plain else (lambda _name: False)
    missing = [n for n in expected if n not in entries and not fresh_ok(hatlm_name(n))]
    unexpected = [n for n in entries if n not in expected and not _ignorable(n, config)]
    mismatched = [
        (n, tuple(expected[n].shape), entries[n].shape)
        for n in expected
        if n in entries and tuple(expected[n].shape) != entries[n].shape
    ]
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"{len(missing)} tensor(s) missing from the checkpoint: {_few(missing)}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected tensor(s) that the model does not have: {_few(unexpected)}")
        if mismatched:
            shown = "; ".join(f"{n}: expected {list(a)}, found {list(b)}" for n, a, b in mismatched[:5])
            more = f"; … (+{len(mismatched) - 5} more)" if len(mismatched) > 5 else ""
            problems.append(f"{len(mismatched)} shape mismatch(es): {shown}{more}")
        hint = ""
        if unexpected and not any(n.startswith(("model.", "lm_head.")) for n in unexpected):
            hint = " (tensor names are not in Hugging Face's Mistral naming: model.*, lm_head.weight)"
        raise CheckpointError(
            f"{folder}: the weights do not match the model that config.json describes ({_describe(config)}): "
            + " | ".join(problems)
            + hint
        )

    if target_dtype is None:
        emb = entries.get("model.embed_tokens.weight")
        floats = [e.dtype for e in entries.values() if e.dtype.is_floating_point]
        target_dtype = emb.dtype if emb is not None else (floats[0] if floats else torch.float32)

    # Read file by file, in file order, each tensor straight into its own buffer.
    to_load = sorted((e.file, e.start, n) for n, e in entries.items() if n in expected)
    total = sum(entries[n].end - entries[n].start for _, _, n in to_load)
    from tqdm import tqdm

    with tqdm(
        total=total, unit="B", unit_scale=True, desc=f"loading {folder.name}", disable=total < _PROGRESS_BYTES
    ) as bar:
        current, f = None, None
        try:
            for file, _, n in to_load:
                if file != current:
                    if f is not None:
                        f.close()
                    current, f = file, open(file, "rb")
                e = entries[n]
                t = torch.empty(e.shape, dtype=e.dtype, device="cpu")
                _read_into(f, t, e)
                if t.dtype != target_dtype or device.type != "cpu":
                    t = t.to(device=device, dtype=target_dtype)
                _set_param(model, hatlm_name(n), t)
                bar.update(e.end - e.start)
        finally:
            if f is not None:
                f.close()

    if config.tie_word_embeddings:
        model.lm_head.weight = model.decoder.embed_tokens.weight
    fresh = {n for n, p in model.named_parameters() if p.is_meta}
    if fresh:
        if seed is not None:
            torch.manual_seed(seed)
        _init_fresh(model, fresh, target_dtype, device)
    # RoPE frequencies are a non-persistent buffer: computed, never stored.
    model.rope = RotaryEmbedding(config.head_dim, config.rope_theta).to(device)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:  # a bug, not bad input: every tensor must have been read or initialised
        raise RuntimeError(f"hatlm.checkpoint: tensors left uninitialised: {_few(left)}")
    return model


@torch.no_grad()
def _init_fresh(model: HatLM, fresh: set[str], dtype: torch.dtype, device: torch.device) -> None:
    """Initialise the parameters a plain Mistral folder does not hold (see the module docstring)."""
    config = model.config
    for n in sorted(fresh):
        p = model.get_parameter(n)
        _set_param(model, n, torch.empty(p.shape, dtype=dtype, device=device))
    std = config.initializer_range
    for mod_name, mod in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        if isinstance(mod, nn.Linear) and prefix + "weight" in fresh:
            mod.weight.normal_(0.0, std)
            if mod.bias is not None:
                mod.bias.zero_()
        elif isinstance(mod, nn.Embedding) and prefix + "weight" in fresh:
            mod.weight.normal_(0.0, std)
        elif isinstance(mod, RMSNorm) and prefix + "weight" in fresh:
            mod.weight.fill_(1.0)
    if any(n == "thought_slots" or n.startswith(("prompt_refine.", "thinker.", "thought_gate.")) for n in fresh):
        model.reset_refinement()
    if model.thinker is not None and config.hybrid.thinker_init == "copy_first":
        K, L = len(model.thinker.layers), config.num_hidden_layers
        if K > L:
            raise ConfigError(
                f"thinker_init='copy_first' copies the first {K} decoder layers into the thinker, but the "
                f"checkpoint has only {L}; use thinker_layers <= {L} or thinker_init='random'"
            )
        for i, layer in enumerate(model.thinker.layers):
            layer.load_state_dict(model.decoder.layers[i].state_dict())
    # Extra decoder layers of the parameter-matched baselines start as the identity.
    for layer in list(model.decoder.layers)[config.num_hidden_layers :]:
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()


# ----------------------------------------------------------------------------------- save


def _shard(tensors: list[tuple[str, Tensor]], max_bytes: int | None) -> list[list[tuple[str, Tensor]]]:
    if max_bytes is None:
        return [tensors]
    shards: list[list[tuple[str, Tensor]]] = [[]]
    size = 0
    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        # A tensor larger than the limit gets a shard of its own (as transformers does).
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, t))
        size += nbytes
    return shards


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_model(
    model: HatLM,
    folder: str | Path,
    tokenizer: Any | None = None,
    max_shard_size: int | str | None = None,
    write_extra: Callable[[Path], None] | None = None,
) -> Path:
    """Save `model` as a Hugging Face-layout folder (config.json with a `hatlm` section + safetensors).

    max_shard_size: None → one model.safetensors; else shards of at most this size (e.g. "2GB")
                    plus model.safetensors.index.json.
    tokenizer:      saved into the folder (its `save(folder)`) when given.
    write_extra:    called with the temporary folder before it is renamed into place, so that extra
                    files (optimizer state, …) become part of the same atomic write.

    An existing checkpoint at `folder` is replaced only once the new one is complete. A non-empty
    folder that is not a checkpoint (no config.json) is refused rather than deleted.
    """
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"{folder}: exists and is a file; expected a folder path for the checkpoint")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / CONFIG_FILE).exists():
        raise CheckpointError(
            f"{folder}: exists and is not a checkpoint folder (no config.json); refusing to replace it — "
            "choose a new or empty folder"
        )
    limit = None if max_shard_size is None else parse_size(max_shard_size)
    with atomic_folder(folder) as tmp:
        tensors = [(hf_name(n), t) for n, t in _model_tensors(model).items()]
        shards = _shard(tensors, limit)
        total = sum(t.numel() * t.element_size() for _, t in tensors)
        from tqdm import tqdm

        with tqdm(
            total=total, unit="B", unit_scale=True, desc=f"saving {folder.name}", disable=total < _PROGRESS_BYTES
        ) as bar:
            if len(shards) == 1:
                write_safetensors(tmp / WEIGHTS_FILE, shards[0])
                bar.update(total)
            else:
                weight_map: dict[str, str] = {}
                for i, shard in enumerate(shards):
                    fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                    bar.update(write_safetensors(tmp / fname, shard))
                    weight_map.update({n: fname for n, _ in shard})
                index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
                (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        (tmp / CONFIG_FILE).write_text(json.dumps(hf_config_dict(model.config, model.dtype), indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp)
        if write_extra is not None:
            write_extra(tmp)
    return folder


@contextlib.contextmanager
def atomic_folder(folder: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `folder`; on success it is synced and renamed into place (replacing an
    existing `folder` only then), on any error it is removed — a reader never sees a half-written folder."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        _fsync_dir(tmp)
        _replace_dir(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_dir(src: Path, dst: Path) -> None:
    """Move the finished folder `src` to `dst`. A non-empty folder cannot be the target of an atomic
    rename, so an old `dst` is first renamed aside, then deleted: at every moment `dst` is either the
    complete old checkpoint, absent, or the complete new one — never half-written."""
    if not dst.exists():
        os.replace(src, dst)
    else:
        old = dst.parent / f".{dst.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.replace(dst, old)
        try:
            os.replace(src, dst)
        except BaseException:
            os.replace(old, dst)
            raise
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(dst.parent)


__all__ = [
    "TensorEntry",
    "apply_overrides",
    "hatlm_name",
    "hf_config_dict",
    "hf_name",
    "load_model",
    "parse_dtype",
    "parse_size",
    "read_config",
    "read_safetensors_header",
    "save_model",
    "weight_files",
    "write_safetensors",
]
