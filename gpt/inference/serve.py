"""`gpt serve`: a checkpoint behind OpenAI's HTTP API (the subset local servers agree on), with
a chat page at `/`. FastAPI and uvicorn answer requests on the event loop; the `Engine` decodes
on a thread of its own, every running request in one batch.

Each request becomes one `Choice` per prompt and `n`: its tokens arrive on the engine's thread,
which grows the text (stop strings, whole characters: `GrowingText`, `Streamer`, as `gpt sample`)
and posts what can be shown to the request's coroutine.

A prompt longer than the context allows (it needs room for `max_tokens`) keeps its end, as
`gpt sample` and `gpt chat` crop it; the response says how many tokens were cropped in a
top-level `truncated_prompt_tokens` (on the first chunk when streaming).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import signal
import socket
import threading
import time
import uuid
from importlib import resources
from pathlib import Path
from typing import Any, AsyncIterator, Literal, Union

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from gpt import chat
from gpt.chat import ChatTemplate
from gpt.checkpoint import Checkpoint
from gpt.data.tokenizer import Tokenizer
from gpt.errors import GptError
from gpt.inference.engine import Engine, QueueFull, Sequence, Token
from gpt.inference.sample import CHAT_STOP, GrowingText, Streamer, prompt_ids, reply_prompt, transcript
from gpt.model import GPT

log = logging.getLogger("gpt.serve")

MAX_BODY_BYTES = 1 << 20  # a request body over this is refused with 413
MAX_LOGPROBS = 5
MAX_STOPS = 4
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


# ----------------------------------------------------------------------------- requests

class Strict(BaseModel):
    """Unknown fields are refused (400 naming them), and no value is coerced to another type."""
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(Strict):
    include_usage: bool = False


class Sampling(Strict):
    """The fields /v1/completions and /v1/chat/completions share."""
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)
    stop: Union[str, list[str], None] = None
    n: int = Field(1, ge=1)
    seed: int | None = Field(None, ge=0, lt=2**64)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted, as OpenAI's clients send it; not used
    presence_penalty: float = Field(0.0, ge=0, le=0, description="not supported: only 0")
    frequency_penalty: float = Field(0.0, ge=0, le=0, description="not supported: only 0")

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOPS or not all(stops):
            raise ApiError(400, f"stop takes up to {MAX_STOPS} non-empty strings", "stop")
        return stops


class CompletionRequest(Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart]]
    name: str | None = None

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


def conversation_prompt(template: ChatTemplate | None, tokenizer: Tokenizer, messages: list[Message], room: int
                        ) -> tuple[list[int], list[str], int]:
    """The ids (at most `room`) that prompt a reply to a conversation, the stops that end the
    reply, and how many tokens of the conversation were left out to fit: `gpt chat`'s way
    (`reply_prompt`). A chat model renders the messages with its chat template (its reply ends
    at `<|end|>`) and drops whole turns, oldest first; a base model gets the plain-text
    transcript ("System: ...", "User: ...", "Assistant:"), cropped from the start, and its
    reply ends where it starts the user's next line."""
    said = [chat.Message("system" if m.role == "developer" else m.role, m.text) for m in messages]
    ids, dropped = reply_prompt(tokenizer, said, room, template)
    stops = [] if template else [CHAT_STOP]
    if not dropped:
        return ids, stops, 0
    whole = template.render(tokenizer, said, reply=True)[0] if template else prompt_ids(tokenizer, transcript(said))
    return ids, stops, len(whole) - len(ids)


# ----------------------------------------------------------------------------- errors

class ApiError(Exception):
    """An answer in OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def validation_error(exc: ValidationError) -> ApiError:
    """The first problem pydantic found, as a 400 naming the field (`messages[0].content`; the
    member of a union that pydantic adds to the path, such as `str`, is left out)."""
    error = exc.errors()[0]
    fields = {name for schema in (CompletionRequest, ChatRequest, Message, TextPart, StreamOptions)
              for name in schema.model_fields}
    extra = error["type"] == "extra_forbidden"  # the last part is the unknown field's name
    param = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for i, part in enumerate(error["loc"])
                    if isinstance(part, int) or part in fields or (extra and i == len(error["loc"]) - 1)).lstrip(".")
    if error["type"] == "extra_forbidden":
        return ApiError(400, f"Unrecognized request argument supplied: {param}", param)
    if error["type"] == "missing":
        return ApiError(400, f"Missing required parameter: '{param}'", param)
    if not param:
        return ApiError(400, f"the request body must be a JSON object ({error['msg']})")
    return ApiError(400, f"Invalid value for '{param}': {error['msg']}", param)


async def read_json(request: Request, schema: type[Strict]) -> Any:
    """The request's body as `schema`, read up to MAX_BODY_BYTES (413 past that)."""
    declared = request.headers.get("content-length", "")
    too_big = ApiError(413, f"the request body is over {MAX_BODY_BYTES:,} bytes", code="request_too_large")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_big
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise too_big
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON ({exc})") from None
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None


def one_line(exc: BaseException) -> str:
    """An exception as one line for the log: its type and the first line of its message."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


class OneLineErrors:
    """ASGI middleware: a fault in the server answers 500 in OpenAI's shape (when the response
    has not started) and logs one line, not a traceback; the server goes on."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        started = False

        async def watched_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched_send)
        except Exception as exc:
            log.error("500 on %s %s: %s", scope.get("method"), scope.get("path"), one_line(exc))
            if scope["type"] == "http" and not started:
                error = ApiError(500, "the server failed on this request (its log names the fault)",
                                 kind="server_error")
                await error.response()(scope, receive, send)


# ----------------------------------------------------------------------------- choices

class Outbox:
    """Events from the engine's thread to the requests' coroutines, handed over once per engine
    step: one wake-up of the event loop per step, not one per token and request (each wake-up
    makes the two threads trade the interpreter lock)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.pending: list[tuple[asyncio.Queue, tuple]] = []  # touched only on the engine's thread

    def post(self, queue: asyncio.Queue, event: tuple) -> None:
        self.pending.append((queue, event))

    def flush(self) -> None:
        """The engine's `after_step`."""
        if self.pending:
            batch, self.pending = self.pending, []
            self.loop.call_soon_threadsafe(self._deliver, batch)

    @staticmethod
    def _deliver(batch: list[tuple[asyncio.Queue, tuple]]) -> None:
        for queue, event in batch:
            queue.put_nowait(event)


class Job:
    """One request: its choices, and the queue their events reach its coroutine through."""

    def __init__(self, outbox: Outbox):
        self.outbox = outbox
        self.events: asyncio.Queue = asyncio.Queue()
        self.choices: list[Choice] = []
        self.prompt_tokens = 0  # of the prompts as run (cropped), each counted once whatever n

    def post(self, *event: Any) -> None:
        """From the engine's thread: an event for the request's coroutine (at the step's end)."""
        self.outbox.post(self.events, event)

    def sequences(self) -> list[Sequence]:
        return [choice.sequence for choice in self.choices]


class Choice:
    """One sequence of a request and its text. Events posted: ("text", index, piece, tokens)
    with the tokens whose text the piece completes, and ("end", index, reason). `settings`
    are the Sequence's sampling fields."""

    def __init__(self, job: Job, index: int, tokenizer: Tokenizer, stops: list[str], end_token: int | None,
                 prompt: list[int], max_tokens: int, **settings: Any):
        self.job, self.index = job, index
        self.text = GrowingText(tokenizer, stops, end_token=end_token)
        self.streamer = Streamer(self._show, stops)
        self.scored: list[Token] = []  # parallel to text.tokens
        self.shown_tokens = 0
        self.finish_reason: str | None = None
        self.sequence = Sequence(prompt, max_tokens, self.on_token, self.on_end, **settings)
        job.choices.append(self)

    def on_token(self, token: Token) -> bool:
        before = len(self.text.tokens)
        self.text.add(token.id)
        if len(self.text.tokens) > before:
            self.scored.append(token)
        self.streamer.update(self.text.text)
        return self.text.done

    def on_end(self, reason: str) -> None:
        if reason in ("stop", "length"):
            self.text.finish()
            self.streamer.finish(self.text.text)
            reason = "stop" if self.text.stop_reason in ("eot", "end", "stop") else "length"
        self.job.post("end", self.index, reason)

    def _show(self, piece: str) -> None:
        """Post `piece` with the tokens whose text now lies wholly in what was shown."""
        shown = self.streamer.shown + len(piece)
        first = self.shown_tokens
        while self.shown_tokens < len(self.text.ends) and self.text.ends[self.shown_tokens] <= shown:
            self.shown_tokens += 1
        self.job.post("text", self.index, piece, self.scored[first:self.shown_tokens])


# ----------------------------------------------------------------------------- the app

class Server:
    """What the endpoints share: the model, its tokenizer, the engine and the settings."""

    def __init__(self, model: GPT, checkpoint: Checkpoint, model_id: str, api_key: str | None,
                 max_batch: int, max_queue: int):
        self.checkpoint, self.model_id, self.api_key = checkpoint, model_id, api_key
        self.tokenizer = checkpoint.tokenizer
        self.context = model.config.block_size
        self.created = int(checkpoint.path.stat().st_mtime)
        self.template = ChatTemplate.of(checkpoint.config)  # a chat model's; None for a base model
        # A chat model may draw its text vocabulary and <|end|>; any other model its tokenizer's ids.
        drawable = self.tokenizer.vocab_size if self.template is None else self.template.end + 1
        self.outbox: Outbox | None = None  # made on the event loop, when the app starts
        self.engine = Engine(model, drawable, max_batch, max_queue, after_step=self.flush)
        self.thread: threading.Thread | None = None

    def flush(self) -> None:
        if self.outbox is not None:
            self.outbox.flush()

    def authorize(self, request: Request) -> None:
        """Every /v1 request needs the key when the server has one (compared in constant time)."""
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if not (scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())):
            raise ApiError(401, "Incorrect API key provided: send the header Authorization: Bearer KEY",
                           code="invalid_api_key")

    def check_model(self, name: str) -> None:
        if name != self.model_id:
            raise ApiError(404, f"The model '{name}' does not exist; this server serves '{self.model_id}'",
                           "model", "model_not_found")

    def encode(self, text: str, param: str) -> list[int]:
        try:
            return prompt_ids(self.tokenizer, text)
        except GptError as exc:
            raise ApiError(400, f"{param}: {exc}", param) from None

    def room(self, max_tokens: int) -> int:
        """How many prompt tokens fit in the context beside max_tokens new ones."""
        if max_tokens >= self.context:
            raise ApiError(400, f"max_tokens must be below the model's context of {self.context} tokens",
                           "max_tokens")
        return self.context - max_tokens

    def fit(self, ids: list[int], max_tokens: int) -> tuple[list[int], int]:
        """The prompt cropped from the left to leave room for max_tokens; and how many tokens went."""
        keep = self.room(max_tokens)
        return ids[-keep:], max(0, len(ids) - keep)

    def completion_prompts(self, body: CompletionRequest) -> list[list[int]]:
        prompt = body.prompt
        if isinstance(prompt, str):
            return [self.encode(prompt, "prompt")]
        if not prompt:
            raise ApiError(400, "prompt must not be an empty list", "prompt")
        if isinstance(prompt[0], str):
            return [self.encode(text, f"prompt[{i}]") for i, text in enumerate(prompt)]
        lists = [prompt] if isinstance(prompt[0], int) else prompt
        for i, ids in enumerate(lists):
            if not ids or not all(0 <= t < self.tokenizer.vocab_size for t in ids):
                raise ApiError(400, f"prompt[{i}]: token ids must be a non-empty list of ids in "
                                    f"[0, {self.tokenizer.vocab_size})", "prompt")
        return [list(ids) for ids in lists]

    def start(self, job: Job, prompts: list[list[int]], body: Sampling, max_tokens: int, stops: list[str],
              logprobs: int | None, prompt_logprobs: bool = False, cropped: int = 0) -> int:
        """Queue `n` sequences per prompt; returns the tokens cropped from the prompts (with
        `cropped`, those already left out)."""
        for p, ids in enumerate(prompts):
            ids, lost = self.fit(ids, max_tokens)
            cropped += lost
            job.prompt_tokens += len(ids)
            for j in range(body.n):  # choice j draws from seed + j: choice 0 is what n=1 gives
                Choice(job, p * body.n + j, self.tokenizer, stops, self.template.end if self.template else None, ids,
                       max_tokens, temperature=body.temperature, top_k=body.top_k, top_p=body.top_p,
                       seed=None if body.seed is None else (body.seed + j) % 2**64, logprobs=logprobs,
                       prompt_logprobs=prompt_logprobs)
        if len(job.choices) > self.engine.max_queue:
            raise ApiError(400, f"n x prompts asks for {len(job.choices)} sequences; this server queues at most "
                                f"{self.engine.max_queue}", "n")
        try:
            self.engine.submit(job.sequences())
        except QueueFull as exc:
            if self.engine.stopping:
                raise ApiError(503, "the server is shutting down", kind="server_error") from None
            raise ApiError(429, f"the server is busy ({exc}); retry shortly", code="queue_full",
                           kind="rate_limit_error", headers={"Retry-After": "1"}) from None
        return cropped


async def collect(server: Server, job: Job, request: Request) -> None:
    """Wait for every choice to end; a client that goes away cancels its sequences."""
    pending = len(job.choices)
    try:
        while pending:
            try:
                kind, index, *rest = await asyncio.wait_for(job.events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return
                continue
            if kind == "end":
                job.choices[index].finish_reason = rest[0]
                pending -= 1
        raise_for_ends(job)
    finally:
        server.engine.cancel(job.sequences())


def raise_for_ends(job: Job) -> None:
    """A choice that ended in a fault or at shutdown turns the whole request into an error."""
    reasons = {choice.finish_reason for choice in job.choices}
    if "error" in reasons:
        error = next(c.sequence.error for c in job.choices if c.sequence.error is not None)
        raise RuntimeError(f"decoding failed: {one_line(error)}")
    if "cancelled" in reasons:
        raise ApiError(503, "the server is shutting down; the request was cut", kind="server_error")


def completion_logprobs(tokenizer: Tokenizer, tokens: list[Token], offset: int) -> dict:
    """The legacy completions format: token texts, their logprobs, the top alternatives (the
    chosen token always among them) and each token's offset in the text."""
    texts, offsets, top = [], [], []
    for token in tokens:
        texts.append(tokenizer.decode([token.id]))
        offsets.append(offset)
        offset += len(texts[-1])
        alternatives = {tokenizer.decode([i]): lp for i, lp in token.top}
        alternatives.setdefault(texts[-1], token.logprob)
        top.append(alternatives if token.logprob is not None else None)  # the first prompt token has none
    return {"tokens": texts, "token_logprobs": [t.logprob for t in tokens], "top_logprobs": top,
            "text_offset": offsets}


def chat_logprobs(tokenizer: Tokenizer, tokens: list[Token]) -> dict:
    """The chat format: {"content": [{token, logprob, bytes, top_logprobs: [...]}]}."""

    def entry(token_id: int, logprob: float) -> dict:
        return {"token": tokenizer.decode([token_id]), "logprob": logprob,
                "bytes": list(tokenizer.decode_bytes([token_id]))}

    return {"content": [{**entry(t.id, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top]}
                        for t in tokens]}


def create_app(model: GPT, checkpoint: Checkpoint, model_id: str, api_key: str | None = None,
               max_batch: int = 8, max_queue: int = 64) -> FastAPI:
    """The FastAPI app; its lifespan runs the engine's thread."""
    server = Server(model, checkpoint, model_id, api_key, max_batch, max_queue)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server.outbox = Outbox(asyncio.get_running_loop())
        server.thread = threading.Thread(target=server.engine.run, name="gpt-engine", daemon=True)
        server.thread.start()
        yield
        server.engine.stop()
        await asyncio.to_thread(server.thread.join, 30)

    app = FastAPI(title="gpt serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    app.add_middleware(OneLineErrors)
    app.add_exception_handler(ApiError, lambda request, exc: exc.response())
    app.add_exception_handler(StarletteHTTPException, lambda request, exc: ApiError(
        exc.status_code, f"{request.method} {request.url.path}: {exc.detail}").response())

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(resources.files("gpt.inference").joinpath("chat.html").read_text(encoding="utf-8"))

    @app.get("/health")
    async def health() -> JSONResponse:
        alive = server.thread is not None and server.thread.is_alive()
        return JSONResponse({"status": "ok" if alive else "stopped", "running": len(server.engine.running),
                             "waiting": len(server.engine.waiting)}, status_code=200 if alive else 503)

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        server.authorize(request)
        return {"object": "list", "data": [model_card(server)]}

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str, request: Request) -> dict:
        server.authorize(request)
        server.check_model(name)
        return model_card(server)

    async def parsed(request: Request, schema: type[Sampling]) -> Any:
        server.authorize(request)
        body = await read_json(request, schema)
        server.check_model(body.model)
        return body

    async def answer(request: Request, body: Sampling, prompts: list[list[int]], max_tokens: int,
                     stops: list[str], logprobs: int | None, chat: bool, prompt_logprobs: bool = False,
                     cropped: int = 0):
        job = Job(server.outbox)
        cropped = server.start(job, prompts, body, max_tokens, stops, logprobs, prompt_logprobs, cropped)
        reply = Reply(server, job, "chatcmpl" if chat else "cmpl", cropped)
        if body.stream:
            return EventSourceResponse(reply.chunks(body, chat), sep="\n")
        await collect(server, job, request)
        return reply.chat(body) if chat else reply.completion(body)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body: CompletionRequest = await parsed(request, CompletionRequest)
        stops = body.stops()
        return await answer(request, body, server.completion_prompts(body), body.max_tokens or COMPLETION_MAX_TOKENS,
                            stops, body.logprobs, chat=False, prompt_logprobs=body.echo and body.logprobs is not None)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body: ChatRequest = await parsed(request, ChatRequest)
        stops = body.stops()
        if body.max_tokens is not None and body.max_completion_tokens is not None:
            raise ApiError(400, "give max_tokens or max_completion_tokens, not both", "max_completion_tokens")
        if body.top_logprobs is not None and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        max_tokens = body.max_tokens or body.max_completion_tokens or server.context // 2
        try:
            ids, template_stops, cropped = conversation_prompt(server.template, server.tokenizer, body.messages,
                                                               server.room(max_tokens))
        except GptError as exc:
            raise ApiError(400, f"messages: {exc}", "messages") from None
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        return await answer(request, body, [ids], max_tokens, [*stops, *template_stops], logprobs, chat=True,
                            cropped=cropped)

    return app


def model_card(server: Server) -> dict:
    return {"id": server.model_id, "object": "model", "created": server.created, "owned_by": "gpt",
            "max_model_len": server.context}


class Reply:
    """A request's answer in OpenAI's shapes: whole, or as a stream of chunks."""

    def __init__(self, server: Server, job: Job, prefix: str, cropped: int):
        self.server, self.job, self.cropped = server, job, cropped
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def head(self, kind: str) -> dict:
        head = {"id": self.id, "object": kind, "created": self.created, "model": self.server.model_id}
        if self.cropped:
            head["truncated_prompt_tokens"] = self.cropped
        return head

    def usage(self) -> dict:
        completion = sum(len(choice.text.tokens) for choice in self.job.choices)
        return {"prompt_tokens": self.job.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.job.prompt_tokens + completion}

    def echoed(self, choice: Choice) -> str:
        return self.server.tokenizer.decode(choice.sequence.prompt)

    def completion(self, body: CompletionRequest) -> dict:
        choices = []
        for choice in self.job.choices:
            prefix = self.echoed(choice) if body.echo else ""
            logprobs = None
            if body.logprobs is not None:
                tokens = choice.scored[:choice.shown_tokens]
                if body.echo:
                    tokens = [Token(choice.sequence.prompt[0]), *choice.sequence.prompt_tokens, *tokens]
                logprobs = completion_logprobs(self.server.tokenizer, tokens, 0)
            choices.append({"text": prefix + choice.text.text, "index": choice.index, "logprobs": logprobs,
                            "finish_reason": choice.finish_reason})
        return {**self.head("text_completion"), "choices": choices, "usage": self.usage()}

    def chat(self, body: ChatRequest) -> dict:
        choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text.text},
                    "logprobs": chat_logprobs(self.server.tokenizer, c.scored[:c.shown_tokens]) if body.logprobs
                    else None, "finish_reason": c.finish_reason} for c in self.job.choices]
        return {**self.head("chat.completion"), "choices": choices, "usage": self.usage()}

    async def next_events(self) -> tuple[dict[int, tuple[str, list[Token]]], dict[int, str]]:
        """The events posted since the last call (waiting for one): each choice's new text in
        one piece, with its tokens, and the choices that ended. A stream that falls behind the
        engine (a busy server, a slow client) so sends fewer, larger chunks."""
        events = [await self.job.events.get()]
        while not self.job.events.empty():
            events.append(self.job.events.get_nowait())
        texts: dict[int, tuple[str, list[Token]]] = {}
        ends: dict[int, str] = {}
        for kind, index, *rest in events:
            if kind == "text":
                text, tokens = texts.get(index, ("", []))
                texts[index] = (text + rest[0], tokens + rest[1])
            else:
                ends[index] = rest[0]
        return texts, ends

    async def chunks(self, body: Sampling, chat: bool) -> AsyncIterator[str]:
        """SSE data lines: the chunks as the text grows, an end chunk per choice, the usage
        (stream_options.include_usage), then [DONE]. A client that goes away stops this
        generator, and the finally frees its rows at the engine's next step."""
        kind = "chat.completion.chunk" if chat else "text_completion"
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        extra = {"usage": None} if include_usage else {}
        first = True
        tokenizer = self.server.tokenizer

        def chunk(index: int, text: str | None, tokens: list[Token] | None, finish: str | None) -> str:
            nonlocal first
            head = self.head(kind) if first else {k: v for k, v in self.head(kind).items()
                                                  if k != "truncated_prompt_tokens"}
            first = False
            if chat:
                delta = {} if text is None else {"content": text}
                logprobs = chat_logprobs(tokenizer, tokens) if tokens is not None and body.logprobs else None
                choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            else:
                logprobs = None
                if tokens is not None and body.logprobs is not None:
                    logprobs = completion_logprobs(tokenizer, tokens, offsets[index])
                    offsets[index] += len(text or "")
                choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
            return json.dumps({**head, "choices": [choice], **extra}, ensure_ascii=False)

        offsets = [0] * len(self.job.choices)
        try:
            for choice in self.job.choices:
                if chat:
                    yield json.dumps({**self.head(kind), "choices": [{"index": choice.index, "delta": {
                        "role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}], **extra})
                    first = False
                elif body.echo:
                    prompt = self.echoed(choice)
                    tokens = None
                    if body.logprobs is not None:
                        tokens = [Token(choice.sequence.prompt[0]), *choice.sequence.prompt_tokens]
                    yield chunk(choice.index, prompt, tokens, None)
            pending = len(self.job.choices)
            while pending:
                texts, ends = await self.next_events()
                for index, (text, tokens) in texts.items():
                    yield chunk(index, text, tokens, None)
                for index, reason in ends.items():
                    self.job.choices[index].finish_reason = reason
                    pending -= 1
                    if reason == "error":
                        log.error("500 on a stream: decoding failed: %s",
                                  one_line(self.job.choices[index].sequence.error))
                        yield json.dumps(ApiError(500, "the server failed while decoding", kind="server_error").body())
                        return
                    if reason == "cancelled":
                        yield json.dumps(ApiError(503, "the server is shutting down; the request was cut",
                                                  kind="server_error").body())
                        return
                    yield chunk(index, None, None, reason)
            if include_usage:
                yield json.dumps({**self.head(kind), "choices": [], "usage": self.usage()})
            yield "[DONE]"
        finally:
            self.server.engine.cancel(self.job.sequences())


# ----------------------------------------------------------------------------- running it

class StoppableServer(uvicorn.Server):
    """uvicorn's server, where SIGINT and SIGTERM are the normal way to stop: the engine cuts
    what is in flight at once (streams end with an error event, waiting requests get 503), and
    the process exits 0 (uvicorn would raise the signal again after shutting down)."""

    def __init__(self, config: uvicorn.Config, engine: Engine):
        super().__init__(config)
        self.engine = engine

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: Any) -> None:
        super().handle_exit(sig, frame)
        self.engine.stop()


def serve(run: str, host: str, port: int, api_key: str | None, device: str, max_batch: int, max_queue: int) -> None:
    """Load the run's latest checkpoint and answer HTTP requests until SIGINT or SIGTERM."""
    from gpt.checkpoint import load_model, read_checkpoint
    from gpt.device import pick_device
    from gpt.inference.sample import ready_for_decoding

    if max_batch < 1 or max_queue < 1:
        raise GptError("--max-batch and --max-queue must be at least 1")
    if not 0 < port < 65536:
        raise GptError(f"--port must be in 1..65535, got {port}")
    checkpoint = read_checkpoint(run)
    try:  # uvicorn would log a bind failure in its own words and exit 1
        socket.create_server((host, port)).close()
    except OSError as exc:
        raise GptError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); "
                       "pick another --port or --host") from None
    model = ready_for_decoding(load_model(checkpoint, pick_device(device)))
    model_id = Path(run).resolve().name
    app = create_app(model, checkpoint, model_id, api_key or None,
                     max_batch, max_queue)
    config = uvicorn.Config(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=10)
    server = StoppableServer(config, app.state.server.engine)
    print(f"gpt serve: model '{model_id}' ({checkpoint.path}) on http://{host}:{port}/ "
          f"(max batch {max_batch}, queue {max_queue}{', API key required' if app.state.server.api_key else ''})",
          flush=True)
    server.run()
