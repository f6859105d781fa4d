"""Build a next-line cloze task for `gpt eval --task` from a plain-text corpus.

Built the way StoryCloze and HellaSwag are: a context of N consecutive lines, the true next
line, and distractor lines drawn at random from elsewhere in the corpus; the position of the
true line among the choices is random too. Everything is seeded.

    python scripts/make_tasks.py data/tinyshakespeare.txt --part val --out tasks/shakespeare_next_line.jsonl

`--part val` keeps only the validation tail that `gpt prepare` holds out of a single text file
(with the same --val-fraction), so a model trained on the train split never saw the items.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

from gpt.data.sources import Reader, Source
from gpt.errors import GptError


def corpus_text(path: Path, part: str, val_fraction: float) -> str:
    """The whole file, or the part `gpt prepare` puts in the val split (the same cut, by reusing its reader)."""
    if part == "all":
        return path.read_text(encoding="utf-8")
    _, val = Reader("strict", "text", None).text_halves(Source(str(path), [path]), val_fraction)
    return "".join(val)


def other_lines(lines: list[str], candidates: list[int], line: int, count: int, away: int,
                rng: np.random.Generator) -> list[str]:
    """`count` distinct candidate lines more than `away` lines from `line` and unlike it."""
    wrong: list[str] = []
    for _ in range(100 * count):
        other = candidates[rng.integers(len(candidates))]
        text = lines[other]
        if abs(other - line) > away and text != lines[line] and text not in wrong:
            wrong.append(text)
            if len(wrong) == count:
                return wrong
    raise GptError(f"too few distinct lines to draw {count} distractors for line {line + 1}; give a longer corpus")


def shuffled_words(answer: str, count: int, rng: np.random.Generator) -> list[str]:
    """`count` distinct reorderings of the answer's words: the same bytes, only the order differs."""
    words = answer.split()
    wrong: list[str] = []
    while len(wrong) < count:  # at least 3 distinct words give 6 orders, enough for 3 distractors
        text = " ".join(rng.permutation(words))
        if text != answer and text not in wrong:
            wrong.append(text)
    return wrong


def build_items(lines: list[str], *, context_lines: int, distractors: int, items: int, min_chars: int,
                seed: int, shuffle_words: bool = False) -> list[dict]:
    """Cloze items: the lines before a line of at least `min_chars` characters, that line, and
    `distractors` other such lines that are neither near it nor equal to it (or, as a control,
    the line's own words in other orders)."""
    candidates = [i for i in range(context_lines, len(lines)) if len(lines[i].strip()) >= min_chars
                  and (not shuffle_words or len(set(lines[i].split())) >= 3)]
    if len(candidates) <= distractors:
        raise GptError(f"the corpus has {len(candidates)} lines of at least {min_chars} characters; "
                       "give a longer corpus or lower --min-chars")
    if shuffle_words and distractors > 5:
        raise GptError("--shuffle-words makes at most 5 distractors (3 words have 6 orders); lower --distractors")
    rng = np.random.default_rng(seed)
    picked = sorted(rng.choice(len(candidates), size=min(items, len(candidates)), replace=False))
    result = []
    for index in picked:
        line = candidates[index]
        answer = lines[line]
        if shuffle_words:
            wrong = shuffled_words(answer, distractors, rng)
        else:
            wrong = other_lines(lines, candidates, line, distractors, context_lines, rng)
        choices = [answer, *wrong]
        order = rng.permutation(len(choices))
        result.append({"context": "\n".join(lines[line - context_lines:line]) + "\n",
                       "choices": [choices[i] for i in order], "label": int(np.argmax(order == 0))})
    return result


def write_jsonl(path: Path, records: list[dict]) -> None:
    """Write to a temporary name, then rename: never a half-written task file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("corpus", type=Path, help="a UTF-8 text file")
    parser.add_argument("--out", type=Path, required=True, help="the task file to write (.jsonl)")
    parser.add_argument("--part", choices=["val", "all"], default="val", help="which part of the corpus to use")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="as given to gpt prepare")
    parser.add_argument("--context-lines", type=int, default=4, help="lines of context before the answer")
    parser.add_argument("--distractors", type=int, default=3, help="wrong choices per item")
    parser.add_argument("--items", type=int, default=300, help="items to build (fewer if the corpus is short)")
    parser.add_argument("--min-chars", type=int, default=20, help="shortest line usable as a choice")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shuffle-words", action="store_true",
                        help="control task: the distractors are the answer's words in other orders")
    args = parser.parse_args()
    if not args.corpus.is_file():
        parser.error(f"corpus not found: {args.corpus}")
    try:
        text = corpus_text(args.corpus, args.part, args.val_fraction)
        records = build_items(text.splitlines(), context_lines=args.context_lines, distractors=args.distractors,
                              items=args.items, min_chars=args.min_chars, seed=args.seed,
                              shuffle_words=args.shuffle_words)
    except (GptError, UnicodeDecodeError) as exc:
        parser.error(str(exc).splitlines()[0])
    write_jsonl(args.out, records)
    print(f"{args.out}: {len(records)} items, {args.distractors + 1} choices each (chance "
          f"{1 / (args.distractors + 1):.2f}), from the {args.part} part of {args.corpus}")


if __name__ == "__main__":
    main()
