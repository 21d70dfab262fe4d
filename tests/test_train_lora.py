"""`hatlm train --lora`: a LoRA run on top of a base checkpoint — adapter + merged model, exact resume,
bf16 weights, gradient checkpointing, clear errors."""

from __future__ import annotations

import pytest
import torch
from conftest import as_if_trained
from test_train import TINY_MODEL, TINY_RUN

import hatlm
from hatlm.checkpoint import save_model
from hatlm.cli import main
from hatlm.data import write_jsonl
from hatlm.errors import ConfigError, UserError
from hatlm.loader import load_model_and_tokenizer
from hatlm.lora import load_with_adapter
from hatlm.tasks import make_split
from hatlm.train import TrainConfig, train

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("lora")
    train_ex, evals = make_split("recall", seed=0, n_train=48, n_eval=8, train_difficulties=[2], eval_difficulties=[2])
    write_jsonl(train_ex, d / "train.jsonl")
    model, tok = load_model_and_tokenizer("tiny-bytes", arm="hybrid", seed=3, **TINY_MODEL)
    save_model(as_if_trained(model), d / "base", tokenizer=tok)
    return d


def run_cfg(d, **extra) -> TrainConfig:
    base = {k: v for k, v in TINY_RUN.items() if k not in ("preset", "model")}
    return TrainConfig(**{**base, "init_from": str(d / "base"), "data": [str(d / "train.jsonl")], "steps": 6,
                          "save_every": 3, "eval_every": 0, "lora": "r=4,alpha=8", **extra})  # fmt: skip


def test_lora_run_writes_adapter_and_merged_model(setup, tmp_path):
    res = train(run_cfg(setup), tmp_path / "run", progress=False)
    out = tmp_path / "run"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (out / "adapter").iterdir()}
    ckpt = out / "checkpoints" / "step-00000006"
    assert (ckpt / "adapter_config.json").is_file() and not (ckpt / "model.safetensors").exists()  # adapter only
    merged = hatlm.load(out / "model")
    unmerged = load_with_adapter(out / "adapter")
    base = hatlm.load(setup / "base")
    ids = torch.randint(3, 250, (2, 10), generator=torch.Generator().manual_seed(0))
    pl = torch.tensor([4, 6])
    with torch.no_grad():
        lm, lu, lb = (m.eval()(ids, prompt_lengths=pl).logits for m in (merged, unmerged, base))
    torch.testing.assert_close(lm, lu, atol=1e-5, rtol=0)
    assert not torch.allclose(lm, lb, atol=1e-4)  # training changed the model
    # Only adapters and the thinking path were trained: embeddings and norms are the base's.
    for name in ("decoder.embed_tokens.weight", "decoder.norm.weight", "decoder.layers.0.input_layernorm.weight"):
        assert torch.equal(merged.state_dict()[name], base.state_dict()[name])
    assert res["steps"] == 6


def test_lora_resume_is_exact(setup, tmp_path):
    full = tmp_path / "full"
    train(run_cfg(setup), full, progress=False)

    def stop(step, loss):
        if step == 5:
            raise KeyboardInterrupt  # after the checkpoint at step 3
        return loss

    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        train(run_cfg(setup), part, progress=False, loss_hook=stop)
    train(run_cfg(setup), part, resume=True, progress=False)
    a, b = hatlm.load(full / "model").state_dict(), hatlm.load(part / "model").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bf16_base_and_gradient_checkpointing(setup, tmp_path):
    # bf16 frozen base, fp32 trained tensors, checkpointing on: trains (finite loss) on the CPU.
    res = train(run_cfg(setup, dtype="bfloat16", gradient_checkpointing=True, steps=2, save_every=0,
                        eval=[str(setup / "train.jsonl")], eval_max_examples=8),
                tmp_path / "bf16", progress=False)  # fmt: skip
    assert torch.isfinite(torch.tensor(res["final_loss"]))
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in res["eval"].values())
    # Gradient checkpointing alone changes nothing numerically (float32).
    a = train(run_cfg(setup, steps=2, save_every=0), tmp_path / "a", progress=False)
    b = train(run_cfg(setup, steps=2, save_every=0, gradient_checkpointing=True), tmp_path / "b", progress=False)
    assert a["final_loss"] == pytest.approx(b["final_loss"], abs=1e-6)


def test_bad_lora_and_dtype_are_named(setup, tmp_path, capsys):
    with pytest.raises(ConfigError, match="unknown key"):
        run_cfg(setup, lora="rank=4").validate()
    with pytest.raises(ConfigError, match="dtype must be"):
        run_cfg(setup, dtype="int8").validate()
    with pytest.raises(UserError, match="float16 is not supported for training"):
        train(run_cfg(setup, dtype="float16"), tmp_path / "f16", progress=False)
    rc = main(["train", "--init-from", str(setup / "base"), "--data", str(setup / "train.jsonl"), "--out",
               str(tmp_path / "cli"), "--lora", "r=2,targets=foo", "--steps", "1", "--no-progress"])
    assert rc == 2 and "match no backbone projection" in capsys.readouterr().err
