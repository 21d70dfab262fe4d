"""Data: prompt/answer examples (JSONL, bAbI, ProntoQA, ProsQA), plain-text windows, batching.

Two kinds of training data:

* prompt/answer examples — the prompt is thought over, the loss is on the answer tokens plus EOS;
* plain text — each window of `window` tokens is split at a random point: the prefix is the
  prompt, the loss is on the continuation (no EOS: the text goes on).

Both end up as rows `(token ids incl. BOS, prompt_length)` that `collate` pads into a `Batch`.
Readers never guess silently: a malformed line is a `UserError` naming file, line (or record)
and what was wrong; `prepare` reports, rather than silently drops, empty and too-long examples.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hatlm.errors import UserError
from hatlm.util import atomic_write_text

FORMATS = ("jsonl", "babi", "prontoqa", "prosqa", "json", "text")


@dataclass
class Example:
    prompt: str
    answer: str
    task: str = ""  # e.g. "babi/qa1", "chain/d3"; per-task accuracy groups by it


# ---------------------------------------------------------------------------------- readers


def _read_text(path: Path) -> str:
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path}: is a folder; expected a data file (.jsonl, .json, .txt)")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None


_BABI_LINE = re.compile(r"^(\d+) (.*)$")


def _looks_like_babi(text: str) -> bool:
    # bAbI: every story starts with line "1 ...", and questions carry tab-separated answers.
    first = next((ln for ln in text.splitlines() if ln.strip()), "")
    return bool(re.match(r"^1 \S", first)) and "\t" in text


def detect_format(path: str | Path) -> str:
    """One of "jsonl", "babi", "prontoqa", "prosqa", "json" (a list of {"prompt","answer"}), "text".

    Decided by the file name's suffix and, for .json and .txt, by the content's layout.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        if not path.exists():
            raise UserError(f"{path}: no such file")
        return "jsonl"
    text = _read_text(path)
    if suffix == ".json":
        data = _parse_json(path, text)
        return _json_layout(path, data)
    if _looks_like_babi(text):
        return "babi"
    stripped = text.lstrip()
    if stripped.startswith("{") and '"prompt"' in stripped.split("\n", 1)[0]:
        return "jsonl"  # JSONL saved under another suffix
    return "text"


def _parse_json(path: Path, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}, line {e.lineno}: not valid JSON ({e.msg})") from None


def _json_layout(path: Path, data: Any) -> str:
    if isinstance(data, dict) and "example_pool" in data:
        return "prontoqa"
    if isinstance(data, dict) and data and all(isinstance(v, dict) and "test_example" in v for v in data.values()):
        return "prontoqa"
    if isinstance(data, list) and data and isinstance(data[0], dict):
        if {"question", "answer", "steps"} <= set(data[0]):
            return "prosqa"
        if {"prompt", "answer"} <= set(data[0]):
            return "json"
    raise UserError(
        f"{path}: unrecognised JSON layout; expected ProntoQA (llm-reasoners: {{'exampleN': {{..., "
        "'test_example': {question, query, answer}}}} or {'example_pool': [...]}), ProsQA (coconut: a list "
        "of {question, answer, steps, ...}) or a list of {prompt, answer}"
    )


def load_examples(path: str | Path, fmt: str | None = None) -> list[Example]:
    """Prompt/answer examples from a file; `fmt` None auto-detects (see `detect_format`).

    Plain text files are not examples: use `TextWindows` for them.
    """
    path = Path(path)
    if fmt is None:
        fmt = detect_format(path)
    if fmt not in FORMATS:
        raise UserError(f"unknown data format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if fmt == "text":
        raise UserError(
            f"{path}: plain text, not prompt/answer examples (expected .jsonl lines "
            '{"prompt": ..., "answer": ...}, bAbI, ProntoQA or ProsQA); plain text is read as text windows'
        )
    if fmt == "jsonl":
        return _read_jsonl(path)
    text = _read_text(path)
    if fmt == "babi":
        return _read_babi(path, text)
    data = _parse_json(path, text)
    if fmt == "prontoqa":
        return _read_prontoqa(path, data)
    if fmt == "prosqa":
        return _read_prosqa(path, data)
    return _read_json_list(path, data)


def _example_from_record(obj: Any, where: str) -> Example:
    if not isinstance(obj, dict):
        raise UserError(f'{where}: expected a JSON object with "prompt" and "answer"; got {type(obj).__name__}')
    missing = [k for k in ("prompt", "answer") if k not in obj]
    if missing:
        raise UserError(f'{where}: missing key(s) {", ".join(missing)}; expected {{"prompt": ..., "answer": ...}}')
    for k in ("prompt", "answer", "task"):
        if k in obj and not isinstance(obj[k], str):
            raise UserError(f'{where}: "{k}" must be a string; got {type(obj[k]).__name__}')
    return Example(obj["prompt"], obj["answer"], obj.get("task", ""))


def _read_jsonl(path: Path) -> list[Example]:
    out = []
    text = _read_text(path)
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}, line {i}: not valid JSON ({e.msg} at column {e.colno})") from None
        out.append(_example_from_record(obj, f"{path}, line {i}"))
    return out


def _read_json_list(path: Path, data: Any) -> list[Example]:
    if not isinstance(data, list):
        raise UserError(f'{path}: expected a JSON list of {{"prompt", "answer"}} objects')
    return [_example_from_record(obj, f"{path}, record {i}") for i, obj in enumerate(data)]


def _read_babi(path: Path, text: str) -> list[Example]:
    """bAbI v1.2: numbered lines, numbering restarts at 1 for each story; a question line is
    `N question?<TAB>answer<TAB>supporting ids`. Each question becomes one example whose prompt is
    the story's statements so far (earlier questions left out) followed by the question."""
    m = re.match(r"qa(\d+)_", path.name)
    task = f"babi/qa{m.group(1)}" if m else "babi"
    out: list[Example] = []
    story: list[str] = []
    prev = 0
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        mm = _BABI_LINE.match(line)
        if not mm:
            raise UserError(f"{path}, line {i}: expected 'N text' (a line number, a space, the text); got {line!r}")
        n, body = int(mm.group(1)), mm.group(2)
        if n == 1:
            story = []
        elif n != prev + 1:
            raise UserError(f"{path}, line {i}: line number {n} follows {prev}; expected {prev + 1} or 1 (new story)")
        prev = n
        if "\t" in body:
            parts = body.split("\t")
            question, answer = parts[0].strip(), parts[1].strip() if len(parts) > 1 else ""
            if not question or not answer:
                raise UserError(
                    f"{path}, line {i}: a question line needs 'question<TAB>answer<TAB>supporting ids'; got {line!r}"
                )
            out.append(Example(" ".join(story + [question]), answer, task))
        else:
            story.append(body.strip())
    return out


def _require(obj: Any, keys: tuple[str, ...], where: str) -> None:
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object; got {type(obj).__name__}")
    for k in keys:
        if k not in obj:
            raise UserError(f"{where}: missing key {k!r}")
        if not isinstance(obj[k], str):
            raise UserError(f"{where}: {k!r} must be a string; got {type(obj[k]).__name__}")


def _prontoqa_example(obj: Any, where: str) -> Example:
    _require(obj, ("question", "query", "answer"), where)
    cot = obj.get("chain_of_thought")
    # A k-hop proof reads "X is a A. Every A is a B. X is a B. ..." → 2k+1 sentences.
    task = f"prontoqa/{(len(cot) - 1) // 2}hop" if isinstance(cot, list) and cot else "prontoqa"
    return Example(f"{obj['question'].strip()} {obj['query'].strip()}", obj["answer"].strip(), task)


def _read_prontoqa(path: Path, data: Any) -> list[Example]:
    """llm-reasoners layout: {"exampleN": {"in_context_example0..7": ..., "test_example": {...}}}
    (one example per item: its test example) or {"example_pool": [{...}, ...]}. Each record has
    question (facts), query ("True or false: ..."), answer ("True"/"False")."""
    if isinstance(data, dict) and "example_pool" in data:
        pool = data["example_pool"]
        if not isinstance(pool, list):
            raise UserError(f"{path}: 'example_pool' must be a list of records")
        return [_prontoqa_example(obj, f"{path}, example_pool[{i}]") for i, obj in enumerate(pool)]
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object of ProntoQA items")
    out = []
    for key, item in data.items():
        if not isinstance(item, dict) or "test_example" not in item:
            raise UserError(f"{path}, record {key!r}: missing 'test_example'")
        out.append(_prontoqa_example(item["test_example"], f"{path}, record {key!r}.test_example"))
    return out


def _read_prosqa(path: Path, data: Any) -> list[Example]:
    """coconut layout: a list of {question, answer, steps, idx_to_symbol, edges, root, target, ...};
    the prompt is the question, the answer the final sentence ("Tom is a lempus.")."""
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of ProsQA records")
    out = []
    for i, obj in enumerate(data):
        where = f"{path}, record {i}"
        _require(obj, ("question", "answer"), where)
        steps = obj.get("steps")
        task = f"prosqa/{len(steps)}hop" if isinstance(steps, list) and steps else "prosqa"
        out.append(Example(obj["question"].strip(), obj["answer"].strip(), task))
    return out


def write_jsonl(examples: list[Example], path: str | Path) -> None:
    """Write examples as JSONL (`{"prompt", "answer", "task"}` per line), atomically."""
    lines = [json.dumps({"prompt": e.prompt, "answer": e.answer, "task": e.task}, ensure_ascii=False) for e in examples]
    atomic_write_text(path, "".join(line + "\n" for line in lines))


# ---------------------------------------------------------------------------------- plain text


def _rng(*key: object) -> random.Random:
    # random.Random seeded with a str hashes it with SHA-512: stable across runs and machines
    # (unlike hash(), which is salted per process).
    return random.Random(":".join(str(k) for k in key))


class TextWindows:
    """A plain text file as windows of `window` tokens (BOS included), each split at a random point.

    The prefix (at least `min_prompt` text tokens) is the prompt the model thinks over; the loss is
    on the continuation (at least one token). Window boundaries shift by a random offset each epoch
    and split points are drawn per (seed, epoch, index), so every epoch sees different cuts while
    `example_ids` stays a pure function of its arguments (what exact resume needs).

    `path_or_text`: a `Path` is always a file; a `str` is text if it contains a newline or is long,
    else a file name.
    """

    def __init__(self, path_or_text: str | Path, tokenizer, window: int, seed: int, min_prompt: int = 1) -> None:
        if isinstance(path_or_text, Path) or ("\n" not in path_or_text and len(path_or_text) < 1024):
            path = Path(path_or_text)
            text = _read_text(path)
            self.source = str(path)
        else:
            text = path_or_text
            self.source = "<text>"
        if window < 3:
            raise UserError(f"text window must be at least 3 tokens (BOS, prompt, continuation); got {window}")
        if min_prompt < 1 or min_prompt > window - 2:
            raise UserError(f"min_prompt must be in [1, window - 2 = {window - 2}]; got {min_prompt}")
        self.tokenizer = tokenizer
        self.window, self.seed, self.min_prompt = window, seed, min_prompt
        self.tokens = tokenizer.encode(text, bos=False)
        self.stride = window - 1  # text tokens per window (BOS is added)
        n = len(self.tokens)
        if n < min_prompt + 1:
            raise UserError(
                f"{self.source}: only {n} tokens of text; a window needs at least {min_prompt + 1} "
                "(the prompt and one continuation token)"
            )
        # With >= 2 strides of text, every epoch offset in [0, stride) still leaves n // stride - 1
        # full windows; shorter text gives one (possibly short) window.
        self._n = n // self.stride - 1 if n >= 2 * self.stride else 1

    def __len__(self) -> int:
        return self._n

    def offset(self, epoch: int) -> int:
        if len(self.tokens) < 2 * self.stride:
            return 0  # a single window: it starts at the beginning of the text
        return _rng("windows", self.seed, epoch).randrange(self.stride)

    def example_ids(self, index: int, epoch: int) -> tuple[list[int], int]:
        """(token ids incl. BOS, prompt_length incl. BOS); deterministic in (seed, epoch, index)."""
        if not 0 <= index < self._n:
            raise IndexError(f"window index {index} out of range [0, {self._n})")
        start = self.offset(epoch) + index * self.stride
        chunk = self.tokens[start : start + self.stride]
        # prompt text tokens k ∈ [min_prompt, len(chunk) - 1]: at least one continuation token
        k = _rng("split", self.seed, epoch, index).randint(self.min_prompt, len(chunk) - 1)
        return [self.tokenizer.bos_id] + chunk, 1 + k

    def rows(self, epoch: int) -> list[tuple[list[int], int]]:
        """All windows of one epoch."""
        return [self.example_ids(i, epoch) for i in range(self._n)]


# ---------------------------------------------------------------------------------- batching


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, L] long, right-padded with tokenizer.pad_id
    lengths: torch.Tensor  # [B] valid tokens per row
    prompt_lengths: torch.Tensor  # [B] prompt tokens per row (incl. BOS)
    # [B, L] bool: True where input_ids[b, t] is an answer token (to be predicted);
    # loss = CE(logits[:, :-1], input_ids[:, 1:]) over target_mask[:, 1:]
    target_mask: torch.Tensor
    tasks: list[str] = field(default_factory=list)

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            self.input_ids.to(device),
            self.lengths.to(device),
            self.prompt_lengths.to(device),
            self.target_mask.to(device),
            self.tasks,
        )

    @property
    def num_targets(self) -> int:
        return int(self.target_mask.sum())


def encode_example(ex: Example, tokenizer) -> tuple[list[int], int]:
    """prompt = encode(prompt, bos=True); answer = encode(answer, bos=False, eos=True) → (ids, prompt_length)."""
    p = tokenizer.encode(ex.prompt, bos=True)
    a = tokenizer.encode(ex.answer, bos=False, eos=True)
    return p + a, len(p)


def collate(rows: list[tuple[list[int], int]], pad_id: int, tasks: list[str] | None = None) -> Batch:
    """Right-pad rows `(ids, prompt_length)` into a Batch; targets are the tokens after the prompt."""
    if not rows:
        raise ValueError("collate needs at least one row")
    if tasks is not None and len(tasks) != len(rows):
        raise ValueError(f"{len(tasks)} task names for {len(rows)} rows")
    B, L = len(rows), max(len(ids) for ids, _ in rows)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    lengths = torch.tensor([len(ids) for ids, _ in rows], dtype=torch.long)
    prompt_lengths = torch.tensor([p for _, p in rows], dtype=torch.long)
    for b, (ids, p) in enumerate(rows):
        if not 1 <= p <= len(ids):
            raise ValueError(f"row {b}: prompt_length {p} not in [1, {len(ids)}]")
        input_ids[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    t = torch.arange(L)[None, :]
    target_mask = (t >= prompt_lengths[:, None]) & (t < lengths[:, None])
    return Batch(input_ids, lengths, prompt_lengths, target_mask, list(tasks) if tasks is not None else [""] * B)


def iter_batches(
    rows: list[tuple[list[int], int]],
    batch_size: int,
    pad_id: int,
    tasks: list[str] | None = None,
    shuffle_seed: int | None = None,
) -> Iterator[Batch]:
    """Batches over `rows` in order, or in a permutation fixed by `shuffle_seed`."""
    order = list(range(len(rows)))
    if shuffle_seed is not None:
        _rng("shuffle", shuffle_seed).shuffle(order)
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        yield collate([rows[i] for i in idx], pad_id, [tasks[i] for i in idx] if tasks is not None else None)


@dataclass
class PreparedData:
    rows: list[tuple[list[int], int]]
    tasks: list[str]
    dropped_too_long: int
    dropped_empty: int
    report: str  # human-readable summary naming the first few offenders
    max_len: int = 0
    kept_indices: list[int] = field(default_factory=list)  # index in the input list of each kept row


def prepare(examples: list[Example], tokenizer, max_len: int) -> PreparedData:
    """Encode examples, leaving out (and reporting) empty ones and those longer than `max_len` tokens."""
    rows, tasks, kept = [], [], []
    empty, too_long = [], []
    for i, ex in enumerate(examples):
        if not ex.prompt.strip() or not ex.answer.strip():
            empty.append(i)
            continue
        ids, p = encode_example(ex, tokenizer)
        if len(ids) > max_len:
            too_long.append((i, len(ids)))
            continue
        rows.append((ids, p))
        tasks.append(ex.task)
        kept.append(i)
    # Offenders are shown numbered from 1 (for a JSONL file without blank lines: its line number).
    parts = [f"kept {len(rows)} of {len(examples)} examples"]
    if empty:
        shown = ", ".join(f"#{i + 1}" for i in empty[:5]) + (", ..." if len(empty) > 5 else "")
        parts.append(f"left out {len(empty)} with an empty prompt or answer ({shown})")
    if too_long:
        shown = ", ".join(f"#{i + 1} ({n} tokens)" for i, n in too_long[:5]) + (", ..." if len(too_long) > 5 else "")
        longest = max(n for _, n in too_long)
        parts.append(
            f"left out {len(too_long)} longer than max_len={max_len} tokens ({shown}; longest {longest}); "
            "raise max_len to keep them"
        )
    return PreparedData(rows, tasks, len(too_long), len(empty), "; ".join(parts), max_len, kept)
