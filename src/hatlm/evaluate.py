"""Evaluation, the one place for it: used by `hatlm train` (periodic), `hatlm eval` and `hatlm compare`.

* teacher-forced (`teacher_forced`, `evaluate_text`): loss per answer/continuation token given the
  gold prefix, and exact match of the argmax (every answer token, EOS included, is what greedy
  decoding would pick) — cheap, for learning curves and plain text;
* greedy (`evaluate_examples`): real greedy generation and exact match after stripping whitespace,
  overall and per task (bAbI: per qaN file; built-in tasks: per level);
* `evaluate_set` and `chance_floor` score an `EvalSet` (hatlm.datasets) on its kept examples, so
  that every metric of a compare record is computed on the same examples.

Layering: greedy accuracy decodes, so this module sits above hatlm.generate (it imports it; generate
never imports this).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from hatlm.data import Example, TextWindows, collate, encode_example
from hatlm.datasets import EvalSet
from hatlm.errors import UserError

Row = tuple[list[int], int]  # (token ids incl. BOS, prompt length)


def _answer_matches(prediction: str, answer: str) -> bool:
    return prediction.strip() == answer.strip()


# ------------------------------------------------------------------------------ teacher-forced


def answer_loss(logits: Tensor, input_ids: Tensor, target_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Summed CE over answer tokens, their count, and per-row exact match of the argmax.

    logits [B, L, V] in the causal convention (logits[:, t] predicts input_ids[:, t+1]);
    target_mask [B, L] True where input_ids is an answer token."""
    tgt = input_ids[:, 1:]
    mask = target_mask[:, 1:]
    pred_logits = logits[:, :-1]
    sel = pred_logits[mask].float()  # [N, V]: only the answer positions
    loss_sum = F.cross_entropy(sel, tgt[mask], reduction="sum")
    hit = (pred_logits.argmax(-1) == tgt) | ~mask  # [B, L-1]
    return loss_sum, mask.sum(), hit.all(dim=1)


def forward_batch(model, batch, device: torch.device, think_iters: int | None, autocast: bool,
                  backprop_iters: int | None = None):
    """(input_ids on device, model output) for a collated Batch; bf16 autocast when asked (GPU).
    `backprop_iters` (training) overrides the thinker's truncated-backprop depth for this call."""
    ids = batch.input_ids.to(device)
    extra = {} if backprop_iters is None else {"backprop_iters": backprop_iters}
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=autocast):
        out = model(ids, prompt_lengths=batch.prompt_lengths.to(device), lengths=batch.lengths.to(device),
                    think_iters=think_iters, **extra)
    return ids, out


@torch.no_grad()
def teacher_forced(model, rows: Sequence[Row], pad_id: int, *, batch_size: int = 64, think_iters: int | None = None,
                   device: torch.device | None = None, progress: bool = False) -> dict[str, float]:
    """Loss per target token (the tokens after each row's prompt, each counted once whatever the
    batching), its perplexity, and teacher-forced exact match per row."""
    from tqdm import tqdm

    if not rows:
        raise UserError("no data to evaluate")
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1; got {batch_size}")
    device = device or model.device
    was_training = model.training
    model.eval()
    loss_sum, tokens, correct = 0.0, 0, 0
    try:
        with tqdm(total=len(rows), desc="evaluating", unit="row", disable=not progress, leave=False) as bar:
            for i in range(0, len(rows), batch_size):
                batch = collate(list(rows[i : i + batch_size]), pad_id)
                # autocast on GPU, and for bf16 weights on the CPU (a LoRA run's bf16 base beside fp32 trained parts)
                autocast = device.type == "cuda" or model.dtype != torch.float32
                ids, out = forward_batch(model, batch, device, think_iters, autocast)
                ls, nt, hit = answer_loss(out.logits, ids, batch.target_mask.to(device))
                loss_sum += float(ls)
                tokens += int(nt)
                correct += int(hit.sum())
                bar.update(len(batch.lengths))
    finally:
        model.train(was_training)
    loss = loss_sum / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "accuracy_tf": correct / len(rows),
            "n": len(rows), "tokens": tokens}


def evaluate_text(model, tokenizer, data: TextWindows | list[Example] | list[Row], *, batch_size: int = 32,
                  think_iters: int | None = None, epoch: int = 0, progress: bool = False) -> dict[str, float]:
    """Mean cross-entropy per continuation token (and its perplexity) with the prompt thought over.

    data: text windows (epoch `epoch`'s cuts), prompt/answer examples (loss on answer + EOS), or
    rows (ids, prompt_length)."""
    if isinstance(data, TextWindows):
        rows = data.rows(epoch)
    else:
        rows = [encode_example(r, tokenizer) if isinstance(r, Example) else r for r in data]
    r = teacher_forced(model, rows, tokenizer.pad_id, batch_size=batch_size, think_iters=think_iters,
                       progress=progress)
    return {"loss": r["loss"], "perplexity": r["perplexity"], "tokens": r["tokens"]}


def subsample_rows(rows: list[Row], k: int) -> list[Row]:
    """A fixed, evenly spaced subset of k rows (all when k is 0 or covers them): the same examples
    at every periodic evaluation and in every run."""
    if k == 0 or len(rows) <= k:
        return rows
    idx = np.linspace(0, len(rows) - 1, k).round().astype(int)
    return [rows[i] for i in idx]


# ------------------------------------------------------------------------------ greedy


def evaluate_examples(
    model,
    tokenizer,
    examples: list[Example],
    *,
    batch_size: int = 32,
    think_iters: int | None = None,
    max_new_tokens: int | None = None,
    progress: bool = False,
    halting_threshold: float | None = None,
    rethink_every: int | None = None,
    refine_steps: int = 0,
    refine_lr: float = 0.1,
    refine_objective: str = "entropy",
) -> dict[str, Any]:
    """Greedy exact-match accuracy of `model` on prompt/answer `examples`.

    For arms that think (hybrid, looped) the result also holds "mean_iterations", the thinking
    iterations used per example (fewer than think_iters where `halting_threshold` stops a row early).
    rethink_every / refine_steps / refine_lr / refine_objective (hybrid) go to `generate`: re-thinking
    every R answer tokens, gradient refinement of the thoughts; with refinement the result also holds
    "refine_before" / "refine_after", the mean objective over the examples before and after it.

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
    options = {"rethink_every": rethink_every, "refine_steps": refine_steps, "refine_lr": refine_lr,
               "refine_objective": refine_objective}
    refine_obj: list[tuple[float, float]] = []
    # Batch prompts of similar length together (less padding work); results go back in input order.
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].prompt))
    predictions: list[str] = [""] * len(examples)
    iterations: list[int] = [0] * len(examples)
    was_training = model.training
    model.eval()
    try:
        with tqdm(total=len(examples), desc="evaluating", unit="ex", disable=not progress, leave=False) as bar:
            for s in range(0, len(order), batch_size):
                idx = order[s : s + batch_size]
                out = generate(model, tokenizer, [examples[i].prompt for i in idx], max_new_tokens=max_new_tokens,
                               temperature=0.0, think_iters=think_iters, halting_threshold=halting_threshold,
                               **options)
                for i, text, st in zip(idx, out.texts, out.stats):
                    predictions[i] = text
                    iterations[i] = int(st.get("think_iterations", 0))
                    if st.get("refine_before") is not None:
                        refine_obj.append((st["refine_before"], st["refine_after"]))
                bar.update(len(idx))
    finally:
        model.train(was_training)
    records = []
    per_task: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])  # task → [correct, n, iterations]
    for ex, pred, it in zip(examples, predictions, iterations):
        ok = _answer_matches(pred, ex.answer)
        records.append({"prompt": ex.prompt, "answer": ex.answer, "prediction": pred, "correct": ok, "task": ex.task,
                        "iterations": it})
        per_task[ex.task][0] += ok
        per_task[ex.task][1] += 1
        per_task[ex.task][2] += it
    correct = sum(r["correct"] for r in records)
    result = {
        "accuracy": correct / len(records),
        "n": len(records),
        "mean_iterations": sum(iterations) / len(records),
        "per_task": {t: {"accuracy": c / n, "n": n, "mean_iterations": i / n}
                     for t, (c, n, i) in sorted(per_task.items())},
        "predictions": records,
    }
    if refine_obj:
        result["refine_before"] = float(np.mean([b for b, _ in refine_obj]))
        result["refine_after"] = float(np.mean([a for _, a in refine_obj]))
    return result


# ------------------------------------------------------------------------------ eval sets


def select_examples(ev: EvalSet, max_examples: int | None) -> list[Example]:
    """The kept examples a greedy evaluation of `ev` uses: the first `max_examples` (None: all)."""
    exs = ev.examples or []
    return exs[:max_examples] if max_examples else exs


def evaluate_set(model, tokenizer, ev: EvalSet, *, think_iters: int | None, max_examples: int | None = None,
                 batch_size: int = 64, halting_threshold: float | None = None, **generate_options: Any
                 ) -> dict[str, Any]:
    """Greedy exact-match accuracy (prompt/answer) or loss per token (text) of one model on one set;
    with accuracy, the mean thinking iterations per example (see `evaluate_examples`, which also
    takes `generate_options`: rethink_every, refine_steps, refine_lr, refine_objective)."""
    if ev.examples is None:
        rows = ev.rows[:max_examples] if max_examples else ev.rows
        r = teacher_forced(model, rows, tokenizer.pad_id, batch_size=batch_size, think_iters=think_iters)
        return {"metric": "loss", "loss": r["loss"], "perplexity": r["perplexity"], "n": r["n"], "tokens": r["tokens"]}
    r = evaluate_examples(model, tokenizer, select_examples(ev, max_examples), batch_size=batch_size,
                          think_iters=think_iters, halting_threshold=halting_threshold, **generate_options)
    return {"metric": "accuracy", "accuracy": float(r["accuracy"]), "n": int(r["n"]),
            "mean_iterations": float(r["mean_iterations"]),
            "per_task": {k: dict(v) for k, v in r["per_task"].items()}, "predictions": r["predictions"],
            **{k: r[k] for k in ("refine_before", "refine_after") if k in r}}


def chance_floor(ev: EvalSet, max_examples: int | None = None) -> tuple[float, str]:
    """The accuracy a model gets without solving the task, on the examples `evaluate_set` scores.

    Built-in tasks (labels NAME/dK): the task's own chance (a uniform guess among the answers the
    prompt makes possible), averaged over the examples. Other files: always answering the most
    frequent answer of the set. Multiple-choice sets (lm-eval tasks): the mean of 1/choices."""
    from hatlm import tasks as T

    exs = select_examples(ev, max_examples)
    if getattr(ev, "choices", None) and exs:
        return float(np.mean([1 / c for c in ev.choices[: len(exs)]])), "uniform guess among the choices"
    try:
        vals = []
        for ex in exs:
            name, d = ex.task.split("/d")
            vals.append(T.chance_accuracy(name, int(d)))
        if vals:
            return float(np.mean(vals)), "uniform guess among the answers the prompt allows"
    except (ValueError, UserError, KeyError):
        pass
    if not exs:
        return float("nan"), "n/a"
    answer, c = Counter(e.answer.strip() for e in exs).most_common(1)[0]
    return c / len(exs), f"always answering the most frequent answer ({answer!r})"
