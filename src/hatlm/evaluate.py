"""Evaluation: greedy exact match for prompt/answer tasks, loss/perplexity for text; `hatlm eval`.

    hatlm eval CHECKPOINT --data FILE [--think-iters N] [--json] [--batch-size N]

Prompt/answer files (JSONL, bAbI, ProntoQA, ProsQA) are scored by greedy generation and exact match
after stripping whitespace, overall and per task (bAbI: per qaN file; built-in tasks: per level).
Plain text files are scored by the mean cross-entropy of the continuation given the prefix
(windows split at a seeded random point, as in training) and its perplexity.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from hatlm.data import Example, TextWindows, encode_example, iter_batches
from hatlm.errors import UserError


def _answer_matches(prediction: str, answer: str) -> bool:
    return prediction.strip() == answer.strip()


def evaluate_examples(
    model,
    tokenizer,
    examples: list[Example],
    *,
    batch_size: int = 32,
    think_iters: int | None = None,
    max_new_tokens: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Greedy exact-match accuracy of `model` on prompt/answer `examples`.

    max_new_tokens None → the longest answer in tokens + 2 (room for EOS and one token beyond, so a
    model that runs on past the answer is caught). Returns {"accuracy", "n", "per_task": {task:
    {"accuracy", "n"}}, "predictions": [{prompt, answer, prediction, correct, task}, ...]} in the
    order of `examples`.
    """
    from tqdm import tqdm

    from hatlm.generate import generate

    if not examples:
        raise UserError("no examples to evaluate")
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1; got {batch_size}")
    if max_new_tokens is None:
        max_new_tokens = max(len(tokenizer.encode(ex.answer, bos=False)) for ex in examples) + 2
    # Batch prompts of similar length together (less padding work); results go back in input order.
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].prompt))
    predictions: list[str] = [""] * len(examples)
    was_training = model.training
    model.eval()
    try:
        with tqdm(total=len(examples), desc="evaluating", unit="ex", disable=not progress, leave=False) as bar:
            for s in range(0, len(order), batch_size):
                idx = order[s : s + batch_size]
                out = generate(
                    model,
                    tokenizer,
                    [examples[i].prompt for i in idx],
                    max_new_tokens=max_new_tokens,
                    temperature=0.0,
                    think_iters=think_iters,
                )
                for i, text in zip(idx, out.texts):
                    predictions[i] = text
                bar.update(len(idx))
    finally:
        model.train(was_training)
    records = []
    per_task: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # task → [correct, n]
    for ex, pred in zip(examples, predictions):
        ok = _answer_matches(pred, ex.answer)
        records.append({"prompt": ex.prompt, "answer": ex.answer, "prediction": pred, "correct": ok, "task": ex.task})
        per_task[ex.task][0] += ok
        per_task[ex.task][1] += 1
    correct = sum(r["correct"] for r in records)
    return {
        "accuracy": correct / len(records),
        "n": len(records),
        "per_task": {t: {"accuracy": c / n, "n": n} for t, (c, n) in sorted(per_task.items())},
        "predictions": records,
    }


def evaluate_text(
    model,
    tokenizer,
    data: TextWindows | list[Example] | list[tuple[list[int], int]],
    *,
    batch_size: int = 32,
    think_iters: int | None = None,
    epoch: int = 0,
    progress: bool = False,
) -> dict[str, float]:
    """Mean cross-entropy per continuation token (and its perplexity) with the prompt thought over.

    data: text windows (epoch `epoch`'s cuts), prompt/answer examples (loss on answer + EOS), or
    rows (ids, prompt_length). Every token after a row's prompt counts once, whatever the batching.
    """
    from tqdm import tqdm

    if isinstance(data, TextWindows):
        rows = data.rows(epoch)
    else:
        rows = [encode_example(r, tokenizer) if isinstance(r, Example) else r for r in data]
    if not rows:
        raise UserError("no data to evaluate")
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), tqdm(total=len(rows), desc="evaluating", unit="row", disable=not progress) as bar:
            for batch in iter_batches(rows, batch_size, tokenizer.pad_id):
                batch = batch.to(model.device)
                out = model(
                    batch.input_ids,
                    prompt_lengths=batch.prompt_lengths,
                    lengths=batch.lengths,
                    think_iters=think_iters,
                )
                # logits[:, t] predicts input_ids[:, t+1]; the targets are the non-prompt tokens.
                sel = batch.target_mask[:, 1:]
                logits = out.logits[:, :-1][sel].float()  # [n_targets, V]
                targets = batch.input_ids[:, 1:][sel]
                total += float(F.cross_entropy(logits, targets, reduction="sum"))
                count += int(sel.sum())
                bar.update(batch.input_ids.shape[0])
    finally:
        model.train(was_training)
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": count}


# ---------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a hatlm (or Hugging Face Mistral) checkpoint folder")
    parser.add_argument("--data", required=True, type=Path, help="data file: .jsonl, bAbI .txt, ProntoQA/ProsQA "
                        ".json, or plain text")  # fmt: skip
    parser.add_argument("--think-iters", type=int, default=None,
                        help="hybrid: thinking iterations (default: the checkpoint's max_think_iters)")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N examples (or windows)")
    parser.add_argument("--window", type=int, default=256, help="plain text: tokens per window (default 256)")
    parser.add_argument("--seed", type=int, default=0, help="plain text: seed of the window split points")
    parser.add_argument("--show", type=int, default=5, help="print the first N predictions (default 5; 0: none)")
    parser.add_argument("--predictions", type=Path, default=None,
                        help="write every prediction to this JSONL file")  # fmt: skip


def _load(checkpoint: str):
    import hatlm
    from hatlm.tokenizer import load_tokenizer

    path = Path(checkpoint)
    if not path.is_dir():
        raise UserError(f"{checkpoint}: no such checkpoint folder")
    if not (path / "config.json").exists():
        raise UserError(f"{path}: no config.json; expected a hatlm or Hugging Face Mistral checkpoint folder")
    model = hatlm.load(path)
    tokenizer = load_tokenizer(path)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UserError(
            f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but the model only {model.config.vocab_size}; "
            "put the checkpoint's own tokenizer file in its folder"
        )
    return model.float(), tokenizer


def run(args: argparse.Namespace) -> int:
    from hatlm.data import _atomic_write_text, detect_format, load_examples

    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1; got {args.batch_size}")
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be >= 1; got {args.limit}")
    if args.think_iters is not None and args.think_iters < 0:
        raise UserError(f"--think-iters must be >= 0; got {args.think_iters}")
    fmt = detect_format(args.data)  # checks the data file before the (slower) model load
    model, tokenizer = _load(args.checkpoint)
    if args.think_iters is not None and model.arm != "hybrid":
        raise UserError(f"--think-iters applies to the hybrid arm; {args.checkpoint} is the {model.arm!r} arm")
    think = args.think_iters if args.think_iters is not None else (
        model.config.hybrid.max_think_iters if model.arm == "hybrid" else None)  # fmt: skip
    result: dict[str, Any] = {"checkpoint": str(args.checkpoint), "data": str(args.data), "format": fmt,
                              "arm": model.arm, "think_iters": think}  # fmt: skip
    progress = sys.stderr.isatty()
    if fmt == "text":
        limit = model.config.max_position_embeddings - model.config.num_thought_slots
        if not 3 <= args.window <= limit:
            raise UserError(f"--window must be in [3, {limit}] for this model; got {args.window}")
        windows = TextWindows(args.data, tokenizer, args.window, args.seed)
        rows = windows.rows(0)[: args.limit]
        result.update(evaluate_text(model, tokenizer, rows, batch_size=args.batch_size, think_iters=args.think_iters,
                                    progress=progress))  # fmt: skip
        result["windows"] = len(rows)
    else:
        examples = load_examples(args.data, fmt)[: args.limit]
        r = evaluate_examples(model, tokenizer, examples, batch_size=args.batch_size, think_iters=args.think_iters,
                              progress=progress)  # fmt: skip
        predictions = r.pop("predictions")
        result.update(r)
        if args.predictions is not None:
            _atomic_write_text(args.predictions, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions))
    if args.json:
        print(json.dumps(result))
        return 0
    head = f"{args.checkpoint} ({model.arm}" + (f", {think} thinking iterations" if think is not None else "") + ")"
    print(f"{head} on {args.data} [{fmt}]")
    if fmt == "text":
        print(f"  loss {result['loss']:.4f}  perplexity {result['perplexity']:.2f}  "
              f"over {result['tokens']} continuation tokens in {result['windows']} windows")  # fmt: skip
        return 0
    n_ok = round(result["accuracy"] * result["n"])
    print(f"  accuracy {100 * result['accuracy']:.1f}%  ({n_ok}/{result['n']} exact match)")
    if len(result["per_task"]) > 1:
        width = max(len(t) for t in result["per_task"])
        for task, v in result["per_task"].items():
            print(f"    {task or '(no task)':<{width}}  {100 * v['accuracy']:5.1f}%  (n={v['n']})")
    for p in predictions[: max(0, args.show)]:
        mark = "ok " if p["correct"] else "no "
        print(f"  {mark} {_clip(p['prompt'])!r} → {p['prediction']!r} (answer {p['answer']!r})")
    return 0


def _clip(text: str, n: int = 60) -> str:
    return text if len(text) <= n else "…" + text[-(n - 1) :]
