"""`gpt serve` as its users meet it: OpenAI's own client against a live server on 127.0.0.1
(a free port, a thread of this process), bad requests, load, disconnects, faults, shutdown,
the chat page in a real browser, and the command itself."""

import asyncio
import json
import logging
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn
from conftest import REPO, tiny_config
from sse_starlette.sse import AppStatus

from gpt.chat import ChatTemplate, Message
from gpt.checkpoint import load_model, read_checkpoint
from gpt.config import SampleConfig, build_config
from gpt.data.tokenizer import ByteTokenizer
from gpt.inference.engine import Token
from gpt.inference.replies import Choice, Job, Outbox
from gpt.inference.sample import CHAT_STOP, generate, reply, transcript
from gpt.inference.serve import StoppableServer, create_app
from gpt.training.loop import train

CONTEXT = 64


@pytest.fixture(scope="module")
def run(char_data, tmp_path_factory) -> Path:
    """A char model trained a little (its next-token choices are far from ties), context 64."""
    out = tmp_path_factory.mktemp("serve") / "tiny"
    config = tiny_config(char_data, out, max_iters=40, eval_interval=40, ckpt_interval=40)
    config.model.block_size = CONTEXT
    config.model.dropout = 0.0
    train(config)
    return out


@pytest.fixture(scope="module")
def model(run):
    return load_model(read_checkpoint(run)).eval()


class LiveServer:
    """The app on 127.0.0.1 at a free port, served by uvicorn on a thread; closed with `close`."""

    def __init__(self, app):
        self.app = app
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", timeout_graceful_shutdown=5)
        self.server = StoppableServer(config, app.state.server.engine)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}"

    def client(self, key: str = "unused") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=10).json()

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        assert not self.thread.is_alive()


def slowed(model, seconds: float):
    """The model, each forward pass `seconds` longer: time for a test to act while a request runs."""
    real = model.hidden_states

    def hidden_states(*args):
        time.sleep(seconds)
        return real(*args)

    model.hidden_states = hidden_states
    return model


@pytest.fixture(scope="module")
def live(run, model):
    server = LiveServer(create_app(model, read_checkpoint(run), "tiny", max_batch=4, max_queue=64))
    yield server
    server.close()


@pytest.fixture
def slow_server(run):
    """A server whose forward passes take 30 ms, one request in the batch and one waiting."""
    servers = []

    def start(**options):
        settings = {"max_batch": 1, "max_queue": 1, **options}
        servers.append(LiveServer(create_app(slowed(load_model(read_checkpoint(run)), 0.03),
                                             read_checkpoint(run), "tiny", **settings)))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def reference(model, run, prompt: str, max_tokens: int, temperature: float = 0.0, seed: int | None = None,
              stop: list[str] = (), top_k: int | None = None, top_p: float = 1.0) -> str:
    """What `gpt sample` writes for the same prompt and settings."""
    settings = SampleConfig(max_new_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            seed=seed, stop=list(stop))
    return generate(model, read_checkpoint(run).tokenizer, prompt, settings)[0].text


def test_models_health_and_an_offline_page(live):
    assert live.client().models.list().data[0].id == "tiny"
    card = httpx.get(live.url + "/v1/models/tiny", timeout=10).json()
    assert card["max_model_len"] == CONTEXT
    assert live.health() == {"status": "ok", "running": 0, "waiting": 0}
    page = httpx.get(live.url + "/", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<textarea" in page.text and "/v1/chat/completions" in page.text
    assert 'src="http' not in page.text and 'href="http' not in page.text  # nothing from a CDN


@pytest.mark.parametrize("settings", [dict(temperature=0.0), dict(temperature=0.9, seed=7, top_k=10),
                                      dict(temperature=1.2, seed=3, top_p=0.8)])
def test_completions_are_what_gpt_sample_gives(live, model, run, settings):
    for prompt in ["ROMEO:", "First Citizen:\nWe are"]:
        openai_fields = {k: v for k, v in settings.items() if k != "top_k"}  # top_k is an extension
        reply = live.client().completions.create(model="tiny", prompt=prompt, max_tokens=24, **openai_fields,
                                                 extra_body={"top_k": settings.get("top_k")})
        choice = reply.choices[0]
        assert choice.text == reference(model, run, prompt, 24, **settings)
        assert choice.finish_reason == "length"
        assert reply.usage.prompt_tokens == len(prompt) and reply.usage.completion_tokens == 24


def test_chat_renders_the_transcript_gpt_chat_uses(live, model, run):
    messages = [{"role": "system", "content": "Be."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Yo"}, {"role": "user", "content": "Go"}]
    reply = live.client().chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    prompt = transcript([Message("system", "Be."), Message("user", "Hi"), Message("assistant", "Yo"),
                         Message("user", "Go")])
    assert len(prompt) + 10 <= CONTEXT  # no crop: the same context as gpt sample's
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == reference(model, run, prompt, 10, stop=[CHAT_STOP])
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")


def test_streams_join_to_the_whole_reply_and_end_with_usage(live):
    client = live.client()
    whole = client.completions.create(model="tiny", prompt="KING:", max_tokens=30, temperature=0.8, seed=5)
    pieces = list(client.completions.create(model="tiny", prompt="KING:", max_tokens=30, temperature=0.8, seed=5,
                                            stream=True))
    assert "".join(p.choices[0].text for p in pieces) == whole.choices[0].text
    assert pieces[-1].choices[0].finish_reason == "length"
    messages = [{"role": "user", "content": "Speak."}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=30, seed=9)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=30, seed=9,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def posted(job: Job) -> list[tuple]:
    """The events a job's choices posted from the engine's thread, in order."""
    job.outbox.flush()
    job.outbox.loop.run_until_complete(asyncio.sleep(0))
    events = []
    while not job.events.empty():
        events.append(job.events.get_nowait())
    return events


def test_the_outbox_hands_over_at_most_every_interval_unless_urgent(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr("gpt.inference.replies.time.monotonic", lambda: clock[0])
    loop = asyncio.new_event_loop()
    try:
        outbox, queue = Outbox(loop), asyncio.Queue()

        def delivered() -> list[tuple]:
            loop.run_until_complete(asyncio.sleep(0))
            return [queue.get_nowait() for _ in range(queue.qsize())]

        outbox.post(queue, ("text", 0))
        outbox.flush(urgent=True)  # a first token goes out at once
        assert delivered() == [("text", 0)]
        outbox.post(queue, ("text", 1))
        clock[0] += outbox.interval / 2
        outbox.flush(urgent=False)  # a step soon after: held, to go with the next ones
        assert delivered() == []
        outbox.post(queue, ("text", 2))
        clock[0] += outbox.interval
        outbox.flush(urgent=False)
        assert delivered() == [("text", 1), ("text", 2)]  # in order, once the interval has passed
        outbox.post(queue, ("end", 0))
        outbox.flush(urgent=True)  # the batch ran empty: nothing may stay behind
        assert delivered() == [("end", 0)]
    finally:
        loop.close()


def test_a_choice_posts_whole_characters_with_the_tokens_that_make_them():
    job = Job(Outbox(asyncio.new_event_loop()))
    choice = Choice(job, 0, ByteTokenizer(), ["!?"], None, [1], 10)
    sequence = choice.sequence
    try:
        for byte in "né!?x".encode():  # é is two tokens; "!?" is a stop string
            if sequence.on_token(Token(byte, -1.0)):
                break
        sequence.on_end("stop")
        events = posted(job)
    finally:
        job.outbox.loop.close()
    texts = [(e[2], [t.id for t in e[3]]) for e in events if e[0] == "text"]
    assert texts == [("n", [ord("n")]), ("é", list("é".encode()))]  # "!" was held back, then cut with the stop
    assert events[-1] == ("end", 0, "stop") and choice.text.text == "né"


def test_raw_stream_is_openai_sse_ending_with_done(live):
    body = {"model": "tiny", "prompt": "A", "max_tokens": 5, "stream": True}
    with httpx.stream("POST", live.url + "/v1/completions", json=body, timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[0][6:])["object"] == "text_completion"


def test_n_choices_and_seeds_are_reproducible(live):
    client = live.client()
    three = client.completions.create(model="tiny", prompt="HAMLET:", max_tokens=20, n=3, seed=11, temperature=1)
    again = client.completions.create(model="tiny", prompt="HAMLET:", max_tokens=20, n=3, seed=11, temperature=1)
    one = client.completions.create(model="tiny", prompt="HAMLET:", max_tokens=20, seed=11, temperature=1)
    texts = [c.text for c in three.choices]
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert texts == [c.text for c in again.choices] and texts[0] == one.choices[0].text
    assert len(set(texts)) > 1  # each choice draws its own tokens
    two_prompts = client.completions.create(model="tiny", prompt=["HAMLET:", "KING:"], max_tokens=5, n=2, seed=1)
    assert [c.index for c in two_prompts.choices] == [0, 1, 2, 3]


def test_a_stop_string_cuts_the_text(live):
    client = live.client()
    free = client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=40, temperature=0).choices[0].text
    stop = free[10:12]
    cut = client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=40, temperature=0, stop=[stop, "#"])
    assert cut.choices[0].text == free[:free.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=40, temperature=0, stop=stop,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == free[:free.index(stop)]


def test_logprobs_and_echo(live):
    reply = live.client().completions.create(model="tiny", prompt="KING:", max_tokens=6, temperature=0, logprobs=2,
                                             echo=True)
    choice = reply.choices[0]
    assert choice.text.startswith("KING:") and len(choice.text) == 5 + 6
    lp = choice.logprobs
    assert "".join(lp.tokens) == choice.text and lp.text_offset == list(range(11))
    assert lp.token_logprobs[0] is None and all(x <= 0 for x in lp.token_logprobs[1:])
    for chosen, logprob, top in list(zip(lp.tokens, lp.token_logprobs, lp.top_logprobs))[5:]:
        assert len(top) == 2 and max(top.values()) == pytest.approx(logprob) and top[chosen] == logprob  # greedy
    chat = live.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=4, temperature=0, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert "".join(t.token for t in content) == chat.choices[0].message.content
    assert all(len(t.top_logprobs) == 3 and t.top_logprobs[0].logprob == pytest.approx(t.logprob) for t in content)


def test_a_prompt_longer_than_the_context_keeps_its_end_and_says_so(live, model, run):
    prompt = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer"
    reply = live.client().completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0)
    kept = CONTEXT - 10
    assert reply.model_extra["truncated_prompt_tokens"] == len(prompt) - kept
    assert reply.usage.prompt_tokens == kept
    assert reply.choices[0].text == reference(model, run, prompt[-kept:], 10)


def test_errors_surface_as_the_clients_exception_types(live):
    client = live.client()
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model="tiny", prompt="A", temperature=-1)
    assert bad.value.param == "temperature" and bad.value.type == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as long:
        client.completions.create(model="tiny", prompt="A", max_tokens=CONTEXT)
    assert long.value.param == "max_tokens" and f"context of {CONTEXT}" in long.value.message
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "Hi"}])
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def post(live, path: str, body, **kw) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(live.url + path, content=content, headers={"content-type": "application/json"}, timeout=30,
                      **kw)


GOOD = {"model": "tiny", "prompt": "A"}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}]}
BAD_REQUESTS = [  # (path, body, status, param, words of the message)
    ("/v1/completions", b"{not json", 400, None, "not valid JSON"),
    ("/v1/completions", b"\xff\xfe", 400, None, "not valid JSON"),
    ("/v1/completions", [1, 2], 400, None, "JSON object"),
    ("/v1/completions", {"prompt": "A"}, 400, "model", "Missing required parameter"),
    ("/v1/completions", {"model": "tiny"}, 400, "prompt", "Missing required parameter"),
    ("/v1/completions", {**GOOD, "prompt": []}, 400, "prompt", "empty"),
    ("/v1/completions", {**GOOD, "prompt": [[]]}, 400, "prompt", "token ids"),
    ("/v1/completions", {**GOOD, "prompt": [5, 99999]}, 400, "prompt", "token ids"),
    ("/v1/completions", {**GOOD, "prompt": "price: €5"}, 400, "prompt", "prompt"),
    ("/v1/completions", {**GOOD, "prompt": 5}, 400, "prompt", "Invalid value"),
    ("/v1/completions", {**GOOD, "temperature": "hot"}, 400, "temperature", "Invalid value"),
    ("/v1/completions", {**GOOD, "top_p": 0}, 400, "top_p", "greater than 0"),
    ("/v1/completions", {**GOOD, "top_p": 1.5}, 400, "top_p", "less than or equal"),
    ("/v1/completions", {**GOOD, "top_k": 0}, 400, "top_k", "greater than or equal"),
    ("/v1/completions", {**GOOD, "max_tokens": 0}, 400, "max_tokens", "greater than or equal"),
    ("/v1/completions", {**GOOD, "max_tokens": 2.5}, 400, "max_tokens", "Invalid value"),
    ("/v1/completions", {**GOOD, "max_tokens": True}, 400, "max_tokens", "Invalid value"),
    ("/v1/completions", {**GOOD, "n": 0}, 400, "n", "greater than or equal"),
    ("/v1/completions", {**GOOD, "n": 1000}, 400, "n", "queues at most"),
    ("/v1/completions", {**GOOD, "logprobs": 6}, 400, "logprobs", "less than or equal to 5"),
    ("/v1/completions", {**GOOD, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "up to 4"),
    ("/v1/completions", {**GOOD, "stop": ""}, 400, "stop", "non-empty"),
    ("/v1/completions", {**GOOD, "seed": -1}, 400, "seed", "greater than or equal"),
    ("/v1/completions", {**GOOD, "stream": "yes"}, 400, "stream", "Invalid value"),
    ("/v1/completions", {**GOOD, "suffix": "x"}, 400, "suffix", "Unrecognized request argument"),
    ("/v1/completions", {**GOOD, "presence_penalty": 0.5}, 400, "presence_penalty", "less than or equal to 0"),
    ("/v1/completions", {**GOOD, "stream_options": {"include_usage": 1}}, 400, "stream_options.include_usage",
     "Invalid value"),
    ("/v1/chat/completions", {**CHAT, "messages": []}, 400, "messages", "at least 1"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "robot", "content": "Hi"}]}, 400, "messages[0].role",
     "Invalid value"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content",
     "Invalid value"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user"}]}, 400, "messages[0].content", "Missing"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "€"}]}, 400, "messages", "messages"),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, 400, "top_logprobs", "needs logprobs"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 5, "max_completion_tokens": 5}, 400, "max_completion_tokens",
     "not both"),
    ("/v1/chat/completions", {**CHAT, "model": "other"}, 404, "model", "does not exist"),
    ("/v1/completions", {**GOOD, "prompt": "A" * (1 << 20)}, 413, None, "over 1,048,576 bytes"),
    ("/v1/nothing", GOOD, 404, None, "Not Found"),
]


@pytest.mark.parametrize("path, body, status, param, words", BAD_REQUESTS,
                         ids=[f"{i}-{case[3]}" for i, case in enumerate(BAD_REQUESTS)])
def test_bad_requests_answer_in_openais_error_shape(live, path, body, status, param, words):
    response = post(live, path, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and words in error["message"]
    assert live.health()["status"] == "ok"


def test_a_chunked_body_over_the_limit_is_refused_and_a_wrong_method_named(live):
    def chunks():
        for _ in range(40):
            yield b" " * 32768

    response = httpx.post(live.url + "/v1/completions", content=chunks(), timeout=30)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    response = httpx.get(live.url + "/v1/completions", timeout=10)
    assert response.status_code == 405 and "Method Not Allowed" in response.json()["error"]["message"]


def test_an_api_key_guards_v1_and_is_checked(run, model):
    server = LiveServer(create_app(model, read_checkpoint(run), "tiny", api_key="sesame"))
    try:
        with pytest.raises(openai.AuthenticationError) as wrong:
            server.client("guess").models.list()
        assert wrong.value.code == "invalid_api_key"
        response = httpx.post(server.url + "/v1/completions", json=GOOD, timeout=10)
        assert response.status_code == 401 and response.json()["error"]["param"] is None
        assert server.client("sesame").completions.create(model="tiny", prompt="A", max_tokens=2).choices
        assert httpx.get(server.url + "/health", timeout=10).status_code == 200
        assert httpx.get(server.url + "/", timeout=10).status_code == 200
    finally:
        server.close()


LONG_STREAM = {"model": "tiny", "prompt": "A", "max_tokens": 60, "stream": True}  # 2 s on a slowed server


def first_chunks(server: LiveServer, body: dict, count: int):
    """Open a streaming request and read `count` data lines; returns the client, the open
    response and the iterator of its remaining lines."""
    client = httpx.Client(timeout=30)
    response = client.send(client.build_request("POST", server.url + "/v1/completions", json=body), stream=True)
    lines = response.iter_lines()
    seen = 0
    while seen < count:
        seen += next(lines).startswith("data: ")
    return client, response, lines


def wait_until(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_a_full_queue_answers_429_with_retry_after(slow_server):
    server = slow_server()
    client, response, _ = first_chunks(server, LONG_STREAM, 2)  # the batch's one place
    waiting = threading.Thread(target=lambda: server.client().completions.create(model="tiny", prompt="B",
                                                                                  max_tokens=2))
    waiting.start()
    assert wait_until(lambda: server.health()["waiting"] == 1, 10)
    with pytest.raises(openai.RateLimitError) as busy:
        server.client().completions.create(model="tiny", prompt="C", max_tokens=2)
    assert busy.value.response.headers["retry-after"] == "1"
    response.close()
    client.close()
    waiting.join(timeout=30)
    assert not waiting.is_alive()


def test_a_client_that_goes_away_mid_stream_frees_its_place_at_once(slow_server):
    server = slow_server()
    client, response, lines = first_chunks(server, LONG_STREAM, 3)
    assert server.health()["running"] == 1
    response.close()
    client.close()
    # 60 tokens at 30 ms would take ~2 s more; the place is free after a step or two.
    assert wait_until(lambda: server.health()["running"] == 0, 0.6)
    started = time.monotonic()
    server.client().completions.create(model="tiny", prompt="B", max_tokens=3)
    assert time.monotonic() - started < 1.5


def test_a_fault_answers_500_logs_one_line_and_the_server_goes_on(slow_server, caplog):
    server = slow_server(max_batch=2)
    model = server.app.state.server.engine.model
    working = model.hidden_states
    model.hidden_states = lambda *args: (_ for _ in ()).throw(RuntimeError("CUDA error: out of cheese\nmore"))
    with caplog.at_level(logging.ERROR, logger="gpt.serve"):
        with pytest.raises(openai.InternalServerError):
            server.client().completions.create(model="tiny", prompt="A", max_tokens=3)
        with pytest.raises(openai.APIError):
            list(server.client().completions.create(model="tiny", prompt="A", max_tokens=3, stream=True))
    lines = [r for r in caplog.records if r.name == "gpt.serve"]
    assert len(lines) == 2 and all("out of cheese" in r.getMessage() and "\n" not in r.getMessage() for r in lines)
    assert all(r.exc_info is None for r in lines)
    model.hidden_states = working
    assert server.client().completions.create(model="tiny", prompt="A", max_tokens=3).choices[0].text


def test_shutdown_cuts_streams_in_flight_cleanly(slow_server):
    server = slow_server()
    client, response, lines = first_chunks(server, LONG_STREAM, 2)
    try:
        server.server.handle_exit(signal.SIGTERM, None)  # what SIGTERM and Ctrl-C call
        rest = [line for line in lines if line.startswith("data: ")]
        assert any("shutting down" in line for line in rest)
        client.close()
        server.thread.join(timeout=15)
        assert not server.thread.is_alive()
    finally:
        AppStatus.should_exit = False  # sse-starlette's flag is global: this process serves on in other tests


@pytest.mark.slow
def test_load_48_requests_from_12_clients_each_equal_to_its_solo_output(live):
    """Each request, alone, then all at once from 12 clients: every answer is complete, none
    mixed with another's, each the one it gave alone."""
    requests = [dict(prompt=f"{name}:\n{word}", max_tokens=12 + i % 7, temperature=[0.0, 0.9][i % 2], seed=i,
                     stream=i % 3 == 0)
                for i, (name, word) in enumerate((n, w) for n in ["ROMEO", "JULIET", "KING", "QUEEN", "FOOL", "NURSE"]
                                                 for w in ["Why", "And", "Then", "No", "What", "I", "O", "Come"])]
    assert len(requests) == 48

    def ask(client: openai.OpenAI, request: dict) -> tuple[str, str]:
        if request["stream"]:
            chunks = list(client.completions.create(model="tiny", **request))
            return "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
        choice = client.completions.create(model="tiny", **request).choices[0]
        return choice.text, choice.finish_reason

    solo = [ask(live.client(), request) for request in requests]
    model = live.app.state.server.engine.model
    batches = []
    step = model.forward_step
    model.forward_step = lambda idx, cache: batches.append(idx.size(0)) or step(idx, cache)

    def one_client(k: int) -> list[tuple[int, tuple[str, str]]]:
        client = live.client()
        return [(i, ask(client, requests[i])) for i in range(k, 48, 12)]

    try:
        with ThreadPoolExecutor(12) as pool:
            together = dict(pair for answers in pool.map(one_client, range(12)) for pair in answers)
    finally:
        del model.forward_step
    assert max(batches) == 4  # the server's --max-batch: requests did share forward passes
    assert [together[i] for i in range(48)] == solo
    assert all(reason in ("length", "stop") for _, reason in solo)
    assert live.health() == {"status": "ok", "running": 0, "waiting": 0}


def browser():
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.skip("no headless browser here: apt-get install chromium chromium-driver (.ci/run does)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"]:
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)


@pytest.mark.slow
def test_the_chat_page_asks_for_the_key_and_streams_a_reply(slow_server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    server = slow_server(api_key="sesame")
    driver = browser()
    try:
        driver.set_page_load_timeout(30)
        driver.get(server.url + "/")
        WebDriverWait(driver, 60).until(expected_conditions.alert_is_present())
        alert = driver.switch_to.alert
        alert.send_keys("sesame")
        alert.accept()
        WebDriverWait(driver, 60).until(lambda d: "ready" in d.find_element(By.ID, "status").text)
        driver.find_element(By.ID, "max-tokens").clear()
        driver.find_element(By.ID, "max-tokens").send_keys("25")
        driver.find_element(By.ID, "input").send_keys("Good morrow", Keys.ENTER)
        lengths = set()
        deadline = time.monotonic() + 60
        while driver.find_element(By.ID, "send").get_attribute("disabled") or not lengths:
            assert time.monotonic() < deadline, "no reply"
            bubbles = driver.find_elements(By.CSS_SELECTOR, ".assistant")
            if bubbles:
                lengths.add(len(bubbles[-1].text))
            time.sleep(0.02)
        reply = driver.find_elements(By.CSS_SELECTOR, ".assistant")[-1].text
        assert reply and driver.find_element(By.CSS_SELECTOR, ".user").text == "Good morrow"
        assert len(lengths - {0}) > 1  # the reply grew on screen as tokens came: it streamed
        assert "tokens/s" in driver.find_element(By.ID, "status").text
        assert not driver.find_elements(By.CSS_SELECTOR, ".error")
    finally:
        driver.quit()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_the_command_serves_and_exits_0_on_a_signal(run, sig):
    port = free_port()
    command = [sys.executable, "-m", "gpt", "serve", str(run), "--port", str(port), "--max-batch", "2"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        assert wait_until(lambda: _answers(url), 60), "the server did not come up"
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=30)
        assert client.completions.create(model="tiny", prompt="A", max_tokens=3).choices[0].text
        process.send_signal(sig)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
    output = process.stdout.read()
    assert "gpt serve: model 'tiny'" in output and f"http://127.0.0.1:{port}/" in output
    assert "Traceback" not in output


def _answers(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_the_command_names_a_busy_port_in_one_line(cli, run):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        code, _, err = cli("serve", run, "--port", taken.getsockname()[1])
    assert code == 2 and "cannot listen on 127.0.0.1" in err and len(err.strip().splitlines()) == 1


def test_a_chat_model_is_prompted_with_its_template_as_gpt_chat_does(char_data, tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"Say {w}"}, {"role": "assistant", "content": w}]}
            for w in ("First", "Citizen", "Before", "proceed", "further", "hear", "speak", "All")] * 6
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = tiny_config(char_data, tmp_path / "sft", max_iters=12, eval_interval=12, ckpt_interval=12)
    config = build_config({"model": {"preset": "tiny", "block_size": 32}, "data": {"dir": str(char_data)},
                           "train": dict(config.train.__dict__), "task": {"kind": "chat",
                                                                         "train": str(tmp_path / "train.jsonl")}})
    train(config)
    checkpoint = read_checkpoint(tmp_path / "sft")
    model = load_model(checkpoint).eval()
    server = LiveServer(create_app(model, checkpoint, "sft"))
    try:
        messages = [Message("system", "Be"), Message("user", "Say All")]
        answer = server.client().chat.completions.create(
            model="sft", messages=[{"role": m.role, "content": m.content} for m in messages], max_tokens=8,
            temperature=0)
        settings = SampleConfig(max_new_tokens=8, temperature=0.0, top_k=None)
        expected, _ = reply(model, checkpoint.tokenizer, messages, settings, ChatTemplate.of(checkpoint.config))
        assert answer.choices[0].message.content.strip() == expected and "<|" not in expected
    finally:
        server.close()
