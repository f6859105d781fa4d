"""`gpt serve`: a checkpoint behind OpenAI's HTTP API (the subset local servers agree on), with
a chat page at `/`. FastAPI and uvicorn answer requests on the event loop; the `Engine` decodes
on a thread of its own, every running request in one batch.

Here: the app, its routes and the `Server` they share, and running it. A request's body is read
and checked by `gpt.inference.api` (OpenAI's request shapes and errors); it becomes one `Choice`
per prompt and `n`, and its answer is shaped, whole or streamed, by `gpt.inference.replies`.

A prompt longer than the context allows (it needs room for `max_tokens`) keeps its end, as
`gpt sample` and `gpt chat` crop it; the response says how many tokens were cropped in a
top-level `truncated_prompt_tokens` (on the first chunk when streaming).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import signal
import socket
import threading
from importlib import resources
from pathlib import Path
from typing import Any, AsyncIterator

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from gpt import chat
from gpt.chat import ChatTemplate
from gpt.checkpoint import Checkpoint
from gpt.data.tokenizer import Tokenizer
from gpt.errors import GptError
from gpt.inference.api import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    Message,
    OneLineErrors,
    Sampling,
    one_line,
    read_json,
)
from gpt.inference.engine import Engine, QueueFull
from gpt.inference.replies import Choice, Job, Outbox, Reply
from gpt.inference.sample import CHAT_STOP, prompt_ids, reply_prompt, transcript
from gpt.model import GPT

COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


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


# ----------------------------------------------------------------------------- the app

class Server:
    """What the endpoints share: the model, its tokenizer, the engine and the settings."""

    def __init__(self, model: GPT, checkpoint: Checkpoint, model_id: str, api_key: str | None,
                 max_batch: int, max_queue: int, threads: int | None = None):
        self.checkpoint, self.model_id, self.api_key = checkpoint, model_id, api_key
        self.tokenizer = checkpoint.tokenizer
        self.context = model.config.block_size
        self.created = int(checkpoint.path.stat().st_mtime)
        self.template = ChatTemplate.of(checkpoint.config)  # a chat model's; None for a base model
        # A chat model may draw its text vocabulary and <|end|>; any other model its tokenizer's ids.
        drawable = self.tokenizer.vocab_size if self.template is None else self.template.end + 1
        self.outbox: Outbox | None = None  # made on the event loop, when the app starts
        self.engine = Engine(model, drawable, max_batch, max_queue, after_step=self.flush, threads=threads)
        self.thread: threading.Thread | None = None

    def flush(self, urgent: bool) -> None:
        if self.outbox is not None:
            self.outbox.flush(urgent)

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


def create_app(model: GPT, checkpoint: Checkpoint, model_id: str, api_key: str | None = None,
               max_batch: int = 8, max_queue: int = 64, threads: int | None = None) -> FastAPI:
    """The FastAPI app; its lifespan runs the engine's thread (with `threads` torch threads)."""
    server = Server(model, checkpoint, model_id, api_key, max_batch, max_queue, threads)

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
    _add_info_routes(app, server)
    _add_completion_routes(app, server)
    return app


def _add_info_routes(app: FastAPI, server: Server) -> None:
    """The chat page, the health check and the model list."""

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


def _add_completion_routes(app: FastAPI, server: Server) -> None:
    """/v1/completions and /v1/chat/completions: the body read and checked, `n` sequences queued
    per prompt, the answer returned whole or streamed."""

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


def model_card(server: Server) -> dict:
    return {"id": server.model_id, "object": "model", "created": server.created, "owned_by": "gpt",
            "max_model_len": server.context}


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


def cores_to_the_engine() -> int:
    """Keep this thread to one torch thread and return how many the engine's thread should have
    (torch's default: the cores). Call it before this thread runs any torch work. torch's OpenMP
    workers belong to the thread that first runs parallel work; if the main thread had its own,
    they would contend for the cores with the engine's long after it stopped using them (GPT-2
    124M, 2 cores: decoding on a second thread ran 44 tokens/s against 62, and at 62 again when the
    main thread had never had workers; BENCHMARKS.md, issue 27)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    return threads


def serve(run: str, host: str, port: int, api_key: str | None, device: str, max_batch: int, max_queue: int,
          weights: str | None = None) -> None:
    """Load the run's latest checkpoint, its weights stored as `weights` (`load_for_reading`),
    and answer HTTP requests until SIGINT or SIGTERM."""
    from gpt.checkpoint import read_checkpoint
    from gpt.device import pick_device
    from gpt.inference.weights import load_for_reading

    if max_batch < 1 or max_queue < 1:
        raise GptError("--max-batch and --max-queue must be at least 1")
    if not 0 < port < 65536:
        raise GptError(f"--port must be in 1..65535, got {port}")
    threads = cores_to_the_engine()
    checkpoint = read_checkpoint(run)
    try:  # uvicorn would log a bind failure in its own words and exit 1
        socket.create_server((host, port)).close()
    except OSError as exc:
        raise GptError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); "
                       "pick another --port or --host") from None
    model, described = load_for_reading(checkpoint, pick_device(device), weights, batched=max_batch > 1)
    model_id = Path(run).resolve().name
    app = create_app(model, checkpoint, model_id, api_key or None, max_batch, max_queue, threads)
    config = uvicorn.Config(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=10)
    server = StoppableServer(config, app.state.server.engine)
    print(f"gpt serve: model '{model_id}' ({checkpoint.path}) on http://{host}:{port}/ "
          f"(max batch {max_batch}, queue {max_queue}{', API key required' if app.state.server.api_key else ''}; "
          f"{described})", flush=True)
    server.run()
