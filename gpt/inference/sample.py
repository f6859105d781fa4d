"""Generation: KV-cache decoding, temperature / top-k / top-p, stops, and prompt framing.

Chat and few-shot prompting here are plain text framing for a base model, as in the GPT-2
and GPT-3 papers: the model continues a transcript, it has not been trained to follow
instructions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch

from gpt.chat import ChatTemplate, Message, fit_turns
from gpt.config import SampleConfig
from gpt.data.tokenizer import TextDecoder, Tokenizer
from gpt.device import autocast_for, pick_dtype
from gpt.errors import GptError
from gpt.model import GPT, KVCache, StaticKVCache, evaluating

CHAT_STOP = "\nUser:"


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float) -> torch.Tensor:
    """Set to -inf every logit outside the top k and outside the nucleus: the smallest set of
    most likely tokens whose probability reaches top_p (the most likely token always stays)."""
    logits = logits.clone()
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits[logits < kth] = -float("inf")
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        sorted_logits[mass_before >= top_p] = -float("inf")
        logits = torch.full_like(logits, -float("inf")).scatter(-1, order, sorted_logits)
    return logits


def sampling_probs(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float) -> torch.Tensor:
    """The distribution (B, vocab) that the next token is drawn from: logits divided by the
    temperature, filtered, softmaxed. Temperature 0 (greedy) puts all the mass on the argmax."""
    if temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(dim=-1), logits.size(-1)).float()
    return torch.softmax(filter_logits(logits.float() / temperature, top_k, top_p), dim=-1)


def pick_tokens(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float,
                generator: torch.Generator | None, vocab_size: int | None = None) -> torch.Tensor:
    """Next token ids (B,) from logits (B, vocab). Temperature 0 is greedy. Only ids below
    `vocab_size` (the tokenizer's) are picked: the special tokens a task run appends are not text."""
    logits = logits[..., :vocab_size]
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = sampling_probs(logits, temperature, top_k, top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def decode(model: GPT, idx: torch.Tensor, steps: int, pick: Callable[[torch.Tensor], torch.Tensor],
           use_cache: bool = True, copies: int = 1, static_cache: bool | None = None) -> Iterator[torch.Tensor]:
    """Yield `steps` next tokens (B * copies,) for the sequences idx (B, T), each continued as
    `copies` independent streams (rows b * copies to b * copies + copies - 1 continue idx[b]).

    With the cache the prompt is run once, however many copies, and each new token costs one
    attention row. The context is always the last block_size tokens: once it is full the
    window slides, which shifts every position, so each further step recomputes the cropped
    window (without the cache, which would be rebuilt every step). The result equals
    recomputing from scratch at every step, for every kind of position encoding.

    `static_cache` (default: on CUDA) uses a `StaticKVCache`; on CUDA the one-token step is
    then compiled once, with fixed shapes, and replayed as a CUDA graph (`CudaGraphStep`)."""
    block_size = model.config.block_size
    device = next(model.parameters()).device
    static = device.type == "cuda" if static_cache is None else static_cache
    cache = new_cache(model, idx.size(0), StaticKVCache if static else KVCache) if use_cache else None
    seq = idx[:, -block_size:]
    logits = model.forward_step(seq, cache)
    if copies > 1:
        seq, logits = seq.repeat_interleave(copies, dim=0), logits.repeat_interleave(copies, dim=0)
        if cache is not None:
            cache.repeat_interleave(copies)
    one_token_step = model.forward_step
    if isinstance(cache, StaticKVCache) and device.type == "cuda" and steps > 1 and seq.size(1) < block_size:
        one_token_step = CudaGraphStep(torch.compile(model.forward_step), cache)
    for step in range(steps):
        token = pick(logits)
        yield token
        if step + 1 == steps:
            return  # no forward pass for a token that will not be drawn
        seq = torch.cat([seq, token[:, None]], dim=1)
        if cache is not None and seq.size(1) <= block_size:  # the cache holds all but the new token
            logits = one_token_step(token[:, None], cache)
        else:
            seq = seq[:, -block_size:]
            logits = model.forward_step(seq, None)


class CudaGraphStep:
    """A one-token step recorded once as a CUDA graph and then replayed for every token. A
    small model's decoding on a GPU is bound by the host launching kernels one by one (GPT-2
    124M: about 7 ms per token eager or compiled on an H100, BENCHMARKS.md); a replay is one
    launch. The cache must be a `StaticKVCache`: its buffers keep their addresses and its
    position lives on the device, so the recorded graph stays valid from token to token.

    The logits returned are the graph's own output buffer, overwritten by the next call."""

    def __init__(self, step: Callable[[torch.Tensor, KVCache], torch.Tensor], cache: StaticKVCache):
        self.token = torch.zeros(cache.keys.size(1), 1, dtype=torch.long, device=cache.keys.device)
        position = cache.index.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # compile, choose kernels and allocate before recording
                step(self.token, cache)
                cache.index.copy_(position)  # what the warm-up wrote at this slot is written again
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # Autocast's cache of weights cast to bf16 must not hold tensors that live in the graph.
        autocast = torch.is_autocast_enabled("cuda")
        dtype = torch.get_autocast_dtype("cuda")
        with torch.autocast("cuda", dtype, enabled=autocast, cache_enabled=False), torch.cuda.graph(self.graph):
            self.logits = step(self.token, cache)

    def __call__(self, token: torch.Tensor, cache: KVCache) -> torch.Tensor:
        self.token.copy_(token)
        self.graph.replay()
        return self.logits


def new_cache(model: GPT, batch_size: int, kind: type[KVCache] = KVCache) -> KVCache:
    """A cache in the dtype attention runs in: the autocast dtype when one is active (half the
    bytes to read per token on a GPU), else the weights' dtype."""
    param = next(model.parameters())
    device = param.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else param.dtype
    return kind(model.config, batch_size, param.device, dtype)


def decoding_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """The precision decoding runs in: autocast on a GPU (bf16, or fp16 where bf16 is missing),
    fp32 elsewhere."""
    precision = pick_dtype("auto", device) if device.type == "cuda" else torch.float32
    return autocast_for(device, precision)()


@dataclass
class Sample:
    prompt: str
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    stop_reason: str = "max_tokens"
    tokens_per_s: float = 0.0
    done: bool = False

    def to_json(self) -> dict:
        return {"prompt": self.prompt, "text": self.text, "tokens": len(self.tokens),
                "stop_reason": self.stop_reason, "tokens_per_s": round(self.tokens_per_s, 2)}


def prompt_ids(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """Token ids of the prompt; an empty prompt starts from end-of-text (or a newline)."""
    if prompt:
        return tokenizer.encode(prompt)
    if tokenizer.eot is not None:
        return [tokenizer.eot]
    return tokenizer.encode("\n") if "\n" in getattr(tokenizer, "vocab", "\n") else [0]


def generate(model: GPT, tokenizer: Tokenizer, prompt: str, settings: SampleConfig,
             on_text: Callable[[str], None] | None = None, *, prompt_tokens: list[int] | None = None,
             end_token: int | None = None) -> list[Sample]:
    """Sample `settings.num_samples` continuations of `prompt` (or of the ids `prompt_tokens`)
    as one batch: the prompt is run once and its cache shared, then each sample draws its own
    tokens. On a GPU the forward passes run under autocast (bf16, or fp16 where bf16 is missing).

    Each sample stops at end-of-text (unless ignore_eot), at a stop string (the text is cut
    before it), at `end_token` (a chat model's `<|end|>`, the one appended token it may draw)
    or after max_new_tokens. `on_text` receives the first sample's text as it grows, holding
    back what could still turn out to be the start of a stop string."""
    device = next(model.parameters()).device
    ids = prompt_tokens if prompt_tokens is not None else prompt_ids(tokenizer, prompt)
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    generator = seeded_generator(device, settings.seed)
    growing = [GrowingText(tokenizer, settings.stop, settings.ignore_eot, end_token)
               for _ in range(settings.num_samples)]
    stream = Streamer(on_text, settings.stop) if on_text else None
    drawable = tokenizer.vocab_size if end_token is None else end_token + 1
    pick = functools.partial(pick_tokens, temperature=settings.temperature, top_k=settings.top_k,
                             top_p=settings.top_p, generator=generator, vocab_size=drawable)
    start = time.perf_counter()
    with evaluating(model), decoding_autocast(device):
        for tokens in decode(model, idx, settings.max_new_tokens, pick, settings.kv_cache, settings.num_samples):
            for text, token in zip(growing, tokens.tolist()):
                text.add(token)
            if stream:
                stream.update(growing[0].text)
            if all(text.done for text in growing):
                break
    elapsed = max(time.perf_counter() - start, 1e-9)
    for text in growing:
        text.finish()
    if stream:
        stream.finish(growing[0].text)
    return [Sample(prompt=prompt, tokens=text.tokens, text=text.text, stop_reason=text.stop_reason,
                   tokens_per_s=len(text.tokens) / elapsed, done=text.done) for text in growing]


def seeded_generator(device: torch.device, seed: int | None) -> torch.Generator:
    """A generator of its own for one stream of samples: seeded, or randomly when seed is None."""
    generator = torch.Generator(device=device)
    if seed is not None:
        generator.manual_seed(seed)
    else:
        generator.seed()
    return generator



class GrowingText:
    """The text of one sample as tokens arrive: decodes only the new token, looks for stop
    strings only where the new text could complete one, and marks the sample done when it ends
    (`stop_reason` "eot", "end" (a chat model's `end_token`), "stop", or "max_tokens" while it
    runs). `ends[i]` is the length of the text once token i is part of it (inf while its
    character is unfinished), which ties each token to its place in the text."""

    def __init__(self, tokenizer: Tokenizer, stop: list[str], ignore_eot: bool = False, end_token: int | None = None):
        self.tokenizer, self.stop, self.ignore_eot, self.end_token = tokenizer, stop, ignore_eot, end_token
        self.decoder = TextDecoder(tokenizer)
        self.longest_stop = max((len(s) for s in stop), default=0)
        self.tokens: list[int] = []
        self.ends: list[float] = []
        self.text = ""
        self.done = False
        self.stop_reason = "max_tokens"

    def add(self, token: int) -> None:
        if self.done:
            return
        if token == self.tokenizer.eot and not self.ignore_eot:
            self.done, self.stop_reason = True, "eot"
            return
        if token == self.end_token:
            self.done, self.stop_reason = True, "end"
            return
        self.tokens.append(token)
        self._extend(self.decoder.add(token))
        self.ends.append(math.inf)
        if not self.decoder.holding():
            self._place_tokens()

    def finish(self) -> None:
        if not self.done:
            self._extend(self.decoder.finish())
            self._place_tokens()

    def _place_tokens(self) -> None:
        """The tokens whose character was unfinished end where the text ends now."""
        i = len(self.ends) - 1
        while i >= 0 and self.ends[i] == math.inf:
            self.ends[i] = len(self.text)
            i -= 1

    def _extend(self, piece: str) -> None:
        if not piece:
            return
        search_from = max(0, len(self.text) - self.longest_stop + 1)
        self.text += piece
        hits = [i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.done, self.stop_reason = True, "stop"


class Streamer:
    """Passes on the growing text of one sample, never a part that a stop string may remove."""

    def __init__(self, on_text: Callable[[str], None], stops: list[str]):
        self.on_text = on_text
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.shown = 0

    def update(self, text: str) -> None:
        self._show(text, max(self.shown, len(text) - self.hold))

    def finish(self, text: str) -> None:
        self._show(text, len(text))

    def _show(self, text: str, end: int) -> None:
        if end > self.shown:
            self.on_text(text[self.shown:end])
            self.shown = end


def few_shot_prompt(examples: str, prompt: str) -> str:
    """Examples from a file, a blank line, then the prompt (GPT-3 style in-context learning)."""
    return examples.rstrip("\n") + "\n\n" + prompt


def chat_prompt(system: str | None, history: list[tuple[str, str]], user: str) -> str:
    """A conversation as a plain-text transcript that ends where the assistant speaks next."""
    messages = [Message("system", system)] if system else []
    for said, answered in history:
        messages += [Message("user", said), Message("assistant", answered)]
    return transcript([*messages, Message("user", user)])


def transcript(messages: list[Message]) -> str:
    """Messages framed as `System: ...`, `User: ...`, `Assistant: ...` lines, ending with
    `Assistant:`: how a base model, which only continues documents, is made to chat."""
    names = {"system": "System", "user": "User", "assistant": "Assistant"}
    return "\n".join([*(f"{names[m.role]}: {m.content}" for m in messages), "Assistant:"])


def crop_to_context(prompt: str, tokenizer: Tokenizer, budget: int) -> str:
    """Keep the end of a long prompt so that `budget` tokens of it fit in the context window."""
    ids = tokenizer.encode(prompt)
    return tokenizer.decode(ids[-budget:]) if budget > 0 and len(ids) > budget else prompt


def reply_prompt(tokenizer: Tokenizer, messages: list[Message], room: int, template: ChatTemplate | None = None,
                 examples: str | None = None) -> tuple[list[int], bool]:
    """The ids that prompt a reply to `messages` (ending with a user turn), at most `room` of
    them, and whether the conversation had to lose its start to fit. A chat model's template
    drops whole turns, oldest first (system messages stay); a base model's transcript, after
    optional solved `examples`, is cropped from the start."""
    if template is not None:
        sizes = {m: len(tokenizer.encode(m.content)) + 2 for m in messages}  # role token, text, <|end|>
        fixed = 1 + (tokenizer.eot is not None)  # <|assistant|>, and end-of-text first
        fitted = fit_turns(messages, room, sizes.__getitem__, fixed, reply=True)
        if fitted is None:
            least = fixed + sum(sizes[m] for m in messages if m.role == "system") + sizes[messages[-1]]
            raise GptError(f"the system message and the last turn take {least} tokens, more than the {room} left for "
                           "the prompt in the model's context; shorten them or lower max_new_tokens")
        kept, dropped = fitted
        return template.render(tokenizer, kept, reply=True)[0], dropped
    prompt = transcript(messages)
    if examples is not None:
        prompt = few_shot_prompt(examples, prompt)
    cropped = crop_to_context(prompt, tokenizer, room)
    return prompt_ids(tokenizer, cropped), cropped != prompt


def reply(model: GPT, tokenizer: Tokenizer, messages: list[Message], settings: SampleConfig,
          template: ChatTemplate | None = None, examples: str | None = None) -> tuple[str, bool]:
    """The model's reply to a conversation (ending with a user turn), through its chat template
    or, for a base model, the transcript framing; and whether old turns were dropped to fit."""
    settings = dataclasses.replace(settings, num_samples=1, stop=settings.stop + ([] if template else [CHAT_STOP]))
    block_size = model.config.block_size
    # Room for the reply; a reply longer than half the context slides the window over the prompt.
    room = max(block_size - settings.max_new_tokens, block_size // 2)
    ids, dropped = reply_prompt(tokenizer, messages, room, template, examples)
    sample = generate(model, tokenizer, "", settings, prompt_tokens=ids,
                      end_token=template.end if template else None)[0]
    return sample.text.strip(), dropped


def chat(model: GPT, tokenizer: Tokenizer, settings: SampleConfig, turns: Iterable[str],
         system: str | None = None, examples: str | None = None, template: ChatTemplate | None = None,
         on_drop: Callable[[], None] | None = None) -> Iterator[str]:
    """Reply to each user turn in `turns` (blank ones are skipped), keeping the whole
    conversation in the prompt; when it outgrows the context its oldest turns go (`on_drop` is
    told the first time)."""
    messages = [Message("system", system)] if system else []
    told = False
    for user in turns:
        if not user.strip():
            continue
        messages.append(Message("user", user))
        answer, dropped = reply(model, tokenizer, messages, settings, template, examples)
        if dropped and not told and on_drop is not None:
            on_drop()
            told = True
        messages.append(Message("assistant", answer))
        yield answer
