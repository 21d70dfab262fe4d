"""hatlm.lora: PEFT adapters on the backbone projections only; inject → train → save → load → merge."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import make_config

import hatlm
from hatlm.checkpoint import save_model
from hatlm.errors import UserError
from hatlm.generate import generate
from hatlm.lora import (
    LoraSpec,
    add_lora,
    has_lora,
    load_adapter,
    load_with_adapter,
    merge_lora,
    parse_lora_spec,
    save_adapter,
)
from hatlm.model import HatLM

pytest.importorskip("peft")

PROMPT_LEN = torch.tensor([5, 7])


def make_base(tmp_path, arm="hybrid", seed=0, **overrides):
    torch.manual_seed(seed)
    model = HatLM(make_config(arm=arm, **overrides))
    folder = tmp_path / f"base-{arm}-{seed}"
    save_model(model, folder)
    return folder


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        if model.arm == "causal":
            return model(ids)
        return model(ids, prompt_lengths=PROMPT_LEN).logits


def train_steps(model, params, steps=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(params, lr=2e-2)
    model.train()
    for _ in range(steps):
        ids = torch.randint(3, model.config.vocab_size, (2, 12), generator=g)
        out = model(ids, prompt_lengths=PROMPT_LEN).logits if model.arm != "causal" else model(ids)
        F.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]), ids[:, 1:].reshape(-1)).backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def test_parse_lora_spec():
    assert parse_lora_spec("r=16,alpha=32") == LoraSpec(r=16, alpha=32.0)
    assert parse_lora_spec("r=8") == LoraSpec(r=8, alpha=16.0)  # alpha defaults to 2r
    s = parse_lora_spec("r=4,alpha=8,dropout=0.1,targets=q_proj+v_proj")
    assert (s.dropout, s.targets) == (0.1, ("q_proj", "v_proj"))
    for bad, msg in [("r=0", "positive integer"), ("r=x", "not a number"), ("rank=4", "unknown key"),
                     ("r=4,targets=foo_proj", "match no backbone projection"), ("r", "KEY=VALUE"),
                     ("r=4,dropout=1.5", "dropout")]:  # fmt: skip
        with pytest.raises(UserError, match=msg):
            parse_lora_spec(bad)


@pytest.mark.parametrize("targets", [("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                                     ("q_proj", "v_proj"), ("down_proj",)])  # fmt: skip
def test_adapters_only_on_backbone_projections(targets):
    torch.manual_seed(0)
    model = HatLM(make_config(arm="hybrid"))
    trainable = add_lora(model, LoraSpec(r=2, targets=targets))
    wrapped = {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters() if ".lora_A." in n}
    expected = {f"decoder.layers.{i}.{'self_attn' if t in ('q_proj', 'k_proj', 'v_proj', 'o_proj') else 'mlp'}.{t}"
                for i in range(model.config.decoder_layers) for t in targets}  # fmt: skip
    assert wrapped == expected  # the thinker's identically named projections, gate and LM head are not caught
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {id(p) for p in trainable} == {id(p) for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("thinker.layers.0.self_attn.q_proj") for n in names)  # thinker trained fully
    assert {"thought_slots", "prompt_refine.weight", "thinker.gate.weight"} <= names
    assert not any(n.startswith(("lm_head", "decoder.embed_tokens", "decoder.norm")) for n in names)
    assert all("lora_" in n for n in names if n.startswith("decoder."))


def test_target_matching_nothing_is_a_clear_error():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    model.config = make_config()
    with pytest.raises(UserError, match="matches no module"):
        add_lora(model, LoraSpec(r=2))


def test_inject_train_save_load_merge_give_equal_logits(tmp_path):
    base_dir = make_base(tmp_path)
    model = hatlm.load(base_dir)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(3, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(5))
    before = logits(model, ids)
    params = add_lora(model, LoraSpec(r=4, alpha=8, dropout=0.0), base=str(base_dir))
    assert torch.equal(logits(model, ids), before)  # PEFT's B = 0: the adapter starts as the identity
    train_steps(model, params)
    trained = logits(model, ids)
    assert not torch.allclose(trained, before, atol=1e-3)
    # The frozen base did not move.
    now = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
    frozen = [k for k in base_state if not k.startswith(("thinker", "thought", "prompt"))]
    assert all(torch.equal(now[k], base_state[k]) for k in frozen)

    adapter = save_adapter(model, tmp_path / "adapter", base=str(base_dir))
    files = {p.name for p in adapter.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "hatlm_trainable.safetensors"} <= files
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["r"], cfg["base_model_name_or_path"]) == ("LORA", 4, str(base_dir))
    from safetensors import safe_open

    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("base_model.model.decoder.layers.") and ".lora_" in k for k in keys)

    loaded = load_with_adapter(adapter)  # the base from adapter_config.json
    assert has_lora(loaded)
    torch.testing.assert_close(logits(loaded, ids), trained, atol=1e-6, rtol=0)
    via_load = hatlm.load(base_dir, adapter=adapter)  # the same through hatlm.load
    torch.testing.assert_close(logits(via_load, ids), trained, atol=1e-6, rtol=0)

    merged = merge_lora(loaded)
    assert not has_lora(merged)
    assert set(merged.state_dict()) == set(base_state)  # a plain hatlm model again
    torch.testing.assert_close(logits(merged, ids), trained, atol=1e-5, rtol=0)
    save_model(merged, tmp_path / "merged")
    torch.testing.assert_close(logits(hatlm.load(tmp_path / "merged"), ids), trained, atol=1e-5, rtol=0)


def test_causal_arm_from_plain_mistral_folder(tmp_path):
    """A plain (transformers-layout, no hatlm section) base, causal arm: adapter round trip and merge."""
    torch.manual_seed(1)
    model = HatLM(make_config(arm="causal", thinker_layers=0))
    save_model(model, tmp_path / "base")
    model = hatlm.load(tmp_path / "base")
    ids = torch.randint(3, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(6))
    params = add_lora(model, LoraSpec(r=2), base=str(tmp_path / "base"))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if "lora_" in n
    }
    train_steps(model, params)
    trained = logits(model, ids)
    save_adapter(model, tmp_path / "ad", base=str(tmp_path / "base"))
    assert not (tmp_path / "ad" / "hatlm_trainable.safetensors").exists()  # nothing but adapters trained
    loaded = load_with_adapter(tmp_path / "ad")
    torch.testing.assert_close(logits(merge_lora(loaded), ids), trained, atol=1e-5, rtol=0)


def test_adapter_for_another_base_is_refused(tmp_path):
    base_dir = make_base(tmp_path)
    model = hatlm.load(base_dir)
    params = add_lora(model, LoraSpec(r=2))
    train_steps(model, params, steps=1)
    save_adapter(model, tmp_path / "ad", base=str(base_dir))
    # Same shapes, other weights.
    with pytest.raises(UserError, match="fingerprint"):
        load_adapter(hatlm.load(make_base(tmp_path, seed=1)), tmp_path / "ad")
    # Other shapes.
    other = HatLM(make_config(arm="hybrid", hidden_size=48))
    with pytest.raises(UserError, match="another base model.*hidden_size"):
        load_adapter(other, tmp_path / "ad")
    # Other arm / slots.
    with pytest.raises(UserError, match="thought_slots"):
        load_adapter(hatlm.load(base_dir, thought_slots=5), tmp_path / "ad")
    # Without the check the shapes still have to fit.
    with pytest.raises(UserError, match="do not fit"):
        load_adapter(other, tmp_path / "ad", check_base=False)
    with pytest.raises(UserError, match="not a LoRA adapter folder"):
        load_adapter(hatlm.load(base_dir), tmp_path)


def test_generate_with_unmerged_adapter_equals_merged(tmp_path):
    """Decoding must honour unmerged adapters: greedy tokens equal those of the merged weights."""
    base_dir = make_base(tmp_path)
    model = hatlm.load(base_dir)
    params = add_lora(model, LoraSpec(r=4, alpha=16))
    train_steps(model, params, steps=4)
    prompts = [[1, 5, 9, 14, 3], [1, 7, 7, 20, 33, 41, 2]]
    unmerged = generate(model, None, prompts, 12, ignore_eos=True, output_logits=True)
    merged_model = merge_lora(model)
    merged = generate(merged_model, None, prompts, 12, ignore_eos=True, output_logits=True)
    assert unmerged.tokens == merged.tokens
    for a, b in zip(unmerged.logits, merged.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_cli_merge(tmp_path, capsys):
    from hatlm.cli import main

    base_dir = make_base(tmp_path)
    model = hatlm.load(base_dir)
    train_steps(model, add_lora(model, LoraSpec(r=2)), steps=2)
    ids = torch.randint(3, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(2))
    expected = logits(model, ids)
    save_adapter(model, tmp_path / "ad", base=str(base_dir))
    assert main(["merge", str(tmp_path / "ad"), str(tmp_path / "out")]) == 0
    torch.testing.assert_close(logits(hatlm.load(tmp_path / "out"), ids), expected, atol=1e-5, rtol=0)
    assert main(["merge", str(tmp_path / "nothing"), str(tmp_path / "out2")]) == 2
    assert "not a LoRA adapter folder" in capsys.readouterr().err
