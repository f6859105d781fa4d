"""A request's answer in `gpt serve`: its choices, fed token by token on the engine's thread, and
the answer in OpenAI's shapes, whole or as a stream of server-sent-event chunks.

Each request becomes one `Choice` per prompt and `n`: its tokens arrive on the engine's thread,
which grows the text (stop strings, whole characters: `GrowingText`, `Streamer`, as `gpt sample`)
and posts what can be shown to the request's coroutine through the `Outbox`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import TYPE_CHECKING, Any, AsyncIterator

from gpt.data.tokenizer import Tokenizer
from gpt.inference.api import ApiError, ChatRequest, CompletionRequest, Sampling, one_line
from gpt.inference.engine import Sequence, Token
from gpt.inference.sample import GrowingText, Streamer

if TYPE_CHECKING:
    from gpt.inference.serve import Server

log = logging.getLogger("gpt.serve")


# ----------------------------------------------------------------------------- choices

class Outbox:
    """Events from the engine's thread to the requests' coroutines, handed over at most once per
    engine step, and between steps at most every `interval` seconds unless urgent: each
    hand-over wakes the event loop and makes the two threads trade the interpreter lock, and
    each woken stream sends an HTTP chunk. A small model steps in about a millisecond, so its
    streams would otherwise send one chunk per token (BENCHMARKS.md: +7% for one client of the
    CPU config on an idle host), while a reader cannot tell 50 updates a second from a thousand.
    A large model's steps are longer than the interval, so each of its tokens still goes out at
    once."""

    interval = 0.02

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.pending: list[tuple[asyncio.Queue, tuple]] = []  # touched only on the engine's thread
        self.sent = 0.0  # time.monotonic() of the last hand-over

    def post(self, queue: asyncio.Queue, event: tuple) -> None:
        self.pending.append((queue, event))

    def flush(self, urgent: bool = True) -> None:
        """The engine's `after_step`. Urgent: first tokens (time to first token), and whatever
        is pending when the batch runs empty (no later step would send it)."""
        now = time.monotonic()
        if self.pending and (urgent or now - self.sent >= self.interval):
            batch, self.pending = self.pending, []
            self.sent = now
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


# ----------------------------------------------------------------------------- replies

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

    def stream_error(self, index: int, reason: str) -> str | None:
        """The error event that ends a stream when a choice ended in a fault or at shutdown (what
        `raise_for_ends` does to a whole answer); None when it ended as it should."""
        if reason == "error":
            log.error("500 on a stream: decoding failed: %s", one_line(self.job.choices[index].sequence.error))
            return json.dumps(ApiError(500, "the server failed while decoding", kind="server_error").body())
        if reason == "cancelled":
            return json.dumps(ApiError(503, "the server is shutting down; the request was cut",
                                       kind="server_error").body())
        return None

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
                    error = self.stream_error(index, reason)
                    if error is not None:
                        yield error
                        return
                    yield chunk(index, None, None, reason)
            if include_usage:
                yield json.dumps({**self.head(kind), "choices": [], "usage": self.usage()})
            yield "[DONE]"
        finally:
            self.server.engine.cancel(self.job.sequences())
