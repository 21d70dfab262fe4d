"""Typed model configuration: the Mistral backbone plus the hybrid (thinking) section.

A `ModelConfig` reads and writes Hugging Face `config.json` files for Mistral. hatlm's own
checkpoints add a `hatlm` section holding the `HybridConfig`; a plain Mistral folder has none and
loads as the `causal` arm.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from hatlm.errors import ConfigError

Arm = Literal["causal", "pause", "hybrid"]
ARMS: tuple[str, ...] = ("causal", "pause", "hybrid")


@dataclass
class HybridConfig:
    """The thinking part of the model (docs/design.md §1) and which comparison arm is built.

    arm="causal": the thinker's layers become extra decoder layers (parameter-matched baseline).
    arm="pause":  causal decoder (with the extra layers) plus `thought_slots` learned positions.
    arm="hybrid": the full model — encoder, thinker, thought slots, decoder.
    """

    arm: str = "hybrid"
    thinker_layers: int = 2  # K: Mistral-shaped layers iterated with shared weights
    thought_slots: int = 8  # m: learned latent positions appended to the prompt
    max_think_iters: int = 4  # T_max
    halting_threshold: float = 0.0  # ε on ‖z_t − z_{t−1}‖/‖z_{t−1}‖; 0 disables halting
    encoder_layers: int = 0  # first backbone layers run over the prompt before thinking
    reweight: bool = True  # contextual re-weighting by cosine similarity
    reweight_temperature: float = 1.0  # initial value of the learned temperature
    gate_bias_init: float = 0.0  # interpolation gate a = sigmoid(w·u + b); 0 → a = 0.5 at init
    # Initial per-layer, per-head gate of the decoder's attention to the thought (or pause) positions.
    # 0 makes a fresh hybrid/pause model equal its base model for any number of slots.
    thought_gate_init: float = 0.0
    decoder_prefix: str = "causal"  # decoder mask over prompt+thoughts: "causal" | "bidirectional"
    thinker_init: str = "copy_first"  # when built from a Mistral checkpoint: "copy_first" | "random"

    def validate(self) -> None:
        if self.arm not in ARMS:
            raise ConfigError(f"hybrid.arm must be one of {', '.join(ARMS)}; got {self.arm!r}")
        for name in ("thinker_layers", "thought_slots", "max_think_iters", "encoder_layers"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ConfigError(f"hybrid.{name} must be a non-negative integer; got {v!r}")
        if self.arm == "hybrid" and self.thinker_layers < 1:
            raise ConfigError("hybrid.thinker_layers must be >= 1 for the hybrid arm")
        if self.halting_threshold < 0:
            raise ConfigError(f"hybrid.halting_threshold must be >= 0; got {self.halting_threshold}")
        if self.decoder_prefix not in ("causal", "bidirectional"):
            raise ConfigError(
                f"hybrid.decoder_prefix must be 'causal' or 'bidirectional'; got {self.decoder_prefix!r}"
            )
        if self.thinker_init not in ("copy_first", "random"):
            raise ConfigError(
                f"hybrid.thinker_init must be 'copy_first' or 'random'; got {self.thinker_init!r}"
            )


@dataclass
class ModelConfig:
    """Mistral decoder hyper-parameters (field names follow Hugging Face's `MistralConfig`)."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int | None = None  # None → hidden_size // num_attention_heads
    max_position_embeddings: int = 32768
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    sliding_window: int | None = 4096
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int | None = None
    initializer_range: float = 0.02
    attn_backend: str = "sdpa"  # "sdpa" (explicit boolean mask) or "flex" (FlexAttention block mask)
    hybrid: HybridConfig = field(default_factory=HybridConfig)

    def __post_init__(self) -> None:
        if isinstance(self.hybrid, dict):
            self.hybrid = hybrid_from_dict(self.hybrid)
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        self.validate()

    # ----------------------------------------------------------------------------------------
    def validate(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "max_position_embeddings",
        ):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ConfigError(f"{name} must be a positive integer; got {v!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads}) for grouped-query attention"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE; got {self.head_dim}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ConfigError(f"sliding_window must be a positive integer or null; got {self.sliding_window}")
        if self.attn_backend not in ("sdpa", "flex"):
            raise ConfigError(f"attn_backend must be 'sdpa' or 'flex'; got {self.attn_backend!r}")
        self.hybrid.validate()
        if self.hybrid.encoder_layers > self.num_hidden_layers:
            raise ConfigError(
                f"hybrid.encoder_layers ({self.hybrid.encoder_layers}) exceeds num_hidden_layers "
                f"({self.num_hidden_layers})"
            )

    @property
    def arm(self) -> str:
        return self.hybrid.arm

    @property
    def decoder_layers(self) -> int:
        """Decoder depth: the baselines take the thinker's layers as extra decoder layers."""
        if self.hybrid.arm == "hybrid":
            return self.num_hidden_layers
        return self.num_hidden_layers + self.hybrid.thinker_layers

    @property
    def num_thought_slots(self) -> int:
        return 0 if self.hybrid.arm == "causal" else self.hybrid.thought_slots

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with `changes`; keys of HybridConfig may be given directly (e.g. thought_slots=4)."""
        hybrid_names = {f.name for f in dataclasses.fields(HybridConfig)}
        model_changes = {k: v for k, v in changes.items() if k not in hybrid_names}
        hybrid_changes = {k: v for k, v in changes.items() if k in hybrid_names}
        unknown = set(model_changes) - {f.name for f in dataclasses.fields(ModelConfig)}
        if unknown:
            raise ConfigError(
                f"unknown config key(s): {', '.join(sorted(unknown))}; valid keys are the fields of "
                "ModelConfig and HybridConfig"
            )
        hybrid = dataclasses.replace(self.hybrid, **hybrid_changes)
        return dataclasses.replace(self, **model_changes, hybrid=hybrid)

    # ---------------------------------------------------------------------- presets and HF io
    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> ModelConfig:
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
        return cls(**PRESETS[name]).replace(**overrides)

    def to_hf_dict(self) -> dict[str, Any]:
        """A Hugging Face `config.json` dictionary (with a `hatlm` section for the hybrid)."""
        d = {
            "architectures": ["MistralForCausalLM"],
            "model_type": "mistral",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "sliding_window": self.sliding_window,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "initializer_range": self.initializer_range,
            "hidden_act": "silu",
            "torch_dtype": "float32",
            "hatlm": {"attn_backend": self.attn_backend, **dataclasses.asdict(self.hybrid)},
        }
        return d

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Read a Mistral-like Hugging Face config. Every value comes from the file; a missing
        required key is an error rather than a silent default (eps and θ differ across versions)."""
        model_type = d.get("model_type")
        if model_type not in ("mistral", "llama"):
            raise ConfigError(
                f"{source}: model_type is {model_type!r}; hatlm loads Mistral-architecture "
                "checkpoints (model_type 'mistral')"
            )
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{source}: hidden_act is {act!r}; Mistral uses 'silu'")
        if d.get("attention_bias") or d.get("mlp_bias"):
            raise ConfigError(f"{source}: attention/MLP biases are not part of the Mistral architecture")
        required = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
        )
        missing = [k for k in required if k not in d]
        if missing:
            raise ConfigError(f"{source}: missing required key(s) {', '.join(missing)}")
        rope_theta = d.get("rope_theta")
        if rope_theta is None and isinstance(d.get("rope_parameters"), dict):
            rope_theta = d["rope_parameters"].get("rope_theta")
            rtype = d["rope_parameters"].get("rope_type", "default")
            if rtype != "default":
                raise ConfigError(f"{source}: rope_type {rtype!r} is not supported (only 'default')")
        if rope_theta is None:
            raise ConfigError(
                f"{source}: no rope_theta; Mistral v0.1 uses 10000 and v0.2 uses 1e6, so hatlm will "
                "not guess — add it to the config"
            )
        if "rms_norm_eps" not in d:
            raise ConfigError(f"{source}: no rms_norm_eps (Mistral-7B uses 1e-5); add it to the config")
        extra = dict(d.get("hatlm") or {})
        attn_backend = extra.pop("attn_backend", "sdpa")
        # A saved causal/pause arm writes its real decoder depth (L + K) as num_hidden_layers so that
        # transformers can load it; `backbone_layers` keeps L (see hatlm.checkpoint.hf_config_dict).
        backbone_layers = extra.pop("backbone_layers", None)
        hybrid = hybrid_from_dict(extra, source) if extra else HybridConfig(arm="causal", thought_slots=0)
        if not extra:
            hybrid.thinker_layers = 0
        eos = d.get("eos_token_id", 2)
        if isinstance(eos, list):
            eos = eos[0]
        try:
            return cls(
                vocab_size=d["vocab_size"],
                hidden_size=d["hidden_size"],
                intermediate_size=d["intermediate_size"],
                num_hidden_layers=d["num_hidden_layers"] if backbone_layers is None else backbone_layers,
                num_attention_heads=d["num_attention_heads"],
                num_key_value_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
                head_dim=d.get("head_dim"),
                max_position_embeddings=d.get("max_position_embeddings", 32768),
                rope_theta=float(rope_theta),
                rms_norm_eps=float(d["rms_norm_eps"]),
                sliding_window=d.get("sliding_window"),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                bos_token_id=d.get("bos_token_id", 1),
                eos_token_id=eos,
                pad_token_id=d.get("pad_token_id"),
                initializer_range=d.get("initializer_range", 0.02),
                attn_backend=attn_backend,
                hybrid=hybrid,
            )
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_hf_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return cls.from_hf_dict(d, source=str(path))


def hybrid_from_dict(d: dict[str, Any], source: str = "hybrid config") -> HybridConfig:
    names = {f.name for f in dataclasses.fields(HybridConfig)}
    unknown = set(d) - names
    if unknown:
        raise ConfigError(
            f"{source}: unknown hybrid key(s) {', '.join(sorted(unknown))}; valid: {', '.join(sorted(names))}"
        )
    return HybridConfig(**d)


# Named presets. `tiny` trains on 2 CPU cores in minutes; `mistral-7b` is Mistral-7B-v0.1 exactly.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        vocab_size=32000,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        sliding_window=256,
        hybrid=dict(thinker_layers=2, thought_slots=8, max_think_iters=4),
    ),
    "small": dict(
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        sliding_window=4096,
        hybrid=dict(thinker_layers=2, thought_slots=16, max_think_iters=4),
    ),
    "mistral-7b": dict(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=32768,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        sliding_window=4096,
        hybrid=dict(thinker_layers=2, thought_slots=16, max_think_iters=4),
    ),
}
# Same shapes as `tiny` on a byte vocabulary (259 = 256 bytes + BOS/EOS/PAD): from-scratch runs on tasks.
PRESETS["tiny-bytes"] = dict(
    PRESETS["tiny"], vocab_size=259, sliding_window=None, tie_word_embeddings=True,
    bos_token_id=256, eos_token_id=257, pad_token_id=258,
)  # fmt: skip
PRESETS = {name: PRESETS[name] for name in ("tiny", "tiny-bytes", "small", "mistral-7b")}  # listing order
