"""`gpt serve` under concurrent streaming clients: time to first token and tokens/s per client
and in all, at 1, 4, 8 and 16 clients, against `gpt sample`'s tokens/s on the same model.

    python scripts/bench_serve.py [--models cpu-config,gpt2-124M] [--clients 1,4,8,16] [--tokens 48]
                                  [--max-batch 8] [--device cpu] [--tiny]

Random weights (speed does not depend on them): the CPU config's model (configs/shakespeare_char.yaml,
65 characters) and a GPT-2 124M-shaped one (GPT-2's tokenizer). The server runs in this process on
127.0.0.1 in a process of its own, as `gpt serve` runs it; each client is a thread of this process
with an httpx client of its own, made before the clock starts (as OpenAI's client keeps one: making
one costs 20-85 ms of the interpreter, which 8 threads would otherwise queue for, and which no
server can shorten), that streams one completion of --tokens tokens (greedy) and reads the exact
count from the final usage chunk. Targets (issue 27): aggregate tokens/s at 8 clients >= 4x
that at 1; at 1 client within 10% of `gpt sample`; p95 time to first token at 8 clients <= 3x that at 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import socket
import statistics
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

import httpx
import torch
import uvicorn

from gpt.checkpoint import Checkpoint
from gpt.config import SampleConfig, build_config, load_config
from gpt.data.tokenizer import TokenizerSpec
from gpt.device import pick_device
from gpt.inference.sample import generate
from gpt.inference.serve import StoppableServer, cores_to_the_engine, create_app
from gpt.inference.weights import prepare_weights
from gpt.model import GPT

CHARS = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"  # tiny Shakespeare's 65
PROMPTS = ["ROMEO:", "JULIET:\nO", "First Citizen:\nWe", "KING HENRY:", "HAMLET:\nTo be", "MENENIUS:\nWhy",
           "LADY MACBETH:", "Second Servant:\nAy"]


def bench_model(name: str, tiny: bool, device: torch.device) -> tuple[GPT, Checkpoint]:
    """A random-weight model and a checkpoint record for it (nothing is written but a folder)."""
    shrink = {"n_layer": 1, "n_head": 2, "n_embd": 32} if tiny else {}
    if name == "cpu-config":
        config = load_config("configs/shakespeare_char.yaml",
                             ["model.vocab_size=65", *(f"model.{k}={v}" for k, v in shrink.items())])
        spec = TokenizerSpec("char", CHARS)
    else:
        config = build_config({"model": {"preset": "gpt2", **shrink}})
        spec = TokenizerSpec("gpt2")
    torch.manual_seed(0)
    model, _ = prepare_weights(GPT(config.model).to(device).eval(), "auto", batched=True)  # as `gpt serve` runs it
    folder = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    return model, Checkpoint(path=folder, config=config, tokenizer_spec=spec, state={})


def sample_tokens_per_s(model: GPT, checkpoint: Checkpoint, tokens: int, prompt: str) -> float:
    """`gpt sample`'s speed at batch 1, greedy, for the prompt and length a client asks for."""
    settings = SampleConfig(max_new_tokens=tokens, temperature=0.0, top_k=None, ignore_eot=True)
    return generate(model, checkpoint.tokenizer, prompt, settings)[0].tokens_per_s


def stream_one(client: httpx.Client, url: str, prompt: str, tokens: int, out: dict) -> None:
    """One streaming completion: when it began, when its first text came, when it ended, and tokens."""
    body = {"model": "bench", "prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    out["start"] = time.perf_counter()
    with client.stream("POST", url + "/v1/completions", json=body, timeout=600) as response:
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["text"] and "first" not in out:
                out["first"] = time.perf_counter()
            if chunk.get("usage"):
                out["tokens"] = chunk["usage"]["completion_tokens"]
    out["end"] = time.perf_counter()


def run_level(url: str, clients: int, tokens: int) -> dict:
    """`clients` streaming requests started together."""
    results = [{} for _ in range(clients)]
    with contextlib.ExitStack() as stack:
        sessions = [stack.enter_context(httpx.Client()) for _ in range(clients)]
        threads = [threading.Thread(target=stream_one, args=(sessions[i], url, PROMPTS[i % len(PROMPTS)], tokens,
                                                             results[i])) for i in range(clients)]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - start
    ttft = sorted(r["first"] - r["start"] for r in results)
    per_client = [r["tokens"] / (r["end"] - r["start"]) for r in results]
    return {"clients": clients, "tokens": sum(r["tokens"] for r in results), "wall_s": wall,
            "aggregate_tok_s": sum(r["tokens"] for r in results) / wall,
            "per_client_tok_s": statistics.mean(per_client),
            "ttft_p50_s": statistics.median(ttft), "ttft_p95_s": ttft[round(0.95 * (len(ttft) - 1))]}


def serve_random(name: str, tiny: bool, device: str, port: int, max_batch: int, threads: int | None) -> None:
    """The server process: the same random model, served as `gpt serve` serves a checkpoint."""
    cores = cores_to_the_engine()  # as gpt serve does, before any torch work
    threads = threads or cores
    model, checkpoint = bench_model(name, tiny, pick_device(device))
    app = create_app(model, checkpoint, "bench", max_batch=max_batch, max_queue=256, threads=threads)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    StoppableServer(config, app.state.server.engine).run()


def start_server(name: str, args: argparse.Namespace) -> tuple[multiprocessing.Process, str]:
    """A server in a process of its own (the clients' threads must not share its interpreter lock)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = multiprocessing.get_context("spawn").Process(
        target=serve_random, args=(name, args.tiny, args.device, port, args.max_batch, args.server_threads))
    process.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.is_alive():
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit(f"the {name} server did not start")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="cpu-config,gpt2-124M")
    parser.add_argument("--clients", default="1,4,8,16")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each level (the best aggregate is kept)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--server-threads", type=int, help="torch threads of the server's engine (default: torch's)")
    parser.add_argument("--tiny", action="store_true", help="1-layer models (a smoke test of this script)")
    args = parser.parse_args()
    device = pick_device(args.device)
    levels = [int(c) for c in args.clients.split(",")]
    print(f"{date.today()} | {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, device {device}")
    rows = []
    for name in args.models.split(","):
        model, checkpoint = bench_model(name, args.tiny, device)
        sample_tokens_per_s(model, checkpoint, 4, PROMPTS[0])  # warm-up
        process, url = start_server(name, args)
        try:
            run_level(url, 1, 4)  # warm-up
            # 1 client and `gpt sample` in turns (the idle server takes no CPU), so that a shared
            # host's swings hit both alike; the best of each is kept.
            sample_speed, alone = 0.0, None
            for _ in range(max(2, args.repeats)):
                sample_speed = max(sample_speed, sample_tokens_per_s(model, checkpoint, args.tokens, PROMPTS[0]))
                level = run_level(url, 1, args.tokens)
                alone = level if alone is None or level["aggregate_tok_s"] > alone["aggregate_tok_s"] else alone
            rows.append({"model": name, **alone})
            for clients in (c for c in levels if c != 1):
                best = max((run_level(url, clients, args.tokens) for _ in range(args.repeats)),
                           key=lambda r: r["aggregate_tok_s"])
                rows.append({"model": name, **best})
        finally:
            process.terminate()  # SIGTERM: the server's graceful stop
            process.join(timeout=60)
        one = next(r for r in rows if r["model"] == name and r["clients"] == 1)
        print(f"\n{name}: gpt sample {sample_speed:,.1f} tok/s at batch 1 ({args.tokens} tokens, greedy)")
        print("| clients | aggregate tok/s | per-client tok/s | TTFT p50 ms | TTFT p95 ms | x 1 client "
              "| vs gpt sample |\n" + "|---" * 7 + "|")
        for r in (r for r in rows if r["model"] == name):
            print(f"| {r['clients']} | {r['aggregate_tok_s']:,.1f} | {r['per_client_tok_s']:,.1f} "
                  f"| {1000 * r['ttft_p50_s']:,.0f} | {1000 * r['ttft_p95_s']:,.0f} "
                  f"| {r['aggregate_tok_s'] / one['aggregate_tok_s']:.2f}x "
                  f"| {r['per_client_tok_s'] / sample_speed:.2f} |")
        eight = next((r for r in rows if r["model"] == name and r["clients"] == 8), None)
        if eight:
            print(f"targets: 8 clients {eight['aggregate_tok_s'] / one['aggregate_tok_s']:.2f}x of 1 (>= 4x); "
                  f"1 client {one['per_client_tok_s'] / sample_speed:.2f} of gpt sample (>= 0.90); "
                  f"TTFT p95 at 8 {eight['ttft_p95_s'] / one['ttft_p95_s']:.2f}x of 1 (<= 3x)")


if __name__ == "__main__":
    main()
