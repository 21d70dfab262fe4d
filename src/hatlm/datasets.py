"""Data sources for training and evaluation: what `--data` / `--eval` name, turned into rows.

`hatlm.data` reads files and batches rows; this module decides what a run trains and evaluates on:
files, plain text windows and built-in tasks (`task:NAME`), mixed into one stream whose order is a
pure function of (seed, position) — what exact resume needs — and eval sets that keep, and say,
which examples were left out (too long for `max_len`, or empty).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from hatlm.data import Example, PreparedData, TextWindows, detect_format, load_examples, prepare
from hatlm.errors import UserError

TASK_PREFIX = "task:"
LM_EVAL_PREFIX = "lm-eval:"  # an lm-evaluation-harness task as an eval set: lm-eval:NAME


class DataSettings(Protocol):
    """The TrainConfig fields the sources are built from (duck-typed: data sits below train)."""

    data: list[str]
    eval: list[str]
    max_len: int
    seed: int
    data_seed: int
    task_train_size: int
    task_eval_size: int
    task_train_difficulties: list[int] | None
    task_eval_difficulties: list[int] | None


class RowSource:
    """Training rows (token ids, prompt length, task) addressed by (index, epoch).

    Prompt/answer rows are fixed; plain-text windows are re-split every epoch, deterministically."""

    def __init__(self, rows: list[tuple[list[int], int]] | None = None, tasks: list[str] | None = None,
                 windows: TextWindows | None = None, name: str = "") -> None:
        self.rows, self.tasks, self.windows, self.name = rows, tasks, windows, name

    def __len__(self) -> int:
        return len(self.windows) if self.windows is not None else len(self.rows)

    def get(self, index: int, epoch: int) -> tuple[list[int], int, str]:
        if self.windows is not None:
            ids, n = self.windows.example_ids(index, epoch)
            return list(ids), int(n), self.name
        ids, n = self.rows[index]
        return ids, n, (self.tasks[index] if self.tasks else self.name)


class ConcatSource:
    def __init__(self, sources: list[RowSource]) -> None:
        self.sources = [s for s in sources if len(s)]
        self.offsets = np.cumsum([0] + [len(s) for s in self.sources])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def get(self, index: int, epoch: int) -> tuple[list[int], int, str]:
        k = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return self.sources[k].get(index - int(self.offsets[k]), epoch)


class DataOrder:
    """An endless stream of example indices: epoch e is a permutation seeded by (seed, e).

    Its whole state is the number of examples consumed, so resuming is exact by construction."""

    def __init__(self, n: int, seed: int, consumed: int = 0) -> None:
        self.n, self.seed, self.consumed = n, seed, consumed
        self._perm_epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> Tensor:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g), epoch
        return self._perm

    def take(self, k: int) -> list[tuple[int, int]]:
        """The next k (index, epoch) pairs."""
        out = []
        for _ in range(k):
            epoch, pos = divmod(self.consumed, self.n)
            out.append((int(self._permutation(epoch)[pos]), epoch))
            self.consumed += 1
        return out

    def state_dict(self) -> dict[str, int]:
        return {"consumed": self.consumed, "n": self.n, "seed": self.seed}


def is_task_spec(spec: str) -> bool:
    return spec.startswith(TASK_PREFIX)


def _is_plain_text(path: Path) -> bool:
    return detect_format(path) == "text"


def is_lm_eval_spec(spec: str) -> bool:
    return spec.startswith(LM_EVAL_PREFIX)


def check_data_path(spec: str, flag: str = "--data") -> None:
    """Fail early, with the flag's name, for a file that does not exist or an unknown task."""
    if is_lm_eval_spec(spec):
        if flag != "--eval":
            raise UserError(f"{flag} {spec}: lm-eval tasks are eval sets only (--eval {spec})")
        if not spec[len(LM_EVAL_PREFIX) :].strip():
            raise UserError(f"{flag} {spec}: name the task, e.g. lm-eval:arc_easy")
        try:
            import lm_eval  # noqa: F401
        except ImportError:
            raise UserError(f"{flag} {spec}: lm-eval is not installed (pip install 'hatlm[eval]')") from None
        return  # whether the task exists is known only once the harness has indexed its tasks
    if is_task_spec(spec):
        from hatlm.tasks import TASKS

        name = spec[len(TASK_PREFIX) :]
        if name not in TASKS:
            raise UserError(f"{flag} {spec}: unknown built-in task {name!r}; tasks: {', '.join(TASKS)}")
        return
    p = Path(spec)
    if not p.exists():
        raise UserError(f"{flag} {spec}: no such file")
    if p.is_dir():
        raise UserError(f"{flag} {spec}: is a folder; expected a data file (JSONL, bAbI, ProntoQA, ProsQA, text)")


@dataclass
class EvalSet:
    """One evaluation source: prompt/answer examples (accuracy) or text windows (loss).

    `rows` and `examples` are the same kept examples (row i encodes examples[i]): every metric —
    teacher-forced curves, greedy accuracy, the chance floor — is computed on them. `n_total` and
    `left_out` say how many the file had and why the others were dropped."""

    name: str  # as given (file path or task:NAME/split)
    rows: list[tuple[list[int], int]]
    tasks: list[str]
    examples: list[Example] | None  # the kept prompt/answer examples; None for text
    n_total: int = 0  # examples (or windows) in the source before anything was left out
    left_out: str = ""  # e.g. "12 of 200 left out: 12 longer than max_len 128"; "" when none
    choices: list[int] | None = None  # multiple-choice sets (lm-eval): number of choices per kept example

    @property
    def metric(self) -> str:
        return "accuracy" if self.examples is not None else "loss"


def left_out_text(prep: PreparedData, total: int) -> str:
    """'N of M left out: ...' for what `prepare` dropped; '' when it kept everything."""
    dropped = prep.dropped_too_long + prep.dropped_empty
    if not dropped:
        return ""
    why = []
    if prep.dropped_too_long:
        why.append(f"{prep.dropped_too_long} longer than max_len {prep.max_len}")
    if prep.dropped_empty:
        why.append(f"{prep.dropped_empty} with an empty prompt or answer")
    return f"{dropped} of {total} left out: {', '.join(why)}"


def _task_split(spec: str, cfg: DataSettings) -> tuple[list[Example], dict[str, list[Example]]]:
    from hatlm.tasks import make_split

    name = spec[len(TASK_PREFIX) :]
    kwargs: dict[str, Any] = {}
    if cfg.task_train_difficulties is not None:
        kwargs["train_difficulties"] = cfg.task_train_difficulties
    if cfg.task_eval_difficulties is not None:
        kwargs["eval_difficulties"] = cfg.task_eval_difficulties
    return make_split(name, seed=cfg.data_seed, n_train=cfg.task_train_size, n_eval=cfg.task_eval_size, **kwargs)


def _prepare_rows(examples: list[Example], tokenizer, max_len: int, name: str,
                  log: Callable[[str], None]) -> PreparedData:
    prep = prepare(examples, tokenizer, max_len)
    if prep.dropped_too_long or prep.dropped_empty:
        log(f"{name}: {prep.report}")
    if not prep.rows:
        raise UserError(f"{name}: no usable examples left (all empty or longer than max_len={max_len})")
    return prep


def _example_eval_set(name: str, examples: list[Example], tokenizer, max_len: int,
                      log: Callable[[str], None], choices: list[int] | None = None) -> EvalSet:
    prep = _prepare_rows(examples, tokenizer, max_len, name, log)
    kept = [examples[i] for i in prep.kept_indices]
    return EvalSet(name, prep.rows, prep.tasks, kept, len(examples), left_out_text(prep, len(examples)),
                   [choices[i] for i in prep.kept_indices] if choices is not None else None)


_LM_EVAL_CACHE: dict[tuple[str, str | None], tuple[list[Example], list[int] | None]] = {}


def lm_eval_examples(task: str, include_path: str | None = None) -> tuple[list[Example], list[int] | None]:
    """An lm-eval task's examples (and choices per example for multiple choice), cached per process.

    With an include path the harness first indexes only that folder (seconds faster than its whole
    task library), and the full library only when the task is not there."""
    key = (task, include_path)
    if key not in _LM_EVAL_CACHE:
        from hatlm.harness import task_examples_with_choices

        if include_path is not None and not Path(include_path).is_dir():
            raise UserError(f"--lm-eval-include-path {include_path}: no such folder")
        try:
            try:
                got = task_examples_with_choices(task, include_path, include_defaults=include_path is None)
            except UserError as err:
                if include_path is None or not str(err).startswith("unknown lm-eval task"):
                    raise
                got = task_examples_with_choices(task, include_path, include_defaults=True)
        except UserError:
            raise
        except Exception as err:  # the harness's own errors (a bad YAML, a dataset not available offline)
            raise UserError(f"--eval lm-eval:{task}: lm-eval could not load the task: {type(err).__name__}: {err}") \
                from err
        _LM_EVAL_CACHE[key] = got
    return _LM_EVAL_CACHE[key]


def build_sources(cfg: DataSettings, tokenizer, log: Callable[[str], None]) -> tuple[ConcatSource, list[EvalSet]]:
    """The training stream and the evaluation sets described by the config."""
    train_sources: list[RowSource] = []
    evals: list[EvalSet] = []
    for spec in cfg.data:
        check_data_path(spec)
        if is_task_spec(spec):
            train_ex, eval_splits = _task_split(spec, cfg)
            prep = _prepare_rows(train_ex, tokenizer, cfg.max_len, spec, log)
            train_sources.append(RowSource(prep.rows, prep.tasks, name=spec))
            if not cfg.eval:
                for split, exs in eval_splits.items():
                    evals.append(_example_eval_set(f"{spec}/{split}", exs, tokenizer, cfg.max_len, log))
        elif _is_plain_text(Path(spec)):
            windows = TextWindows(spec, tokenizer, window=cfg.max_len, seed=cfg.seed)
            if len(windows) == 0:
                raise UserError(f"--data {spec}: the text is too short for one window of {cfg.max_len} tokens")
            train_sources.append(RowSource(windows=windows, name=spec))
        else:
            prep = _prepare_rows(load_examples(spec), tokenizer, cfg.max_len, spec, log)
            train_sources.append(RowSource(prep.rows, prep.tasks, name=spec))
    for spec in cfg.eval:
        evals.append(load_eval_set(spec, tokenizer, cfg.max_len, cfg.data_seed, log,
                                   lm_eval_include_path=getattr(cfg, "lm_eval_include_path", None)))
    return ConcatSource(train_sources), evals


def load_eval_set(spec: str, tokenizer, max_len: int, seed: int = 0, log: Callable[[str], None] = print,
                  lm_eval_include_path: str | None = None) -> EvalSet:
    """An eval file as an EvalSet: prompt/answer examples that fit `max_len`, or text windows; or an
    lm-eval task (`lm-eval:NAME`, local YAML tasks from `lm_eval_include_path`) as prompt/answer examples."""
    check_data_path(spec, "--eval")
    if is_lm_eval_spec(spec):
        examples, choices = lm_eval_examples(spec[len(LM_EVAL_PREFIX) :], lm_eval_include_path)
        if not examples:
            raise UserError(f"--eval {spec}: the task has no evaluation documents")
        return _example_eval_set(spec, examples, tokenizer, max_len, log, choices)
    if is_task_spec(spec):
        raise UserError(f"--eval {spec}: give an eval file; a task's own held-out sets come with --data {spec}")
    if _is_plain_text(Path(spec)):
        windows = TextWindows(spec, tokenizer, window=max_len, seed=seed)
        rows = [(list(ids), int(n)) for ids, n in windows.rows(0)]
        if not rows:
            raise UserError(f"--eval {spec}: the text is too short for one window of {max_len} tokens")
        return EvalSet(spec, rows, [spec] * len(rows), None, len(rows))
    return _example_eval_set(spec, load_examples(spec), tokenizer, max_len, log)
