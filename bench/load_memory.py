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
    .venv/bin/python bench/load_memory.py --preset mistral-7b --dtype bfloat16 [--layers 16]

The checkpoint is written from a meta-device model, one random tensor at a time, so a 7B-shaped
checkpoint can be written on a machine that could not hold it in float32. Methods that would build
the whole model in float32 in memory (naive; transformers) are skipped, with a message, when that
would not fit the memory available (--methods chooses explicitly).
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


def _meminfo_kib(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        k, _, v = line.partition(":")
        if k == key:
            return int(v.split()[0])
    return 0


class _RandomTensor:
    """Stands in for a meta tensor in `write_safetensors`: shape and dtype for the header, and random
    values materialised only when its data is written (one tensor in memory at a time)."""

    def __init__(self, meta, dtype) -> None:
        self.shape, self.dtype = meta.shape, dtype
        self._numel = meta.numel()

    def numel(self) -> int:
        return self._numel

    def element_size(self) -> int:
        import torch

        return torch.empty((), dtype=self.dtype).element_size()

    def detach(self):
        import torch

        return torch.empty(self.shape, dtype=self.dtype).uniform_(-0.02, 0.02)


def write_random_checkpoint(config, folder: Path, dtype, shard: str | None) -> int:
    """A Mistral-layout folder (plain config.json, no hatlm section) of random weights, written from a
    meta-device model; returns the number of parameters."""
    import torch

    from hatlm.checkpoint import (
        INDEX_FILE,
        _model_tensors,
        _shard,
        hf_config_dict,
        hf_name,
        parse_size,
        write_safetensors,
    )
    from hatlm.model import HatLM

    with torch.device("meta"):
        model = HatLM(config)
    tensors = [(hf_name(n), _RandomTensor(t, dtype)) for n, t in _model_tensors(model).items()]
    folder.mkdir(parents=True)
    shards = _shard(tensors, None if shard is None else parse_size(shard))
    if len(shards) == 1:
        write_safetensors(folder / "model.safetensors", shards[0])
    else:
        weight_map = {}
        for i, part in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(folder / fname, part)
            weight_map.update({n: fname for n, _ in part})
        total = sum(t.numel() * t.element_size() for _, t in tensors)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    # A plain Mistral folder (no hatlm section), as downloaded from the Hub.
    cfg = hf_config_dict(config, dtype)
    cfg.pop("hatlm", None)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    return sum(t.numel() for _, t in tensors)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default=None, help="a hatlm preset's shapes (e.g. mistral-7b); --layers overrides")
    ap.add_argument("--hidden", type=int, default=None, help="default 1024 (or the preset's)")
    ap.add_argument("--intermediate", type=int, default=None, help="MLP width (default 3 × hidden, or the preset's)")
    ap.add_argument("--layers", type=int, default=None, help="default 8 (or the preset's)")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--shard", default=None, help="max_shard_size for the saved checkpoint, e.g. 200MB")
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--methods", default=None, help="comma-separated subset of hatlm,hatlm-hybrid,naive,transformers")
    ap.add_argument("--child", nargs=2, metavar=("METHOD", "FOLDER"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return

    import torch

    from hatlm.config import ModelConfig

    if args.preset:
        base = ModelConfig.from_name(args.preset)
        hidden = args.hidden or base.hidden_size
        shape = dict(vocab_size=base.vocab_size, hidden_size=hidden,
                     intermediate_size=args.intermediate or base.intermediate_size,
                     num_hidden_layers=args.layers or base.num_hidden_layers,
                     num_attention_heads=base.num_attention_heads, num_key_value_heads=base.num_key_value_heads)
    else:
        hidden = args.hidden or 1024
        shape = dict(vocab_size=args.vocab, hidden_size=hidden, intermediate_size=args.intermediate or hidden * 3,
                     num_hidden_layers=args.layers or 8, num_attention_heads=max(1, hidden // 128),
                     num_key_value_heads=max(1, hidden // 512))
    config = ModelConfig(**shape, hybrid=dict(arm="causal", thinker_layers=0, thought_slots=0))
    dtype = getattr(torch, args.dtype)
    with tempfile.TemporaryDirectory(dir=Path(__file__).resolve().parent) as tmp:
        folder = Path(tmp) / "ckpt"
        n_params = write_random_checkpoint(config, folder, dtype, args.shard)
        size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        print(
            f"checkpoint: {size / 2**20:,.0f} MiB {args.dtype} ({n_params / 1e9:.2f} B parameters), "
            f"{len(list(folder.glob('*.safetensors')))} file(s), hidden {shape['hidden_size']}, "
            f"MLP {shape['intermediate_size']}, {shape['num_hidden_layers']} layers, vocab {shape['vocab_size']}; "
            f"torch {torch.__version__}; host RAM {_meminfo_kib('MemTotal') / 2**20:.1f} GiB, "
            f"{_meminfo_kib('MemAvailable') / 2**20:.1f} GiB available"
        )
        if args.methods:
            methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        else:
            methods = ["hatlm", "hatlm-hybrid", "naive"] + ([] if args.no_transformers else ["transformers"])
            # naive builds the model in float32 and then holds the file's tensors too; transformers
            # (4.x) builds in float32: skipped where that would not fit (an OOM kill helps nobody).
            avail = _meminfo_kib("MemAvailable") * 1024
            need = {"naive": n_params * 4 + size, "transformers": n_params * 4}
            try:  # transformers 5 loads in the file's dtype ("auto"); 4.x in float32
                import transformers

                if int(transformers.__version__.split(".")[0]) >= 5:
                    need["transformers"] = size
            except ImportError:
                pass
            for m, b in need.items():
                if m in methods and b > 0.8 * avail:
                    methods.remove(m)
                    print(f"{m}: skipped (needs about {b / 2**30:.1f} GiB; {avail / 2**30:.1f} GiB available)")
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
