"""The one model + tokenizer loader, and the shared helpers (atomic writes, --set values, devices)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from hatlm.checkpoint import save_model
from hatlm.errors import ConfigError, UserError
from hatlm.loader import load_model_and_tokenizer
from hatlm.tokenizer import ByteTokenizer
from hatlm.util import atomic_write, atomic_write_json, atomic_write_text, parse_set_items, resolve_device

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
             num_key_value_heads=1, thinker_layers=1, thought_slots=2, max_think_iters=2)


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_preset_is_deterministic_with_the_tokenizer_its_vocabulary_implies():
    torch.manual_seed(123)  # the global RNG state must not matter
    a, tok = load_model_and_tokenizer("tiny-bytes", arm="pause", **SMALL)
    b, _ = load_model_and_tokenizer("tiny-bytes", arm="pause", **SMALL)
    c, _ = load_model_and_tokenizer("tiny-bytes", arm="pause", seed=1, **SMALL)
    assert isinstance(tok, ByteTokenizer) and a.arm == "pause" and a.config.hidden_size == 32
    assert _same_weights(a, b) and not _same_weights(a, c)
    assert a.dtype == torch.float32 and a.device.type == "cpu"
    d, _ = load_model_and_tokenizer("tiny-bytes", dtype=torch.bfloat16, **SMALL)
    assert d.dtype == torch.bfloat16  # what was asked for, even on the CPU


def test_folder_round_trip_and_clear_errors(tmp_path):
    model, tok = load_model_and_tokenizer("tiny-bytes", arm="hybrid", **SMALL)
    save_model(model, tmp_path / "ckpt", tokenizer=tok)
    again, tok2 = load_model_and_tokenizer(tmp_path / "ckpt")
    assert again.arm == "hybrid" and isinstance(tok2, ByteTokenizer) and _same_weights(model, again)

    with pytest.raises(UserError, match="neither a checkpoint folder nor a preset: no such checkpoint folder"):
        load_model_and_tokenizer(str(tmp_path / "missing"))
    with pytest.raises(UserError, match="neither a checkpoint folder nor a preset"):
        load_model_and_tokenizer("tiny-byts")
    # A folder without its own tokenizer falls back to Mistral's 32000 tokens: too many for 259.
    (tmp_path / "ckpt" / "hatlm_tokenizer.json").unlink()
    with pytest.raises(UserError, match="tokenizer has 32000 tokens but the model only 259"):
        load_model_and_tokenizer(tmp_path / "ckpt")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_cuda_is_an_error_not_a_fallback():
    with pytest.raises(ConfigError, match="CUDA is not available"):
        load_model_and_tokenizer("tiny-bytes", device="cuda", **SMALL)
    with pytest.raises(ConfigError, match="not a device name"):
        resolve_device("gpu0")
    assert resolve_device("auto").type == "cpu" and resolve_device(None).type == "cpu"


def test_atomic_writes_leave_the_old_file_on_failure_and_no_temporaries(tmp_path):
    p = tmp_path / "sub" / "out.json"
    atomic_write_json(p, {"a": 1, "x": torch.tensor(2.5).numpy()[()]})
    assert json.loads(p.read_text()) == {"a": 1, "x": 2.5}
    atomic_write_text(p, "new")
    assert p.read_text() == "new"

    def fail(tmp):
        tmp.write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_write(p, fail)
    assert p.read_text() == "new" and os.listdir(p.parent) == ["out.json"]


def test_set_items_parse_like_yaml():
    assert parse_set_items(["steps=5", "lr=1e-3", "name=x=y", "flag=true", "ds=[1, 2]", "none=null"]) == {
        "steps": 5, "lr": 1e-3, "name": "x=y", "flag": True, "ds": [1, 2], "none": None}
    with pytest.raises(UserError, match="--set 'steps': expected KEY=VALUE"):
        parse_set_items(["steps"])
