"""Tokenizer benchmark (issue 25): how fast `gpt prepare --tokenizer bpe` trains, how well the
trained BPE compresses next to GPT-2's, and how fast it encodes next to tiktoken.

    python scripts/bench_tokenizer.py [--sizes 4096,16384,32768] [--big-mb 100] [--json PATH]

- training: seconds and MB/s of `gpt.data.tokenizer.train_bpe` (Hugging Face `tokenizers`'
  trainer with GPT-4's split pattern, as `gpt prepare` runs it, fed 16k-character pieces) for
  each size on the bundled Shakespeare (1.1 MB) and on a generated corpus of --big-mb MB: words
  drawn at random with Shakespeare's word frequencies, numbers mixed in, lines of ~12 words.
- compression: UTF-8 bytes per token (more is better) on English, Shakespeare's last 10% (the
  val split `gpt prepare` cuts; the BPEs are trained on the other 90%), and on Chinese, a
  passage written for this benchmark (ZH below). Rows: GPT-2, the BPEs trained on Shakespeare,
  and, when `jieba` (MIT) is installed, BPEs trained on --zh-mb (10) MB of Chinese drawn from
  jieba's word-frequency dictionary (the passage itself is never trained on).
- encoding: MB/s on the Shakespeare text, one thread, the trained BPE (Hugging Face
  `tokenizers`) against tiktoken's GPT-2 (`encode_ordinary`), taken alternately, best of 5.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from gpt.data.sources import BUNDLED_DATA
from gpt.data.tokenizer import GPT2Tokenizer, HFTokenizer, gpt2_encoding, train_bpe

SHAKESPEARE = BUNDLED_DATA / "tinyshakespeare.txt"
PIECE_CHARS = 1 << 14  # as gpt.data.prepare.TRAIN_PIECE_CHARS
# Written for this benchmark (public domain): everyday prose on several subjects, no spaces.
ZH = """\
语言模型的任务很简单：读过前面的文字，猜出下一个字。为了把文字变成数字，模型先要把句子切成小块，这些小块叫做词元。\
英文里常见的单词往往是一个词元，而中文里一个汉字在不同的切分方法下可能占一个、两个甚至三个词元。\
词元越少，同样长度的上下文就能装下越多的内容，训练和生成也就越快。
今天早上下了一场小雨，街道两旁的树叶被洗得发亮。卖早点的老人照常推着小车来到路口，豆浆和油条的香味飘得很远。\
上班的人撑着伞匆匆走过，孩子们却故意踩着水坑，笑声一阵接着一阵。
我们的城市有一条古老的河，河上有七座石桥。传说最早的一座桥是一位木匠用了十年时间修成的，他每天只搬一块石头，\
邻居都笑他太慢，可是桥修好以后，一直用了三百多年。现在每到周末，桥边都会有人下棋、喝茶、聊天。
学习一门新的语言需要耐心。刚开始的时候，每一个词都很陌生，每一句话都要想很久。慢慢地，你会发现有些词经常一起出现，\
有些句子的结构总是差不多。等到有一天你能用这门语言讲一个完整的故事，那种高兴是很难形容的。
电脑的计算能力在过去几十年里增长得非常快。以前需要一个房间才能放下的机器，现在可以装进口袋里。\
不过，训练一个大型语言模型仍然需要成千上万块显卡连续工作好几个星期，耗电量也相当惊人。
做饭其实和做实验很像：先准备材料，再按步骤操作，最后检查结果。盐放多了，就加一点水；火太大了，就把锅端开一会儿。\
只要多试几次，记下每一次的变化，就能找到最合适的方法。
图书馆里很安静，只能听见翻书的声音。靠窗的位置阳光最好，常常一早就被占满了。有人在准备考试，有人在写论文，\
也有人只是随便拿一本小说，一坐就是一个下午。
"""


# ----------------------------------------------------------------------------- corpora

def pieces_of(path: Path) -> Iterator[str]:
    """A text file in pieces of about PIECE_CHARS characters, cut at line ends."""
    with open(path, encoding="utf-8") as handle:
        piece: list[str] = []
        size = 0
        for line in handle:
            piece.append(line)
            size += len(line)
            if size >= PIECE_CHARS:
                yield "".join(piece)
                piece, size = [], 0
        if piece:
            yield "".join(piece)


def shakespeare_halves() -> tuple[str, str]:
    """Train and val text as `gpt prepare` splits a single file: val starts at the first line
    start after 90% of the bytes."""
    raw = SHAKESPEARE.read_bytes()
    cut = raw.index(b"\n", int(len(raw) * 0.9)) + 1
    return raw[:cut].decode("utf-8"), raw[cut:].decode("utf-8")


def write_generated(path: Path, megabytes: int, words: list[str], weights: np.ndarray, seed: int,
                    chinese: bool = False) -> None:
    """`megabytes` MB of words drawn with `weights`, 1 in 40 a number, lines of 12 words: joined
    by spaces, or for Chinese without them, a comma after every fourth word and a full stop at
    the end (Chinese clauses are the pieces GPT-4's split pattern makes of it)."""
    rng = np.random.default_rng(seed)
    target = megabytes * (1 << 20)
    with open(path, "w", encoding="utf-8") as out:
        while out.tell() < target:
            drawn = rng.choice(len(words), size=120_000, p=weights)
            numbers = rng.integers(0, 100_000, size=drawn.size)
            tokens = [str(n) if d % 40 == 0 else words[d] for d, n in zip(drawn, numbers)]
            if chinese:
                lines = ["，".join("".join(tokens[j:j + 4]) for j in range(i, i + 12, 4)) + "。"
                         for i in range(0, len(tokens), 12)]
            else:
                lines = [" ".join(tokens[i:i + 12]) for i in range(0, len(tokens), 12)]
            out.write("\n".join(lines) + "\n")


def english_words() -> tuple[list[str], np.ndarray]:
    counts: dict[str, int] = {}
    for word in re.findall(r"[A-Za-z']+[,.;:!?]?", SHAKESPEARE.read_text(encoding="utf-8")):
        counts[word] = counts.get(word, 0) + 1
    words = sorted(counts)
    freq = np.array([counts[w] for w in words], dtype=np.float64)
    return words, freq / freq.sum()


def chinese_words() -> tuple[list[str], np.ndarray] | None:
    """jieba's dictionary (word, frequency), if jieba is installed."""
    try:
        import jieba
    except ImportError:
        return None
    words, freq = [], []
    for line in (Path(jieba.__file__).parent / "dict.txt").read_text(encoding="utf-8").splitlines():
        word, count, *_ = line.split(" ")
        if re.fullmatch(r"[\u4e00-\u9fff]+", word):
            words.append(word)
            freq.append(float(count))
    weights = np.array(freq)
    return words, weights / weights.sum()


# ----------------------------------------------------------------------------- measurements

def timed_training(path: Path, size: int) -> tuple[HFTokenizer, float]:
    start = time.perf_counter()
    file = train_bpe(pieces_of(path), size)
    return HFTokenizer("bpe", file), time.perf_counter() - start


def bytes_per_token(encode, text: str) -> float:
    return len(text.encode("utf-8")) / len(encode(text))


def encode_speed(text: str, bpe: HFTokenizer, repeats: int = 5) -> dict[str, float]:
    """MB/s on 256 KB pieces (as `gpt prepare` cuts them): one at a time on one thread, and as
    prepare's batches across all cores; the tokenizers taken alternately, best of `repeats`."""
    gpt2, threads = GPT2Tokenizer(), os.cpu_count() or 1
    encoders = {"trained BPE (tokenizers), 1 thread": lambda p: [bpe.encode_array(t) for t in p],
                "GPT-2 (tiktoken encode_ordinary), 1 thread": lambda p: [gpt2.encoding.encode_ordinary(t) for t in p],
                f"trained BPE, prepare's batches, {threads} threads": lambda p: bpe.encode_batch(p, threads),
                f"GPT-2, prepare's batches, {threads} threads": lambda p: gpt2.encode_batch(p, threads)}
    pieces = [text[i:i + (1 << 18)] for i in range(0, len(text), 1 << 18)]
    best = {name: float("inf") for name in encoders}
    for _ in range(repeats):
        for name, encode in encoders.items():
            start = time.perf_counter()
            encode(pieces)
            best[name] = min(best[name], time.perf_counter() - start)
    megabytes = len(text.encode("utf-8")) / 1e6
    return {name: megabytes / seconds for name, seconds in best.items()}


def host() -> str:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = re.search(r"Model name:\s*(.+)", lscpu)
    cores = re.search(r"^CPU\(s\):\s*(\d+)", lscpu, re.M)
    flags = re.search(r"Flags:\s*(.+)", lscpu)
    simd = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if flags and f in flags.group(1).split()]
    import tiktoken
    import tokenizers
    return (f"{model.group(1).strip() if model else platform.processor()}, {cores.group(1) if cores else '?'} CPUs "
            f"({', '.join(simd)}), Python {platform.python_version()}, tokenizers {tokenizers.__version__}, "
            f"tiktoken {tiktoken.__version__}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="4096,16384,32768")
    parser.add_argument("--big-mb", type=int, default=100)
    parser.add_argument("--zh-mb", type=int, default=10)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    train_text, val_text = shakespeare_halves()
    results: dict = {"date": str(datetime.date.today()), "host": host(), "training": [], "compression": [],
                     "encode_mb_per_s": {}}
    gpt2 = gpt2_encoding()
    results["compression"].append({"tokenizer": "GPT-2 (50,257)", "english": bytes_per_token(gpt2.encode_ordinary,
                                   val_text), "chinese": bytes_per_token(gpt2.encode_ordinary, ZH)})
    with tempfile.TemporaryDirectory() as tmp:
        train_file, big = Path(tmp) / "train.txt", Path(tmp) / "big.txt"
        train_file.write_text(train_text, encoding="utf-8")
        write_generated(big, args.big_mb, *english_words(), seed=0)
        trained = {}
        for size in sizes:
            for name, path in (("Shakespeare train split", train_file), (f"generated {args.big_mb} MB", big)):
                tokenizer, seconds = timed_training(path, size)
                megabytes = path.stat().st_size / 1e6
                results["training"].append({"corpus": name, "size": size, "tokens": tokenizer.vocab_size,
                                            "seconds": seconds, "mb": megabytes, "mb_per_s": megabytes / seconds})
                print(results["training"][-1], flush=True)
                if path == train_file:
                    trained[size] = tokenizer
            results["compression"].append({"tokenizer": f"BPE {trained[size].vocab_size:,} on Shakespeare train",
                                           "english": bytes_per_token(trained[size].encode, val_text),
                                           "chinese": bytes_per_token(trained[size].encode, ZH)})
        zh_words = chinese_words()
        if zh_words is not None:
            zh_file = Path(tmp) / "zh.txt"
            write_generated(zh_file, args.zh_mb, *zh_words, seed=1, chinese=True)
            for size in sizes:
                tokenizer, seconds = timed_training(zh_file, size)
                results["compression"].append({"tokenizer": f"BPE {tokenizer.vocab_size:,} on {args.zh_mb} MB of "
                                                            "jieba-drawn Chinese",
                                               "english": bytes_per_token(tokenizer.encode, val_text),
                                               "chinese": bytes_per_token(tokenizer.encode, ZH)})
        results["encode_mb_per_s"] = encode_speed(SHAKESPEARE.read_text(encoding="utf-8"), trained[sizes[0]])
    print(report(results, args))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


def report(results: dict, args) -> str:
    lines = [f"{results['date']}, {results['host']}", "",
             "| corpus | --vocab-size | tokens made | MB | seconds | MB/s |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['corpus']} | {r['size']:,} | {r['tokens']:,} | {r['mb']:.1f} | {r['seconds']:.1f} "
              f"| {r['mb_per_s']:.2f} |" for r in results["training"]]
    lines += ["", "| tokenizer | English bytes/token | Chinese bytes/token |", "|---|---|---|"]
    lines += [f"| {r['tokenizer']} | {r['english']:.2f} | {r['chinese']:.2f} |" for r in results["compression"]]
    lines += ["", "| encoder (Shakespeare, 1.1 MB) | MB/s |", "|---|---|"]
    lines += [f"| {name} | {speed:.2f} |" for name, speed in results["encode_mb_per_s"].items()]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
