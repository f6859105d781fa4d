"""`gpt eval` (gpt.evaluation) and `gpt classify` (gpt.tasks): numbers from a checkpoint."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional

import typer

from gpt.cli.app import app
from gpt.errors import GptError

if TYPE_CHECKING:
    from gpt.evaluation.chat import ChatResult
    from gpt.evaluation.choice import TaskResult
    from gpt.evaluation.perplexity import LMResult


@app.command(name="eval")
def evaluate(
    checkpoint: str = typer.Argument(..., help="Run folder (its newest checkpoint) or a ckpt_* folder."),
    data: Optional[str] = typer.Option(None, help="Dataset folder (scores --split) or a UTF-8 text file: loss, "
                                       "perplexity and bits per byte over all of it."),
    split: Optional[str] = typer.Option(None, help="Split of a dataset folder to score (default: val)."),
    stride: Optional[int] = typer.Option(None, help="Tokens each window moves on; each scored token sees at least "
                                         "block_size - stride of context (default: half the context)."),
    max_tokens: Optional[int] = typer.Option(None, help="Score only the first N tokens."),
    task: List[str] = typer.Option([], help="Multiple-choice JSONL file of {context, choices, label} (repeatable)."),
    chat: List[str] = typer.Option([], help="JSONL file of conversations ending with a user turn, each with the "
                                   "\"answer\" its greedy reply is scored against (repeatable)."),
    match: str = typer.Option("exact", help="How --chat replies are scored: exact (after trimming whitespace) or "
                              "contains."),
    shots: int = typer.Option(0, help="Solved examples placed before each question (0 = zero-shot); for --chat, "
                              "base models only."),
    seed: int = typer.Option(1337, help="Seed for drawing the few-shot examples."),
    fewshot_file: Optional[str] = typer.Option(None, help="Draw the examples from this JSONL file (default: the "
                                               "task's other items)."),
    batch_size: int = typer.Option(8, help="Sequences per forward pass."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as one JSON object."),
    details: Optional[str] = typer.Option(None, help="Write per-item results (choice scores, chat replies) "
                                   "to this JSONL file."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or mps."),
    dtype: str = typer.Option("auto", help="auto (as in training), float32, bfloat16 or float16 autocast."),
    weights: str = typer.Option("auto", help="auto (= fp32: scoring many tokens at once is bound by arithmetic, "
                                "not by reading weights), fp32, bf16 or int8 (per-row scales, bf16 activations): "
                                "what rounding the weights costs."),
) -> None:
    """Measure a model: perplexity and bits per byte, zero/few-shot multiple-choice accuracy, exact match of
    chat replies."""
    from gpt.chat import ChatTemplate
    from gpt.checkpoint import read_checkpoint
    from gpt.device import autocast_for, pick_device, pick_dtype
    from gpt.evaluation.chat import MATCHES, evaluate_chat_file
    from gpt.evaluation.choice import evaluate_task, write_details
    from gpt.evaluation.perplexity import evaluate_lm
    from gpt.inference.weights import load_for_reading

    if data is None and not task and not chat:
        raise GptError("nothing to evaluate; give --data DATA_DIR|TEXT_FILE, --task FILE.jsonl and/or "
                       "--chat FILE.jsonl")
    if match not in MATCHES:
        raise GptError(f"--match must be exact or contains, got {match!r}")
    if split is not None and (data is None or not Path(data).is_dir()):
        raise GptError(f"--split picks a split of a dataset folder, and --data {data} is none (a text file is "
                       "scored whole); drop --split")
    split = split or "val"
    if fewshot_file is not None and len(task) != 1:
        raise GptError("--fewshot-file holds the examples of one task; give exactly one --task with it")
    if details is not None and not task and not chat:
        raise GptError("--details writes per-item results of --task and --chat files; give one")
    if batch_size < 1:
        raise GptError(f"--batch-size must be at least 1, got {batch_size}")
    if dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise GptError(f"--dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    ckpt = read_checkpoint(checkpoint)
    # The weights are named with the results, not at the start: a mistake found later stays one line.
    model, described = load_for_reading(ckpt, pick_device(device), weights, decoding=False)
    tokenizer = ckpt.tokenizer
    model_device = next(model.parameters()).device
    autocast = autocast_for(model_device, pick_dtype(dtype, model_device))
    lm = None
    if data is not None:
        lm = evaluate_lm(model, ckpt.tokenizer_spec, data, split=split, stride=stride, max_tokens=max_tokens,
                         batch_size=batch_size, autocast=autocast)
    tasks = [evaluate_task(model, tokenizer, path, shots=shots, seed=seed, fewshot_path=fewshot_file,
                           batch_size=batch_size, autocast=autocast) for path in task]
    template = ChatTemplate.of(ckpt.config)
    chats = [evaluate_chat_file(model, tokenizer, path, template, shots=shots, seed=seed, match=match,
                                autocast=autocast) for path in chat]
    for t in tasks:
        if t.cropped:
            room = f"; the {shots} examples take room: lower --shots" if shots else ""
            print(f"note: {t.cropped} of {len(t.scores)} items of {t.name} were cropped from the start to fit the "
                  f"model's context (block_size={model.config.block_size}){room}", file=sys.stderr)
    if details is not None:
        write_details(details, [*tasks, *chats])
    if as_json:
        print(json.dumps({"checkpoint": str(ckpt.path), "weights": described.removeprefix("weights: "),
                          "data": data, "split": split if lm else None,
                          "lm": lm.to_json() if lm else None, "tasks": [t.to_json() for t in tasks],
                          "chat": [c.to_json() for c in chats]}))
    else:
        print(described, file=sys.stderr)
        print(results_table((data, lm) if lm else None, tasks, chats))


@app.command()
def classify(
    checkpoint: str = typer.Argument(..., help="A task run folder (its latest checkpoint), its best or a ckpt_* one."),
    text: Optional[str] = typer.Option(None, help="Text to label (a classify model)."),
    premise: Optional[str] = typer.Option(None, help="Premise, with --hypothesis (an entail model)."),
    hypothesis: Optional[str] = typer.Option(None, help="Hypothesis, with --premise."),
    text_a: Optional[str] = typer.Option(None, help="First text, with --text-b (a similar model; either order)."),
    text_b: Optional[str] = typer.Option(None, help="Second text, with --text-a."),
    context: Optional[str] = typer.Option(None, help="Context, with two or more --choice (a choice model)."),
    choice: List[str] = typer.Option([], help="One choice (repeatable), with --context."),
    file: Optional[str] = typer.Option(None, help="JSONL task file; with labels it prints accuracy and a confusion "
                                       "matrix, else one prediction a line."),
    as_json: bool = typer.Option(False, "--json", help="JSON output (one object per item, or the summary)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or mps."),
) -> None:
    """Label items with a fine-tuned task model: prints the label and the probabilities."""
    from gpt.device import pick_device
    from gpt.inference.classify import format_item, format_summary, item_from_options, load_classifier
    from gpt.tasks.items import read_task_file

    classifier = load_classifier(checkpoint, pick_device(device))
    options = dict(text=text, premise=premise, hypothesis=hypothesis, text_a=text_a, text_b=text_b,
                   context=context, choice=choice)
    if file is not None and any(options.values()):
        raise GptError("give --file or the texts of one item, not both")
    items = read_task_file(file, classifier.kind) if file is not None else \
        [item_from_options(classifier.kind, options)]
    result = classifier.classify(items)
    if result.cropped:
        print(f"note: {result.cropped} of {len(items)} item(s) cropped to the model's context "
              f"({classifier.model.gpt.config.block_size} tokens)", file=sys.stderr)
    if result.labels is not None:
        summary = result.summary_json()
        print(json.dumps(summary) if as_json else format_summary(summary))
        return
    for i in range(len(items)):
        item = result.item_json(i)
        if as_json:
            print(json.dumps(item, ensure_ascii=False))
        else:
            print(format_item(item) if file is None else f"{item['label']}\t{max(item['probs'].values()):.4f}")


def results_table(lm: tuple[str, LMResult] | None, tasks: list[TaskResult], chats: list[ChatResult]) -> str:
    """A plain-text table: one row for the language-modelling data, one per task, one per chat
    file (and one per skill of it)."""
    lines = []
    if lm is not None:
        name, result = lm
        bpb = f"{result.bits_per_byte:.4f}" if result.bits_per_byte is not None else "-"
        lines += [f"{'data':<32} {'tokens':>10} {'loss':>8} {'ppl':>9} {'bpb':>8}",
                  f"{name[-32:]:<32} {result.tokens:>10,} {result.loss:>8.4f} {result.perplexity:>9.3f} {bpb:>8}"]
    if tasks:
        if lines:
            lines.append("")
        lines.append(f"{'task':<32} {'items':>6} {'shots':>5} {'acc':>7} {'acc_norm':>8} {'chance':>7}")
        lines += [f"{t.name[-32:]:<32} {len(t.scores):>6} {t.shots:>5} {t.acc:>7.4f} {t.acc_norm:>8.4f} "
                  f"{t.chance:>7.4f}" for t in tasks]
    if chats:
        if lines:
            lines.append("")
        lines.append(f"{'chat':<32} {'items':>6} {'shots':>5} {'match':>8} {'accuracy':>8}")
        for c in chats:
            lines.append(f"{c.name[-32:]:<32} {len(c.scores):>6} {c.shots:>5} {c.match:>8} {c.accuracy:>8.4f}")
            lines += [f"{'  ' + skill:<32} {'':>6} {'':>5} {'':>8} {acc:>8.4f}" for skill, acc in c.by_skill().items()]
    return "\n".join(lines)
