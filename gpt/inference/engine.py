"""Continuous batching: token sequences decoded together, each joining the running batch at the
next step and leaving when it is done, over one `RaggedKVCache` whose rows sit at their own
positions (vLLM's and TGI's scheduling, at the scale of one process).

The engine knows only token ids (as nanochat's engine.py): text, stop strings and the HTTP side
live with the caller, which hears of each token through `Sequence.on_token` and decides there
whether the sequence ends. Each sequence samples with its own settings and its own
torch.Generator, through the same filter as `gpt sample`, so its tokens are those it would get
alone, up to float rounding: a batched matrix product may round differently from one row's, so
two candidates whose logits tie to ~1e-6 can swap (see README, Serve).
"""

from __future__ import annotations

import functools
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from gpt.inference.sample import decoding_autocast, new_cache, pick_tokens, seeded_generator
from gpt.model import GPT, RaggedKVCache


@dataclass
class Token:
    """One token of a sequence and, when asked for, its log-probability under the model (before
    temperature and filters) and the `top` most likely alternatives as (id, logprob)."""
    id: int
    logprob: float | None = None
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass(eq=False)
class Sequence:
    """A prompt to continue and how. `on_token` runs on the engine's thread for each new token
    and returns True when the sequence should end there (end-of-text, a stop string);
    `on_end(reason)` runs once at the end, reason "length" (max_tokens or the context is
    full), "stop" (on_token said so), "cancelled" or "error" (`error` then holds the cause)."""
    prompt: list[int]
    max_tokens: int
    on_token: Callable[[Token], bool]
    on_end: Callable[[str], None]
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    seed: int | None = None
    logprobs: int | None = None  # None: none; k: the chosen token's and the k most likely
    prompt_logprobs: bool = False  # also for the prompt's tokens (after the first), in `prompt_tokens`
    prompt_tokens: list[Token] = field(default_factory=list)
    generator: torch.Generator | None = None
    generated: int = 0
    cancelled: bool = False
    error: BaseException | None = None


class QueueFull(Exception):
    """More sequences wait than the engine was told to hold."""


class Engine:
    """Runs sequences on `model` in batches of up to `max_batch`, with up to `max_queue` more
    waiting; `run` loops on a thread of its own. `after_step(urgent)` is called after each
    forward pass (where a caller hands on what the callbacks gathered, once per pass rather than
    once per token); urgent after a prefill (first tokens) and when no sequence runs any more
    (nothing later would carry what is pending). `submit` and `cancel` may be called from any
    thread. `vocab_size` is the tokenizer's: ids above it (appended special tokens) are never
    sampled. `threads`: torch's threads on the engine's thread (None: as many as where it is made;
    see `serve.cores_to_the_engine`)."""

    def __init__(self, model: GPT, vocab_size: int, max_batch: int = 8, max_queue: int = 64,
                 after_step: Callable[[bool], None] = lambda urgent: None, threads: int | None = None):
        self.model, self.vocab_size, self.after_step = model.eval(), vocab_size, after_step
        self.threads = threads or torch.get_num_threads()
        self.max_batch, self.max_queue = max_batch, max_queue
        self.device = next(model.parameters()).device
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # running[i] lives in row i of the cache
        self.last: list[int] = []  # running[i]'s newest token, fed at the next step
        self.wake = threading.Condition()
        self.stopping = False
        with decoding_autocast(self.device):
            self.cache: RaggedKVCache = new_cache(model, max_batch, RaggedKVCache)

    def submit(self, sequences: list[Sequence]) -> None:
        """Queue sequences to join the batch, all or none: QueueFull when they do not fit."""
        context = self.cache.keys.size(3)
        for sequence in sequences:
            if not 1 <= len(sequence.prompt) <= context or sequence.max_tokens < 1:
                raise ValueError(f"a prompt needs 1 to {context} tokens and max_tokens at least 1")
        with self.wake:
            if self.stopping:
                raise QueueFull("the server is shutting down")
            if len(self.waiting) + len(sequences) > self.max_queue:
                raise QueueFull(f"{len(self.waiting)} sequences wait already (at most {self.max_queue})")
            self.waiting.extend(sequences)
            self.wake.notify()

    def cancel(self, sequences: list[Sequence]) -> None:
        """End sequences at the next step, freeing their rows (a client went away)."""
        with self.wake:
            for sequence in sequences:
                sequence.cancelled = True
            self.wake.notify()

    def stop(self) -> None:
        """End every sequence ("cancelled") and make `run` return."""
        with self.wake:
            self.stopping = True
            self.wake.notify()

    def busy(self) -> int:
        """Sequences running or waiting."""
        return len(self.running) + len(self.waiting)

    def run(self) -> None:
        """Step until `stop`; sleeps while there is nothing to do."""
        torch.set_num_threads(self.threads)  # a thread's own setting in torch's OpenMP builds
        with torch.inference_mode(), decoding_autocast(self.device):
            while True:
                with self.wake:
                    while not (self.stopping or self.waiting or self.running):
                        self.wake.wait()
                    if self.stopping:
                        break
                self.step()
        for sequence in [*self.running, *self.waiting]:
            self._end(sequence, "cancelled")
        self.running, self.waiting = [], deque()
        self.after_step(True)

    def step(self) -> None:
        """Let waiting sequences into free rows (one prefill for all of them, again while more
        came meanwhile and rows are free), then decode one token for every running sequence.
        A failure ends the sequences of that forward pass with "error", and the engine goes on."""
        self._drop_cancelled()
        joining = self._admit()
        while joining:  # prefills first: requests that came during one join before the batch decodes
            self._guarded(joining, functools.partial(self._prefill, joining))
            self.after_step(True)  # the first tokens go out now, not after the decoding pass too
            joining = self._admit()
        if self.running:
            self._guarded(list(self.running), self._decode)
        self.after_step(not self.running)

    def _guarded(self, sequences: list[Sequence], work: Callable[[], None]) -> None:
        try:
            work()
        except Exception as exc:  # a fault of this forward pass: its sequences end, the others go on
            for sequence in sequences:
                sequence.error = exc
                if sequence in self.running:
                    self._leave(sequence, "error")

    def _admit(self) -> list[Sequence]:
        joining = []
        with self.wake:
            while self.waiting and len(self.running) < self.max_batch:
                sequence = self.waiting.popleft()
                if sequence.cancelled:
                    self._end(sequence, "cancelled")
                    continue
                joining.append(sequence)
                self.running.append(sequence)
                self.last.append(-1)
        return joining

    def _prefill(self, joining: list[Sequence]) -> None:
        """Run the prompts of the joining sequences as one padded batch into their rows, and
        draw each one's first token."""
        first = len(self.running) - len(joining)
        for row in range(first, len(self.running)):
            self.cache.lengths[row] = 0
        counts = [len(sequence.prompt) for sequence in joining]
        idx = torch.zeros(len(joining), max(counts), dtype=torch.long, device=self.device)
        for b, sequence in enumerate(joining):
            idx[b, :counts[b]] = torch.tensor(sequence.prompt, device=self.device)
            sequence.generator = seeded_generator(self.device, sequence.seed)
        self.cache.run(first, counts)
        states = self.model.hidden_states(idx, self.cache)
        last = torch.tensor(counts, device=self.device) - 1
        logits = self.model.logits(states[torch.arange(len(joining), device=self.device), last])
        for b, sequence in enumerate(joining):
            if sequence.prompt_logprobs:
                prompt_logits = self.model.logits(states[b, :counts[b] - 1])
                sequence.prompt_tokens = self._scored(prompt_logits, sequence.prompt[1:], sequence.logprobs or 0)
        self._sample(joining, logits, first)

    def _decode(self) -> None:
        """One token for every running sequence."""
        full = [s for row, s in enumerate(self.running) if self.cache.lengths[row] >= self.cache.keys.size(3)]
        for sequence in full:  # the context has no room for its newest token
            self._leave(sequence, "length")
        if not self.running:
            return
        idx = torch.tensor(self.last, device=self.device)[:, None]
        self.cache.run(0, [1] * len(self.running))
        logits = self.model.forward_step(idx, self.cache)
        self._sample(list(self.running), logits, 0)

    def _sample(self, sequences: list[Sequence], logits: torch.Tensor, first: int) -> None:
        """Draw each sequence's next token from its row of logits, tell its owner, and let go of
        the sequences that are done."""
        ended = []
        for b, sequence in enumerate(sequences):
            row_logits = logits[b:b + 1]
            token = pick_tokens(row_logits, sequence.temperature, sequence.top_k, sequence.top_p,
                                sequence.generator, self.vocab_size)
            chosen = int(token.item())
            scored = self._scored(row_logits, [chosen], sequence.logprobs)[0]
            self.last[first + b] = chosen
            sequence.generated += 1
            if sequence.on_token(scored):
                ended.append((sequence, "stop"))
            elif sequence.generated >= sequence.max_tokens:
                ended.append((sequence, "length"))
        for sequence, reason in ended:
            self._leave(sequence, reason)

    def _scored(self, logits: torch.Tensor, ids: list[int], top: int | None) -> list[Token]:
        """Tokens `ids` (one per row of logits) with their log-probabilities and `top`
        alternatives; without `top` (None), the ids alone."""
        if top is None:
            return [Token(i) for i in ids]
        logprobs = torch.log_softmax(logits[:, :self.vocab_size].float(), dim=-1)
        chosen = logprobs.gather(1, torch.tensor(ids, device=logits.device)[:, None])[:, 0].tolist()
        best = torch.topk(logprobs, top, dim=-1) if top else None
        return [Token(i, lp, list(zip(best.indices[r].tolist(), best.values[r].tolist())) if best is not None else [])
                for r, (i, lp) in enumerate(zip(ids, chosen))]

    def _drop_cancelled(self) -> None:
        for sequence in [s for s in self.running if s.cancelled]:
            self._leave(sequence, "cancelled")

    def _leave(self, sequence: Sequence, reason: str) -> None:
        """Free the sequence's row: the last running row moves into it, so that the running rows
        stay a block at the top of the cache."""
        row, last = self.running.index(sequence), len(self.running) - 1
        if row != last:
            self.cache.move(last, row)
            self.running[row], self.last[row] = self.running[last], self.last[last]
        self.cache.lengths[last] = 0
        self.running.pop()
        self.last.pop()
        self._end(sequence, reason)

    def _end(self, sequence: Sequence, reason: str) -> None:
        sequence.generator = None
        sequence.on_end(reason)

