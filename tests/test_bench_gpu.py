"""bench/gpu.py: its tiny CPU mode runs end to end, and its LoRA FLOP formula matches torch's counter."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import make_config
from torch.utils.flop_counter import FlopCounterMode

from hatlm.model import HatLM

pytest.importorskip("peft")
pytest.importorskip("transformers")

BENCH = Path(__file__).resolve().parents[1] / "bench" / "gpu.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_tiny_cpu_run_reports_every_section(tmp_path, monkeypatch, capsys):
    # The GPU machine has no mistral-common: the benchmark must not need it (nor a tokenizer at all).
    monkeypatch.setitem(sys.modules, "mistral_common", None)
    bench = load_bench()
    rc = bench.main(["--preset", "tiny", "--device", "cpu", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert rc == 0, {k: v.get("error") for k, v in report["sections"].items()}
    assert set(report["sections"]) == {"decode", "prefill", "lora"}
    assert all(s["status"] == "ok" for s in report["sections"].values())

    dec = report["sections"]["decode"]
    # float32 on a CPU: hatlm's decode path and transformers agree token for token and on the logits.
    assert dec["greedy_leading_agree"] == dec["new_tokens"]
    assert dec["prefill_logits_max_abs_diff"] < 1e-4
    assert dec["prefill_argmax_agree"] == 1.0
    assert set(dec["engines"]) >= {"transformers", "hatlm causal"}

    pre = report["sections"]["prefill"]["rows"]
    p = bench.PRESETS["tiny"]
    assert {(r["prompt"], r["T"]) for r in pre} == {(P, T) for P in p["prompt_lens"] for T in p["think_iters"]}

    lora = report["sections"]["lora"]
    assert lora["trainable_params"] > 0
    assert [r["batch"] for r in lora["rows"]] == p["lora_batches"]
    for r in lora["rows"]:
        assert math.isfinite(r["loss_first"]) and math.isfinite(r["loss_last"]) and r["tokens_per_s"] > 0

    md = (tmp_path / "gpu.md").read_text()
    assert md.strip() in capsys.readouterr().out  # the same report on stdout
    for title in ("## (a)", "## (b)", "## (c)", "torch ", "transformers "):
        assert title in md


@pytest.mark.slow
def test_failing_section_is_reported_and_others_still_run(tmp_path, monkeypatch):
    bench = load_bench()

    def boom(ctx):
        raise RuntimeError("deliberate failure")

    monkeypatch.setattr(bench, "section_prefill", boom)
    rc = bench.main(["--preset", "tiny", "--device", "cpu", "--sections", "prefill,lora", "--lora-batches", "1",
                     "--out", str(tmp_path)])  # fmt: skip
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert rc == 1
    assert report["sections"]["prefill"]["status"] == "failed"
    assert "deliberate failure" in report["sections"]["prefill"]["error"]
    assert report["sections"]["lora"]["status"] == "ok"
    assert "FAILED" in (tmp_path / "gpu.md").read_text()


@pytest.mark.parametrize("window", [None, 5])
def test_lora_flop_formula_equals_flop_counter(window):
    """Independent oracle: torch's FlopCounterMode counts every matrix product of a real forward+backward
    (on a CPU it does not see SDPA, hence attention="none"; the attention term is the textbook 4·H·D/pair)."""
    bench = load_bench()
    torch.manual_seed(0)
    cfg = make_config(arm="causal", thinker_layers=1, sliding_window=window)
    model = HatLM(cfg)
    bench.add_lora(model, 4)
    model.train()
    B, S = 2, 12
    ids = torch.randint(3, cfg.vocab_size, (B, S))
    with FlopCounterMode(display=False) as fc:
        logits = model(ids)
        F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).backward()
    expected = bench.lora_step_flops(cfg, B, S, 4, attention="none")
    assert fc.get_total_flops() == expected["model"]
    # Attention: dense counts every pair, causal only the allowed ones (a window shrinks them further).
    dense = bench.lora_step_flops(cfg, B, S, 4, attention="dense")["model"] - expected["model"]
    causal = bench.lora_step_flops(cfg, B, S, 4, attention="causal")["model"] - expected["model"]
    per_pair = 3 * cfg.decoder_layers * 4 * cfg.num_attention_heads * cfg.head_dim * B
    assert dense == per_pair * S * S
    w = window or S
    assert causal == per_pair * sum(min(q + 1, w) for q in range(S))


def test_baseline_failure_keeps_hatlm_decode_numbers(tmp_path, monkeypatch):
    bench = load_bench()

    def no_hf(*args, **kwargs):
        raise RuntimeError("no transformers here")

    monkeypatch.setattr(bench, "build_hf", no_hf)
    bench.main(["--preset", "tiny", "--device", "cpu", "--sections", "decode", "--out", str(tmp_path)])
    dec = json.loads((tmp_path / "gpu.json").read_text())["sections"]["decode"]
    assert dec["status"] == "failed" and "no transformers here" in dec["errors"]["transformers"]
    assert dec["engines"]["hatlm causal"]["decode_tokens_per_s"] > 0


@pytest.mark.slow
def test_imports_without_tokenizer_packages():
    """The GPU machine lacks mistral-common (and may lack sentencepiece): a fresh interpreter that cannot
    import them must still import the benchmark and everything it pulls from hatlm."""
    import subprocess

    code = (
        "import sys; sys.modules['mistral_common'] = None; sys.modules['sentencepiece'] = None\n"
        f"import runpy; runpy.run_path({str(BENCH)!r}, run_name='not_main')\n"
    )
    src = str(Path(__file__).resolve().parents[1] / "src")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"PYTHONPATH": src})
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.slow
def test_gpu_train_check_runs_on_cpu(tmp_path, monkeypatch):
    """bench/gpu_train_check.py on the CPU (gloo instead of NCCL): both parts run, and where float32 or the
    CPU makes results exact they are (bf16 LoRA resume, sharded vs unsharded losses, DCP resume, export)."""
    monkeypatch.setitem(sys.modules, "mistral_common", None)
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    spec = importlib.util.spec_from_file_location("gpu_train_check", BENCH.parent / "gpu_train_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--device", "cpu", "--small", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "gpu_train_check.md").read_text()
    res = json.loads(text[text.index("{") : text.rindex("}") + 1])
    lora, fsdp = res["lora"], res["fsdp"]
    assert lora["status"] == "ok" and fsdp["status"] == "ok"
    assert lora["resume_max_weight_diff"] == 0.0  # bf16 base: trained tensors restored without rounding
    assert "adapter_model.safetensors" in lora["adapter_files"] and lora["loss_last"] < lora["loss_first"]
    assert fsdp["max_rel_loss_diff_vs_unsharded"] < 1e-5
    assert fsdp["resume_max_loss_diff"] == 0.0 and fsdp["export_logit_max_diff"] < 1e-5


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
