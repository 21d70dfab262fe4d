"""`hatlm lm-eval`: lm-evaluation-harness tasks on a hatlm checkpoint.

    hatlm lm-eval --model-args pretrained=DIR,think_iters=4 --tasks hellaswag,arc_easy
    hatlm lm-eval --model-args pretrained=DIR --tasks my_task --include-path tasks/ --limit 100 --output-path out/

The harness's own CLI cannot load model classes from other packages, so this launcher imports
hatlm.harness (which registers `hatlm`) and calls `lm_eval.simple_evaluate`. This module stays free
of lm_eval imports so that `hatlm --help` works without the `eval` extra.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hatlm.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model-args", required=True, help="pretrained=DIR_OR_PRESET[,think_iters=N,halting_threshold=E,dtype=...]"
    )
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    parser.add_argument("--include-path", default=None, help="folder of extra task YAMLs")
    parser.add_argument(
        "--no-default-tasks", action="store_true", help="index only --include-path tasks (skips the built-in ones)"
    )
    parser.add_argument("--limit", type=float, default=None, help="examples per task (a fraction if < 1)")
    parser.add_argument("--num-fewshot", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None, help="rows per forward pass (default 16)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    parser.add_argument("--output-path", type=Path, default=None, help="folder for results.json (+ samples)")
    parser.add_argument("--log-samples", action="store_true", help="also write per-example samples")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    try:
        import lm_eval  # noqa: F401
    except ModuleNotFoundError:
        raise UserError("hatlm lm-eval needs lm-evaluation-harness: pip install 'hatlm[eval]'") from None
    import hatlm.harness  # noqa: F401 — registers the "hatlm" model class
    from hatlm.harness import evaluate

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


def write_results(results: dict, folder: Path, samples: bool = False) -> None:
    """results.json (everything but the samples) and, with `samples`, samples_TASK.jsonl per task."""
    folder.mkdir(parents=True, exist_ok=True)
    body = {k: v for k, v in results.items() if k != "samples"}
    (folder / "results.json").write_text(json.dumps(body, indent=2, default=str) + "\n")
    if samples:
        for task, rows in (results.get("samples") or {}).items():
            lines = (json.dumps(r, default=str) for r in rows)
            (folder / f"samples_{task}.jsonl").write_text("".join(line + "\n" for line in lines))
