"""OpenAI's HTTP API as `gpt serve` reads it: the request bodies (pydantic models that refuse
unknown fields and coerce nothing), errors in OpenAI's shape, and the middleware that turns a
fault in the server into one such error and one log line.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Literal, Union

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

log = logging.getLogger("gpt.serve")

MAX_BODY_BYTES = 1 << 20  # a request body over this is refused with 413
MAX_LOGPROBS = 5
MAX_STOPS = 4


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
