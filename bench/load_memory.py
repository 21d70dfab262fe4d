"""Peak memory while loading a checkpoint: hatlm.load against two baselines, measured in one run.

Saves a random Mistral-shaped model (default ≈ 0.6 GB in float32) with `hatlm.checkpoint.save_model`,
then loads it in fresh subprocesses, each reporting the growth of its resident memory over its
state right before loading (imports done):

  hatlm         hatlm.load(folder)                           (meta-device build, tensors read in place)
  hatlm-hybrid  hatlm.load(folder, arm="hybrid")             (plus fresh thinker/slots, not in the file)
  naive         HatLM(config) + safetensors load_file + load_state_dict   (weights held twice)
  transformers  MistralForCausalLM.from_pretrained(folder)   (skipped with --no-transformers)

Every weight is read once after loading (a model memory-mapped from the file is only resident
once touched). Peak is VmHWM (it includes mapped file pages), final is VmRSS after loading; both
are reported as a ratio to the size of the weights file(s), and the peak also as a ratio to the
loaded model's own weight bytes (the hybrid is larger than the file: its thinker and slots are
new). The claim under test: hatlm's peak stays within ~1.1× the model's size (model + its largest
tensor when a dtype cast is needed).

    OMP_NUM_THREADS=1 .venv/bin/python bench/load_memory.py [--hidden 1024 --layers 8] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def _mem_kib() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process in KiB."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields["VmRSS"], fields["VmHWM"]


def _reset_peak() -> None:
    # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux ≥ 4.0).
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def child(method: str, folder: str) -> None:
    import torch

    import hatlm
    from hatlm.checkpoint import read_config

    if method == "transformers":
        from transformers import MistralForCausalLM
    if method == "naive":
        import safetensors.torch

        from hatlm.checkpoint import hatlm_name
        from hatlm.model import HatLM

        config, _ = read_config(folder)
    torch.set_num_threads(1)
    # Warm-up: the first meta-device build imports torch's reference ops (~tens of MiB of code);
    # that is not weight memory, so it happens before the baseline.
    from hatlm.config import ModelConfig
    from hatlm.model import HatLM as _HatLM

    with torch.device("meta"):
        _HatLM(ModelConfig.from_name("tiny"))
    _reset_peak()
    rss0, _ = _mem_kib()
    if method == "hatlm":
        model = hatlm.load(folder)
    elif method == "hatlm-hybrid":
        model = hatlm.load(folder, arm="hybrid", thought_slots=8)
    elif method == "naive":
        model = HatLM(config)
        sd = {}
        for f in sorted(Path(folder).glob("*.safetensors")):
            sd.update({hatlm_name(k): v for k, v in safetensors.torch.load_file(f).items()})
        model.load_state_dict(sd, strict=False)
        del sd
    elif method == "transformers":
        model = MistralForCausalLM.from_pretrained(folder)
    else:
        raise SystemExit(f"unknown method {method}")
    # Touch every weight: parameters that are views of a memory-mapped file (transformers 5 keeps
    # them so) only become resident when read, as they will be by the first forward pass.
    with torch.no_grad():
        for p in model.parameters():
            p.sum()
    rss1, hwm = _mem_kib()
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"peak_kib": hwm - rss0, "final_kib": rss1 - rss0, "model_bytes": n_bytes}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--shard", default=None, help="max_shard_size for the saved checkpoint, e.g. 200MB")
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--child", nargs=2, metavar=("METHOD", "FOLDER"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return

    import torch

    from hatlm.checkpoint import save_model
    from hatlm.config import ModelConfig
    from hatlm.model import HatLM

    config = ModelConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 3,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 128),
        num_key_value_heads=max(1, args.hidden // 512),
        hybrid=dict(arm="causal", thinker_layers=0, thought_slots=0),
    )
    with tempfile.TemporaryDirectory(dir=Path(__file__).resolve().parent) as tmp:
        folder = Path(tmp) / "ckpt"
        model = HatLM(config).to(getattr(torch, args.dtype))
        save_model(model, folder, max_shard_size=args.shard)
        del model
        # A plain Mistral folder (no hatlm section), as downloaded from the Hub.
        cfg = json.loads((folder / "config.json").read_text())
        cfg.pop("hatlm")
        (folder / "config.json").write_text(json.dumps(cfg, indent=2))
        size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        print(
            f"checkpoint: {size / 2**20:,.0f} MiB {args.dtype}, {len(list(folder.glob('*.safetensors')))} file(s), "
            f"hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; torch {torch.__version__}"
        )
        methods = ["hatlm", "hatlm-hybrid", "naive"] + ([] if args.no_transformers else ["transformers"])
        print(
            f"{'method':<14}{'peak MiB':>10}{'peak/size':>11}{'final MiB':>11}{'final/size':>12}"
            f"{'model MiB':>11}{'peak/model':>12}"
        )
        env = dict(os.environ, OMP_NUM_THREADS="1")
        for method in methods:
            out = subprocess.run(
                [sys.executable, __file__, "--child", method, str(folder)],
                capture_output=True,
                text=True,
                env=env,
            )
            if out.returncode:
                print(f"{method:<14} failed: {out.stderr.strip().splitlines()[-1]}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            peak, final = r["peak_kib"] * 1024, r["final_kib"] * 1024
            mb = r["model_bytes"]
            print(
                f"{method:<14}{peak / 2**20:>10,.0f}{peak / size:>11.2f}{final / 2**20:>11,.0f}{final / size:>12.2f}"
                f"{mb / 2**20:>11,.0f}{peak / mb:>12.2f}"
            )


if __name__ == "__main__":
    main()
