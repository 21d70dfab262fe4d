"""`hatlm` command line, all of it: one argparse definition and one thin run function per subcommand.

Run functions parse flags into library calls and print; the work lives in the library modules,
imported only when their subcommand runs (so `hatlm --help` does not load them).

    info      hatlm.info        parameter counts and memory estimates
    demo      hatlm.demo        built-in task, five-arm comparison, report
    train     hatlm.train       train one arm
    eval      hatlm.evaluate    evaluate a checkpoint on a data file
    compare   hatlm.compare     train and compare the arms (+ hatlm.reports)
    generate  hatlm.generate    generate text
    init-from hatlm.checkpoint  a Mistral folder → a hatlm hybrid checkpoint
    serve     hatlm.serve       OpenAI-compatible server
    lm-eval   hatlm.harness     lm-evaluation-harness tasks
    show      hatlm.show        pictures of thinking

Why ~600 lines: every subcommand's flags in one place (issue 7) — each run function stays a few lines.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hatlm.config import ARMS, PRESETS
from hatlm.errors import UserError

# ------------------------------------------------------------------------------------ info


def info_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="PATH_OR_PRESET", help=f"a checkpoint folder or a preset ({', '.join(PRESETS)})")
    p.add_argument("--arm", choices=ARMS, help="count for this arm instead of the configured one")
    p.add_argument("--thinker-layers", type=int, metavar="K", help="override the thinker depth K")
    p.add_argument("--thought-slots", type=int, metavar="M", help="override the number of thought slots m")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    plan = p.add_argument_group("training memory plan (--plan)")
    plan.add_argument("--plan", action="store_true",
                      help="per-GPU training memory: full fine-tune / LoRA x GPUs x activation checkpointing")
    plan.add_argument("--seq-len", type=int, default=2048, help="tokens per training sequence (default 2048)")
    plan.add_argument("--batch", type=int, default=1, help="sequences per GPU (default 1)")
    plan.add_argument("--lora-r", type=int, default=16, help="LoRA rank (default 16)")
    plan.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 8], help="GPU counts (default 1 2 8)")
    plan.add_argument("--prompt-len", type=int, help="prompt tokens the thinker sees (default seq-len/4)")
    plan.add_argument("--think-iters", type=int, metavar="T", help="thinking iterations (default T_max)")
    plan.add_argument("--gpu-gib", type=float, default=80.0, help="GPU memory for the 'fits' column (default 80)")


def run_info(args: argparse.Namespace) -> int:
    from hatlm.info import describe, format_table, resolve_config

    overrides = {k: v for k, v in (("arm", args.arm), ("thinker_layers", args.thinker_layers),
                                   ("thought_slots", args.thought_slots)) if v is not None}
    if args.plan:
        from hatlm.plan import format_plan, plan_grid

        config, _ = resolve_config(args.source, **overrides)
        rows = plan_grid(config, lora_r=args.lora_r, worlds=tuple(args.gpus), seq_len=args.seq_len, batch=args.batch,
                         prompt_len=args.prompt_len, think_iters=args.think_iters)  # fmt: skip
        table = format_plan(config, rows, args.gpu_gib)
        print(json.dumps([r.as_dict() for r in rows], indent=2) if args.json else table)
        return 0
    info = describe(args.source, **overrides)
    print(json.dumps(info, indent=2) if args.json else format_table(info))
    return 0


# ------------------------------------------------------------------------------------ demo


def demo_arguments(p: argparse.ArgumentParser) -> None:
    from hatlm.demo import DEMO_SEEDS, DEMO_TRAIN

    p.add_argument("--out", default="hatlm-demo", metavar="DIR", help="report folder (default hatlm-demo)")
    p.add_argument("--steps", type=int, help=f"training steps per run (default {DEMO_TRAIN['steps']})")
    p.add_argument("--seeds", type=int, default=DEMO_SEEDS, help=f"seeds per arm (default {DEMO_SEEDS})")
    p.add_argument("--workers", type=int, help="runs trained at once (default: one per available CPU core)")
    p.add_argument("--no-progress", action="store_true")


def run_demo(args: argparse.Namespace) -> int:
    from hatlm.demo import demo

    out = Path(args.out)
    if (out / "results.json").exists() and args.steps is None:
        print(f"{out} holds an earlier demo; its finished runs are reused (delete the folder to start over)",
              file=sys.stderr)
    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps must be a positive integer; got {args.steps}")
    demo(out, steps=args.steps, seeds=args.seeds, workers=args.workers, progress=not args.no_progress)
    return 0


# ------------------------------------------------------------------------------------ train


def train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", action="append", metavar="FILE",
                   help="training data: JSONL prompt/answer, bAbI, ProntoQA, ProsQA, plain text, or task:NAME "
                        "(a built-in task); repeat to mix")
    p.add_argument("--eval", action="append", metavar="FILE", help="evaluation file (repeatable)")
    p.add_argument("--out", required=True, metavar="DIR", help="run folder (metrics, checkpoints, final model)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--preset", metavar="NAME", help="model preset for a random init (default tiny-bytes)")
    g.add_argument("--init-from", metavar="FOLDER", help="initialise from a Mistral or hatlm checkpoint folder")
    p.add_argument("--config", metavar="FILE", help="YAML training config (keys: the TrainConfig fields)")
    p.add_argument("--arm", choices=ARMS)
    p.add_argument("--steps", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--dtype", choices=("float32", "bfloat16"),
                   help="weights' dtype (default float32, with bf16 autocast on GPU; bfloat16 e.g. for a LoRA base)")
    p.add_argument("--lora", metavar="SPEC",
                   help="PEFT LoRA on the backbone projections, thinker/slots/gates trained fully: "
                        "r=16,alpha=32[,dropout=0.05][,targets=q_proj+k_proj+v_proj+o_proj+gate_proj+up_proj+down_proj]")
    p.add_argument("--gradient-checkpointing", action="store_true", default=None,
                   help="recompute activations in backward (less memory, ~1/3 more compute)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads for torch (default: torch's choice; 1 is best for tiny models on a busy machine)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other config key, e.g. --set warmup=20 --set hidden_size=64 (model keys allowed)")
    p.add_argument("--resume", action="store_true", help="continue OUT's latest checkpoint exactly")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def train_config_from_args(args: argparse.Namespace):
    """The TrainConfig that `hatlm train` flags describe: --config (or, with --resume, the run's
    saved config), then --set items, then the named flags."""
    from hatlm.train import CONFIG_FILE, TrainConfig, apply_overrides, load_config
    from hatlm.util import parse_set_items

    out = Path(args.out)
    if args.config:
        cfg = load_config(args.config)
    elif args.resume and (out / CONFIG_FILE).is_file():
        cfg = load_config(out / CONFIG_FILE)  # `hatlm train --out DIR --resume` alone continues the run
    else:
        cfg = TrainConfig()
    over = parse_set_items(args.set)
    for key, val in (("data", args.data), ("eval", args.eval), ("preset", args.preset),
                     ("init_from", args.init_from), ("arm", args.arm), ("steps", args.steps), ("seed", args.seed),
                     ("lr", args.lr), ("batch_size", args.batch_size), ("device", args.device),
                     ("dtype", args.dtype), ("lora", args.lora),
                     ("gradient_checkpointing", args.gradient_checkpointing)):
        if val is not None:
            over[key] = val
    if over:
        return apply_overrides(cfg, over, source="command line")
    cfg.validate()
    return cfg


def _set_threads(n: int | None) -> None:
    if n is None:
        return
    if n < 1:
        raise UserError(f"--threads must be a positive integer; got {n}")
    import torch

    torch.set_num_threads(n)


def run_train(args: argparse.Namespace) -> int:
    from hatlm.train import train
    from hatlm.trainstate import METRICS

    cfg = train_config_from_args(args)
    _set_threads(args.threads)
    try:
        res = train(cfg, args.out, resume=args.resume, progress=not args.no_progress)
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():  # started by torchrun (hatlm.distributed)
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 reports
        return 0
    print(f"trained {res['arm']} for {res['steps']} steps in {res['wall_time_s']:.1f}s; final train loss "
          f"{res['final_loss']:.4f}; {res['params']['total']:,} parameters")
    for name, r in res["eval"].items():
        if "accuracy_tf" in r and r.get("metric", "accuracy") == "accuracy":
            print(f"  eval {name}: accuracy {r['accuracy_tf']:.3f} (teacher-forced exact match), loss {r['loss']:.4f}")
        else:
            print(f"  eval {name}: loss {r['loss']:.4f}, perplexity {r['perplexity']:.2f}")
    print(f"model: {res['model_dir']}   metrics: {Path(args.out) / METRICS}")
    return 0


# ------------------------------------------------------------------------------------ eval


def eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a hatlm (or Hugging Face Mistral) checkpoint folder")
    p.add_argument("--data", required=True, type=Path,
                   help="data file: .jsonl, bAbI .txt, ProntoQA/ProsQA .json, or plain text")
    p.add_argument("--think-iters", type=int, default=None,
                   help="hybrid: thinking iterations (default: the checkpoint's max_think_iters)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:N (default: cpu)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: fp32 on CPU, bf16 on GPU)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N examples (or windows)")
    p.add_argument("--window", type=int, default=256, help="plain text: tokens per window (default 256)")
    p.add_argument("--seed", type=int, default=0, help="plain text: seed of the window split points")
    p.add_argument("--show", type=int, default=5, help="print the first N predictions (default 5; 0: none)")
    p.add_argument("--predictions", type=Path, default=None, help="write every prediction to this JSONL file")
    p.add_argument("--refine-steps", type=int, default=0, metavar="G",
                   help="hybrid: G steps of gradient refinement of the thoughts after each think (default 0)")
    p.add_argument("--refine-lr", type=float, default=0.1, help="refinement's relative step size (default 0.1)")
    p.add_argument("--refine-objective", default="entropy", choices=("entropy", "reread"),
                   help="what refinement lowers (default entropy of the first answer token)")
    p.add_argument("--rethink-every", type=int, default=None, metavar="R",
                   help="hybrid: think again over prompt + answer so far every R generated tokens")


def check_test_time_flags(refine_steps: int, refine_lr: float, rethink_every: int | None) -> None:
    """Clear errors for the refinement / re-thinking flags before any model is loaded."""
    if refine_steps < 0:
        raise UserError(f"--refine-steps must be >= 0; got {refine_steps}")
    if not refine_lr > 0:
        raise UserError(f"--refine-lr must be > 0; got {refine_lr}")
    if rethink_every is not None and rethink_every < 1:
        raise UserError(f"--rethink-every must be >= 1; got {rethink_every}")


def _clip(text: str, n: int = 60) -> str:
    return text if len(text) <= n else "…" + text[-(n - 1) :]


def run_eval(args: argparse.Namespace) -> int:
    from hatlm.data import TextWindows, detect_format, load_examples
    from hatlm.evaluate import evaluate_examples, evaluate_text
    from hatlm.loader import load_model_and_tokenizer
    from hatlm.util import atomic_write_text

    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1; got {args.batch_size}")
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be >= 1; got {args.limit}")
    if args.think_iters is not None and args.think_iters < 0:
        raise UserError(f"--think-iters must be >= 0; got {args.think_iters}")
    check_test_time_flags(args.refine_steps, args.refine_lr, args.rethink_every)
    fmt = detect_format(args.data)  # checks the data file before the (slower) model load
    if fmt == "text" and (args.refine_steps or args.rethink_every):
        raise UserError("--refine-steps / --rethink-every act on generation: they need prompt/answer data "
                        f"(greedy accuracy); {args.data} is plain text (loss per token)")
    model, tokenizer = load_model_and_tokenizer(args.checkpoint, device=args.device, dtype=args.dtype)
    if args.think_iters is not None and model.arm != "hybrid":
        raise UserError(f"--think-iters applies to the hybrid arm; {args.checkpoint} is the {model.arm!r} arm")
    think = args.think_iters if args.think_iters is not None else (
        model.config.hybrid.max_think_iters if model.arm == "hybrid" else None)
    result: dict[str, Any] = {"checkpoint": str(args.checkpoint), "data": str(args.data), "format": fmt,
                              "arm": model.arm, "think_iters": think, "refine_steps": args.refine_steps,
                              "refine_lr": args.refine_lr, "refine_objective": args.refine_objective,
                              "rethink_every": args.rethink_every}
    progress = sys.stderr.isatty()
    if fmt == "text":
        limit = model.config.max_position_embeddings - model.config.num_thought_slots
        if not 3 <= args.window <= limit:
            raise UserError(f"--window must be in [3, {limit}] for this model; got {args.window}")
        rows = TextWindows(args.data, tokenizer, args.window, args.seed).rows(0)[: args.limit]
        result.update(evaluate_text(model, tokenizer, rows, batch_size=args.batch_size, think_iters=args.think_iters,
                                    progress=progress))
        result["windows"] = len(rows)
    else:
        examples = load_examples(args.data, fmt)[: args.limit]
        r = evaluate_examples(model, tokenizer, examples, batch_size=args.batch_size, think_iters=args.think_iters,
                              progress=progress, refine_steps=args.refine_steps, refine_lr=args.refine_lr,
                              refine_objective=args.refine_objective, rethink_every=args.rethink_every)
        predictions = r.pop("predictions")
        result.update(r)
        if args.predictions is not None:
            atomic_write_text(args.predictions, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions))
    if args.json:
        print(json.dumps(result))
        return 0
    head = f"{args.checkpoint} ({model.arm}" + (f", {think} thinking iterations" if think is not None else "") + ")"
    print(f"{head} on {args.data} [{fmt}]")
    if fmt == "text":
        print(f"  loss {result['loss']:.4f}  perplexity {result['perplexity']:.2f}  "
              f"over {result['tokens']} continuation tokens in {result['windows']} windows")
        return 0
    n_ok = round(result["accuracy"] * result["n"])
    print(f"  accuracy {100 * result['accuracy']:.1f}%  ({n_ok}/{result['n']} exact match)")
    if args.refine_steps or args.rethink_every:
        extra = []
        if args.refine_steps:
            extra.append(f"refine_steps={args.refine_steps} (lr {args.refine_lr}, {args.refine_objective})")
        if args.rethink_every:
            extra.append(f"rethink_every={args.rethink_every}")
        if "refine_before" in result:
            extra.append(f"objective {result['refine_before']:.4f} → {result['refine_after']:.4f}")
        print(f"  with {'; '.join(extra)}")
    if len(result["per_task"]) > 1:
        width = max(len(t) for t in result["per_task"])
        for task, v in result["per_task"].items():
            print(f"    {task or '(no task)':<{width}}  {100 * v['accuracy']:5.1f}%  (n={v['n']})")
    for p in predictions[: max(0, args.show)]:
        mark = "ok " if p["correct"] else "no "
        print(f"  {mark} {_clip(p['prompt'])!r} → {p['prediction']!r} (answer {p['answer']!r})")
    return 0


# ------------------------------------------------------------------------------------ compare

def compare_arguments(p: argparse.ArgumentParser) -> None:
    from hatlm.compare import DEFAULT_THINK_SWEEP

    sweep = ",".join(map(str, DEFAULT_THINK_SWEEP))
    p.add_argument("--train", required=True, metavar="FILE", help="training data (file or task:NAME)")
    p.add_argument("--eval", action="append", required=True, metavar="FILE",
                   help="eval file, or lm-eval:TASK for an lm-evaluation-harness task (repeatable)")
    p.add_argument("--lm-eval-include-path", metavar="DIR", help="folder of local lm-eval task YAMLs")
    p.add_argument("--out", required=True, metavar="DIR", help="report folder")
    p.add_argument("--steps", type=int, help="training steps per run")
    p.add_argument("--seeds", type=int, default=3, help="seeds per arm (default 3)")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated arms (default {','.join(ARMS)})")
    p.add_argument("--config", metavar="FILE", help="YAML training config shared by every run")
    p.add_argument("--preset", metavar="NAME", help="model preset (default tiny-bytes)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any other config key")
    p.add_argument("--think-sweep", default=sweep,
                   help=f"test-time thinking iterations for hybrid and looped (default {sweep}; empty: none)")
    p.add_argument("--halting-threshold", type=float, metavar="EPS",
                   help="also evaluate hybrid and looped with adaptive depth (up to the largest swept T): "
                        "accuracy and mean iterations per eval file; the criterion is the model's `halting`")
    p.add_argument("--refine-steps", default="", metavar="G[,G...]",
                   help="also evaluate every hybrid run with G steps of gradient refinement of its thoughts "
                        "(each G in turn); the report shows the effect with CIs, paired per seed")
    p.add_argument("--rethink-every", default="", metavar="R[,R...]",
                   help="also evaluate every hybrid run re-thinking every R generated tokens (each R in turn)")
    p.add_argument("--refine-lr", type=float, default=0.1, help="refinement's relative step size (default 0.1)")
    p.add_argument("--refine-objective", default="entropy", choices=("entropy", "reread"),
                   help="what refinement lowers (default: entropy of the first answer token)")
    p.add_argument("--max-eval", type=int, help="evaluate on at most N examples per eval file")
    p.add_argument("--show-examples", type=int, default=2, metavar="K",
                   help="write `hatlm show` pages of the first K examples for the hybrid (first seed) into "
                        "OUT/show/ and link them from results.md (default 2; 0: none)")
    p.add_argument("--workers", type=int,
                   help="runs trained at once, each in its own process (default: one per available CPU core)")
    p.add_argument("--threads", type=int, default=1, metavar="N", help="torch threads per run (default 1)")
    p.add_argument("--device", default=None, help="device of every run: auto, cpu, cuda, cuda:N")
    p.add_argument("--no-progress", action="store_true")


def _int_list(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{flag} {text!r}: expected comma-separated integers, e.g. 1,2,4,8") from None


def run_compare(args: argparse.Namespace) -> int:
    from hatlm.compare import compare
    from hatlm.reports import print_table, write_report
    from hatlm.train import TrainConfig, apply_overrides, load_config
    from hatlm.util import parse_set_items

    base = load_config(args.config) if args.config else TrainConfig(data=[args.train])
    over = parse_set_items(args.set)
    if args.preset:
        over["preset"] = args.preset
    if args.device:
        over["device"] = args.device
    if args.lm_eval_include_path:
        over["lm_eval_include_path"] = str(Path(args.lm_eval_include_path).resolve())
    over["data"] = [args.train]
    base = apply_overrides(base, over, source="command line")
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    res = compare(args.train, args.eval, args.out, steps=args.steps, seeds=args.seeds, arms=arms, base=base,
                  think_sweep=_int_list(args.think_sweep, "--think-sweep"), max_eval_examples=args.max_eval,
                  halting_threshold=args.halting_threshold, show_examples=args.show_examples,
                  refine_steps=_int_list(args.refine_steps, "--refine-steps"),
                  rethink_every=_int_list(args.rethink_every, "--rethink-every"), refine_lr=args.refine_lr,
                  refine_objective=args.refine_objective,
                  workers=args.workers, threads=args.threads, progress=not args.no_progress)
    write_report(res, args.out)
    print_table(res)
    print(f"\nreport: {Path(args.out) / 'results.md'}  (results.json, learning_curves.png, think_iters.png)")
    return 0


# ------------------------------------------------------------------------------------ generate


def generate_arguments(p: argparse.ArgumentParser) -> None:
    from hatlm.thinking import REFINE_OBJECTIVES

    p.add_argument("model", metavar="CHECKPOINT_OR_PRESET", help="checkpoint folder or preset name")
    p.add_argument("prompt", nargs="?", help="prompt text (or use --file)")
    p.add_argument("--file", type=Path, help="a text file with one prompt per line")
    p.add_argument("--json", action="store_true", help="print results and thinking statistics as JSON")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--think-iters", type=int, default=None, help="thinking iterations (hybrid)")
    p.add_argument("--halting-threshold", type=float, default=None, help="halting epsilon (hybrid)")
    p.add_argument("--rethink-every", type=int, default=None, help="re-think every R tokens (hybrid)")
    p.add_argument("--refine-steps", type=int, default=0, help="gradient refinement steps (hybrid)")
    p.add_argument("--refine-lr", type=float, default=0.1, help="relative refinement step size")
    p.add_argument("--refine-objective", choices=REFINE_OBJECTIVES, default="entropy")
    p.add_argument("--arm", choices=ARMS, default=None, help="arm (presets only)")
    p.add_argument("--batch-size", type=int, default=1, help="prompts per batch with --file")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: fp32 on CPU, bf16 on GPU)")
    p.add_argument(
        "--compile",
        action="store_true",
        help="decode with a torch.compile'd static-shape step (CUDA graphs on a GPU; the first batch compiles)",
    )


def _read_prompts(args: argparse.Namespace) -> list[str]:
    if args.file is not None and args.prompt is not None:
        raise UserError("give either a prompt or --file, not both")
    if args.file is not None:
        try:
            lines = args.file.read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise UserError(f"cannot read --file {args.file}: {e.strerror}") from None
        prompts = [ln for ln in lines if ln.strip()]
        if not prompts:
            raise UserError(f"{args.file} has no prompts (one per line expected)")
        return prompts
    if args.prompt is None:
        raise UserError("no prompt: give one as an argument or use --file prompts.txt")
    if not args.prompt.strip():
        raise UserError("the prompt is empty; give some text to continue")
    return [args.prompt]


def run_generate(args: argparse.Namespace) -> int:
    from hatlm.generate import generate
    from hatlm.loader import load_model_and_tokenizer
    from hatlm.util import resolve_device

    prompts = _read_prompts(args)
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1; got {args.batch_size}")
    device = resolve_device(args.device)  # None: CUDA when available; CUDA asked for but absent is an error
    if args.arm is not None and args.model not in PRESETS and Path(args.model).expanduser().is_dir():
        raise UserError("--arm applies to presets only; a checkpoint carries its own arm")
    model, tok = load_model_and_tokenizer(args.model, arm=args.arm, device=device, dtype=args.dtype)

    out = sys.stdout
    streaming = not args.json and args.batch_size == 1

    def on_piece(row: int, piece: str) -> None:
        out.write(piece)
        out.flush()

    options = dict(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, seed=args.seed, stop=args.stop, think_iters=args.think_iters,
        halting_threshold=args.halting_threshold, rethink_every=args.rethink_every, refine_steps=args.refine_steps,
        refine_lr=args.refine_lr, refine_objective=args.refine_objective, compile=args.compile,
    )
    results = []
    batches = [prompts[i : i + args.batch_size] for i in range(0, len(prompts), args.batch_size)]
    progress = None
    if len(batches) > 1 and not streaming:
        from tqdm import tqdm

        progress = tqdm(total=len(prompts), desc="generate", unit="prompt", file=sys.stderr)
    for batch in batches:
        if streaming and len(prompts) > 1:
            out.write(f"### {batch[0]}\n")
        res = generate(model, tok, batch, stream=on_piece if streaming else None, **options)
        if streaming:
            out.write("\n")
        elif not args.json:
            for p, text in zip(batch, res.texts):
                out.write(f"### {p}\n{text}\n" if len(prompts) > 1 else text + "\n")
        for p, toks, text, st in zip(batch, res.tokens, res.texts, res.stats):
            results.append({"prompt": p, "text": text, "tokens": toks, "stats": st})
        if progress is not None:
            progress.update(len(batch))
    if progress is not None:
        progress.close()
    if args.json:
        json.dump({"model": args.model, "arm": model.arm, "options": options, "results": results}, out, indent=2)
        out.write("\n")
    out.flush()
    return 0




# ------------------------------------------------------------------------------------ init-from


def init_from_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="MISTRAL_DIR", help="a Mistral (or hatlm) checkpoint folder in HF layout")
    p.add_argument("out", metavar="OUT", help="the hatlm checkpoint folder to write")
    p.add_argument("--arm", choices=ARMS, default="hybrid", help="arm to build (default hybrid)")
    p.add_argument("--thought-slots", type=int, metavar="M", help="thought (or pause) slots m")
    p.add_argument("--thinker-layers", type=int, metavar="K", help="thinker depth K")
    p.add_argument("--encoder-layers", type=int, metavar="E", help="backbone layers run over the prompt first")
    p.add_argument("--max-think-iters", type=int, metavar="T", help="thinking iterations T_max")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other config field, e.g. --set thinker_init=random --set halting_threshold=1e-3")
    p.add_argument("--dtype", default=None, help="save in this dtype (default: the source's)")
    p.add_argument("--seed", type=int, default=0, help="seed for the parts a Mistral folder does not hold")
    p.add_argument("--max-shard-size", default="5GB", help="shard size of the written safetensors (default 5GB)")


def run_init_from(args: argparse.Namespace) -> int:
    """Mistral folder → hatlm checkpoint. The loader fills a meta-device model tensor by tensor, and the
    writer streams it to disk: one copy of the weights in memory, never two."""
    from hatlm.checkpoint import load_model, save_model
    from hatlm.tokenizer import load_tokenizer
    from hatlm.util import parse_set_items

    overrides: dict[str, Any] = parse_set_items(args.set)
    overrides["arm"] = args.arm
    for key in ("thought_slots", "thinker_layers", "encoder_layers", "max_think_iters"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    source, out = Path(args.source), Path(args.out)
    if source.resolve() == out.resolve():
        raise UserError("OUT must be a new folder, not the source checkpoint")
    model = load_model(source, dtype=args.dtype, seed=args.seed, **overrides)
    try:
        tok = load_tokenizer(source)
    except UserError:
        tok = None  # a folder without tokenizer files: the checkpoint is still complete
    save_model(model, out, tokenizer=tok, max_shard_size=args.max_shard_size)
    counts = model.num_parameters()
    print(f"wrote {out}: {model.config.arm} arm, {counts['total']:,} parameters "
          f"({counts['thinker'] + counts['slots_and_gates']:,} new)")  # fmt: skip
    return 0


# ------------------------------------------------------------------------------------ inference tools


def model_arguments(p: argparse.ArgumentParser) -> None:
    """The positional model argument and --device/--dtype/--arm shared by serve and show."""
    p.add_argument("model", metavar="CHECKPOINT_OR_PRESET", help="checkpoint folder or preset name")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: fp32 on CPU, bf16 on GPU)")
    p.add_argument("--arm", choices=ARMS, default=None, help="arm (presets only)")


def serve_arguments(p: argparse.ArgumentParser) -> None:
    model_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--served-model-name", default=None, help="model id clients use (default: folder name)")
    p.add_argument("--max-batch", type=int, default=32, help="most requests decoded together (default 32)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))


def run_serve(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ModuleNotFoundError as e:
        raise UserError(f"hatlm serve needs {e.name}: pip install 'hatlm[serve]'") from None
    from hatlm.serve import build_server, create_app

    if not 0 < args.port < 65536:
        raise UserError(f"--port must be in 1..65535; got {args.port}")
    if args.max_batch < 1:
        raise UserError(f"--max-batch must be >= 1; got {args.max_batch}")
    if args.arm is not None and args.model not in PRESETS:
        raise UserError("--arm applies to presets only; a checkpoint carries its own arm")
    server = build_server(args.model, args.device, args.dtype, args.arm, args.served_model_name, args.max_batch)
    print(f"hatlm serve: model {server.model_id!r} ({server.model.arm} arm, chat: {server.chat.source}) "
          f"on http://{args.host}:{args.port}/v1", flush=True)  # fmt: skip
    uvicorn.run(create_app(server), host=args.host, port=args.port, log_level=args.log_level)
    return 0


def lm_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-args", required=True,
                   help="pretrained=DIR_OR_PRESET[,think_iters=N,halting_threshold=E,dtype=...]")  # fmt: skip
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    p.add_argument("--include-path", default=None, help="folder of extra task YAMLs")
    p.add_argument("--no-default-tasks", action="store_true", help="index only --include-path tasks (skips built-ins)")
    p.add_argument("--limit", type=float, default=None, help="examples per task (a fraction if < 1)")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="rows per forward pass (default 16)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    p.add_argument("--output-path", type=Path, default=None, help="folder for results.json (+ samples)")
    p.add_argument("--log-samples", action="store_true", help="also write per-example samples")
    p.add_argument("--seed", type=int, default=0)


def run_lm_eval(args: argparse.Namespace) -> int:
    """lm-evaluation-harness on a hatlm model. The harness's own CLI cannot load model classes from
    other packages, so this imports hatlm.harness (which registers "hatlm") and calls the harness."""
    try:
        import lm_eval  # noqa: F401
    except ModuleNotFoundError:
        raise UserError("hatlm lm-eval needs lm-evaluation-harness: pip install 'hatlm[eval]'") from None
    from hatlm.harness import evaluate, write_results

    if "pretrained=" not in args.model_args:
        raise UserError("--model-args must name the model: pretrained=CHECKPOINT_DIR_OR_PRESET[,think_iters=N,...]")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise UserError("--tasks is empty")
    if args.include_path is not None and not Path(args.include_path).is_dir():
        raise UserError(f"--include-path {args.include_path}: not a folder")
    if args.no_default_tasks and args.include_path is None:
        raise UserError("--no-default-tasks needs --include-path (there would be no tasks at all)")
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    results = evaluate(
        args.model_args, tasks, include_path=args.include_path, limit=limit, num_fewshot=args.num_fewshot,
        batch_size=args.batch_size, device=args.device, log_samples=args.log_samples or args.output_path is not None,
        include_defaults=not args.no_default_tasks, seed=args.seed,
    )  # fmt: skip
    from lm_eval.utils import make_table

    print(make_table(results))
    if args.output_path is not None:
        write_results(results, args.output_path, samples=args.log_samples)
        print(f"results: {args.output_path / 'results.json'}", file=sys.stderr)
    return 0


def show_arguments(p: argparse.ArgumentParser) -> None:
    model_arguments(p)
    p.add_argument("prompt", help="the prompt to think over")
    p.add_argument("--out", type=Path, default=Path("hatlm-show"), help="output folder (default hatlm-show/)")
    p.add_argument("--think-iters", type=int, default=None, help="thinking iterations (default: config)")
    p.add_argument("--halting-threshold", type=float, default=None, help="halting epsilon (default: config)")
    p.add_argument("--rethink-every", type=int, default=None, help="also generate, re-thinking every R tokens")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate with --rethink-every")


def run_show(args: argparse.Namespace) -> int:
    from hatlm.loader import load_model_and_tokenizer
    from hatlm.show import show

    if args.think_iters is not None and args.think_iters < 1:
        raise UserError(f"--think-iters must be >= 1 to have something to show; got {args.think_iters}")
    if args.arm is not None and args.model not in PRESETS:
        raise UserError("--arm applies to presets only; a checkpoint carries its own arm")
    model, tok = load_model_and_tokenizer(args.model, device=args.device or "auto", dtype=args.dtype, arm=args.arm)
    model.eval()
    page = show(model, tok, args.prompt, args.out, args.think_iters, args.halting_threshold, args.rethink_every,
                args.max_new_tokens, model_name=str(args.model))  # fmt: skip
    print(page.resolve().as_uri())
    return 0


# ------------------------------------------------------------------------------------ merge


def merge_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter", metavar="ADAPTER_DIR", help="a LoRA adapter folder (hatlm.lora.save_adapter)")
    p.add_argument("out", metavar="OUT_DIR", help="where to write the merged (plain hatlm) checkpoint")
    p.add_argument("--base", help="base model (default: base_model_name_or_path in adapter_config.json)")
    p.add_argument("--no-check-base", action="store_true", help="skip the check that the base is the trained one")


def run_merge(args: argparse.Namespace) -> int:
    from hatlm.checkpoint import save_model
    from hatlm.lora import load_with_adapter, merge_lora

    model = load_with_adapter(args.adapter, base=args.base, check_base=not args.no_check_base)
    save_model(merge_lora(model), args.out)
    print(f"merged {args.adapter} into {args.out}")
    return 0


# ------------------------------------------------------------------------------------ main

Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]
COMMANDS: dict[str, Command] = {
    "info": ("parameter counts and memory estimates of a checkpoint or preset", info_arguments, run_info),
    "demo": ("the main job: built-in task, five-arm comparison, report", demo_arguments, run_demo),
    "train": ("train one arm on a data file", train_arguments, run_train),
    "eval": ("evaluate a checkpoint on a data file", eval_arguments, run_eval),
    "compare": ("train and compare the arms (causal, pause, hybrid, looped, deep)", compare_arguments, run_compare),
    "generate": ("generate text from a checkpoint or preset", generate_arguments, run_generate),
    "init-from": ("turn a Mistral checkpoint into a hatlm hybrid (or pause) checkpoint", init_from_arguments,
                  run_init_from),
    "serve": ("OpenAI-compatible HTTP server (FastAPI + uvicorn)", serve_arguments, run_serve),
    "lm-eval": ("run lm-evaluation-harness tasks on a checkpoint or preset", lm_eval_arguments, run_lm_eval),
    "show": ("HTML page + PNGs of what the thinker does on a prompt", show_arguments, run_show),
    "merge": ("merge a LoRA adapter into its base model: a plain hatlm checkpoint", merge_arguments, run_merge),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hatlm", description="Hybrid attention transformers on Mistral")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, add_arguments, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_run=run)
        add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except UserError as e:
        print(f"hatlm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hatlm {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Output piped into `head` and closed early: not an error worth a traceback.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
