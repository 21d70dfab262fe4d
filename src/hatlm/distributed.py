"""Multi-GPU / multi-node training with FSDP2 (`torch.distributed.fsdp.fully_shard`) under torchrun.

    torchrun --nproc-per-node 8 -m hatlm train ...      (every rank runs the same program)

    env = init_distributed()                              # process group from torchrun's environment
    shard_model(model, env, checkpointing=True)          # FSDP2 units: each decoder block, the thinker, the root
    loss = token_loss_sum / global_token_count            # each rank's share of the global mean
    loss.backward(); opt.step()                           # gradients are SUMMED across ranks (see below)
    save_checkpoint(dir, model, opt, step=...)            # torch.distributed.checkpoint, sharded, resumable
    export_hf(model, out_dir, env)                         # full weights gathered → HF safetensors on rank 0

Sharding. Each decoder block and the thinker are their own FSDP2 unit (parameters all-gathered just
before use, freed after), the root holds the rest (embeddings, LM head, norms, slots, refinement). The
thinker is weight-shared across its T iterations and the model calls `thinker.step`, not
`thinker.forward`, so `step` is registered as an FSDP forward method: every iteration all-gathers the
thinker's weights, and in backward FSDP2 accumulates the gradient contributions of all T uses before
its single reduce-scatter. The tests check this against a one-process run.

Mixed precision. On GPUs, MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32): fp32 master
weights sharded, bf16 copies for compute, gradients reduced in fp32. On the CPU (tests) everything is fp32.

Gradient reduction. hatlm sums gradients across ranks (divide factor 1) and makes each rank's loss its
share of the *global* mean (sum of its token losses / the global token count). The sum of the ranks'
gradients is then exactly the gradient of the global mean loss, also when ranks see different numbers
of tokens, and FSDP never uses an AVG reduction: gloo's AVG silently gives wrong results (pytorch issue
162338), so `set_force_sum_reduction_for_comms(True)` is set as well.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from hatlm.errors import UserError


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device: str | None = None) -> DistEnv:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

    One process without torchrun → a single-process DistEnv and no process group. Backend: NCCL on
    CUDA, gloo on the CPU. device None → cuda:LOCAL_RANK when CUDA is available, else cpu.
    """
    world = env_world_size()
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is visible to this process")
        dev = torch.device("cuda", local if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=dev if dev.type == "cuda" else None)
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistEnv(rank, world, local, dev)


def per_rank_batch(global_batch: int, world_size: int) -> int:
    """Sequences per rank; the global batch must split evenly so every step is the same computation."""
    if global_batch < 1:
        raise UserError(f"batch size must be >= 1; got {global_batch}")
    if global_batch % world_size:
        raise UserError(
            f"the global batch of {global_batch} sequences does not divide among {world_size} processes; "
            f"use a multiple of {world_size} (e.g. {world_size * max(1, global_batch // world_size)}) or another "
            "--nproc-per-node"
        )
    return global_batch // world_size


def fsdp_modules(model: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def shard_model(
    model: nn.Module,
    env: DistEnv,
    *,
    checkpointing: bool = False,
    param_dtype: torch.dtype | None = None,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """Apply FSDP2 in place: each decoder block, the thinker (its `step` is the forward), then the root.

    param_dtype: compute dtype of the all-gathered parameters; default bf16 on CUDA, none (fp32) on CPU.
    Gradients are always reduced in fp32 and summed (see the module docstring).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    if not dist.is_initialized():
        raise UserError("shard_model needs a process group: start the program with torchrun")
    if any(p.dtype != torch.float32 for p in model.parameters() if p.requires_grad):
        raise UserError("FSDP2 keeps fp32 master weights: load the model in float32 (mixed precision casts to bf16)")
    if param_dtype is None and env.device.type == "cuda":
        param_dtype = torch.bfloat16
    _no_scalar_params(model)
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    mesh = init_device_mesh(env.device.type, (env.world_size,))
    kw: dict[str, Any] = dict(mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    for block in model.decoder.layers:
        fully_shard(block, **kw)
    thinker = getattr(model, "thinker", None)
    if thinker is not None:
        fully_shard(thinker, **kw)
        register_fsdp_forward_method(thinker, "step")
    fully_shard(model, **kw)
    for m in fsdp_modules(model):
        m.set_gradient_divide_factor(1.0)
        m.set_force_sum_reduction_for_comms(True)
    model.set_gradient_checkpointing(checkpointing)
    return model


def _no_scalar_params(model: nn.Module) -> None:
    """fully_shard refuses 0-dim parameters (the thinker's learned temperature): give them shape [1]
    (they broadcast the same). Exports reshape them back (`export_hf`, `plain_state_dict`)."""
    for mod in model.modules():
        for name, p in list(mod.named_parameters(recurse=False)):
            if p.dim() == 0:
                setattr(mod, name, nn.Parameter(p.detach().reshape(1), requires_grad=p.requires_grad))


# ------------------------------------------------------------------------------------ checkpoints


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(folder: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, *, step: int,
                    extra: dict[str, Any] | None = None) -> Path:  # fmt: skip
    """Sharded checkpoint (torch.distributed.checkpoint): every rank writes its shards. Written into a
    temporary folder and renamed into place by rank 0, so a stop mid-save leaves the last good one."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    folder = Path(folder).expanduser()
    tmp = folder.parent / f".{folder.name}.tmp"
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0 and tmp.exists():
        shutil.rmtree(tmp)
    _barrier()
    msd, osd = get_state_dict(model, optimizer) if optimizer is not None else (get_state_dict(model, [])[0], {})
    state = {"model": msd, "optim": osd, "meta": {"step": step, **(extra or {})}}
    dcp.save(state, checkpoint_id=str(tmp))
    _barrier()
    if rank == 0:
        old = folder.parent / f".{folder.name}.old"
        if folder.exists():
            folder.rename(old)
        tmp.rename(folder)
        if old.exists():
            shutil.rmtree(old)
    _barrier()
    return folder


def load_checkpoint(folder: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Restore model and optimizer state written by save_checkpoint (any world size) → its meta dict."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    folder = Path(folder).expanduser()
    if not (folder / ".metadata").is_file():
        raise UserError(f"{folder}: not a distributed checkpoint (no .metadata)")
    msd, osd = get_state_dict(model, optimizer) if optimizer is not None else (get_state_dict(model, [])[0], {})
    state = {"model": msd, "optim": osd, "meta": {"step": 0}}
    dcp.load(state, checkpoint_id=str(folder))
    if optimizer is not None:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    else:
        set_state_dict(model, [], model_state_dict=state["model"], optim_state_dict={})
    return state["meta"]


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """All weights gathered to full tensors on the CPU (on every rank: collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def plain_state_dict(model: nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A gathered state dict with every tensor in the shape a plain (unsharded) model has."""
    from hatlm.model import HatLM

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in HatLM(model.config).state_dict().items()}
    return {k: v.reshape(shapes[k]) if k in shapes else v for k, v in sd.items()}


def export_hf(model: nn.Module, folder: str | Path, env: DistEnv) -> Path | None:
    """Gather the weights and write a plain hatlm checkpoint in Hugging Face layout on rank 0 (LoRA
    adapters merged into their base weights). Collective: call it on every rank."""
    from hatlm.checkpoint import save_model
    from hatlm.lora import has_lora

    sd = plain_state_dict(model, full_state_dict(model))
    out = None
    if env.is_main:
        from hatlm.model import HatLM

        with torch.device("meta"):
            plain = HatLM(model.config)
        if has_lora(model):
            from hatlm.lora import add_lora, merge_lora

            add_lora(plain, model.hatlm_lora_spec)
            plain.load_state_dict(sd, assign=True)
            plain = merge_lora(plain)
        else:
            plain.load_state_dict(sd, assign=True)
        plain.rope = type(plain.rope)(model.config.head_dim, model.config.rope_theta)  # buffers are not saved
        if model.config.tie_word_embeddings:
            plain.lm_head.weight = plain.decoder.embed_tokens.weight
        out = save_model(plain, folder)
    _barrier()
    return out


# ------------------------------------------------------------------------------------ hatlm train under torchrun


class NullMetrics:
    """The metrics log of ranks other than 0 (rank 0 writes the run's records)."""

    def write(self, rec: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def rank_rows(rows: list, env: DistEnv) -> list:
    """This rank's contiguous share of a micro-batch's rows (the global batch must divide evenly)."""
    b = per_rank_batch(len(rows), env.world_size)
    return rows[env.rank * b : (env.rank + 1) * b]


def all_sum(values: list[float], env: DistEnv) -> list[float]:
    """Sum per-rank numbers over all ranks (loss shares, token counts) for the run's metrics."""
    t = torch.tensor(values, dtype=torch.float64, device=env.device)
    dist.all_reduce(t)
    return t.tolist()


def full_norm(norm: torch.Tensor) -> torch.Tensor:
    """clip_grad_norm_ over DTensor gradients returns a DTensor: the plain global norm."""
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def save_train_checkpoint(out: Path, model: nn.Module, optimizer, tokenizer, state: dict[str, Any], step: int,
                          keep: int, env: DistEnv) -> Path:  # fmt: skip
    """checkpoints/step-N of a sharded run: model and optimizer with torch.distributed.checkpoint (every
    rank writes its shards) in step-N/dcp, then rank 0 adds the trainer state (scheduler, RNGs, data order)
    and the tokenizer and moves the `latest` pointer. A stop at any moment leaves the previous one intact."""
    from hatlm.trainstate import CHECKPOINTS, LATEST, STATE_FILE
    from hatlm.util import atomic_write_text

    root = out / CHECKPOINTS
    name = f"step-{step:08d}"
    final = root / name
    if env.is_main:
        root.mkdir(parents=True, exist_ok=True)
        if final.exists():
            shutil.rmtree(final)
        final.mkdir()
    _barrier()
    save_checkpoint(final / "dcp", model, optimizer, step=step)
    if env.is_main:
        torch.save({k: v for k, v in state.items() if k != "optimizer"}, final / f".{STATE_FILE}.tmp")
        os.replace(final / f".{STATE_FILE}.tmp", final / STATE_FILE)
        if tokenizer is not None:
            tokenizer.save(final)
        atomic_write_text(root / LATEST, name + "\n")
        older = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and p.name != name)
        for p in older[: max(0, len(older) - (keep - 1))]:
            shutil.rmtree(p, ignore_errors=True)
    _barrier()
    return final


def save_final_sharded(out: Path, model: nn.Module, tokenizer, env: DistEnv) -> Path:
    """OUT/model of a sharded run: the gathered weights as a plain HF-layout checkpoint (LoRA merged)."""
    folder = out / "model"
    export_hf(model, folder, env)
    if env.is_main and tokenizer is not None:
        tokenizer.save(folder)
    _barrier()
    return folder
