"""`gpt eval --chat`: can the model answer? Each item is a conversation that ends with a user
turn, plus the expected "answer"; the model replies greedily and the reply is scored by exact
match after trimming whitespace (or, with `--match contains`, by containing the answer), as
nanochat scores its chat tasks and GSM8K-style answers are scored.

A chat model replies through its chat template. A base model replies through the transcript
framing of `gpt chat` (`User: ...` / `Assistant:`), optionally after `shots` solved examples of
the same file (other items, drawn with a seed), and its reply ends at the end of its line.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpt.chat import ChatItem, ChatTemplate, read_chat_eval_file
from gpt.config import SampleConfig
from gpt.data.tokenizer import Tokenizer
from gpt.errors import GptError
from gpt.evaluation.perplexity import Autocast, progress
from gpt.inference.sample import reply, transcript

MATCHES = ("exact", "contains")
REPLY_MARGIN = 8  # tokens a reply may run past the length of its answer


@dataclass
class ChatScore:
    where: str
    skill: str | None
    answer: str
    reply: str

    def correct(self, match: str) -> bool:
        reply, answer = self.reply.strip(), self.answer.strip()
        return reply == answer if match == "exact" else answer in reply

    def to_json(self, match: str) -> dict[str, Any]:
        return {"where": self.where, "skill": self.skill, "answer": self.answer, "reply": self.reply,
                "correct": self.correct(match)}


@dataclass
class ChatResult:
    name: str
    shots: int
    match: str
    scores: list[ChatScore] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return float(np.mean([s.correct(self.match) for s in self.scores]))

    def by_skill(self) -> dict[str, float]:
        grouped: dict[str, list[bool]] = defaultdict(list)
        for score in self.scores:
            if score.skill is not None:
                grouped[score.skill].append(score.correct(self.match))
        return {skill: float(np.mean(found)) for skill, found in sorted(grouped.items())}

    def details(self) -> list[dict[str, Any]]:
        """One object per item for `--details`: its reply and whether it counts."""
        return [{"chat": self.name, "shots": self.shots, **score.to_json(self.match)} for score in self.scores]

    def to_json(self) -> dict[str, Any]:
        return {"chat": self.name, "items": len(self.scores), "shots": self.shots, "match": self.match,
                "accuracy": self.accuracy, "skills": self.by_skill()}


def solved_examples(items: list[ChatItem], index: int, shots: int, seed: int) -> str | None:
    """`shots` other items of the file with their answers, as transcripts joined by blank lines:
    how a base model is shown what a reply looks like (the draw depends on the seed and index)."""
    if shots == 0:
        return None
    others = [i for i in np.random.default_rng([seed, index]).permutation(len(items)) if i != index][:shots]
    if len(others) < shots:
        raise GptError(f"--shots {shots} needs {shots} other items, but the file has {len(items)}; lower --shots")
    return "\n\n".join(transcript(items[i].messages) + " " + items[i].answer for i in others)


@torch.no_grad()
def evaluate_chat(model: torch.nn.Module, tokenizer: Tokenizer, items: list[ChatItem], template: ChatTemplate | None,
                  *, name: str = "chat", shots: int = 0, seed: int = 1337, match: str = "exact",
                  autocast: Autocast = contextlib.nullcontext) -> ChatResult:
    """Greedy replies to every item, scored against its answer."""
    if match not in MATCHES:
        raise GptError(f"--match must be exact or contains, got {match!r}")
    if shots and template is not None:
        raise GptError("--shots shows a base model solved examples; a chat model is scored through its chat "
                       "template: drop --shots")
    result = ChatResult(name=name, shots=shots, match=match)
    with progress(len(items), name) as bar, autocast():
        for index, item in enumerate(items):
            # Room for the answer and a few tokens more: a longer reply cannot match exactly anyway.
            settings = SampleConfig(temperature=0.0, max_new_tokens=len(tokenizer.encode(item.answer)) + REPLY_MARGIN,
                                    stop=[] if template else ["\n"])
            examples = solved_examples(items, index, shots, seed)
            try:
                text, _ = reply(model, tokenizer, item.messages, settings, template, examples)
            except GptError as exc:
                raise GptError(f"{item.where}: {exc}") from None
            result.scores.append(ChatScore(item.where, item.skill, item.answer, text))
            bar.update(1)
    return result


def evaluate_chat_file(model: torch.nn.Module, tokenizer: Tokenizer, path: str | Path,
                       template: ChatTemplate | None, **options: Any) -> ChatResult:
    """`gpt eval --chat FILE`: every item of a chat eval file (see `gpt.chat.read_chat_eval_file`)."""
    return evaluate_chat(model, tokenizer, read_chat_eval_file(path), template, name=Path(path).stem, **options)
