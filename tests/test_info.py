"""`hatlm info`: parameter counts on the meta device, memory estimates, folders read by config only."""

from __future__ import annotations

import json
import resource

from conftest import make_config

from hatlm.checkpoint import save_model
from hatlm.cli import main
from hatlm.model import HatLM

MISTRAL_7B = 7_241_732_096  # Mistral-7B-v0.1's parameter count


def _json(capsys, *argv: str) -> dict:
    assert main(["info", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_mistral_7b_counts_on_the_meta_device(capsys, monkeypatch):
    devices: list[set[str]] = []
    original = HatLM.num_parameters

    def spy(self):
        devices.append({p.device.type for p in self.parameters()})
        return original(self)

    monkeypatch.setattr(HatLM, "num_parameters", spy)
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    assert main(["info", "mistral-7b"]) == 0
    table = capsys.readouterr().out
    grown_gib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 2**20
    assert devices == [{"meta"}]  # counted on a model without storage
    assert grown_gib < 0.5  # 7.7B parameters in fp32 would be ~29 GiB
    assert "backbone (decoder + LM head)" in table and "7,241,732,096" in table

    info = _json(capsys, "mistral-7b")
    p, c = info["parameters"], info["config"]
    assert p["backbone"] == MISTRAL_7B
    # The hybrid's additions written out from the architecture (d 4096, KV 1024, MLP 14336, 2 thinker
    # layers, 16 slots, 32 decoder layers × 32 heads of thought gates), not from num_parameters' sum.
    d, kv, ff = 4096, 1024, 14336
    layer = 2 * d * d + 2 * d * kv + 3 * d * ff + 2 * d
    # + the gate (weight, bias), the temperature, the injection norm and the state norm
    assert p["thinker"] == 2 * layer + (d + 1) + 1 + d + d
    assert p["slots_and_gates"] == 16 * d + 32 * 32 + d * d  # slots, decoder gates, prompt projection
    assert p["total"] == MISTRAL_7B + 2 * layer + d + 2 + 2 * d + 16 * d + 32 * 32 + d * d
    assert info["weights_bytes"] == {"fp32": 4 * p["total"], "bf16": 2 * p["total"]}
    # 2 (K and V) × 32 layers × 8 KV heads × 128 head dim × bytes
    assert info["kv_cache_bytes_per_token"] == {"fp32": 262_144, "bf16": 131_072}
    assert (c["decoder_layers"], c["thinker_layers"], c["num_key_value_heads"], c["head_dim"]) == (32, 2, 8, 128)


def test_causal_arm_is_parameter_matched(capsys):
    """The causal baseline's extra decoder layers hold exactly the thinker's layer parameters."""
    hyb = _json(capsys, "mistral-7b")["parameters"]
    causal = _json(capsys, "mistral-7b", "--arm", "causal")
    # the thinker's own: gate (d + 1), relevance temperature, injection norm (d), state norm (d)
    gate_and_temperature = 4096 + 1 + 1 + 4096 + 4096
    assert causal["parameters"]["backbone"] == hyb["backbone"] + hyb["thinker"] - gate_and_temperature
    assert causal["config"]["decoder_layers"] == 34
    assert causal["kv_cache_bytes_per_token"]["bf16"] == 131_072 * 34 // 32


def test_info_on_a_folder_reads_only_its_config(tmp_path, capsys):
    model = HatLM(make_config(tie_word_embeddings=True))
    save_model(model, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "model.safetensors").unlink()  # the weights are not needed
    info = _json(capsys, str(tmp_path / "ckpt"))
    assert info["kind"] == "folder" and info["arm"] == "hybrid"
    assert info["parameters"] == model.num_parameters()
    assert main(["info", str(tmp_path / "ckpt")]) == 0
    assert f"{model.num_parameters()['total']:,}" in capsys.readouterr().out


def test_info_unknown_source(tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "is neither a preset (" in err and "nor an existing checkpoint folder" in err
    assert all(name in err for name in ("tiny", "tiny-bytes", "small", "mistral-7b"))  # in any order
