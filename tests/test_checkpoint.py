"""Checkpoints: exact round trips for every arm, sharding, atomic replacement, initialising the arms
from a plain Mistral folder, and every error path with its message."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import make_config, make_hf_config

import hatlm
from hatlm.checkpoint import load_model, read_safetensors_header, save_model, write_safetensors
from hatlm.config import ModelConfig
from hatlm.errors import CheckpointError, ConfigError
from hatlm.model import HatLM

PL = torch.tensor([3, 5])
LENGTHS = torch.tensor([8, 6])


def _ids() -> torch.Tensor:
    return torch.randint(3, 97, (2, 8))


def _forward(model: HatLM, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, prompt_lengths=PL, lengths=LENGTHS).logits


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(safetensors.torch.load_file(f))  # the reference reader
    return out


# ------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("arm,tied", [("causal", False), ("pause", True), ("hybrid", False), ("hybrid", True)], ids=str)
def test_save_load_round_trip_is_exact(tmp_path, arm, tied):
    cfg = make_config(
        arm=arm,
        tie_word_embeddings=tied,
        thinker_layers=1,
        thought_slots=2,
        max_think_iters=5,
        halting_threshold=0.01,
        decoder_prefix="bidirectional",
        reweight_temperature=0.5,
        sliding_window=6,
    )
    model = HatLM(cfg).eval()
    if arm == "hybrid":
        with torch.no_grad():  # non-default values everywhere, as after training
            model.prompt_refine.weight.normal_(0.0, 0.2)
            model.thinker.gate.bias.fill_(0.3)
    save_model(model, tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp folders left behind
    loaded = load_model(tmp_path / "ckpt")

    assert loaded.config == model.config
    assert ModelConfig.load(tmp_path / "ckpt" / "config.json") == model.config
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys()
    assert all(torch.equal(sd[k], sd2[k]) and sd[k].dtype == sd2[k].dtype for k in sd)
    assert (loaded.lm_head.weight is loaded.decoder.embed_tokens.weight) == tied
    ids = _ids()
    assert torch.equal(_forward(model, ids), _forward(loaded, ids))

    d = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert d["hatlm"]["arm"] == arm
    if arm != "hybrid":  # the real decoder depth is what transformers reads
        assert d["num_hidden_layers"] == 3 and d["hatlm"]["backbone_layers"] == 2
    # The files are valid safetensors for the reference reader, with HF names; a tied head is stored once.
    on_disk = _tensors(tmp_path / "ckpt")
    assert ("lm_head.weight" in on_disk) == (not tied)
    assert torch.equal(on_disk["model.embed_tokens.weight"], model.decoder.embed_tokens.weight)


def test_sharded_save(tmp_path):
    model = HatLM(make_config(hidden_size=64, intermediate_size=128)).eval()
    save_model(model, tmp_path / "ckpt", max_shard_size="20KB")
    folder = tmp_path / "ckpt"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(set(index["weight_map"].values())) == shards
    assert not (folder / "model.safetensors").exists()
    on_disk = _tensors(folder)
    assert set(index["weight_map"]) == set(on_disk)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in on_disk.values())
    for name in shards:  # every shard within the limit unless it holds a single larger tensor
        size = sum(e.end - e.start for e in read_safetensors_header(folder / name).values())
        assert size <= 20_000 or len(read_safetensors_header(folder / name)) == 1
    loaded = load_model(folder)
    ids = _ids()
    assert torch.equal(_forward(model, ids), _forward(loaded, ids))


def test_dtype_kept_or_cast(tmp_path):
    model = HatLM(make_config()).to(torch.bfloat16)
    save_model(model, tmp_path / "bf16")
    kept = load_model(tmp_path / "bf16")
    assert {p.dtype for p in kept.parameters()} == {torch.bfloat16}
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    up = load_model(tmp_path / "bf16", dtype="float32")
    assert {p.dtype for p in up.parameters()} == {torch.float32}
    assert torch.equal(up.decoder.embed_tokens.weight, model.decoder.embed_tokens.weight.float())


def test_replacing_a_checkpoint_is_atomic(tmp_path):
    folder = tmp_path / "ckpt"
    a, b = HatLM(make_config()), HatLM(make_config())
    save_model(a, folder)
    save_model(b, folder)  # replaces
    assert torch.equal(load_model(folder).decoder.embed_tokens.weight, b.decoder.embed_tokens.weight)

    def fail(tmp: Path) -> None:
        (tmp / "optimizer.pt").write_bytes(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_model(a, folder, write_extra=fail)
    # The failed save left the previous checkpoint whole and no temp folder behind.
    assert torch.equal(load_model(folder).decoder.embed_tokens.weight, b.decoder.embed_tokens.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert not (folder / "optimizer.pt").exists()

    save_model(a, folder, write_extra=lambda tmp: (tmp / "state.json").write_text("{}"))
    assert (folder / "state.json").read_text() == "{}"

    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        save_model(a, other)
    assert (other / "todo.txt").read_text() == "keep me"


def test_tokenizer_saved_with_the_model(tmp_path):
    from hatlm.tokenizer import ByteTokenizer, load_tokenizer

    save_model(HatLM(make_config()), tmp_path / "ckpt", tokenizer=ByteTokenizer())
    assert isinstance(load_tokenizer(tmp_path / "ckpt"), ByteTokenizer)


# ------------------------------------------------------------------------------ from a Mistral folder


@pytest.fixture(scope="module")
def mistral_folder(tmp_path_factory):
    """A random transformers Mistral (2 layers, GQA, window 5) saved in shards, and its model."""
    from transformers import MistralForCausalLM

    torch.manual_seed(1)
    cfg = make_config(arm="causal", thinker_layers=0, sliding_window=5)
    hf = MistralForCausalLM(make_hf_config(cfg)).eval()
    folder = tmp_path_factory.mktemp("mistral") / "hf"
    hf.save_pretrained(folder, max_shard_size="20KB")
    return folder, hf


def test_hybrid_initialised_from_mistral_equals_the_base_with_zero_slots(mistral_folder):
    folder, hf = mistral_folder
    base = hatlm.load(folder)
    hyb = hatlm.load(folder, arm="hybrid", thought_slots=0)
    assert hyb.config.arm == "hybrid" and hyb.config.hybrid.thinker_layers == 2  # HybridConfig default K
    ids = _ids()
    with torch.no_grad():
        ref = hf(ids, attention_mask=(torch.arange(8)[None] < LENGTHS[:, None]).long()).logits
    out = _forward(hyb, ids)
    valid = torch.arange(8)[None] < LENGTHS[:, None]
    diff_base = (out - _forward(base, ids))[valid].abs().max().item()
    diff_hf = (out - ref)[valid].abs().max().item()
    print(f"max|hybrid from Mistral (m=0) - base|: {diff_base:.3g}; - transformers: {diff_hf:.3g}")
    assert diff_base <= 1e-6 and diff_hf <= 1e-5
    # copy_first: the thinker starts as the first K decoder layers; the refinement path is fresh.
    for i, layer in enumerate(hyb.thinker.layers):
        ref_sd = hyb.decoder.layers[i].state_dict()
        assert all(torch.equal(v, ref_sd[k]) for k, v in layer.state_dict().items())
    assert not hyb.prompt_refine.weight.any() and not hyb.thinker.gate.weight.any()

    rnd = hatlm.load(folder, arm="hybrid", thinker_init="random", thought_slots=4)
    assert not torch.equal(rnd.thinker.layers[0].self_attn.q_proj.weight, rnd.decoder.layers[0].self_attn.q_proj.weight)
    assert rnd.thought_slots.shape == (4, 32) and rnd.thought_slots.std() > 0
    a = hatlm.load(folder, arm="hybrid", seed=3)
    b = hatlm.load(folder, arm="hybrid", seed=3)
    assert torch.equal(a.thought_slots, b.thought_slots)  # fresh parts are reproducible with a seed
    with pytest.raises(ConfigError, match="copies the first 3 decoder layers.*only 2"):
        hatlm.load(folder, arm="hybrid", thinker_layers=3)


def test_baseline_arms_from_mistral_get_identity_extra_layers(mistral_folder, tmp_path):
    from transformers import MistralForCausalLM

    folder, hf = mistral_folder
    causal = hatlm.load(folder, arm="causal")  # K = 2 extra decoder layers (parameter-matched)
    assert len(causal.decoder.layers) == 4
    for layer in causal.decoder.layers[2:]:
        assert not layer.self_attn.o_proj.weight.any() and not layer.mlp.down_proj.weight.any()
        assert layer.self_attn.q_proj.weight.std() > 0 and layer.mlp.gate_proj.weight.std() > 0
    ids = _ids()
    with torch.no_grad():
        ref = hf(ids).logits
        out = causal(ids)
    diff = (out - ref).abs().max().item()
    print(f"max|causal arm with identity extra layers - transformers base|: {diff:.3g}")
    assert diff <= 1e-5

    # Saved, it is a 4-layer Mistral for transformers, with the same logits.
    save_model(causal, tmp_path / "causal")
    hf4 = MistralForCausalLM.from_pretrained(tmp_path / "causal", attn_implementation="eager").eval()
    assert hf4.config.num_hidden_layers == 4
    with torch.no_grad():
        diff4 = (hf4(ids).logits - out).abs().max().item()
    print(f"max|transformers(saved causal arm) - hatlm|: {diff4:.3g}")
    assert diff4 <= 1e-5
    assert load_model(tmp_path / "causal").config == causal.config

    pause = hatlm.load(folder, arm="pause", thought_slots=2)
    assert len(pause.decoder.layers) == 4 and pause.thought_slots.shape == (2, 32)
    assert not pause.decoder.layers[3].mlp.down_proj.weight.any()


# ------------------------------------------------------------------------------ errors


def _saved(tmp_path: Path, **kw) -> Path:
    folder = tmp_path / "ckpt"
    save_model(HatLM(make_config(arm="causal", thinker_layers=0)), folder, **kw)
    return folder


def test_error_missing_folder_and_file_instead_of_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no such folder"):
        hatlm.load(tmp_path / "nope")
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="is a file; expected the checkpoint folder"):
        hatlm.load(tmp_path / "model.safetensors")


def test_error_no_config(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json; expected a Hugging Face-layout Mistral folder"):
        hatlm.load(tmp_path)
    (tmp_path / "params.json").write_text("{}")
    with pytest.raises(CheckpointError, match="mistral-inference"):
        hatlm.load(tmp_path)


def test_error_config_not_mistral(tmp_path):
    folder = _saved(tmp_path)
    d = json.loads((folder / "config.json").read_text())
    d["model_type"] = "gpt2"
    (folder / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match="model_type is 'gpt2'.*model_type 'mistral'"):
        hatlm.load(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        hatlm.load(folder)


def test_error_no_weights_and_bin_only(tmp_path):
    folder = _saved(tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights; expected model.safetensors"):
        hatlm.load(folder)
    (folder / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(CheckpointError) as e:
        hatlm.load(folder)
    msg = str(e.value)
    assert "pytorch_model.bin" in msg and "safetensors only" in msg
    assert f"M.from_pretrained('{folder}').save_pretrained('{folder}')" in msg


def test_error_index_names_missing_shard(tmp_path):
    folder = _saved(tmp_path, max_shard_size="10KB")
    shards = sorted(folder.glob("model-*.safetensors"))
    shards[1].unlink()
    with pytest.raises(CheckpointError, match=f"names 1 shard file\\(s\\) missing from the folder: {shards[1].name}"):
        hatlm.load(folder)


def test_error_missing_unexpected_and_misshaped_tensors(tmp_path):
    folder = _saved(tmp_path)
    # clone: load_file maps the file, which is rewritten below
    tensors = {k: v.clone() for k, v in safetensors.torch.load_file(folder / "model.safetensors").items()}
    layer1 = sorted(k for k in tensors if k.startswith("model.layers.1."))

    write_safetensors(folder / "model.safetensors", [(k, v) for k, v in tensors.items() if k not in layer1])
    with pytest.raises(CheckpointError) as e:
        hatlm.load(folder)
    msg = str(e.value)
    # Named in model order: first five, then the count of the rest.
    shown = "model.layers.1.input_layernorm.weight, model.layers.1.self_attn.q_proj.weight"
    assert f"{len(layer1)} tensor(s) missing from the checkpoint: {shown}" in msg and "… (+4 more)" in msg
    assert "causal arm: 2 decoder layers, hidden 32" in msg

    extra = [
        *tensors.items(),
        ("model.layers.7.mlp.up_proj.weight", torch.zeros(3)),
        ("thinker.gate.bias", torch.zeros(1)),
    ]
    write_safetensors(folder / "model.safetensors", extra)
    with pytest.raises(CheckpointError, match="2 unexpected tensor\\(s\\) that the model does not have: "):
        hatlm.load(folder)

    write_safetensors(folder / "model.safetensors", list(tensors.items()))
    d = json.loads((folder / "config.json").read_text())
    d["intermediate_size"] = 48
    (folder / "config.json").write_text(json.dumps(d))
    with pytest.raises(CheckpointError) as e:
        hatlm.load(folder)
    msg = str(e.value)
    assert "6 shape mismatch(es): model.layers.0.mlp.gate_proj.weight: expected [48, 32], found [64, 32]" in msg
    assert "model.layers.0.mlp.down_proj.weight: expected [32, 48], found [32, 64]" in msg


def test_error_truncated_file(tmp_path):
    folder = _saved(tmp_path)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        hatlm.load(folder)
    (folder / "model.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        hatlm.load(folder)


def test_cli_prints_checkpoint_errors_as_one_line(tmp_path, capsys):
    from hatlm.cli import main

    shutil.copytree(_saved(tmp_path), tmp_path / "copy")
    (tmp_path / "copy" / "config.json").unlink()
    assert main(["info", str(tmp_path / "copy")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hatlm info: error:") and "no config.json" in err and "\n" not in err


@pytest.mark.parametrize("encoder_layers", [0, 1])
@pytest.mark.parametrize("m", [0, 4, 16])
def test_hybrid_from_mistral_starts_at_the_base_for_any_number_of_slots(mistral_folder, m, encoder_layers):
    """Every path from thinking to the decoder (the thoughts as keys, the prompt refinement, the
    reading of the first answer token) is closed at a fresh start: logits = transformers' to 1e-5."""
    folder, hf = mistral_folder
    hyb = hatlm.load(folder, arm="hybrid", thought_slots=m, encoder_layers=encoder_layers)
    ids = _ids()
    valid = torch.arange(8)[None] < LENGTHS[:, None]
    with torch.no_grad():
        ref = hf(ids, attention_mask=valid.long()).logits
        out = hyb(ids, prompt_lengths=PL, lengths=LENGTHS)
    assert out.think is not None and int(out.iterations.min()) > 0  # it did think …
    if m:
        assert out.think.thoughts(m).std() > 0
    diff = (out.logits - ref)[valid].abs().max().item()
    print(f"max|hybrid from Mistral (m={m}, encoder_layers={encoder_layers}) - transformers|: {diff:.3g}")
    assert diff <= 1e-5  # … and yet speaks exactly as the base model
    # Opening the decoder's gates lets the thoughts in (so the equality above is not vacuous).
    if m:
        with torch.no_grad():
            for g in hyb.thought_gate:
                g.fill_(0.5)
            opened = hyb(ids, prompt_lengths=PL, lengths=LENGTHS).logits
        assert (opened - ref)[valid].abs().max().item() > 1e-3


def test_init_from_writes_a_hybrid_checkpoint_equal_to_loading_it(mistral_folder, tmp_path):
    from hatlm.cli import main

    folder, _ = mistral_folder
    out = tmp_path / "hybrid"
    assert main(["init-from", str(folder), str(out), "--arm", "hybrid", "--thought-slots", "4", "--seed", "3"]) == 0
    saved = hatlm.load(out)
    direct = hatlm.load(folder, arm="hybrid", thought_slots=4, seed=3)
    assert saved.config.arm == "hybrid" and saved.config.num_thought_slots == 4
    a, b = saved.state_dict(), direct.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(SystemExit):
        main(["init-from", str(folder)])  # OUT missing: argparse usage error
    assert main(["init-from", str(tmp_path / "nope"), str(tmp_path / "x")]) == 2
