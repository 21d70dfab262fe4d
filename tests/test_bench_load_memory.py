"""bench/load_memory.py: the random checkpoint written from a meta-device model is a valid Mistral folder."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

import hatlm
from hatlm.config import ModelConfig
from hatlm.model import HatLM


def _bench():
    path = Path(__file__).resolve().parents[1] / "bench" / "load_memory.py"
    spec = importlib.util.spec_from_file_location("bench_load_memory", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_random_checkpoint_from_meta_loads_with_every_shape(tmp_path):
    config = ModelConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2,
                         hybrid=dict(arm="causal", thinker_layers=0, thought_slots=0))
    folder = tmp_path / "ckpt"
    n = _bench().write_random_checkpoint(config, folder, torch.bfloat16, "40KB")
    ref = HatLM(config)  # the same shapes built for real, as the oracle
    assert n == sum(p.numel() for p in ref.parameters())
    assert "hatlm" not in json.loads((folder / "config.json").read_text())  # a plain Mistral folder
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == len(list(folder.glob("*.safetensors"))) > 1
    model = hatlm.load(str(folder))
    got = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    want = {k: (tuple(v.shape), torch.bfloat16) for k, v in ref.state_dict().items()}
    assert got == want
    w = model.decoder.layers[0].mlp.down_proj.weight
    assert 0 < float(w.detach().float().abs().max()) <= 0.0201  # random values (±0.02 in bf16), not zeros
