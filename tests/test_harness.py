"""lm-evaluation-harness adapter: scores equal a direct forward pass of the model; `hatlm lm-eval` runs
local YAML tasks (multiple choice, rolling loglikelihood, generation) offline end to end."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lm_eval")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from conftest import as_if_trained
from lm_eval.api.instance import Instance  # noqa: E402

from hatlm.checkpoint import save_model  # noqa: E402
from hatlm.cli import main as cli_main  # noqa: E402
from hatlm.config import ModelConfig  # noqa: E402
from hatlm.errors import UserError  # noqa: E402
from hatlm.generate import generate  # noqa: E402
from hatlm.harness import HatLMEval  # noqa: E402
from hatlm.model import HatLM  # noqa: E402
from hatlm.tokenizer import load_tokenizer  # noqa: E402

SMALL = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=128, sliding_window=None, initializer_range=0.2,
    hybrid=dict(arm="hybrid", thinker_layers=1, thought_slots=3, max_think_iters=3),
)  # fmt: skip
MC = [
    {"question": "The sky is", "choices": [" blue", " green", " made of cheese"], "answer": 0},
    {"question": "Two plus two equals", "choices": [" four", " five"], "answer": 1},
    {"question": "Paris is the capital of", "choices": [" France", " Spain", " Italy", " Peru"], "answer": 2},
    {"question": "Water boils at", "choices": [" 100 degrees", " 10 degrees"], "answer": 0},
]
TEXTS = [{"text": "The quick brown fox jumps over the lazy dog."}, {"text": "Think first, then speak."}]
GEN = [{"q": "Q: 1+1=\nA:", "a": " 2"}, {"q": "Q: the capital of France?\nA:", "a": " Paris"}]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    tok = load_tokenizer(None)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, **SMALL)
    return save_model(as_if_trained(HatLM(cfg)), tmp_path_factory.mktemp("lm") / "model", tokenizer=tok)


@pytest.fixture(scope="module")
def lm(ckpt):
    return HatLMEval(pretrained=str(ckpt), think_iters=2, batch_size=3, device="cpu")


def _direct_logprob(model, ctx: list[int], cont: list[int], think_iters: int) -> tuple[float, bool]:
    """One unpadded row alone: log p(cont | ctx, thoughts)."""
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        out = model(ids, prompt_lengths=torch.tensor([len(ctx)]), think_iters=think_iters)
    lp = F.log_softmax(out.logits[0].double(), -1)
    rows = torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1)
    tgt = torch.tensor(cont)
    return float(lp[rows, tgt].sum()), bool((lp[rows].argmax(-1) == tgt).all())


def _pairs(tok):
    pairs = []
    for d in MC:
        for ch in d["choices"]:
            whole = tok.encode(d["question"] + ch, bos=True)
            ctx = tok.encode(d["question"], bos=True)
            assert whole[: len(ctx)] == ctx
            pairs.append(((d["question"], ch), ctx, whole[len(ctx) :]))
    return pairs


def test_loglikelihood_equals_direct_forward(lm, ckpt):
    pairs = _pairs(lm.tok)
    reqs = [Instance("loglikelihood", {}, args, i) for i, (args, _, _) in enumerate(pairs)]
    got = lm.loglikelihood(reqs, disable_tqdm=True)
    for (_, ctx, cont), (lp, greedy) in zip(pairs, got):
        ref_lp, ref_greedy = _direct_logprob(lm.model, ctx, cont, 2)
        assert lp == pytest.approx(ref_lp, abs=1e-5)
        assert greedy == ref_greedy
    # Thinking matters: with no thinking iterations the scores change (the check sees the thinker).
    lm0 = HatLMEval(pretrained=str(ckpt), think_iters=0, batch_size=3, device="cpu")
    other = lm0.loglikelihood(reqs, disable_tqdm=True)
    assert max(abs(a[0] - b[0]) for a, b in zip(got, other)) > 1e-3
    # An empty context is conditioned on BOS alone.
    (lp, _), = lm.loglikelihood([Instance("loglikelihood", {}, ("", "Hello world"), 0)], disable_tqdm=True)  # fmt: skip
    cont = lm.tok.encode("Hello world", bos=False)
    assert lp == pytest.approx(_direct_logprob(lm.model, [lm.tok.bos_id], cont, 2)[0], abs=1e-5)


def test_loglikelihood_rolling_windows(ckpt):
    lm = HatLMEval(pretrained=str(ckpt), think_iters=2, batch_size=2, device="cpu", max_length=3 + 1 + 8)
    text = "One two three four five six seven eight nine ten eleven twelve."
    toks = lm.tok.encode(text, bos=False)
    assert len(toks) > 8
    # Windows of 8 positions: the first predicts toks[:8] from BOS; later ones predict up to 7 new tokens
    # each from the token before them; the last keeps a full-length window.
    W, ref, done = 8, 0.0, 0
    ref += _direct_logprob(lm.model, [lm.tok.bos_id], toks[:W], 2)[0]
    done = W
    while done < len(toks):
        end = min(done + W, len(toks))
        start = end - W  # full-length window: context = toks[start-1 : done]
        ctx, cont = toks[start - 1 : done], toks[done:end]
        ref += _direct_logprob(lm.model, ctx, cont, 2)[0]
        done = end
    (got,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
    # A sum of ~40 float32 log-probabilities of size ~4 each: its rounding is ~1e-5 absolute
    # (seen: 1.1e-5 with one thread), so the tolerance is relative to the sum.
    assert got == pytest.approx(ref, rel=1e-6, abs=1e-5)


def test_generate_until_equals_generate(lm):
    kw = {"until": ["\n"], "max_gen_toks": 6}
    reqs = [Instance("generate_until", {}, (g["q"], kw), i) for i, g in enumerate(GEN)]
    got = lm.generate_until(reqs, disable_tqdm=True)
    for g, text in zip(GEN, got):
        ids = lm.tok.encode(g["q"], bos=True)
        ref = generate(lm.model, lm.tok, [ids], 6, stop=["\n"], think_iters=2).texts[0]
        assert text == ref and "\n" not in text


def _write_tasks(folder, cache) -> None:
    def jsonl(name, rows):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))

    jsonl("mc.jsonl", MC)
    jsonl("text.jsonl", TEXTS)
    jsonl("gen.jsonl", GEN)
    common = (
        "dataset_path: json\ndataset_kwargs:\n  cache_dir: {cache}\n  data_files:\n    test: {file}\n"
        "test_split: test\n"
    )
    (folder / "mc.yaml").write_text(
        "task: hat_mc\n" + common.format(cache=cache, file=folder / "mc.jsonl")
        + "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: choices\ndoc_to_target: answer\n"
        "target_delimiter: ''\n"  # the choices carry their own leading space, as the oracle's pairs do
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )  # fmt: skip
    (folder / "roll.yaml").write_text(
        "task: hat_roll\n" + common.format(cache=cache, file=folder / "text.jsonl")
        + "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n"
    )  # fmt: skip
    (folder / "gen.yaml").write_text(
        "task: hat_gen\n" + common.format(cache=cache, file=folder / "gen.jsonl")
        + "output_type: generate_until\ndoc_to_text: '{{q}}'\ndoc_to_target: '{{a}}'\n"
        "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 5\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    )  # fmt: skip


@pytest.mark.slow
def test_cli_runs_local_tasks_offline(ckpt, lm, tmp_path, capsys):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    _write_tasks(tasks, tmp_path / "hf-cache")
    out = tmp_path / "out"
    rc = cli_main([
        "lm-eval", "--model-args", f"pretrained={ckpt},think_iters=2", "--tasks", "hat_mc,hat_roll,hat_gen",
        "--include-path", str(tasks), "--no-default-tasks", "--batch-size", "4", "--device", "cpu",
        "--output-path", str(out), "--log-samples",
    ])  # fmt: skip
    assert rc == 0
    assert "hat_mc" in capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())["results"]
    # Accuracy from the direct oracle: argmax over each question's choice log-likelihoods.
    pairs = _pairs(lm.tok)
    scores = [_direct_logprob(lm.model, c, x, 2)[0] for _, c, x in pairs]
    correct, k = 0, 0
    for d in MC:
        s = scores[k : k + len(d["choices"])]
        k += len(d["choices"])
        correct += int(max(range(len(s)), key=s.__getitem__) == d["answer"])
    assert res["hat_mc"]["acc,none"] == pytest.approx(correct / len(MC))
    # Rolling: bits per byte from the direct log-likelihood of each text given BOS.
    total_lp = sum(
        _direct_logprob(lm.model, [lm.tok.bos_id], lm.tok.encode(t["text"], bos=False), 2)[0] for t in TEXTS
    )
    n_bytes = sum(len(t["text"].encode()) for t in TEXTS)
    assert res["hat_roll"]["bits_per_byte,none"] == pytest.approx(-total_lp / n_bytes / math.log(2), rel=1e-5)
    assert 0.0 <= res["hat_gen"]["exact_match,none"] <= 1.0
    samples = [json.loads(ln) for ln in (out / "samples_hat_gen.jsonl").read_text().splitlines()]
    for s, g in zip(sorted(samples, key=lambda s: s["doc_id"]), GEN):
        ids = lm.tok.encode(g["q"], bos=True)
        assert s["resps"][0][0] == generate(lm.model, lm.tok, [ids], 5, stop=["\n"], think_iters=2).texts[0]


def test_cli_errors_are_user_errors(ckpt, tmp_path, capsys):
    assert cli_main(["lm-eval", "--model-args", "think_iters=2", "--tasks", "x"]) == 2
    assert "pretrained=" in capsys.readouterr().err
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    rc = cli_main(["lm-eval", "--model-args", f"pretrained={ckpt}", "--tasks", "no_such_task",
                   "--include-path", str(tasks), "--no-default-tasks"])  # fmt: skip
    assert rc == 2 and "unknown lm-eval task" in capsys.readouterr().err


def test_task_examples_for_compare(tmp_path):
    from hatlm.harness import task_examples

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    _write_tasks(tasks, tmp_path / "hf-cache")
    mc = task_examples("hat_mc", include_path=str(tasks), include_defaults=False)
    assert [(e.prompt, e.answer) for e in mc] == [(d["question"], d["choices"][d["answer"]].strip()) for d in MC]
    gen = task_examples("hat_gen", include_path=str(tasks), include_defaults=False, limit=1)
    assert [(e.prompt, e.answer, e.task) for e in gen] == [(GEN[0]["q"], "2", "lm-eval/hat_gen")]
    with pytest.raises(UserError, match="loglikelihood_rolling"):
        task_examples("hat_roll", include_path=str(tasks), include_defaults=False)
