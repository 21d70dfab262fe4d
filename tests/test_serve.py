"""`hatlm serve`: the official `openai` client against a real uvicorn server on 127.0.0.1.

Oracles: answers equal `hatlm.generate.generate` called directly on the same model; under concurrent
load every answer equals the same request sent alone; prompt token counts equal mistral-common's
own encoding (Mistral format) or the checkpoint template rendered by hand.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from hatlm.checkpoint import save_model  # noqa: E402
from hatlm.config import ModelConfig  # noqa: E402
from hatlm.generate import generate  # noqa: E402
from hatlm.model import HatLM  # noqa: E402
from hatlm.serve import build_server, create_app  # noqa: E402
from hatlm.tokenizer import ByteTokenizer, load_tokenizer  # noqa: E402

SMALL = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=160, sliding_window=None, initializer_range=0.2,
    hybrid=dict(arm="hybrid", thinker_layers=1, thought_slots=3, max_think_iters=2),
)  # fmt: skip
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


class Running:
    """A uvicorn server in a thread; `client()` gives an openai client for it."""

    def __init__(self, folder) -> None:
        import uvicorn

        self.server = build_server(str(folder), device="cpu")
        self.model_id = self.server.model_id
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        sock.close()
        self.uv = uvicorn.Server(uvicorn.Config(create_app(self.server), host="127.0.0.1", port=self.port,
                                                log_level="warning"))  # fmt: skip
        self.thread = threading.Thread(target=self.uv.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.uv.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self):
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=60)

    def post(self, path: str, body: bytes) -> tuple[int, dict]:
        req = urllib.request.Request(self.url + path, data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def stop(self) -> None:
        self.uv.should_exit = True
        self.thread.join(timeout=30)


def _checkpoint(folder, vocab_tok, template: str | None = None):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=vocab_tok.vocab_size, bos_token_id=vocab_tok.bos_id, eos_token_id=vocab_tok.eos_id,
                      **SMALL)  # fmt: skip
    save_model(HatLM(cfg), folder, tokenizer=vocab_tok)
    if template is not None:
        (folder / "tokenizer_config.json").write_text(
            json.dumps({"chat_template": template, "bos_token": "<s>", "eos_token": "</s>"})
        )
    return folder


@pytest.fixture(scope="module")
def mistral_server(tmp_path_factory):
    folder = _checkpoint(tmp_path_factory.mktemp("serve") / "sp-model", load_tokenizer(None))
    running = Running(folder)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def template_server(tmp_path_factory):
    folder = _checkpoint(tmp_path_factory.mktemp("serve") / "byte-model", ByteTokenizer(), TEMPLATE)
    running = Running(folder)
    yield running
    running.stop()


def _direct(srv: Running, prompt_ids: list[int], max_tokens: int, **kw) -> str:
    res = generate(srv.server.model, srv.server.tokenizer, [prompt_ids], max_tokens, **kw)
    return res.texts[0]


def test_models_and_completion_match_direct_generation(mistral_server):
    srv, c = mistral_server, mistral_server.client()
    assert [m.id for m in c.models.list().data] == [srv.model_id]
    prompt = "The capital of France is"
    r = c.completions.create(model=srv.model_id, prompt=prompt, max_tokens=12, temperature=0)
    ids = srv.server.tokenizer.encode(prompt, bos=True)
    assert r.choices[0].text == _direct(srv, ids, 12, temperature=0.0)
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens == 12 and r.choices[0].finish_reason == "length"
    extra = r.model_extra["hatlm"]
    assert extra["think_iterations"] == 2 and extra["rethinks"] == 0 and extra["final_change"] > 0
    # Streamed: the pieces concatenate to the same text, then [DONE] (the client stops on it).
    pieces, finals = [], []
    for ch in c.completions.create(model=srv.model_id, prompt=prompt, max_tokens=12, temperature=0, stream=True):
        pieces.append(ch.choices[0].text)
        if ch.choices[0].finish_reason:
            finals.append(ch)
    assert "".join(pieces) == r.choices[0].text
    assert len(finals) == 1 and finals[0].model_extra["hatlm"]["think_iterations"] == 2
    # hatlm options through extra_body: rethinking shows in the statistics.
    r2 = c.completions.create(model=srv.model_id, prompt=prompt, max_tokens=6, temperature=0,
                              extra_body={"rethink_every": 2, "think_iters": 1})  # fmt: skip
    assert r2.choices[0].text == _direct(srv, ids, 6, temperature=0.0, rethink_every=2, think_iters=1)
    assert r2.model_extra["hatlm"]["rethinks"] == 2 and r2.model_extra["hatlm"]["think_iterations"] == 1


def test_sse_wire_format_ends_with_done(mistral_server):
    srv = mistral_server
    body = json.dumps({"model": srv.model_id, "prompt": "Hi", "max_tokens": 3, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()  # fmt: skip
    req = urllib.request.Request(srv.url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [ln for ln in r.read().decode().split("\n\n") if ln]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    usage = json.loads(events[-2][6:])["usage"]
    assert usage["completion_tokens"] == 3 and usage["total_tokens"] == usage["prompt_tokens"] + 3


def test_chat_mistral_format(mistral_server):
    from mistral_common.protocol.instruct.messages import AssistantMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    srv, c = mistral_server, mistral_server.client()
    msgs = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi!"},
            {"role": "user", "content": "How are you?"}]  # fmt: skip
    expected = (
        MistralTokenizer.v1()
        .encode_chat_completion(
            ChatCompletionRequest(
                messages=[
                    UserMessage(content="Hello"),
                    AssistantMessage(content="Hi!"),
                    UserMessage(content="How are you?"),
                ]
            )  # fmt: skip
        )
        .tokens
    )
    r = c.chat.completions.create(model=srv.model_id, messages=msgs, max_tokens=8, temperature=0)
    assert r.model_extra["hatlm"]["chat_template"].startswith("mistral-common")
    assert r.usage.prompt_tokens == len(expected)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == _direct(srv, expected, 8, temperature=0.0)
    streamed = "".join(
        ch.choices[0].delta.content or ""
        for ch in c.chat.completions.create(
            model=srv.model_id, messages=msgs, max_tokens=8, temperature=0, stream=True
        )  # fmt: skip
        if ch.choices
    )
    assert streamed == r.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="user message"):
        c.chat.completions.create(model=srv.model_id, messages=[{"role": "assistant", "content": "x"}], max_tokens=2)


def test_chat_checkpoint_template(template_server):
    srv, c = template_server, template_server.client()
    msgs = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
            {"role": "user", "content": "and 3+3?"}]  # fmt: skip
    tok = ByteTokenizer()
    # Rendered by hand: BOS, then the text, with the literal </s> as the EOS token.
    ids = [tok.bos_id] + tok.encode("<|user|>2+2?<|assistant|>4", bos=False) + [tok.eos_id]
    ids += tok.encode("<|user|>and 3+3?<|assistant|>", bos=False)
    r = c.chat.completions.create(model=srv.model_id, messages=msgs, max_tokens=5, temperature=0)
    assert r.model_extra["hatlm"]["chat_template"] == "checkpoint chat_template"
    assert r.usage.prompt_tokens == len(ids)
    assert r.choices[0].message.content == _direct(srv, ids, 5, temperature=0.0)


def test_errors_have_openai_shape_and_server_keeps_serving(mistral_server):
    srv, c = mistral_server, mistral_server.client()
    cases = [
        (b"{not json", 400, None),
        (json.dumps({"model": "no-such-model", "prompt": "x"}).encode(), 404, "model"),
        (json.dumps({"model": srv.model_id, "prompt": "x", "max_tokens": 0}).encode(), 400, "max_tokens"),
        (json.dumps({"model": srv.model_id, "prompt": "x", "max_tokens": 10**6}).encode(), 400, "max_tokens"),
        (json.dumps({"model": srv.model_id, "prompt": "word " * 400}).encode(), 400, "prompt"),
        (json.dumps({"model": srv.model_id, "prompt": "x", "temperature": 7}).encode(), 400, "temperature"),
        (json.dumps({"model": srv.model_id}).encode(), 400, "prompt"),
        (json.dumps([1, 2]).encode(), 400, None),
    ]
    for body, status, param in cases:
        code, payload = srv.post("/v1/completions", body)
        assert code == status, (body[:60], payload)
        err = payload["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
        assert err["param"] == param
    code, payload = srv.post("/v1/chat/completions", json.dumps({"model": srv.model_id, "messages": []}).encode())
    assert code == 400 and "messages" in payload["error"]["message"]
    _, payload = srv.post("/v1/completions", json.dumps({"model": srv.model_id, "prompt": "word " * 400}).encode())
    assert payload["error"]["code"] == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model=srv.model_id, prompt="x", max_tokens=-1)
    r = c.completions.create(model=srv.model_id, prompt="Still there?", max_tokens=4, temperature=0)
    assert r.usage.completion_tokens == 4


def test_client_disconnecting_mid_stream(mistral_server):
    srv = mistral_server
    body = json.dumps({"model": srv.model_id, "prompt": "Tell me a long story", "max_tokens": 120,
                       "temperature": 0, "stream": True}).encode()  # fmt: skip
    for _ in range(2):
        sock = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
        head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()  # fmt: skip
        sock.sendall(head + body)
        got = b""
        while b"data: " not in got:
            chunk = sock.recv(4096)
            assert chunk, "server closed before streaming"
            got += chunk
        sock.close()  # gone mid-stream
    c = srv.client()
    r = c.completions.create(model=srv.model_id, prompt="After the hang-up", max_tokens=5, temperature=0)
    ids = srv.server.tokenizer.encode("After the hang-up", bos=True)
    assert r.choices[0].text == _direct(srv, ids, 5, temperature=0.0)
    assert srv.server.engine.thread.is_alive()


def _request(i: int) -> dict:
    """Request i of the load test: varied prompts (lengths), completions and chat, greedy and seeded sampling."""
    words = ["alpha", "beta gamma", "delta epsilon zeta", "the quick brown fox", "42", "x y z w v u"]
    prompt = f"{words[i % len(words)]} {i % 7}"
    req: dict = {"max_tokens": 6, "temperature": 0.0}
    if i % 5 == 3:
        req.update(temperature=0.9, seed=1000 + i)
    if i % 4 == 1:
        req["messages"] = [{"role": "user", "content": prompt}]
    else:
        req["prompt"] = prompt
    return req


def _send(c, model_id: str, req: dict) -> str:
    if "messages" in req:
        return c.chat.completions.create(model=model_id, **req).choices[0].message.content
    return c.completions.create(model=model_id, **req).choices[0].text


@pytest.mark.slow
def test_concurrent_load_equals_requests_sent_alone(mistral_server):
    srv = mistral_server
    clients, per_client = 16, 8
    reqs = [_request(i) for i in range(clients * per_client)]

    def worker(k: int) -> list[str]:
        c = srv.client()
        return [_send(c, srv.model_id, reqs[k * per_client + j]) for j in range(per_client)]

    rows_before, batches_before = srv.server.engine.rows, srv.server.engine.batches
    with ThreadPoolExecutor(clients) as pool:
        answers = [a for chunk in pool.map(worker, range(clients)) for a in chunk]
    assert srv.server.engine.rows - rows_before == len(reqs)
    # Alone: one request at a time (each its own batch of one).
    c = srv.client()
    alone = {}
    for req in reqs:
        key = json.dumps(req, sort_keys=True)
        if key not in alone:
            alone[key] = _send(c, srv.model_id, req)
    assert answers == [alone[json.dumps(r, sort_keys=True)] for r in reqs]
    assert len(set(answers)) > 5  # the model answers differently to different prompts: the check has teeth
    print(f"load: {len(reqs)} requests in {srv.server.engine.batches - batches_before} batches")


def test_queued_requests_are_decoded_as_one_batch(mistral_server):
    """Requests that queue while the worker is busy go into one generate call, rows unchanged."""
    srv = mistral_server
    engine = srv.server.engine
    reqs = [_request(i) for i in range(12)]
    reqs = [r for r in reqs if "prompt" in r]  # completions: one options group per temperature
    greedy = [r for r in reqs if r["temperature"] == 0.0]
    engine.gate.clear()
    try:
        with ThreadPoolExecutor(len(greedy)) as pool:
            futures = [pool.submit(lambda r: srv.client().completions.create(model=srv.model_id, **r), r)
                       for r in greedy]  # fmt: skip
            deadline = time.time() + 30
            while engine.queue.qsize() < len(greedy) - 1:  # the worker holds the first one at the gate
                assert time.time() < deadline, "requests did not queue"
                time.sleep(0.01)
            engine.gate.set()
            results = [f.result() for f in futures]
    finally:
        engine.gate.set()
    assert [r.model_extra["hatlm"]["batch_size"] for r in results] == [len(greedy)] * len(greedy)
    for req, r in zip(greedy, results):
        ids = srv.server.tokenizer.encode(req["prompt"], bos=True)
        assert r.choices[0].text == _direct(srv, ids, req["max_tokens"], temperature=0.0)


def test_several_prompts_and_choices_with_seeds(mistral_server):
    """A list of prompts × n choices: choice i of a prompt is sampled with seed + i, as if sent alone."""
    srv, c = mistral_server, mistral_server.client()
    assert c.models.retrieve(srv.model_id).id == srv.model_id
    prompts = ["Once upon a time", "In a galaxy"]
    r = c.completions.create(model=srv.model_id, prompt=prompts, n=2, max_tokens=5, temperature=1.0, seed=7)
    assert [ch.index for ch in r.choices] == [0, 1, 2, 3]
    for k, ch in enumerate(r.choices):
        ids = srv.server.tokenizer.encode(prompts[k // 2], bos=True)
        assert ch.text == _direct(srv, ids, 5, temperature=1.0, seed=7 + k % 2)
    assert r.usage.prompt_tokens == sum(len(srv.server.tokenizer.encode(p, bos=True)) for p in prompts)
    assert r.choices[0].text != r.choices[1].text or r.choices[2].text != r.choices[3].text  # seeds differ
