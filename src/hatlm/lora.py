"""LoRA through PEFT: adapters on the backbone's projections, the thinking path trained fully.

    model = hatlm.load(MISTRAL_DIR, arm="hybrid", thought_slots=16)
    add_lora(model, parse_lora_spec("r=16,alpha=32,dropout=0.05"))   # in place; returns the trainable params
    ... train ...
    save_adapter(model, "run/adapter", base="MISTRAL_DIR")
    model = load_with_adapter("run/adapter")            # base from adapter_config.json (or base=...)
    merged = merge_lora(model)                          # a plain HatLM: save_model(merged, "run/merged")

What is adapted. PEFT's `target_modules` is a regular expression that matches only the decoder's
projections, `decoder.layers.N.self_attn.{q,k,v,o}_proj` and `decoder.layers.N.mlp.{gate,up,down}_proj`,
so the thinker (whose layers have the same projection names), the gate, the prompt refinement and the
LM head are never caught by name. Everything of the base is frozen; the adapters and the thinking path
(thinker, thought slots, gate, prompt refinement) are trainable. PEFT's `modules_to_save` is not used
for the thinking path: it wraps modules in copies (the model calls `thinker.step` and reads
`thought_slots`, a bare parameter, directly), so those tensors are trained in place and saved beside
the adapter instead.

Adapter folder (PEFT format plus one hatlm file):
    adapter_config.json          PEFT LoraConfig (base_model_name_or_path = the base given to save_adapter)
    adapter_model.safetensors    the LoRA tensors, PEFT's key names (base_model.model.<module>.lora_A.weight …)
    hatlm_trainable.safetensors  the trained thinker / slots / gate / refinement tensors (hatlm names)
    hatlm_base.json              the base's shapes and a fingerprint of its frozen weights: an adapter is
                                 refused on a different base instead of silently producing garbage
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from hatlm.errors import UserError

ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")
DEFAULT_TARGETS = ATTN_PROJ + MLP_PROJ
ADAPTER_NAME = "default"
PEFT_PREFIX = "base_model.model."  # how a PeftModel names the wrapped model's tensors
TRAINABLE_FILE = "hatlm_trainable.safetensors"
BASE_FILE = "hatlm_base.json"
BASE_SHAPE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                   "head_dim", "decoder_layers")  # fmt: skip


@dataclass(frozen=True)
class LoraSpec:
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS

    def validate(self) -> None:
        if not isinstance(self.r, int) or self.r < 1:
            raise UserError(f"LoRA r must be a positive integer; got {self.r!r}")
        if self.alpha <= 0:
            raise UserError(f"LoRA alpha must be positive; got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"LoRA dropout must be in [0, 1); got {self.dropout!r}")
        unknown = [t for t in self.targets if t not in DEFAULT_TARGETS]
        if unknown or not self.targets:
            raise UserError(
                f"LoRA targets {', '.join(unknown) or '(none)'} match no backbone projection; choose among "
                f"{', '.join(DEFAULT_TARGETS)} (e.g. targets=q_proj+v_proj)"
            )

    def regex(self) -> str:
        return target_regex(self.targets)


def target_regex(targets: tuple[str, ...] | list[str] = DEFAULT_TARGETS) -> str:
    """A PEFT `target_modules` regex (full match) for these projections of the decoder layers only."""
    attn = [t for t in targets if t in ATTN_PROJ]
    mlp = [t for t in targets if t in MLP_PROJ]
    alts = ([rf"self_attn\.({'|'.join(attn)})"] if attn else []) + ([rf"mlp\.({'|'.join(mlp)})"] if mlp else [])
    return rf"(.*\.)?decoder\.layers\.\d+\.({'|'.join(alts)})"


def parse_lora_spec(text: str) -> LoraSpec:
    """'r=16,alpha=32[,dropout=0.05][,targets=q_proj+v_proj]' → LoraSpec (targets joined by '+')."""
    fields: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise UserError(f"--lora: expected KEY=VALUE, got {item!r} (e.g. r=16,alpha=32,dropout=0.05)")
        if key == "targets":
            fields["targets"] = tuple(t.strip() for t in re.split(r"[+|;]", value) if t.strip())
            continue
        if key not in ("r", "alpha", "dropout"):
            raise UserError(f"--lora: unknown key {key!r}; keys are r, alpha, dropout, targets")
        try:
            fields[key] = int(value) if key == "r" else float(value)
        except ValueError:
            raise UserError(f"--lora: {key}={value!r} is not a number") from None
    if "r" in fields and "alpha" not in fields:
        fields["alpha"] = 2.0 * fields["r"]
    spec = LoraSpec(**fields)
    spec.validate()
    return spec


def _peft():
    try:
        import peft
    except ImportError:
        raise UserError("LoRA needs the `peft` package: pip install 'peft>=0.14'") from None
    return peft


def lora_config(spec: LoraSpec, base: str | None = None):
    peft = _peft()
    return peft.LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=spec.regex(),
                           bias="none", base_model_name_or_path=base)  # fmt: skip


def is_thinking_param(name: str) -> bool:
    """Thinker, thought slots, gate and prompt refinement: everything outside the backbone."""
    return not name.startswith(("decoder.", "lm_head."))


def has_lora(model: nn.Module) -> bool:
    return any("lora_" in n for n, _ in model.named_parameters())


def add_lora(model: nn.Module, spec: LoraSpec, base: str | None = None) -> list[nn.Parameter]:
    """Inject PEFT LoRA adapters into `model` in place; freeze the base; → the trainable parameters."""
    spec.validate()
    peft = _peft()
    if has_lora(model):
        raise UserError("this model already has LoRA adapters; merge them (merge_lora) before adding new ones")
    names = [n for n, _ in model.named_modules()]
    if not any(re.fullmatch(spec.regex(), n) for n in names):
        raise UserError(
            f"LoRA target regex {spec.regex()!r} matches no module of this model (targets {'+'.join(spec.targets)}); "
            "is it a hatlm model with decoder layers?"
        )
    peft.inject_adapter_in_model(lora_config(spec, base), model, adapter_name=ADAPTER_NAME)
    trainable = []
    for name, p in model.named_parameters():
        train = "lora_" in name or is_thinking_param(name)
        p.requires_grad_(train)
        if train:
            trainable.append(p)
    model.hatlm_lora_spec = spec  # read by save_adapter
    model.hatlm_lora_base = base
    return trainable


# ------------------------------------------------------------------------------------ base identity


def base_fingerprint(model: nn.Module) -> str:
    """sha256 of a few rows of the frozen embeddings and LM head, rounded to bf16 (so a base loaded in
    fp32 or bf16 gives the same value): tells bases of the same shape apart, e.g. Mistral v0.1 and v0.2."""
    h = hashlib.sha256()
    for t in (model.decoder.embed_tokens.weight, model.lm_head.weight):
        rows = t.detach()[:: max(1, t.shape[0] // 16)][:16].to("cpu", torch.bfloat16).contiguous()
        h.update(rows.view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:32]


def base_info(model: nn.Module) -> dict[str, Any]:
    c = model.config
    shapes = {k: getattr(c, k) for k in BASE_SHAPE_KEYS}
    return {"shapes": shapes, "arm": c.arm, "thinker_layers": c.hybrid.thinker_layers,
            "thought_slots": c.num_thought_slots, "fingerprint": base_fingerprint(model)}  # fmt: skip


def verify_base(model: nn.Module, saved: dict[str, Any], folder: Path) -> None:
    """UserError unless `model` is the base the adapter in `folder` was trained on."""
    now = base_info(model)
    diff = [f"{k}: adapter {saved['shapes'].get(k)} vs base {v}" for k, v in now["shapes"].items()
            if saved["shapes"].get(k) != v]  # fmt: skip
    for k in ("arm", "thinker_layers", "thought_slots"):
        if saved.get(k) != now[k]:
            diff.append(f"{k}: adapter {saved.get(k)} vs base {now[k]}")
    if diff:
        raise UserError(f"{folder}: this adapter was trained on another base model ({'; '.join(diff)})")
    if saved.get("fingerprint") != now["fingerprint"]:
        raise UserError(
            f"{folder}: this adapter was trained on another base model: same shapes, but the frozen weights differ "
            "(fingerprint mismatch); load the base it was trained on (see base_model_name_or_path in "
            "adapter_config.json), or pass check_base=False if you know better"
        )


# ------------------------------------------------------------------------------------ save / load


def adapter_state(model: nn.Module) -> dict[str, Tensor]:
    """The LoRA tensors under PEFT's key names (as `PeftModel.save_pretrained` writes them)."""
    peft = _peft()
    # save_embedding_layers=False: hatlm never resizes embeddings, and PEFT's "auto" would look the base up
    # (on the Hub for a name that is not a folder).
    sd = peft.get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME, save_embedding_layers=False)
    return {PEFT_PREFIX + k: v.detach().contiguous() for k, v in sd.items()}


def thinking_state(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if is_thinking_param(n)}


def save_adapter(model: nn.Module, folder: str | Path, base: str | None = None) -> Path:
    """Write the adapter folder (see the module docstring); the base weights are not written."""
    from safetensors.torch import save_file

    if not has_lora(model):
        raise UserError("this model has no LoRA adapters to save (add_lora first)")
    spec: LoraSpec = getattr(model, "hatlm_lora_spec", None) or LoraSpec()
    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    cfg = lora_config(spec, base)
    cfg.save_pretrained(str(folder))
    save_file(adapter_state(model), str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    thinking = thinking_state(model)
    if thinking:
        save_file(thinking, str(folder / TRAINABLE_FILE), metadata={"format": "pt"})
    (folder / BASE_FILE).write_text(json.dumps({**base_info(model), "base": base}, indent=2) + "\n")
    return folder


def save_adapter_checkpoint(model: nn.Module, folder: str | Path, tokenizer: Any | None = None,
                            write_extra: Any | None = None) -> Path:  # fmt: skip
    """save_adapter (+ tokenizer + extra files) written into a temporary folder and renamed into place, like
    hatlm.checkpoint.save_model: a training checkpoint of a LoRA run holds the adapter, not the base."""
    from hatlm.checkpoint import atomic_folder

    folder = Path(folder).expanduser()
    with atomic_folder(folder) as tmp:
        save_adapter(model, tmp, base=getattr(model, "hatlm_lora_base", None))
        if tokenizer is not None:
            tokenizer.save(tmp)
        if write_extra is not None:
            write_extra(tmp)
    return folder


def read_adapter_config(folder: str | Path) -> tuple[LoraSpec, dict[str, Any]]:
    folder = Path(folder).expanduser()
    path = folder / "adapter_config.json"
    if not path.is_file():
        raise UserError(f"{folder}: not a LoRA adapter folder (no adapter_config.json)")
    d = json.loads(path.read_text())
    if d.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{folder}: adapter type {d.get('peft_type')!r} is not LoRA")
    tm = d.get("target_modules")
    targets = tuple(t for t in DEFAULT_TARGETS if isinstance(tm, str) and t in tm) or DEFAULT_TARGETS
    if isinstance(tm, list):
        targets = tuple(t for t in DEFAULT_TARGETS if t in tm)
    spec = LoraSpec(r=int(d["r"]), alpha=float(d["lora_alpha"]), dropout=float(d.get("lora_dropout", 0.0)),
                    targets=targets)  # fmt: skip
    return spec, d


def load_adapter(model: nn.Module, folder: str | Path, *, check_base: bool = True,
                 trainable_dtype: torch.dtype | None = None) -> nn.Module:  # fmt: skip
    """Inject the adapter saved in `folder` into `model` (the base) and load its tensors, in place.
    trainable_dtype: hold the adapters and the thinking path in this dtype (training keeps them in float32
    beside a bf16 base; the default keeps the model's dtypes)."""
    from safetensors.torch import load_file

    peft = _peft()
    folder = Path(folder).expanduser()
    spec, d = read_adapter_config(folder)
    base_path = folder / BASE_FILE
    if check_base and base_path.is_file():
        verify_base(model, json.loads(base_path.read_text()), folder)
    trainable = add_lora(model, spec, base=d.get("base_model_name_or_path"))
    if trainable_dtype is not None:
        for p in trainable:  # before loading, so that the saved values are not rounded
            p.data = p.data.to(trainable_dtype)
    sd = load_file(str(folder / "adapter_model.safetensors"), device=str(model.device))
    sd = {k.removeprefix(PEFT_PREFIX): v for k, v in sd.items()}
    try:
        res = peft.set_peft_model_state_dict(model, sd, adapter_name=ADAPTER_NAME)
    except RuntimeError as e:  # size mismatches
        raise UserError(f"{folder}: adapter tensors do not fit this model: {str(e).splitlines()[-1].strip()}") from None
    missing = [k for k in res.missing_keys if "lora_" in k]
    if missing or res.unexpected_keys:
        raise UserError(f"{folder}: adapter tensors do not fit this model (missing {missing[:3]}, unexpected "
                        f"{list(res.unexpected_keys)[:3]}); was it trained on another base?")  # fmt: skip
    own = dict(model.named_parameters())
    tpath = folder / TRAINABLE_FILE
    if tpath.is_file():
        with torch.no_grad():
            for k, v in load_file(str(tpath), device=str(model.device)).items():
                if k not in own or own[k].shape != v.shape:
                    raise UserError(f"{folder}: trained tensor {k} does not fit this model")
                own[k].copy_(v)
    return model


def load_with_adapter(folder: str | Path, base: str | Path | None = None, *, check_base: bool = True,
                      **overrides: Any) -> nn.Module:  # fmt: skip
    """Base (a preset, Mistral or hatlm folder; default: the adapter's base_model_name_or_path) + adapter."""
    import hatlm

    folder = Path(folder).expanduser()
    _, d = read_adapter_config(folder)
    base = base if base is not None else d.get("base_model_name_or_path")
    if not base:
        raise UserError(f"{folder}: adapter_config.json names no base model; pass base=...")
    saved = json.loads((folder / BASE_FILE).read_text()) if (folder / BASE_FILE).is_file() else {}
    if saved.get("arm") and "arm" not in overrides:
        # A plain Mistral base becomes the arm the adapter was trained as (same thinker depth and slots).
        overrides["arm"] = saved["arm"]
        overrides.setdefault("thinker_layers", saved["thinker_layers"])
        if saved["arm"] != "causal":
            overrides.setdefault("thought_slots", saved["thought_slots"])
    from hatlm.config import PRESETS

    if isinstance(base, str) and base in PRESETS and not Path(base).is_dir():
        raise UserError(
            f"{folder}: the adapter was trained on a randomly initialised preset ({base!r}), which cannot be "
            "rebuilt from its name; build that base (same seed and overrides) and call load_adapter(model, folder)"
        )
    model = hatlm.load(base, **overrides)
    return load_adapter(model, folder, check_base=check_base)


# ------------------------------------------------------------------------------------ merge


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and drop the PEFT wrappers, in place → a plain HatLM."""
    _peft()
    from peft.tuners.lora import LoraLayer

    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    if not targets:
        raise UserError("this model has no LoRA adapters to merge")
    for name, mod in targets:
        mod.merge(safe_merge=True)  # safe_merge: refuses to produce NaN/inf weights
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, mod.get_base_layer())
    for attr in ("peft_config", "hatlm_lora_spec"):
        if hasattr(model, attr):
            delattr(model, attr)
    model.requires_grad_(True)
    return model
