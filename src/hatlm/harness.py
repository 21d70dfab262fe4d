"""lm-evaluation-harness (0.4.x) model class for hatlm checkpoints: `--model hatlm`.

Importing this module registers the class under the name "hatlm" (`@register_model`). The harness's
own CLI does not import third-party modules, so `hatlm lm-eval` (hatlm/cli.py) imports this
module and then runs the harness.

How requests map onto the model. A request's context is the prompt the thinker thinks over
(`prompt_lengths`); its continuation is scored after the thoughts, by one forward pass
`model(ids, prompt_lengths=..., lengths=...)` whose logits[:, t] predict token t+1 (for t ≥ n−1 they
come after the m thought positions). The causal and pause arms take the same path (no thinking /
fixed pause slots), so every arm is measured on the same requests.

  loglikelihood          (context, continuation): context encoded with BOS, the continuation split
                         off the encoding of context+continuation (the harness's word-boundary rule).
  loglikelihood_rolling  the text in windows of the model's length (lm_eval's rolling windows); each
                         window's prefix is its context (the first window's is the BOS token).
  generate_until         `hatlm.generate.generate` (greedy unless the task asks for sampling), cut at
                         the task's `until` strings; requests with the same generation options share
                         a batch.

Batches are sorted by length (longest first, so an out-of-memory shows at once); each row's result is
independent of its batch-mates (right padding, per-row masks, per-row halting).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from hatlm.errors import UserError


def _opt_int(v: Any, name: str) -> int | None:
    if v is None or v == "":
        return None
    try:
        return int(v)
    except (TypeError, ValueError):
        raise UserError(f"model arg {name} must be an integer; got {v!r}") from None


@register_model("hatlm")
class HatLMEval(TemplateLM):
    """lm-eval model over a hatlm checkpoint folder or preset.

    Model args: pretrained=DIR_OR_PRESET, think_iters, halting_threshold, batch_size, device, dtype,
    max_length (default: the model's context), max_gen_toks (default 256), arm (presets only), seed.
    """

    def __init__(
        self,
        pretrained: str = "tiny",
        think_iters: int | None = None,
        halting_threshold: float | None = None,
        batch_size: int | str | None = 8,
        max_batch_size: int | None = None,
        device: str | None = None,
        dtype: str | None = None,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        arm: str | None = None,
        seed: int = 0,
        **unused: Any,
    ) -> None:
        super().__init__()
        from hatlm.loader import load_model_and_tokenizer

        self.model, self.tok = load_model_and_tokenizer(
            str(pretrained), device=device or "auto", dtype=dtype, arm=arm, seed=int(seed)
        )
        self.model.eval()
        self._device = self.model.device
        self.think_iters = _opt_int(think_iters, "think_iters")
        self.halting_threshold = None if halting_threshold in (None, "") else float(halting_threshold)
        # "auto" (the harness's batch-size search) is not implemented: a fixed default instead.
        bs = 16 if batch_size in (None, "auto") or str(batch_size).startswith("auto") else batch_size
        self.batch_size = _opt_int(bs, "batch_size") or 1
        if self.batch_size < 1:
            raise UserError(f"batch_size must be >= 1; got {self.batch_size}")
        cfg = self.model.config
        self.slots = cfg.num_thought_slots
        self._max_length = _opt_int(max_length, "max_length") or cfg.max_position_embeddings
        if not self.slots + 2 <= self._max_length <= cfg.max_position_embeddings:
            raise UserError(f"max_length must be in [{self.slots + 2}, {cfg.max_position_embeddings}]")
        self.max_gen_toks = int(max_gen_toks)
        self.seed = int(seed)
        self.pretrained = str(pretrained)

    # ------------------------------------------------------------------ harness plumbing
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        # An empty context (and the first rolling window) is conditioned on BOS, as every hatlm prompt.
        return self.tok.bos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return f"hatlm:{type(self.tok).__name__}:{self.tok.vocab_size}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """Token ids; with BOS unless add_special_tokens is False (contexts get BOS, bare continuations not)."""
        return list(self.tok.encode(string, bos=add_special_tokens is not False))

    def tok_decode(self, tokens: list[int], **kwargs: Any) -> str:
        return self.tok.decode(list(tokens))

    # ------------------------------------------------------------------ scoring
    def _fit(self, context: list[int], continuation: list[int]) -> tuple[list[int], list[int]]:
        """Cut the context from the left so that context + thought slots + continuation fit max_length."""
        room = self._max_length - self.slots
        if len(continuation) > room - 1:
            raise UserError(
                f"a continuation of {len(continuation)} tokens does not fit the model's {self._max_length} positions "
                f"({self.slots} thought slots, at least 1 context token); raise max_length or shorten the task"
            )
        keep = room - len(continuation)
        if len(context) > keep:
            context = context[-keep:]
        if not context:
            context = [self.prefix_token_id]
        return context, continuation

    @torch.inference_mode()
    def score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context, thoughts), whether greedy decoding gives it) per pair."""
        self.model.eval()
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        dev = self.model.device
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            rows = [self._fit(*pairs[i]) for i in idx]
            seqs = [c + x for c, x in rows]
            L = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), L), self.tok.pad_id, dtype=torch.long)
            for b, s in enumerate(seqs):
                ids[b, : len(s)] = torch.tensor(s)
            lengths = torch.tensor([len(s) for s in seqs])
            n = torch.tensor([len(c) for c, _ in rows])
            out = self.model(
                ids.to(dev), prompt_lengths=n.to(dev), lengths=lengths.to(dev), think_iters=self.think_iters,
                halting_threshold=self.halting_threshold,
            )  # fmt: skip
            logits = out.logits if hasattr(out, "logits") else out
            for b, i in enumerate(idx):
                c, x = rows[b]
                lp = F.log_softmax(logits[b, len(c) - 1 : len(c) - 1 + len(x)].float(), dim=-1)
                target = torch.tensor(x, device=lp.device)
                total = float(lp.gather(1, target[:, None]).sum())
                greedy = bool((lp.argmax(-1) == target).all())
                results[i] = (total, greedy)
        return results  # type: ignore[return-value]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        pairs = [(list(ctx), list(cont)) for _, ctx, cont in requests]
        out = []
        step = max(self.batch_size * 8, 64)  # progress in chunks; each chunk is batched and sorted
        for s in tqdm(range(0, len(pairs), step), desc="loglikelihood", disable=disable_tqdm or len(pairs) <= step):
            out.extend(self.score(pairs[s : s + step]))
        for (key, _, _), res in zip(requests, out):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, res)
        return out

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        results = []
        # A window of W inputs predicts W tokens; here the last predicted token is an input too (the
        # continuation is scored inside the sequence), so a window takes W + 1 + slots positions.
        window = self._max_length - self.slots - 1
        for req in tqdm(requests, desc="loglikelihood_rolling", disable=disable_tqdm):
            (text,) = req.args
            tokens = self.tok_encode(text, add_special_tokens=False)
            windows = [
                make_disjoint_window(w)
                for w in get_rolling_token_windows(tokens, self.prefix_token_id, max_seq_len=window, context_len=1)
            ]
            total = sum(lp for lp, _ in self.score(windows))
            results.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return results

    # ------------------------------------------------------------------ generation
    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        from hatlm.generate import generate

        groups: dict[str, list[int]] = {}
        parsed = []
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            kw = dict(gen_kwargs or {})
            until = kw.pop("until", None)
            until = [until] if isinstance(until, str) else list(until or [])
            max_gen = int(kw.pop("max_gen_toks", self.max_gen_toks))
            do_sample = bool(kw.pop("do_sample", False))
            temperature = float(kw.pop("temperature", 0.0)) if do_sample else 0.0
            opts = dict(max_new_tokens=max_gen, stop=until, temperature=temperature)
            parsed.append((context, opts))
            groups.setdefault(repr(sorted(opts.items())), []).append(i)
        out: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm)
        for members in groups.values():
            opts = parsed[members[0]][1]
            keep = self._max_length - self.slots - opts["max_new_tokens"]
            if keep < 1:
                raise UserError(f"max_gen_toks={opts['max_new_tokens']} leaves no room for a prompt in max_length")
            members = sorted(members, key=lambda i: -len(parsed[i][0]))
            for s in range(0, len(members), self.batch_size):
                chunk = members[s : s + self.batch_size]
                prompts = []
                for i in chunk:
                    ids = self.tok_encode(parsed[i][0])
                    prompts.append(ids[-keep:] if len(ids) > keep else ids)
                res = generate(
                    self.model, self.tok, prompts, seed=self.seed, think_iters=self.think_iters,
                    halting_threshold=self.halting_threshold, **opts,
                )  # fmt: skip
                for i, text in zip(chunk, res.texts):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(chunk))
        bar.close()
        return out  # type: ignore[return-value]


def evaluate(
    model_args: str | dict[str, Any],
    tasks: list[str],
    include_path: str | None = None,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    log_samples: bool = False,
    include_defaults: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """Run lm-eval tasks on a hatlm model (the Python side of `hatlm lm-eval`) → the harness's results dict."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path, include_defaults=include_defaults)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        hint = "" if include_path else " (local task YAMLs need --include-path DIR)"
        raise UserError(f"unknown lm-eval task(s): {', '.join(unknown)}{hint}")
    results = lm_eval.simple_evaluate(
        model="hatlm", model_args=model_args, tasks=tasks, num_fewshot=num_fewshot, batch_size=batch_size,
        device=device, limit=limit, log_samples=log_samples, task_manager=manager, random_seed=seed,
        numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
    )  # fmt: skip
    if results is None:
        raise UserError("lm-eval returned no results")
    return results


def task_examples(task: str, include_path: str | None = None, limit: int | None = None,
                  include_defaults: bool = True) -> list[Any]:  # fmt: skip
    """An lm-eval task's documents as hatlm prompt/answer `Example`s (for `hatlm eval` / `hatlm compare`).

    Zero-shot: prompt = the task's doc_to_text; answer = the correct choice (multiple_choice, its
    leading target delimiter removed) or doc_to_target (generate_until); task = "lm-eval/<name>".
    Loglikelihood-only tasks (rolling perplexity, plain loglikelihood) have no prompt/answer form.
    """
    return task_examples_with_choices(task, include_path, limit, include_defaults)[0]


def task_examples_with_choices(task: str, include_path: str | None = None, limit: int | None = None,
                               include_defaults: bool = True) -> tuple[list[Any], list[int] | None]:  # fmt: skip
    """`task_examples` and, for a multiple-choice task, the number of choices of each example (its
    chance floor is the mean of 1/choices); None for a generation task."""
    from lm_eval.tasks import TaskManager

    from hatlm.data import Example

    manager = TaskManager(include_path=include_path, include_defaults=include_defaults)
    if task not in manager.all_tasks:
        raise UserError(f"unknown lm-eval task {task!r}" + ("" if include_path else " (local tasks need include_path)"))
    obj = manager.load([task])["tasks"][task]
    kind = obj.OUTPUT_TYPE
    if kind not in ("multiple_choice", "generate_until"):
        raise UserError(f"lm-eval task {task!r} is {kind}: only multiple_choice and generate_until have answers")
    out, n_choices = [], []
    for i, doc in enumerate(obj.eval_docs):
        if limit is not None and i >= limit:
            break
        prompt = obj.doc_to_text(doc)
        target = obj.doc_to_target(doc)
        if kind == "multiple_choice":
            choices = obj.doc_to_choice(doc)
            answer = choices[target] if isinstance(target, int) else str(target)
            n_choices.append(len(choices))
        else:
            answer = target[0] if isinstance(target, list) else str(target)
        out.append(Example(prompt=str(prompt), answer=str(answer).strip(), task=f"lm-eval/{task}"))
    return out, (n_choices if kind == "multiple_choice" else None)


def write_results(results: dict, folder: Path, samples: bool = False) -> None:
    """results.json (everything but the samples) and, with `samples`, samples_TASK.jsonl per task."""
    folder.mkdir(parents=True, exist_ok=True)
    body = {k: v for k, v in results.items() if k != "samples"}
    (folder / "results.json").write_text(json.dumps(body, indent=2, default=str) + "\n")
    if samples:
        for task, rows in (results.get("samples") or {}).items():
            lines = (json.dumps(r, default=str) for r in rows)
            (folder / f"samples_{task}.jsonl").write_text("".join(line + "\n" for line in lines))


__all__ = ["HatLMEval", "evaluate", "task_examples", "task_examples_with_choices", "write_results"]
