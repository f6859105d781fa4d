"""Build chat fine-tuning data from tiny Shakespeare: skills a base model does not pick up by
continuing text, asked and answered as conversations.

    python scripts/make_chat_data.py data/tinyshakespeare.txt --out data/shakespeare_chat

writes train.jsonl and val.jsonl (`{"messages": [...]}` a line, for `task.kind: chat`) and
eval.jsonl (a conversation ending with a user turn, its "answer" and its "skill", for
`gpt eval --chat` and `task.eval`). The skills, after nanochat's SpellingBee idea:

    speaker    "Who speaks this line?" + a line           -> the speaker, e.g. ROMEO
    next_line  "What line comes after this one?" + a line -> the next line of the speech
    words      "How many words are in this line?" + line  -> the count, spelt out (seven)
    backwards  "Spell this word backwards: " + word       -> the letters reversed

Speeches are split in corpus order (train first, then val, then eval), so that no passage of
the val or eval files was seen in training. Numbers are spelt out so that a character-level
model of the corpus (which has no digits but 3) can read and write every answer. Some
conversations open with a system message and some hold two exchanges, so that the template's
every part is learned. Everything is seeded.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np

NUMBERS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
           "sixteen seventeen eighteen nineteen twenty").split()
SYSTEM = "Answer in a few words."
SKILLS = ("speaker", "next_line", "words", "backwards")


def speeches(text: str) -> list[tuple[str, list[str]]]:
    """(speaker, lines) of every speech: blocks separated by blank lines, opened by `NAME:`."""
    found = []
    for block in re.split(r"\n\s*\n", text):
        lines = [line.strip() for line in block.strip().splitlines()]
        if len(lines) >= 2 and lines[0].endswith(":") and lines[0][:-1].replace(" ", "").isalpha():
            found.append((lines[0][:-1], [line for line in lines[1:] if line]))
    return found


def questions(speech: tuple[str, list[str]], rng: np.random.Generator, max_chars: int) -> list[tuple[str, str, str]]:
    """(skill, question, answer) pairs that one speech gives, each short enough for `max_chars`."""
    speaker, lines = speech
    pairs = []
    line = lines[rng.integers(len(lines))]
    pairs.append(("speaker", f"Who speaks this line?\n{line}", speaker))
    if len(lines) >= 2:
        i = int(rng.integers(len(lines) - 1))
        pairs.append(("next_line", f"What line comes after this one?\n{lines[i]}", lines[i + 1]))
    words = line.split()
    if len(words) < len(NUMBERS):
        pairs.append(("words", f"How many words are in this line?\n{line}", NUMBERS[len(words)]))
    long_words = [w.strip(".,;:!?'-") for w in words if len(w.strip(".,;:!?'-")) >= 4]
    if long_words:
        word = long_words[rng.integers(len(long_words))].lower()
        pairs.append(("backwards", f"Spell this word backwards: {word}", word[::-1]))
    return [p for p in pairs if len(p[1]) + len(p[2]) <= max_chars]


def conversation(pairs: list[tuple[str, str, str]], system: bool) -> dict:
    messages = [{"role": "system", "content": SYSTEM}] if system else []
    for _, question, answer in pairs:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


def build(text: str, seed: int, max_chars: int, eval_per_skill: int) -> dict[str, list[dict]]:
    rng = np.random.default_rng(seed)
    found = speeches(text)
    cut_val, cut_eval = int(0.8 * len(found)), int(0.9 * len(found))
    parts = {"train": found[:cut_val], "val": found[cut_val:cut_eval], "eval": found[cut_eval:]}
    out: dict[str, list[dict]] = {}
    for part in ("train", "val"):
        pairs = [pair for speech in parts[part] for pair in questions(speech, rng, max_chars)]
        order = rng.permutation(len(pairs)).tolist()
        rows, i = [], 0
        while i < len(order):
            take = 2 if rng.random() < 0.2 and i + 1 < len(order) else 1  # some conversations go on
            chosen = [pairs[j] for j in order[i:i + take]]
            if sum(len(q) + len(a) for _, q, a in chosen) <= max_chars:
                rows.append(conversation(chosen, system=rng.random() < 0.3))
            i += take
        out[part] = rows
    items = [pair for speech in parts["eval"] for pair in questions(speech, rng, max_chars)]
    out["eval"] = []
    for skill in SKILLS:
        of_skill = [pair for pair in items if pair[0] == skill]
        for j in rng.permutation(len(of_skill))[:eval_per_skill]:
            _, question, answer = of_skill[j]
            out["eval"].append({"messages": [{"role": "user", "content": question}], "answer": answer,
                                "skill": skill})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("corpus", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="folder for train.jsonl, val.jsonl, eval.jsonl")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--max-chars", type=int, default=100,
                        help="longest question + answer (the CPU config's context is 128 characters)")
    parser.add_argument("--eval-per-skill", type=int, default=100)
    args = parser.parse_args()
    data = build(args.corpus.read_text(encoding="utf-8"), args.seed, args.max_chars, args.eval_per_skill)
    args.out.mkdir(parents=True, exist_ok=True)
    for part, rows in data.items():
        (args.out / f"{part}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        print(f"{args.out / part}.jsonl: {len(rows)} conversations")


if __name__ == "__main__":
    main()
