"""Throughput of `gpt prepare` (GPT-2 BPE) against raw tiktoken on the same text, same run.

    python scripts/bench_prepare.py [--megabytes 50] [--workers 2]

The corpus is tiny Shakespeare repeated to the requested size. The baseline is tiktoken's
`encode_ordinary_batch` over the same text in 1 MB pieces, with the same number of threads,
no file reading, hashing or writing; `gpt prepare` does all of those."""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from datetime import date
from pathlib import Path

from gpt.data import BUNDLED_DATA, PrepareOptions, prepare
from gpt.tokenizer import gpt2_encoding


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--megabytes", type=int, default=50)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_prepare_"))
    try:
        base = (BUNDLED_DATA / "tinyshakespeare.txt").read_text(encoding="utf-8")
        text = base * max(1, args.megabytes * (1 << 20) // len(base.encode()))
        corpus = work / "corpus.txt"
        corpus.write_text(text, encoding="utf-8")
        size_mb = corpus.stat().st_size / 1e6

        encoding = gpt2_encoding()
        pieces = [text[i:i + (1 << 20)] for i in range(0, len(text), 1 << 20)]
        start = time.perf_counter()
        tokens = sum(len(ids) for ids in encoding.encode_ordinary_batch(pieces, num_threads=args.workers))
        raw_s = time.perf_counter() - start

        start = time.perf_counter()
        prepare(PrepareOptions(sources=[str(corpus)], tokenizer="gpt2", out=str(work / "out"), workers=args.workers))
        ours_s = time.perf_counter() - start

        print(f"corpus: {size_mb:.1f} MB, {tokens:,} tokens, {args.workers} workers")
        print(f"tiktoken encode_ordinary_batch: {size_mb / raw_s:.2f} MB/s, {tokens / raw_s:,.0f} tok/s")
        print(f"gpt prepare:                    {size_mb / ours_s:.2f} MB/s, {tokens / ours_s:,.0f} tok/s")
        print(f"ratio: {raw_s / ours_s:.2f}x (target >= 0.9x)")
        machine = f"{platform.machine()}, {os.cpu_count()} cores"
        print(f"| {date.today()} | {machine} | {size_mb:.0f} MB, {args.workers} workers "
              f"| {size_mb / raw_s:.2f} MB/s | {size_mb / ours_s:.2f} MB/s | {raw_s / ours_s:.2f}x |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
