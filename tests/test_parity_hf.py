"""The plain causal path equals transformers' MistralForCausalLM (eager attention) on the same weights.

docs/design.md §4: logits to 1e-5 in float32. The weights reach hatlm the way real ones do: transformers
saves a sharded checkpoint (`save_pretrained(..., max_shard_size=...)`) and `hatlm.load` reads it.
The config has GQA (4 heads, 2 KV heads) and a sliding window shorter than the sequence.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_config, make_hf_config

import hatlm

SEQ = 16
WINDOW = 5  # < SEQ: the window really cuts attention (checked by test_sliding_window_is_exercised)
TOL = 1e-5
# Eager FlexAttention on the CPU warns that it is unfused; that is the point here (no compile in tests).
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def _hf_checkpoint(tmp_path, tied: bool, window: int | None = WINDOW):
    """A random transformers Mistral saved in shards; returns (model, folder)."""
    from transformers import MistralForCausalLM

    cfg = make_config(hidden_size=64, intermediate_size=128, sliding_window=window, tie_word_embeddings=tied)
    hf = MistralForCausalLM(make_hf_config(cfg)).eval()
    folder = tmp_path / "hf"
    hf.save_pretrained(folder, max_shard_size="30KB")
    return hf, folder


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@pytest.mark.parametrize("tied", [False, True])
def test_logits_match_transformers_sharded_checkpoint(tmp_path, tied, backend):
    hf, folder = _hf_checkpoint(tmp_path, tied)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1, "the checkpoint should be sharded"

    model = hatlm.load(folder, attn_backend=backend)
    assert model.config.arm == "causal" and len(model.decoder.layers) == 2
    assert model.config.attn_backend == backend
    assert model.config.sliding_window == WINDOW and model.config.num_key_value_heads == 2
    assert (model.lm_head.weight is model.decoder.embed_tokens.weight) == tied

    ids = torch.randint(0, 97, (2, SEQ))
    with torch.no_grad():
        ref = hf(ids).logits
        ours = model(ids)
    diff = (ours - ref).abs().max().item()
    print(f"max|hatlm - transformers| tied={tied} backend={backend}: {diff:.3g}")
    assert ours.shape == ref.shape == (2, SEQ, 97)
    assert ref.std() > 0.3  # O(1) logits: the comparison is not between near-zero numbers
    assert diff <= TOL


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_padded_batch_matches_transformers_attention_mask(tmp_path, backend):
    """Right-padded rows with `lengths` equal transformers with a 0/1 attention_mask, at every
    valid position; padding holds real token ids, so only the mask keeps them out."""
    hf, folder = _hf_checkpoint(tmp_path, tied=False)
    model = hatlm.load(folder, attn_backend=backend)
    lengths = torch.tensor([SEQ, 9, 3])
    ids = torch.randint(0, 97, (3, SEQ))
    attn = (torch.arange(SEQ)[None, :] < lengths[:, None]).long()
    with torch.no_grad():
        ref = hf(ids, attention_mask=attn).logits
        ours = model(ids, lengths=lengths)
    valid = attn.bool()
    diff = (ours - ref)[valid].abs().max().item()
    print(f"max|hatlm - transformers| padded batch backend={backend}: {diff:.3g}")
    assert diff <= TOL
    # Each row also equals itself alone, unpadded.
    for b, n in enumerate(lengths.tolist()):
        with torch.no_grad():
            alone = model(ids[b : b + 1, :n])
        assert (alone[0] - ours[b, :n]).abs().max().item() <= TOL


def test_sliding_window_is_exercised(tmp_path):
    """Negative control: with the window removed, transformers' logits differ from hatlm's (window
    on) by far more than the tolerance — so the parity tests above do pin the window semantics."""
    from transformers import MistralForCausalLM

    hf, folder = _hf_checkpoint(tmp_path, tied=False)
    model = hatlm.load(folder)
    no_window = MistralForCausalLM(make_hf_config(model.config, sliding_window=None)).eval()
    no_window.load_state_dict(hf.state_dict())
    ids = torch.randint(0, 97, (1, SEQ))
    with torch.no_grad():
        ours, ref_full = model(ids), no_window(ids).logits
    # Identical while the window covers the whole prefix, different after.
    assert (ours[:, :WINDOW] - ref_full[:, :WINDOW]).abs().max() <= TOL
    assert (ours[:, WINDOW:] - ref_full[:, WINDOW:]).abs().max() > 1e-2


def test_hatlm_saved_causal_checkpoint_loads_in_transformers(tmp_path):
    """The other direction: a hatlm causal model saved by hatlm loads in MistralForCausalLM."""
    from transformers import MistralForCausalLM

    from hatlm.checkpoint import save_model

    model = hatlm.HatLM(make_config(sliding_window=4, hybrid=dict(arm="causal", thinker_layers=0)))
    save_model(model, tmp_path / "ours", max_shard_size="10KB")
    hf = MistralForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        diff = (hf(ids).logits - model(ids)).abs().max().item()
    print(f"max|transformers(hatlm checkpoint) - hatlm|: {diff:.3g}")
    assert diff <= TOL
