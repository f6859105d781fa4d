"""Chat: the one template that turns a conversation into tokens, for training (`task.kind:
chat`), `gpt chat`, `gpt eval --chat`, `gpt serve` and the Hugging Face `chat_template`.

A chat model's vocabulary is its tokenizer's plus four tokens appended after it, in this order:

    <|end|>  <|system|>  <|user|>  <|assistant|>

A conversation renders as (end-of-text first when the tokenizer has one, as every prepared
document starts):

    <|endoftext|> <|system|> text <|end|> <|user|> text <|end|> <|assistant|> text <|end|> ...

and a prompt for the next reply ends with `<|assistant|>`. The text of a message is always
encoded as plain text: a user who types `<|assistant|>` gets those characters, never the token.
Training learns the assistant turns' text and the `<|end|>` that closes each one (the loss
mask); with `task.train_on_prompt` every token after the first. `<|end|>` comes first so that a
sampler can allow the text vocabulary plus `<|end|>` (ids below `end + 1`) and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from gpt.config import Config
from gpt.data.tokenizer import Tokenizer
from gpt.errors import GptError
from gpt.supervised import IGNORE, encode_text, read_jsonl

CHAT_TOKENS = ("<|end|>", "<|system|>", "<|user|>", "<|assistant|>")
ROLES = ("system", "user", "assistant")
FORMAT = ('{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]} or '
          '{"prompt": "...", "completion": "..."}')


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class ChatTemplate:
    """The chat tokens of a model whose tokenizer has `text_vocab` ids."""

    text_vocab: int

    @property
    def end(self) -> int:
        return self.text_vocab

    def role_token(self, role: str) -> int:
        return self.text_vocab + 1 + ROLES.index(role)

    @property
    def vocab_size(self) -> int:
        return self.text_vocab + len(CHAT_TOKENS)

    @classmethod
    def of(cls, config: Config) -> ChatTemplate | None:
        """The template of a chat model's config; None for any other model."""
        if config.task.kind != "chat":
            return None
        return cls(config.model.vocab_size - len(CHAT_TOKENS))

    def describe(self) -> str:
        """What `gpt info` says of a chat model."""
        ids = ", ".join(f"{token}={self.end + i}" for i, token in enumerate(CHAT_TOKENS))
        return f"chat model: template tokens {ids} (after the tokenizer's {self.text_vocab})"

    def render(self, tokenizer: Tokenizer, messages: list[Message], *, reply: bool = False,
               train_on_prompt: bool = False, where: str = "the conversation") -> tuple[list[int], list[bool]]:
        """Token ids of a conversation and, for each, whether training predicts it (the loss
        mask). With `reply`, the ids end with `<|assistant|>`: the prompt for the next reply."""
        ids = [] if tokenizer.eot is None else [tokenizer.eot]
        for message in messages:
            ids.append(self.role_token(message.role))
            ids += encode_text(tokenizer, message.content, where) + [self.end]
        if reply:
            ids.append(self.role_token("assistant"))
        return ids, self.loss_mask(ids, train_on_prompt)

    def loss_mask(self, ids: list[int], train_on_prompt: bool = False) -> list[bool]:
        """True at the tokens an assistant turn says (its text and closing `<|end|>`), or at
        every token but the first with `train_on_prompt`."""
        mask, speaking = [], False
        for i, token in enumerate(ids):
            if token > self.end:  # a role token opens a turn
                speaking = token == self.role_token("assistant")
                mask.append(train_on_prompt)
            else:
                mask.append(train_on_prompt and i > 0 or speaking)
                if token == self.end:
                    speaking = False
        return mask

    def hf_tokenizer_config(self, eot_text: str | None) -> dict[str, Any]:
        """The part of a Hugging Face tokenizer_config.json that makes `apply_chat_template`
        give our ids: the chat tokens as special tokens at their ids, and the template."""
        added = {str(self.end + i): {"content": token, "special": True, "lstrip": False, "rstrip": False,
                                     "normalized": False, "single_word": False}
                 for i, token in enumerate(CHAT_TOKENS)}
        return {"added_tokens_decoder": added, "chat_template": self.jinja(eot_text)}

    def jinja(self, eot_text: str | None) -> str:
        """The same template in Jinja, for Hugging Face's `tokenizer.apply_chat_template`."""
        start = "{{ '" + eot_text + "' }}" if eot_text else ""
        return (start + "{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] + "
                "'<|end|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")


# ----------------------------------------------------------------------------- chat files

def conversation(record: Any, where: str) -> list[Message]:
    """One line of a chat file as messages: OpenAI's fine-tuning format or prompt/completion."""
    if not isinstance(record, dict):
        raise GptError(f"{where}: not a JSON object; a conversation is {FORMAT}")
    if "messages" not in record:
        if "prompt" in record and "completion" in record:
            record = {"messages": [{"role": "user", "content": record["prompt"]},
                                   {"role": "assistant", "content": record["completion"]}]}
        else:
            raise GptError(f"{where}: missing key 'messages'; a conversation is {FORMAT}")
    turns = record["messages"]
    if not isinstance(turns, list) or not turns:
        raise GptError(f"{where}: \"messages\" must be a non-empty list of {{\"role\", \"content\"}} objects")
    messages = []
    for number, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise GptError(f"{where}: message {number} must be an object with \"role\" and \"content\"")
        if turn["role"] not in ROLES:
            raise GptError(f"{where}: message {number} has role {turn['role']!r}; use system, user or assistant")
        if not isinstance(turn["content"], str):
            raise GptError(f"{where}: message {number}'s content must be a string")
        messages.append(Message(turn["role"], turn["content"]))
    return messages


@dataclass
class ChatItem:
    """A conversation of a chat file, where it came from, and for an eval file the answer the
    reply to its last (user) turn is scored against, and its skill (for a per-skill score)."""

    messages: list[Message]
    where: str
    answer: str | None = None
    skill: str | None = None


def read_chat_file(path: str | Path) -> list[ChatItem]:
    """The conversations of a training or validation file; each needs an assistant turn."""
    items = []
    for record, line in read_jsonl(path, "conversations"):
        where = f"{path}:{line}"
        messages = conversation(record, where)
        if not any(m.role == "assistant" for m in messages):
            raise GptError(f"{where}: no assistant turn, nothing to learn; add one (or use it in a --chat eval file)")
        items.append(ChatItem(messages, where))
    return items


def read_chat_eval_file(path: str | Path) -> list[ChatItem]:
    """Items of `gpt eval --chat`: a conversation that ends with a user turn, and "answer"."""
    items = []
    for record, line in read_jsonl(path, "conversations with an \"answer\""):
        where = f"{path}:{line}"
        messages = conversation(record, where)
        if messages[-1].role != "user":
            raise GptError(f"{where}: the conversation must end with a user turn, which the model answers")
        answer, skill = record.get("answer"), record.get("skill")
        if not isinstance(answer, str):
            raise GptError(f"{where}: missing or non-string \"answer\"; give the expected reply as a string")
        if skill is not None and not isinstance(skill, str):
            raise GptError(f"{where}: \"skill\" must be a string")
        items.append(ChatItem(messages, where, answer=answer, skill=skill))
    return items


# ----------------------------------------------------------------------------- training rows

@dataclass
class ChatExample:
    """A rendered conversation: its ids and loss mask, and whether old turns were dropped."""

    ids: list[int]
    mask: list[bool]
    truncated: bool


def fit_turns(messages: list[Message], room: int, size: Callable[[Message], int], fixed: int = 0,
              reply: bool = False) -> tuple[list[Message], bool] | None:
    """`messages` without their oldest turns, as few as it takes for their sizes (plus `fixed`)
    to fit in `room` tokens, and whether any went. System messages stay; turns go up to the next
    user turn at a time; the last assistant turn (with `reply`, a prompt for the next reply: the
    last turn) never goes. None when even that does not fit."""
    system = [m for m in messages if m.role == "system"]
    turns = [m for m in messages if m.role != "system"]
    keep = len(turns) - 1 if reply else max(i for i, m in enumerate(turns) if m.role == "assistant")
    start, used = 0, fixed + sum(size(m) for m in messages)
    while used > room:
        used -= size(turns[start])
        start += 1
        while start < len(turns) and turns[start].role != "user" and start <= keep:
            used -= size(turns[start])
            start += 1
        if start > keep:
            return None
    return system + turns[start:], start > 0


def encode_conversations(items: list[ChatItem], template: ChatTemplate, tokenizer: Tokenizer, block_size: int,
                         train_on_prompt: bool) -> tuple[list[ChatExample], int]:
    """Render every conversation to at most block_size + 1 ids (inputs and targets of one row);
    returns the examples and how many conversations were skipped as too long."""
    examples, skipped = [], 0
    start = 0 if tokenizer.eot is None else 1
    for item in items:
        sizes = {m: len(encode_text(tokenizer, m.content, item.where)) + 2 for m in item.messages}  # role + end
        fitted = fit_turns(item.messages, block_size + 1, sizes.__getitem__, start)
        if fitted is None:
            skipped += 1
            continue
        messages, truncated = fitted
        ids, mask = template.render(tokenizer, messages, train_on_prompt=train_on_prompt, where=item.where)
        examples.append(ChatExample(ids, mask, truncated))
    return examples, skipped


def collate(examples: list[ChatExample]) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) padded on the right to the longest row; a target is IGNORE where the
    mask is off and at padding, so the loss is the mean over the learned tokens of the batch."""
    width = max(len(e.ids) for e in examples) - 1
    x = torch.zeros(len(examples), width, dtype=torch.long)
    y = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for row, example in enumerate(examples):
        ids, mask = torch.tensor(example.ids), torch.tensor(example.mask)
        x[row, :len(ids) - 1] = ids[:-1]
        y[row, :len(ids) - 1] = torch.where(mask[1:], ids[1:], IGNORE)
    return x, y
