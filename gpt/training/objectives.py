"""What a run trains for: language modelling (pretraining, LM fine-tuning) or a GPT-1 task.

An `Objective` gives the training loop in `gpt.training.loop` the module to train around the GPT, the
micro-batches it reads and what an evaluation reports; it also checks the data, the config and
a `train.init_from` source before anything is written.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch

from gpt.chat import CHAT_TOKENS, ChatTemplate, encode_conversations, read_chat_eval_file, read_chat_file
from gpt.chat import collate as collate_chat
from gpt.checkpoint import HEAD_PREFIX, Checkpoint, assign_weights, split_head
from gpt.config import Config, ModelConfig
from gpt.convert import ImportedModel, read_model_source
from gpt.data.formats import DatasetMeta
from gpt.data.shards import BatchSampler, Dataset, Sampler, load_dataset
from gpt.data.tokenizer import TokenizerSpec
from gpt.errors import GptError
from gpt.evaluation.chat import evaluate_chat
from gpt.evaluation.perplexity import bits_per_byte
from gpt.model import GPT, evaluating
from gpt.supervised import BucketSampler, with_appended_rows
from gpt.tasks.framing import NUM_SPECIAL, encode_items, task_sampler
from gpt.tasks.items import label_names, read_task_file
from gpt.tasks.model import TaskHead, TaskModel, evaluate_split, make_head
from gpt.training import distributed
from gpt.training.metrics import Evaluation

# Model fields that may change between a checkpoint and the run that continues it.
NON_SHAPE_FIELDS = {"dropout", "attn_dropout", "preset"}


# ----------------------------------------------------------------------------- checks

def resolve_vocab(config: Config, dataset: Dataset) -> Config:
    """Fill model.vocab_size from the data, or check that the given one matches it."""
    if config.model.vocab_size is None:
        model = dataclasses.replace(config.model, vocab_size=dataset.vocab_size)
        return dataclasses.replace(config, model=model)
    if config.model.vocab_size != dataset.vocab_size:
        raise GptError(f"model.vocab_size is {config.model.vocab_size} but the data in {dataset.folder} has "
                       f"{dataset.vocab_size} tokens; set model.vocab_size=null to take it from the data")
    return config


def check_block_size(dataset: Dataset, block_size: int) -> None:
    for split, shards in dataset.splits.items():
        longest = max((len(s) for s in shards), default=0)
        if longest <= block_size:
            raise GptError(f"the {split} split's longest shard has {longest} tokens, not more than "
                           f"model.block_size={block_size}; lower model.block_size or prepare more data")


def shape_differences(a: ModelConfig, b: ModelConfig) -> list[str]:
    return [f.name for f in dataclasses.fields(ModelConfig)
            if f.name not in NON_SHAPE_FIELDS and getattr(a, f.name) != getattr(b, f.name)]


def start_differences(source: ModelConfig, config: Config) -> list[str]:
    """The model settings in which a fine-tune differs from the model it starts from and may not:
    any shape but a vocabulary grown by the tokens a task or chat appends, and a shorter context."""
    return [name for name in shape_differences(source, config.model)
            if not (name == "vocab_size" and _grows_for_task(source, config))
            and not (name == "block_size" and config.model.block_size < source.block_size)]


def check_init_from(path: str, config: Config, tokenizer: TokenizerSpec) -> ImportedModel:
    """Fine-tuning start: the language model of another run (or of a Hugging Face GPT-2 folder,
    `hf:DIR`), checked against this model and tokenizer. A task run's model has rows for the
    special tokens that a language model lacks: they keep their fresh initialisation. Its
    context may be shorter than the source's (a task's inputs are short; a pretraining recipe
    may differ by host), not longer: positions it never saw."""
    source = read_model_source(path)
    if config.task.kind is None and any(name.startswith(HEAD_PREFIX) for name in source.weights):
        raise GptError(f"train.init_from {path} is a task model (it has a task head, and its vocabulary has "
                       f"{NUM_SPECIAL} special tokens); start from the language model it was fine-tuned from")
    if source.tokenizer != tokenizer:  # before the shapes: a vocabulary of another size is this
        fix = ("a char model goes on only with data of exactly its characters: prepare text that has the same "
               "ones, or train from scratch" if source.tokenizer.name == "char" == tokenizer.name
               else "prepare the data with the checkpoint's tokenizer")
        raise GptError(f"train.init_from {path}: "
                       f"{source.tokenizer.difference(tokenizer, 'the checkpoint', 'the data')}; {fix}")
    changed = start_differences(source.config, config)
    if changed:
        detail = ", ".join(f"model.{n}={getattr(source.config, n)!r} (here {getattr(config.model, n)!r})"
                           for n in changed)
        # A shipped base recipe may differ by host (hosts:), so the fine-tune's file can be right
        # elsewhere: say what to add to this command line.
        settings = " ".join(f"model.{n}={getattr(source.config, n)}" for n in changed if n != "vocab_size")
        fix = f"add {settings} to the command line" if settings else "use the checkpoint's model settings"
        raise GptError(f"train.init_from {path}: the checkpoint's model differs: {detail}; {fix}")
    return source


def appended_tokens(config: Config) -> int:
    """How many tokens a run appends after its tokenizer's vocabulary: GPT-1's start, delim and
    extract for a task, the chat template's four for chat, none for a language model."""
    return {None: 0, "chat": len(CHAT_TOKENS)}.get(config.task.kind, NUM_SPECIAL)


def _grows_for_task(source: ModelConfig, config: Config) -> bool:
    added = appended_tokens(config)
    return added > 0 and source.vocab_size + added == config.model.vocab_size


def init_weights(model: GPT, source: ImportedModel, config: Config) -> None:
    """Copy a checked `check_init_from` source into a new model; a task head never carries over,
    appended tokens (task or chat) get fresh rows, and a shorter context the source's first
    learned positions."""
    weights, _ = split_head(source.weights)
    if _grows_for_task(source.config, config):
        weights = with_appended_rows(weights, model)
    if "wpe.weight" in weights:  # a shorter context keeps the first positions (nanoGPT's crop_block_size)
        weights = {**weights, "wpe.weight": weights["wpe.weight"][:config.model.block_size]}
    assign_weights(model, weights, config.train.init_from)


def new_model(config: Config, source: ImportedModel | None) -> GPT:
    """The GPT of `config`, with `source`'s weights when the run starts from another model."""
    model = GPT(config.model)
    if source is not None:
        init_weights(model, source, config)
    return model


# ----------------------------------------------------------------------------- objectives

class Objective(Protocol):
    """What a run trains for. The loop is the same for every objective; what differs is the
    module trained around the GPT, the micro-batches (tuples of tensors that the module's
    forward takes, returning (output, loss)) and what an evaluation reports."""

    config: Config            # resolved: the vocabulary size (and a task's labels) filled in
    tokenizer: TokenizerSpec  # saved with every checkpoint
    unit: str                 # what one row of a micro-batch is, for the start-up line

    def describe(self) -> str: ...

    def build_model(self, source: ImportedModel | None) -> tuple[GPT, torch.nn.Module | None, torch.nn.Module]:
        """(the GPT, a task head or None, the module to train), started from `source`'s weights if given."""

    def sampler(self, seed: list[int], dist: distributed.Dist) -> Sampler:
        """The training micro-batches of this process (rank `dist.rank`)."""

    def evaluate(self, model: torch.nn.Module, device: torch.device, autocast: Callable,
                 dist: distributed.Dist) -> Evaluation:
        """Losses (and accuracies) that agree on every rank."""

    def eval_batches(self) -> int:
        """Batches of train.batch_size rows an evaluation reads (a time budget estimates its cost)."""


class LanguageModelling:
    """Pretraining and LM fine-tuning: random windows of the token shards, next-token loss."""

    def __init__(self, config: Config):
        self.dataset = load_dataset(config.data.dir)
        self.config = resolve_vocab(config, self.dataset)
        check_block_size(self.dataset, config.model.block_size)
        if "train" not in self.dataset.splits:
            raise GptError(f"{self.dataset.folder} has no train split; run `gpt prepare` again")
        self.tokenizer = self.dataset.meta.tokenizer
        self.unit = f"sequences of {config.model.block_size} tokens"

    def describe(self) -> str:
        return f"data: {self.dataset.folder}, {self.dataset.num_tokens('train'):,} train tokens"

    def build_model(self, source: ImportedModel | None) -> tuple[GPT, None, GPT]:
        model = new_model(self.config, source)
        return model, None, model

    def sampler(self, seed: list[int], dist: distributed.Dist) -> BatchSampler:
        # One seed for all ranks: each draws the job's batch and keeps its rows (see BatchSampler).
        return BatchSampler(self.dataset.splits["train"], self.config.model.block_size, self.config.train.batch_size,
                            seed=[*seed, 0], rank=dist.rank, world_size=dist.world_size)

    def evaluate(self, model: torch.nn.Module, device: torch.device, autocast: Callable,
                 dist: distributed.Dist) -> Evaluation:
        tc = self.config.train
        losses = evaluate(model, self.dataset, self.config.model.block_size, tc.batch_size, tc.eval_iters, tc.seed,
                          device, autocast, dist)
        val = self.dataset.meta.splits.get("val")
        # Bits per byte compare models with different tokenizers; datasets record the bytes of each split.
        val_bpb = bits_per_byte(losses["val"], val.tokens, val.bytes) if "val" in losses and val.bytes else None
        return Evaluation(losses=losses, val_bpb=val_bpb)

    def eval_batches(self) -> int:
        return self.config.train.eval_iters * len(self.dataset.splits)


class TaskFineTuning:
    """GPT-1 task fine-tuning (`gpt.tasks`): items framed by special tokens, task loss plus
    lm_weight x LM loss on the task text; evaluations report loss and accuracy per split
    (the train split on a fixed sample of at most eval_iters batches, val in full)."""

    def __init__(self, config: Config, tokenizer: TokenizerSpec):
        task, text = config.task, tokenizer.build()
        self.tokenizer, self.text_vocab, self.unit = tokenizer, text.vocab_size, "items"
        items = {"train": read_task_file(task.train, task.kind)}
        if task.val:
            items["val"] = read_task_file(task.val, task.kind)
        labels = None
        if task.kind != "choice":
            labels = task.labels or label_names(items["train"], task.kind, task.train)
        self.config = _resolve_task_config(config, labels, text.vocab_size)
        self.names = {split: labels or label_names(found, task.kind, "") for split, found in items.items()}
        self.examples = {split: encode_items(found, self.names[split], text, config.model.block_size)
                         for split, found in items.items()}
        tc = config.train
        order = np.random.default_rng([tc.seed, 1]).permutation(len(self.examples["train"]))
        self.eval_sets = {"train": [self.examples["train"][i] for i in order[:tc.eval_iters * tc.batch_size]],
                          **({"val": self.examples["val"]} if "val" in self.examples else {})}

    def describe(self) -> str:
        task = self.config.task
        splits = ", ".join(f"{split} {len(found):,} items ({sum(e.cropped for e in found):,} cropped)"
                           for split, found in self.examples.items())
        labels = f"labels {', '.join(task.labels)}" if task.labels else "softmax over each item's choices"
        return (f"task: {task.kind}, {labels}; {splits}; rows longer than model.block_size="
                f"{self.config.model.block_size} are cropped, keeping the end of the first text")

    def build_model(self, source: ImportedModel | None) -> tuple[GPT, TaskHead, TaskModel]:
        model = new_model(self.config, source)
        head = make_head(self.config)
        return model, head, TaskModel(model, head, self.config.task.lm_weight)

    def sampler(self, seed: list[int], dist: distributed.Dist) -> BucketSampler:
        # One seed for all ranks: each keeps its rows of the job's batch, as language modelling does.
        return task_sampler(self.examples["train"], self.config.train.batch_size, self.text_vocab, seed,
                            dist.rank, dist.world_size)

    def evaluate(self, model: torch.nn.Module, device: torch.device, autocast: Callable,
                 dist: distributed.Dist) -> Evaluation:
        # Every rank scores every item with the same weights (tasks train under DDP only), so they agree.
        result = Evaluation(losses={})
        for split, examples in self.eval_sets.items():
            loss, accuracy = evaluate_split(model, examples, self.names[split], split,
                                                  self.config.train.batch_size, self.text_vocab, device, autocast)
            result.losses[split] = loss
            result.accuracy.update(accuracy)
        return result

    def eval_batches(self) -> int:
        return sum(math.ceil(len(examples) / self.config.train.batch_size) for examples in self.eval_sets.values())


class ChatFineTuning:
    """Chat fine-tuning (`gpt.chat`): conversations rendered with the chat template, the
    next-token loss on what the assistant says (its turns and their closing `<|end|>`), averaged
    over those tokens across the batch. Evaluations report that loss per split (train on a fixed
    sample of at most eval_iters batches, val in full) and, with task.eval, the exact match of
    greedy replies."""

    def __init__(self, config: Config, tokenizer: TokenizerSpec):
        task, self.text = config.task, tokenizer.build()
        self.tokenizer, self.unit = tokenizer, "conversations"
        self.template = ChatTemplate(self.text.vocab_size)
        self.config = _resolve_task_config(config, None, self.text.vocab_size)
        block_size = config.model.block_size
        self.examples, self.counts = {}, {}
        for split, path in (("train", task.train), ("val", task.val)):
            if path is None:
                continue
            items = read_chat_file(path)
            examples, skipped = encode_conversations(items, self.template, self.text, block_size,
                                                     task.train_on_prompt)
            if not examples:
                raise GptError(f"{path}: none of its {len(items)} conversations fits model.block_size={block_size} "
                               "even without its older turns; raise model.block_size or shorten them")
            self.examples[split] = examples
            self.counts[split] = (len(examples), sum(e.truncated for e in examples), skipped)
        self.eval_items = read_chat_eval_file(task.eval) if task.eval else []
        tc = config.train
        order = np.random.default_rng([tc.seed, 1]).permutation(len(self.examples["train"]))
        self.eval_sets = {"train": [self.examples["train"][i] for i in order[:tc.eval_iters * tc.batch_size]],
                          **({"val": self.examples["val"]} if "val" in self.examples else {})}

    def describe(self) -> str:
        splits = "; ".join(f"{split} {kept:,} conversations ({truncated:,} lost old turns, {skipped:,} skipped: "
                           "too long)" for split, (kept, truncated, skipped) in self.counts.items())
        padding = self.sampler([self.config.train.seed, 0], distributed.Dist()).padding_share()
        learned = "every token" if self.config.task.train_on_prompt else "the assistant turns"
        return (f"chat: {splits}; the loss covers {learned}; padding {padding:.0%} of a batch's positions "
                f"(conversations batched by length)")

    def build_model(self, source: ImportedModel | None) -> tuple[GPT, None, GPT]:
        model = new_model(self.config, source)
        return model, None, model

    def sampler(self, seed: list[int], dist: distributed.Dist) -> BucketSampler:
        # One seed for all ranks: each keeps its rows of the job's batch, as language modelling does.
        examples = self.examples["train"]
        return BucketSampler(examples, [len(e.ids) for e in examples], self.config.train.batch_size,
                             collate_chat, [*seed, 0], dist.rank, dist.world_size)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, device: torch.device, autocast: Callable,
                 dist: distributed.Dist) -> Evaluation:
        # Every rank scores every conversation with the same weights, so they agree.
        result = Evaluation(losses={})
        with evaluating(model):
            for split, examples in self.eval_sets.items():
                result.losses[split] = self._mean_loss(model, examples, device, autocast)
        if self.eval_items:
            scored = evaluate_chat(model, self.text, self.eval_items, self.template, autocast=autocast)
            result.accuracy["exact_match"] = scored.accuracy
        return result

    def _mean_loss(self, model: torch.nn.Module, examples: list, device: torch.device, autocast: Callable) -> float:
        """Mean loss per learned token over `examples` (batches by length: less padding, same result)."""
        by_length = sorted(examples, key=lambda e: len(e.ids))
        total, count, size = 0.0, 0, self.config.train.batch_size
        for start in range(0, len(by_length), size):
            x, y = (t.to(device) for t in collate_chat(by_length[start:start + size]))
            with autocast():
                logits = model(x)[0]
            total += torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-1,
                                                       reduction="sum").item()
            count += int((y != -1).sum())
        return total / count

    def eval_batches(self) -> int:
        batches = sum(math.ceil(len(examples) / self.config.train.batch_size) for examples in self.eval_sets.values())
        # A greedy reply costs about as much as a batch of forward passes per generated token.
        return batches + len(self.eval_items) * 8


def _resolve_task_config(config: Config, labels: list[str] | None, text_vocab: int) -> Config:
    """Fill model.vocab_size (the tokenizer's plus the appended tokens) and task.labels."""
    added = appended_tokens(config)
    vocab_size = text_vocab + added
    if config.model.vocab_size not in (None, vocab_size):
        raise GptError(f"model.vocab_size is {config.model.vocab_size} but a {config.task.kind} run's is the "
                       f"tokenizer's {text_vocab} plus {added} appended tokens; set model.vocab_size=null")
    return dataclasses.replace(config, model=dataclasses.replace(config.model, vocab_size=vocab_size),
                               task=dataclasses.replace(config.task, labels=labels))


def task_tokenizer(config: Config, checkpoint: Checkpoint | None) -> TokenizerSpec:
    """A task run's tokenizer: the resumed checkpoint's, else train.init_from's, else (training
    from scratch) the one data.dir was prepared with."""
    if checkpoint is not None:
        return checkpoint.tokenizer_spec
    if config.train.init_from:
        return read_model_source(config.train.init_from).tokenizer
    if not (Path(config.data.dir) / "meta.json").is_file():
        raise GptError(f"a task run takes its tokenizer from train.init_from (a pretrained run) or, from scratch, "
                       f"from data.dir, and {config.data.dir} holds no dataset; set train.init_from")
    return DatasetMeta.read(config.data.dir).tokenizer


def make_objective(config: Config, checkpoint: Checkpoint | None) -> Objective:
    if config.task.kind is None:
        return LanguageModelling(config)
    if config.task.kind == "chat":
        return ChatFineTuning(config, task_tokenizer(config, checkpoint))
    return TaskFineTuning(config, task_tokenizer(config, checkpoint))



@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset: Dataset, block_size: int, batch_size: int, eval_iters: int,
             seed: int, device: torch.device, autocast: Callable,
             dist: distributed.Dist | None = None) -> dict[str, float]:
    """Mean loss per split over `eval_iters` batches. The batches are the same at every
    evaluation (own RNG), so the curve shows the model changing, not the sample. Under
    torchrun each rank scores its rows of the job's batches and the means are averaged."""
    dist = dist or distributed.Dist()
    losses = {}
    with evaluating(model):
        for split, shards in dataset.splits.items():
            sampler = BatchSampler(shards, block_size, batch_size, seed=[seed, 1], rank=dist.rank,
                                   world_size=dist.world_size)
            total = torch.zeros((), device=device)
            for _ in range(eval_iters):
                x, y = sampler.next_batch()
                with autocast():
                    total += model(x.to(device), y.to(device))[1].float()
            losses[split] = distributed.mean_across_ranks(total, dist) / eval_iters
    return losses
