"""`hatlm serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) for a checkpoint or preset.

Endpoints: GET /v1/models, GET /v1/models/{id}, POST /v1/completions, POST /v1/chat/completions,
GET /health. Streaming is server-sent events ending in `data: [DONE]`. Every response carries
`usage` and an extra `hatlm` field with the thinking statistics (think_iterations, final_change,
rethinks, thought_shift, …) of each choice; chat responses also name the chat template used.
hatlm-specific options go in the request body next to the OpenAI ones (the `openai` client's
`extra_body`): think_iters, halting_threshold, rethink_every, repetition_penalty.

Concurrency. One worker thread owns the model. Requests are queued; whenever the worker is free it
takes everything waiting (up to --max-batch rows), groups rows whose decoding options agree and runs
one batched `generate` call per group. `generate` gives each row of a batch exactly its single-prompt
result (no padding holes, per-row sampling generators seeded per request), so batching never changes
an answer; the tests check this under concurrent load. A request whose client went away while it was
still queued is dropped; one that is already decoding finishes and its output is discarded.

Errors use OpenAI's shape {"error": {"message", "type", "param", "code"}} with 4xx for bad requests
(bad JSON, unknown model, out-of-range values, prompt too long); the server keeps serving.

Length: ~600 lines in one module on purpose — the engine, the request validation and the HTTP
handlers share the OpenAI request/response shapes, and reading them together is the point.

Why ~570 lines: the request schemas, the batching engine and the HTTP/SSE layer of one server; the
chat templates live in chat.py, generation in generate.py.
"""

# No `from __future__ import annotations` here: FastAPI reads the handlers' annotations (`Request`)
# at run time, and those names are imported inside create_app so that `hatlm --help` stays fast.
import asyncio
import json
import logging
import queue
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from hatlm.errors import UserError

log = logging.getLogger("hatlm.serve")

MAX_N = 16  # choices per request
MAX_STOP = 4  # stop strings per request (OpenAI's limit)


class ApiError(Exception):
    """A request the server refuses: HTTP status + OpenAI error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error") -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ------------------------------------------------------------------------------------ the engine


@dataclass
class Job:
    """One choice of one request: a prompt, its decoding options, where its events go."""

    ids: list[int]
    options: dict[str, Any]  # generate() keyword arguments shared by a batch (see Engine.key)
    seed: int
    index: int  # choice index within its request
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue  # (index, kind, payload); kind: "piece" | "done" | "error"
    stream: bool = False
    cancelled: bool = False
    batch_size: int = field(default=0)


class Engine:
    """The single worker that owns the model and batches queued jobs into `generate` calls."""

    def __init__(self, model: Any, tokenizer: Any, max_batch: int = 32) -> None:
        self.model, self.tokenizer, self.max_batch = model, tokenizer, max(1, int(max_batch))
        self.queue: queue.Queue[Job | None] = queue.Queue()
        self.thread: threading.Thread | None = None
        self.batches = 0  # generate calls made (for tests/benchmarks: shows that batching happened)
        self.rows = 0
        # Cleared, the worker waits before taking a batch: lets tests queue requests deterministically.
        self.gate = threading.Event()
        self.gate.set()

    def start(self) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self._work, name="hatlm-serve-worker", daemon=True)
            self.thread.start()

    def stop(self) -> None:
        if self.thread is not None:
            self.queue.put(None)
            self.thread.join(timeout=30)
            self.thread = None

    def submit(self, job: Job) -> None:
        self.queue.put(job)

    @staticmethod
    def key(options: dict[str, Any]) -> tuple:
        return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in options.items()))

    def _work(self) -> None:
        import torch

        while True:
            first = self.queue.get()
            if first is None:
                return
            self.gate.wait()
            jobs, stop = [first], False
            while len(jobs) < self.max_batch:
                try:
                    nxt = self.queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                jobs.append(nxt)
            groups: dict[tuple, list[Job]] = {}
            for j in jobs:
                if not j.cancelled:
                    groups.setdefault(self.key(j.options), []).append(j)
            for group in groups.values():
                with torch.inference_mode():
                    self._run(group)
            if stop:
                return

    def _run(self, group: list[Job]) -> None:
        from hatlm.generate import generate

        def send(job: Job, kind: str, payload: Any) -> None:
            try:
                job.loop.call_soon_threadsafe(job.events.put_nowait, (job.index, kind, payload))
            except RuntimeError:  # the event loop is gone (server shutting down)
                pass

        streaming = any(j.stream for j in group)

        def on_piece(row: int, piece: str) -> None:
            job = group[row]
            if job.stream and not job.cancelled:
                send(job, "piece", piece)

        try:
            res = generate(
                self.model, self.tokenizer, [j.ids for j in group], seed=[j.seed for j in group],
                stream=on_piece if streaming else None, **group[0].options,
            )  # fmt: skip
        except Exception as e:  # noqa: BLE001 — a failed batch must not take the worker down
            if len(group) > 1:
                for j in group:  # isolate the row that fails; the others still get their answers
                    self._run([j])
                return
            if not isinstance(e, UserError):
                log.exception("generation failed")
            send(group[0], "error", e)
            return
        self.batches += 1
        self.rows += len(group)
        for j, toks, text, st in zip(group, res.tokens, res.texts, res.stats):
            send(j, "done", {"text": text, "tokens": toks, "stats": st, "batch_size": len(group)})


# ------------------------------------------------------------------------------------ requests


def _request_models():
    """Pydantic request bodies (built lazily so that importing this module needs no FastAPI)."""
    from pydantic import BaseModel, ConfigDict

    class _Common(BaseModel):
        model_config = ConfigDict(extra="ignore")
        model: str
        max_tokens: int | None = None
        max_completion_tokens: int | None = None
        temperature: float | None = None
        top_p: float | None = None
        n: int = 1
        stream: bool = False
        stream_options: dict[str, Any] | None = None
        stop: str | list[str] | None = None
        seed: int | None = None
        logprobs: Any = None
        # hatlm extras
        think_iters: int | None = None
        halting_threshold: float | None = None
        rethink_every: int | None = None
        repetition_penalty: float | None = None

    class CompletionRequest(_Common):
        prompt: str | list[str] | list[int] | list[list[int]]
        echo: bool = False
        suffix: str | None = None

    class ChatMessage(BaseModel):
        model_config = ConfigDict(extra="ignore")
        role: Literal["system", "user", "assistant"]
        content: str | list[dict[str, Any]]

    class ChatRequest(_Common):
        messages: list[ChatMessage]

    return CompletionRequest, ChatRequest


class Server:
    """The model, its name and chat format, the engine; request handling without HTTP details."""

    def __init__(self, model: Any, tokenizer: Any, model_id: str, folder: str | Path | None = None,
                 max_batch: int = 32, aliases: tuple[str, ...] = ()) -> None:  # fmt: skip
        from hatlm.chat import ChatFormatter

        self.model, self.tokenizer, self.model_id = model, tokenizer, model_id
        self.names = {model_id, *aliases}
        self.chat = ChatFormatter(tokenizer, folder)
        self.engine = Engine(model, tokenizer, max_batch)
        self.created = int(time.time())
        cfg = model.config
        self.context = cfg.max_position_embeddings
        self.slots = cfg.num_thought_slots

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self.model_card()]}

    def model_card(self) -> dict[str, Any]:
        info = {"arm": self.model.arm, "context_length": self.context, "thought_slots": self.slots}
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "hatlm", "hatlm": info}

    # ------------------------------------------------------------------ validation
    def check_model(self, name: str) -> None:
        if name not in self.names:
            raise ApiError(404, f"The model `{name}` does not exist; this server serves `{self.model_id}`",
                           param="model", code="model_not_found")  # fmt: skip

    def options(self, req: Any, room: int, default_max: int) -> dict[str, Any]:
        """generate() options from the request; `room` = positions left after the longest prompt."""
        if req.n < 1 or req.n > MAX_N:
            raise ApiError(400, f"n must be between 1 and {MAX_N}; got {req.n}", param="n")
        if req.logprobs not in (None, False):
            raise ApiError(400, "logprobs are not supported by this server", param="logprobs")
        max_tokens = req.max_tokens if req.max_tokens is not None else req.max_completion_tokens
        if max_tokens is None:
            max_tokens = max(1, min(default_max, room))
        if max_tokens < 1:
            raise ApiError(400, f"max_tokens must be at least 1; got {max_tokens}", param="max_tokens",
                           code="invalid_value")  # fmt: skip
        if max_tokens > room:
            raise ApiError(
                400,
                f"max_tokens={max_tokens} does not fit: this model's context is {self.context} positions, of which "
                f"the prompt and {self.slots} thought slots leave {room}; ask for at most {room}",
                param="max_tokens", code="invalid_value",
            )  # fmt: skip
        temperature = 1.0 if req.temperature is None else req.temperature
        if not 0 <= temperature <= 2:
            raise ApiError(400, f"temperature must be in [0, 2]; got {temperature}", param="temperature")
        if req.top_p is not None and not 0 < req.top_p <= 1:
            raise ApiError(400, f"top_p must be in (0, 1]; got {req.top_p}", param="top_p")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > MAX_STOP:
            raise ApiError(400, f"at most {MAX_STOP} stop sequences; got {len(stop)}", param="stop")
        if req.think_iters is not None and not 0 <= req.think_iters <= 256:
            raise ApiError(400, f"think_iters must be in [0, 256]; got {req.think_iters}", param="think_iters")
        if req.rethink_every is not None:
            if req.rethink_every < 1:
                raise ApiError(400, f"rethink_every must be >= 1; got {req.rethink_every}", param="rethink_every")
            if self.model.arm != "hybrid":
                raise ApiError(400, f"rethink_every needs the hybrid arm; this model is {self.model.arm!r}",
                               param="rethink_every")  # fmt: skip
        if req.halting_threshold is not None and req.halting_threshold < 0:
            raise ApiError(400, "halting_threshold must be >= 0", param="halting_threshold")
        rp = 1.0 if req.repetition_penalty is None else req.repetition_penalty
        if rp <= 0:
            raise ApiError(400, "repetition_penalty must be > 0", param="repetition_penalty")
        return dict(
            max_new_tokens=int(max_tokens), temperature=float(temperature),
            top_p=None if req.top_p is None or req.top_p >= 1 else float(req.top_p), stop=stop,
            think_iters=req.think_iters, halting_threshold=req.halting_threshold, rethink_every=req.rethink_every,
            repetition_penalty=float(rp),
        )  # fmt: skip

    def room(self, prompts: list[list[int]], param: str) -> int:
        longest = max(len(p) for p in prompts)
        room = self.context - self.slots - longest
        if room < 1:
            raise ApiError(
                400,
                f"This model's maximum context length is {self.context} positions; the prompt has {longest} tokens "
                f"(+{self.slots} thought slots), which leaves no room for a completion; shorten it",
                param=param, code="context_length_exceeded",
            )  # fmt: skip
        return room

    def encode_prompts(self, prompt: Any) -> list[list[int]]:
        tok, vocab = self.tokenizer, self.model.config.vocab_size
        if isinstance(prompt, str):
            prompt = [prompt]
        if not prompt:
            raise ApiError(400, "prompt is empty", param="prompt")
        if all(isinstance(p, int) for p in prompt):
            prompt = [prompt]
        rows = []
        for p in prompt:
            if isinstance(p, str):
                if not p:
                    raise ApiError(400, "prompt is empty", param="prompt")
                rows.append(tok.encode(p, bos=True))
            else:
                if not p or any(not 0 <= t < vocab for t in p):
                    raise ApiError(400, f"token prompts must be non-empty lists of ids in [0, {vocab})", param="prompt")
                rows.append(list(p))
        return rows

    # ------------------------------------------------------------------ running
    def jobs(self, prompts: list[list[int]], options: dict[str, Any], req: Any) -> tuple[list[Job], asyncio.Queue]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        jobs = []
        for p in prompts:
            for i in range(req.n):
                seed = secrets.randbelow(2**62) if req.seed is None else int(req.seed) + i
                jobs.append(Job(p, options, seed, len(jobs), loop, events, stream=req.stream))
        for j in jobs:
            self.engine.submit(j)
        return jobs, events

    async def results(self, jobs: list[Job], events: asyncio.Queue) -> list[dict[str, Any]]:
        out: list[dict[str, Any] | None] = [None] * len(jobs)
        left = len(jobs)
        while left:
            index, kind, payload = await events.get()
            if kind == "piece":
                continue
            if kind == "error":
                raise _as_api_error(payload)
            out[index] = payload
            left -= 1
        return out  # type: ignore[return-value]

    def stats(self, result: dict[str, Any]) -> dict[str, Any]:
        st = result["stats"]
        keep = ("think_iterations", "final_change", "rethinks", "rethink_iterations", "thought_shift",
                "time_to_first_token_s", "tokens_per_s", "stop_reason")  # fmt: skip
        out = {k: _jsonable(st.get(k)) for k in keep}
        out["batch_size"] = result["batch_size"]
        return out


def _jsonable(v: Any) -> Any:
    if isinstance(v, float):
        return v if v == v and abs(v) != float("inf") else None
    if hasattr(v, "item"):
        return _jsonable(v.item())
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def _as_api_error(e: Exception) -> ApiError:
    if isinstance(e, ApiError):
        return e
    if isinstance(e, UserError):
        return ApiError(400, str(e))
    return ApiError(500, f"internal error: {type(e).__name__}: {e}", type="server_error")


def _finish(stop_reason: str) -> str:
    return "length" if stop_reason == "length" else "stop"


# ------------------------------------------------------------------------------------ HTTP app


def create_app(server: Server):
    """The FastAPI application around `server` (its worker starts and stops with the app)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    CompletionRequest, ChatRequest = _request_models()

    @asynccontextmanager
    async def lifespan(app):
        server.engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(server.engine.stop)

    app = FastAPI(title="hatlm", lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        if first.get("type") == "json_invalid":
            err = ApiError(400, f"We could not parse the JSON body of your request: {first.get('msg', '')}")
        else:
            loc = [str(x) for x in first.get("loc", ()) if x != "body"]
            where = ".".join(loc) or "body"
            err = ApiError(400, f"Invalid value for '{where}': {first.get('msg', 'invalid')}", param=where or None)
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        err = ApiError(exc.status_code, str(exc.detail), type="invalid_request_error")
        return JSONResponse(err.body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception):
        log.exception("unhandled error")
        err = _as_api_error(exc)
        return JSONResponse(err.body(), status_code=err.status)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return server.models()

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        server.check_model(name)
        return server.model_card()

    async def parse(request: Request, kind):
        """The body as `kind` (parsed by hand: handler annotations cannot name these local classes)."""
        from pydantic import ValidationError

        raw = await request.body()
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"We could not parse the JSON body of your request: {e}") from None
        if not isinstance(data, dict):
            raise ApiError(400, "The request body must be a JSON object")
        try:
            return kind.model_validate(data)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(x) for x in first.get("loc", ())) or None
            raise ApiError(400, f"Invalid value for '{where}': {first.get('msg', 'invalid')}", param=where) from None

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await parse(request, CompletionRequest)
        server.check_model(req.model)
        if req.echo or req.suffix:
            raise ApiError(400, "echo and suffix are not supported by this server", param="echo")
        prompts = server.encode_prompts(req.prompt)
        options = server.options(req, server.room(prompts, "prompt"), default_max=16)
        return await respond(req, prompts, options, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = await parse(request, ChatRequest)
        server.check_model(req.model)
        try:
            ids = server.chat.encode([m.model_dump() for m in req.messages])
        except UserError as e:
            raise ApiError(400, str(e), param="messages") from None
        prompts = [ids]
        options = server.options(req, server.room(prompts, "messages"), default_max=256)
        return await respond(req, prompts, options, chat=True)

    async def respond(req, prompts: list[list[int]], options: dict[str, Any], chat: bool):
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        meta = {"arm": server.model.arm}
        if chat:
            meta["chat_template"] = server.chat.source
        jobs, events = server.jobs(prompts, options, req)
        prompt_tokens = sum(len(p) for p in prompts)
        if not req.stream:
            results = await server.results(jobs, events)
            choices = []
            for j, r in zip(jobs, results):
                c: dict[str, Any] = {"index": j.index, "finish_reason": _finish(r["stats"]["stop_reason"]),
                                     "logprobs": None, "hatlm": server.stats(r)}  # fmt: skip
                if chat:
                    c["message"] = {"role": "assistant", "content": r["text"]}
                else:
                    c["text"] = r["text"]
                choices.append(c)
            completion_tokens = sum(len(r["tokens"]) for r in results)
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                     "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip
            return {"id": rid, "object": obj, "created": created, "model": server.model_id, "choices": choices,
                    "usage": usage, "hatlm": {**meta, **choices[0]["hatlm"]}}  # fmt: skip
        include_usage = bool((req.stream_options or {}).get("include_usage"))
        chunk_obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
            body = {"id": rid, "object": chunk_obj, "created": created, "model": server.model_id,
                    "choices": choices, **extra}  # fmt: skip
            return f"data: {json.dumps(body)}\n\n"

        def piece(index: int, text: str, finish: str | None = None, first: bool = False) -> dict[str, Any]:
            if chat:
                delta: dict[str, Any] = {"role": "assistant", "content": text} if first else {"content": text}
                return {"index": index, "delta": delta if (text or first) else {}, "logprobs": None,
                        "finish_reason": finish}  # fmt: skip
            return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}

        async def sse():
            try:
                if chat:
                    yield chunk([piece(j.index, "", first=True) for j in jobs])
                left, completion_tokens = len(jobs), 0
                while left:
                    index, kind, payload = await events.get()
                    if kind == "piece":
                        if payload:
                            yield chunk([piece(index, payload)])
                    elif kind == "error":
                        yield f"data: {json.dumps(_as_api_error(payload).body())}\n\n"
                        left -= 1
                    else:
                        left -= 1
                        completion_tokens += len(payload["tokens"])
                        st = server.stats(payload)
                        final = piece(index, "", finish=_finish(payload["stats"]["stop_reason"]))
                        final["hatlm"] = st
                        yield chunk([final], hatlm={**meta, **st})
                if include_usage:
                    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                             "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip
                    yield chunk([], usage=usage)
                yield "data: [DONE]\n\n"
            finally:
                # The client went away (or we are done): drop whatever of this request is still queued.
                for j in jobs:
                    j.cancelled = True

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip

    return app


def build_server(name: str, device: str | None = None, dtype: str | None = None, arm: str | None = None,
                 served_name: str | None = None, max_batch: int = 32) -> Server:  # fmt: skip
    """Load `name` (checkpoint folder or preset) and wrap it in a `Server`."""
    from hatlm.config import PRESETS
    from hatlm.loader import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(name, device=device or "auto", dtype=dtype, arm=arm)
    model.eval()
    folder = None if name in PRESETS else Path(name).expanduser()
    model_id = served_name or (name if folder is None else folder.resolve().name)
    return Server(model, tok, model_id, folder=folder, max_batch=max_batch, aliases=(name,))



__all__ = ["ApiError", "Engine", "Server", "build_server", "create_app"]
