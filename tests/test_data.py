"""Data readers (on fixture snippets mirroring the real layouts), text windows, batching, prepare."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from hatlm.data import (
    Example,
    TextWindows,
    collate,
    detect_format,
    encode_example,
    iter_batches,
    load_examples,
    prepare,
    write_jsonl,
)
from hatlm.errors import UserError
from hatlm.tokenizer import ByteTokenizer

TOK = ByteTokenizer()

BABI = (
    "1 Mary moved to the bathroom.\n"
    "2 John went to the hallway.\n"
    "3 Where is Mary? \tbathroom\t1\n"
    "4 Daniel went back to the hallway.\n"
    "5 Where is Daniel? \thallway\t4\n"
    "1 Sandra travelled to the office.\n"
    "2 Where is Sandra? \toffice\t1\n"
)

PRONTO_RECORD = {
    "question": "Every cat is a feline. Felines are carnivores. Fae is a cat.",
    "query": "True or false: Fae is a carnivore.",
    "chain_of_thought": [
        "Fae is a cat.",
        "Every cat is a feline.",
        "Fae is a feline.",
        "Felines are carnivores.",
        "Fae is a carnivore.",
    ],
    "answer": "True",
}

PROSQA_RECORD = {
    "question": "Every wumpus is a rempus. Tom is a wumpus. Every rempus is a lorpus. Is Tom a lorpus or gerpus?",
    "answer": "Tom is a lorpus.",
    "steps": ["Tom is a wumpus.", "Every wumpus is a rempus.", "Every rempus is a lorpus."],
    "idx_to_symbol": ["Tom", "wumpus", "rempus", "lorpus", "gerpus"],
    "edges": [[0, 1], [1, 2], [2, 3]],
    "root": 0,
    "target": 3,
    "neg_target": 4,
}


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


# ------------------------------------------------------------------------------ readers


def test_jsonl_roundtrip_and_detect(tmp_path):
    exs = [Example("2+2=", "4", "arith"), Example("say ünïcode", "ok")]
    p = tmp_path / "d.jsonl"
    write_jsonl(exs, p)
    assert detect_format(p) == "jsonl"
    assert load_examples(p) == exs
    # no temporary file is left next to the output (written via a temp name then renamed)
    assert [f.name for f in tmp_path.iterdir()] == ["d.jsonl"]


@pytest.mark.parametrize(
    "line, expected",
    [
        ('{"prompt": "a", "answer": ', "line 2: not valid JSON"),
        ('{"prompt": "a"}', "line 2: missing key(s) answer"),
        ('{"prompt": "a", "answer": 3}', 'line 2: "answer" must be a string'),
        ('["a", "b"]', "line 2: expected a JSON object"),
    ],
)
def test_jsonl_malformed_names_file_and_line(tmp_path, line, expected):
    p = write(tmp_path, "bad.jsonl", '{"prompt": "x", "answer": "y"}\n' + line + "\n")
    with pytest.raises(UserError) as e:
        load_examples(p)
    assert str(p) in str(e.value) and expected in str(e.value)


def test_babi_reader(tmp_path):
    p = write(tmp_path, "qa1_single-supporting-fact_train.txt", BABI)
    assert detect_format(p) == "babi"
    exs = load_examples(p)
    assert exs == [
        Example("Mary moved to the bathroom. John went to the hallway. Where is Mary?", "bathroom", "babi/qa1"),
        # the story goes on past the first question (which is not repeated in the prompt)
        Example(
            "Mary moved to the bathroom. John went to the hallway. Daniel went back to the hallway. Where is Daniel?",
            "hallway",
            "babi/qa1",
        ),
        # numbering restarting at 1 starts a new story
        Example("Sandra travelled to the office. Where is Sandra?", "office", "babi/qa1"),
    ]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("1 Mary went home.\n3 Where is Mary?\thome\t1\n", "line 2: line number 3 follows 1"),
        ("1 Mary went home.\nWhere is Mary?\thome\t1\n", "line 2: expected 'N text'"),
        ("1 Mary went home.\n2 Where is Mary?\t\t1\n", "line 2: a question line needs"),
    ],
)
def test_babi_malformed(tmp_path, text, expected):
    p = write(tmp_path, "qa2_x_train.txt", text)
    with pytest.raises(UserError) as e:
        load_examples(p, fmt="babi")
    assert str(p) in str(e.value) and expected in str(e.value)


def test_prontoqa_reader_both_layouts(tmp_path):
    items = {
        "example1": {"in_context_example0": PRONTO_RECORD, "test_example": PRONTO_RECORD},
        "example2": {"test_example": dict(PRONTO_RECORD, answer="False")},
    }
    p = write(tmp_path, "345hop_random_true.json", json.dumps(items))
    assert detect_format(p) == "prontoqa"
    exs = load_examples(p)
    prompt = PRONTO_RECORD["question"] + " " + PRONTO_RECORD["query"]
    # one example per item (its test example); a 2-hop proof has 5 sentences
    assert exs == [Example(prompt, "True", "prontoqa/2hop"), Example(prompt, "False", "prontoqa/2hop")]
    pool = write(tmp_path, "example_pool.json", json.dumps({"example_pool": [PRONTO_RECORD] * 3}))
    assert len(load_examples(pool)) == 3

    bad = write(tmp_path, "bad.json", json.dumps({"example1": {"test_example": {"question": "q", "answer": "True"}}}))
    with pytest.raises(UserError, match=r"record 'example1'.test_example: missing key 'query'"):
        load_examples(bad)


def test_prosqa_reader(tmp_path):
    p = write(tmp_path, "prosqa_valid.json", json.dumps([PROSQA_RECORD, PROSQA_RECORD]))
    assert detect_format(p) == "prosqa"
    exs = load_examples(p)
    assert exs[0] == Example(PROSQA_RECORD["question"], "Tom is a lorpus.", "prosqa/3hop")
    bad = write(tmp_path, "bad.json", json.dumps([PROSQA_RECORD, {"question": "q", "answer": 5, "steps": []}]))
    with pytest.raises(UserError, match=r"record 1: 'answer' must be a string"):
        load_examples(bad, fmt="prosqa")


def test_unrecognised_and_text_files(tmp_path):
    with pytest.raises(UserError, match="unrecognised JSON layout"):
        load_examples(write(tmp_path, "x.json", json.dumps({"a": 1})))
    with pytest.raises(UserError, match="line 1: not valid JSON"):
        load_examples(write(tmp_path, "y.json", "{nope"))
    txt = write(tmp_path, "story.txt", "Once upon a time.\nThe end.\n")
    assert detect_format(txt) == "text"
    with pytest.raises(UserError, match="plain text"):
        load_examples(txt)
    with pytest.raises(UserError, match="no such file"):
        load_examples(tmp_path / "missing.jsonl")
    with pytest.raises(UserError, match="unknown data format"):
        load_examples(txt, fmt="csv")


# ------------------------------------------------------------------------------ text windows


def test_text_windows_deterministic_and_split():
    rng = random.Random(0)
    text = "".join(rng.choice("abcdefghij \n") for _ in range(1001))  # random, so a piece occurs once
    tw = TextWindows(text, TOK, window=32, seed=3, min_prompt=4)
    assert len(tw) == 1001 // 31 - 1
    for epoch in (0, 1):
        for i in range(len(tw)):
            ids, p = tw.example_ids(i, epoch)
            assert (ids, p) == tw.example_ids(i, epoch)
            assert len(ids) == 32 and ids[0] == TOK.bos_id
            assert 1 + 4 <= p <= len(ids) - 1  # >= min_prompt text tokens and >= 1 continuation token
            assert bytes(ids[1:]).decode() in text  # a contiguous piece of the text
        # consecutive windows tile the text without overlap
        first = bytes(tw.example_ids(0, epoch)[0][1:] + tw.example_ids(1, epoch)[0][1:]).decode()
        assert first in text
    # another seed or epoch cuts differently
    a = [TextWindows(text, TOK, 32, seed=3).example_ids(i, 0) for i in range(5)]
    b = [TextWindows(text, TOK, 32, seed=4).example_ids(i, 0) for i in range(5)]
    c = [TextWindows(text, TOK, 32, seed=3).example_ids(i, 1) for i in range(5)]
    assert a != b and a != c


def test_text_windows_short_text_and_errors(tmp_path):
    p = write(tmp_path, "t.txt", "hello")
    tw = TextWindows(p, TOK, window=64, seed=0)
    assert len(tw) == 1
    ids, plen = tw.example_ids(0, 0)
    assert ids == TOK.encode("hello") and 2 <= plen <= 5
    with pytest.raises(UserError, match="only 1 tokens"):
        TextWindows(write(tmp_path, "u.txt", "h"), TOK, window=64, seed=0)
    with pytest.raises(UserError, match="no such file"):
        TextWindows(str(tmp_path / "nope.txt"), TOK, window=64, seed=0)
    with pytest.raises(UserError, match="window must be at least 3"):
        TextWindows(p, TOK, window=2, seed=0)


# ------------------------------------------------------------------------------ batching


def test_collate_target_mask_is_answer_plus_eos():
    exs = [Example("abc", "xy", "t1"), Example("q", "long answer", "t2")]
    rows = [encode_example(e, TOK) for e in exs]
    batch = collate(rows, TOK.pad_id, [e.task for e in exs])
    assert batch.input_ids.shape == (2, max(len(r[0]) for r in rows))
    assert batch.tasks == ["t1", "t2"]
    assert batch.prompt_lengths.tolist() == [4, 2]  # BOS + prompt bytes
    for b, ex in enumerate(exs):
        n = int(batch.lengths[b])
        assert batch.input_ids[b, n:].eq(TOK.pad_id).all()
        targets = batch.input_ids[b][batch.target_mask[b]].tolist()
        assert targets == list(ex.answer.encode()) + [TOK.eos_id]
        # the shifted mask selects exactly the logits that predict those targets
        pred_pos = torch.nonzero(batch.target_mask[b, 1:]).flatten()
        assert batch.input_ids[b, pred_pos + 1].tolist() == targets
        assert int(pred_pos[0]) == int(batch.prompt_lengths[b]) - 1  # first one is read at the last prompt token
    assert batch.num_targets == 3 + 12
    with pytest.raises(ValueError, match="prompt_length"):
        collate([([1, 2], 3)], 0)


def test_iter_batches_covers_rows_once():
    rows = [([TOK.bos_id] + [i] * (i % 3 + 1), 1) for i in range(10)]
    seen = []
    for batch in iter_batches(rows, 4, TOK.pad_id, shuffle_seed=1):
        for b in range(batch.input_ids.shape[0]):
            seen.append(int(batch.input_ids[b, 1]))
    assert sorted(seen) == list(range(10)) and seen != list(range(10))


def test_prepare_reports_empty_and_too_long():
    exs = [
        Example("ok", "1"),
        Example("", "2"),
        Example("x" * 50, "3"),
        Example("fine", "  "),
        Example("also ok", "4", "t"),
    ]
    data = prepare(exs, TOK, max_len=20)
    assert data.dropped_empty == 2 and data.dropped_too_long == 1
    assert data.kept_indices == [0, 4] and data.tasks == ["", "t"]
    assert data.rows == [encode_example(exs[0], TOK), encode_example(exs[4], TOK)]
    assert "kept 2 of 5" in data.report
    assert "2 with an empty prompt or answer (#2, #4)" in data.report
    assert "1 longer than max_len=20 tokens (#3 (53 tokens)" in data.report
