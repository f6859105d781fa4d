"""The `gpt` command: prepare, train, sample, chat, classify, info. Argument parsing and error
mapping only; the work happens in the modules it calls."""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Iterator, List, Optional

import typer

from gpt import __version__
from gpt.config import Config, SampleConfig, apply_overrides, build_config, config_help, load_config, to_dict
from gpt.errors import GptError

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  pretty_exceptions_enable=False,
                  help="Train and sample GPT-style language models: prepare -> train -> sample.")


def _version(value: bool) -> None:
    if value:
        print(f"gpt {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                              help="Print the version and exit.")) -> None:
    """Train and sample GPT-style language models: prepare -> train -> sample."""


def _command_line() -> str:
    return " ".join(shlex.quote(a) for a in ["gpt", *sys.argv[1:]])


@app.command()
def prepare(
    sources: List[str] = typer.Argument(None, help="Files, folders, globs, '-' for stdin, or a recipe "
                                        "(shakespeare, shakespeare_char). Default: shakespeare."),
    tokenizer: Optional[str] = typer.Option(None, help="gpt2, char or byte (default: the recipe's, else gpt2)."),
    out: Optional[str] = typer.Option(None, help="Output folder (default: data/<name>_<tokenizer>)."),
    val: Optional[str] = typer.Option(None, help="A separate source for the validation split."),
    val_fraction: float = typer.Option(0.1, help="Share held out for validation when --val is not given."),
    workers: int = typer.Option(os.cpu_count() or 1, help="Tokenizer threads."),
    shard_size: int = typer.Option(100_000_000, help="Tokens per shard."),
    ext: List[str] = typer.Option([".txt"], help="File endings to take from folders (repeatable; '*' for all)."),
    jsonl_field: str = typer.Option("text", help="Field holding the text in .jsonl files."),
    errors: str = typer.Option("strict", help="Invalid UTF-8: strict (stop) or replace."),
    overwrite: bool = typer.Option(False, help="Replace an existing dataset in --out."),
) -> None:
    """Tokenize text into shards + meta.json for training."""
    from gpt.data import PrepareOptions
    from gpt.data import prepare as run_prepare
    from gpt.shards import load_dataset

    if tokenizer is not None and tokenizer not in ("gpt2", "char", "byte"):
        raise GptError(f"--tokenizer must be gpt2, char or byte, got {tokenizer!r}")
    folder = run_prepare(PrepareOptions(
        sources=list(sources or []), tokenizer=tokenizer, out=out, val=val, val_fraction=val_fraction,
        workers=workers, shard_size=shard_size, extensions=list(ext), jsonl_field=jsonl_field,
        errors=errors, overwrite=overwrite, command=_command_line()))
    _print_dataset(load_dataset(folder))


def _print_dataset(dataset) -> None:
    meta = dataset.meta
    print(f"dataset {dataset.folder}: tokenizer {meta.tokenizer.name}, vocab_size {meta.vocab_size}")
    for split, info in meta.splits.items():
        size = f", {info.bytes:,} bytes of text" if info.bytes is not None else ""
        print(f"  {split}: {info.tokens:,} tokens{size} in {len(info.shards)} shard(s)")
        for shard in info.shards:
            print(f"    {shard.file}  {shard.tokens:,} tokens")


@app.command(epilog="Config keys:\n\n" + config_help().replace("\n", "\n\n"))
def train(
    args: List[str] = typer.Argument(None, help="CONFIG.yaml and/or section.key=value overrides; with --resume "
                                     "the run folder may stand in place of the config."),
    resume: bool = typer.Option(False, help="Continue the run in train.out_dir (or the given run folder)."),
    overwrite: bool = typer.Option(False, help="Start over in a train.out_dir that already holds a run."),
) -> None:
    """Train a model: gpt train configs/shakespeare_char.yaml train.max_iters=500"""
    from gpt.train import train as run_train

    config = _train_config(list(args or []), resume)
    code = run_train(config, resume=resume, overwrite=overwrite)
    raise typer.Exit(code)


def _train_config(args: List[str], resume: bool) -> Config:
    overrides = [a for a in args if "=" in a]
    paths = [a for a in args if "=" not in a]
    if len(paths) > 1:
        raise GptError(f"expected one config file, got {len(paths)}: {' '.join(paths)}")
    if not paths:
        raise GptError("give a config file, e.g. gpt train configs/shakespeare_char.yaml "
                       "(or gpt train --resume RUN_DIR)")
    path = Path(paths[0])
    if resume and not path.exists():
        raise GptError(f"{path} does not exist; --resume takes a run folder (train.out_dir) or the run's config file")
    if path.is_dir():
        if not resume:
            raise GptError(f"{path} is a folder; to continue that run use gpt train --resume {path}")
        from gpt.checkpoint import read_checkpoint

        saved = read_checkpoint(path).config
        raw = apply_overrides(to_dict(saved), [f"train.out_dir={path}", *overrides])
        return build_config(raw)
    return load_config(path, overrides)


def _sample_settings(defaults: SampleConfig, **given) -> SampleConfig:
    """The checkpoint's sample section with the options given on the command line."""
    values = dataclasses.asdict(defaults)
    values.update({k: v for k, v in given.items() if v is not None})
    return build_config({"sample": values}).sample


def _read_prompt(prompt: Optional[str], prompt_file: Optional[str]) -> str:
    if prompt is not None and prompt_file is not None:
        raise GptError("give --prompt or --prompt-file, not both")
    if prompt_file == "-" or prompt == "-":
        return sys.stdin.read()
    if prompt_file is not None:
        try:
            return Path(prompt_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise GptError(f"cannot read --prompt-file {prompt_file}: {exc}") from None
    return prompt or ""


@app.command()
def sample(
    checkpoint: str = typer.Argument(..., help="Run folder (its latest checkpoint) or a ckpt_* folder."),
    prompt: Optional[str] = typer.Option(None, help="Text to continue ('-' reads stdin)."),
    prompt_file: Optional[str] = typer.Option(None, help="Read the prompt from a file ('-' for stdin)."),
    few_shot: Optional[str] = typer.Option(None, help="File of examples placed before the prompt."),
    system: Optional[str] = typer.Option(None, help="System line for --interactive chat."),
    max_new_tokens: Optional[int] = typer.Option(None, help="Tokens to generate per sample."),
    temperature: Optional[float] = typer.Option(None, help="0 = greedy; higher = more random."),
    top_k: Optional[int] = typer.Option(None, help="Sample among the k most likely tokens."),
    top_p: Optional[float] = typer.Option(None, help="Nucleus sampling threshold in (0, 1]."),
    num_samples: Optional[int] = typer.Option(None, help="Samples decoded together."),
    stop: List[str] = typer.Option([], help="Stop before this string (repeatable)."),
    ignore_eot: Optional[bool] = typer.Option(None, "--ignore-eot", help="Keep going past the end-of-text token."),
    seed: Optional[int] = typer.Option(None, help="Seed for reproducible samples."),
    stream: Optional[bool] = typer.Option(None, help="Print tokens as they come (default: on a terminal)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per sample."),
    interactive: bool = typer.Option(False, help="Chat: frame turns as System/User/Assistant text (= gpt chat)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or mps."),
    no_cache: bool = typer.Option(False, help="Recompute the whole context each step (slow; for checks)."),
) -> None:
    """Generate text from a trained checkpoint (settings default to the run's sample section)."""
    from gpt.sample import few_shot_prompt

    model, tokenizer, ckpt = _load_for_sampling(checkpoint, device)
    settings = _sample_settings(ckpt.config.sample, max_new_tokens=max_new_tokens, temperature=temperature,
                                top_k=top_k, top_p=top_p, num_samples=num_samples, seed=seed,
                                stop=list(stop) if stop else None, ignore_eot=ignore_eot,
                                kv_cache=False if no_cache else None)
    examples = _read_prompt(None, few_shot) if few_shot else None
    if interactive:
        _chat(model, tokenizer, settings, system, examples)
        return
    text = _read_prompt(prompt, prompt_file)
    if examples is not None:
        text = few_shot_prompt(examples, text)
    _print_samples(model, tokenizer, text, settings, as_json, stream)


@app.command()
def chat(
    checkpoint: str = typer.Argument(..., help="Run folder or ckpt_* folder."),
    system: Optional[str] = typer.Option(None, help="A System: line that opens the transcript."),
    max_new_tokens: Optional[int] = typer.Option(None, help="Longest reply in tokens."),
    temperature: Optional[float] = typer.Option(None, help="0 = greedy; higher = more random."),
    top_k: Optional[int] = typer.Option(None, help="Sample among the k most likely tokens."),
    top_p: Optional[float] = typer.Option(None, help="Nucleus sampling threshold in (0, 1]."),
    seed: Optional[int] = typer.Option(None, help="Seed for reproducible replies."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or mps."),
) -> None:
    """Talk to a base model through a plain-text transcript (prompt framing, not instruction
    tuning); the same as `gpt sample --interactive`."""
    model, tokenizer, ckpt = _load_for_sampling(checkpoint, device)
    settings = _sample_settings(ckpt.config.sample, max_new_tokens=max_new_tokens, temperature=temperature,
                                top_k=top_k, top_p=top_p, seed=seed)
    _chat(model, tokenizer, settings, system, None)


def _load_for_sampling(path: str, device_name: str):
    from gpt.checkpoint import load_model, read_checkpoint
    from gpt.device import pick_device

    ckpt = read_checkpoint(path)
    model = load_model(ckpt, pick_device(device_name))
    return model, ckpt.tokenizer, ckpt


def _print_samples(model, tokenizer, text: str, settings: SampleConfig, as_json: bool, stream: Optional[bool]) -> None:
    from gpt.sample import generate

    stream = (sys.stdout.isatty() if stream is None else stream) and not as_json and settings.num_samples == 1
    if stream:
        sys.stdout.write(text)
        on_text = lambda piece: (sys.stdout.write(piece), sys.stdout.flush())  # noqa: E731
        generate(model, tokenizer, text, settings, on_text=on_text)
        sys.stdout.write("\n")
        return
    for i, result in enumerate(generate(model, tokenizer, text, settings)):
        if as_json:
            print(json.dumps(result.to_json(), ensure_ascii=False))
        else:
            print(("\n---------------\n" if i else "") + text + result.text)


def _chat(model, tokenizer, settings: SampleConfig, system: Optional[str], examples: Optional[str]) -> None:
    from gpt.sample import chat

    tty = sys.stdin.isatty()
    if tty:
        print("Chatting with a base model through a plain-text transcript. Ctrl-D to quit.", file=sys.stderr)
    for reply in chat(model, tokenizer, settings, _user_turns(tty), system, examples):
        print(f"Assistant: {reply}", flush=True)


def _user_turns(tty: bool) -> Iterator[str]:
    while True:
        try:
            yield input("User: " if tty else "")
        except EOFError:
            return


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
    from gpt import tasks
    from gpt.device import pick_device

    classifier = tasks.load_classifier(checkpoint, pick_device(device))
    options = dict(text=text, premise=premise, hypothesis=hypothesis, text_a=text_a, text_b=text_b,
                   context=context, choice=choice)
    if file is not None and any(options.values()):
        raise GptError("give --file or the texts of one item, not both")
    items = tasks.read_task_file(file, classifier.kind) if file is not None else \
        [tasks.item_from_options(classifier.kind, options)]
    result = classifier.classify(items)
    if result.cropped:
        print(f"note: {result.cropped} of {len(items)} item(s) cropped to the model's context "
              f"({classifier.model.gpt.config.block_size} tokens)", file=sys.stderr)
    if result.labels is not None:
        summary = result.summary_json()
        print(json.dumps(summary) if as_json else tasks.format_summary(summary))
        return
    for i in range(len(items)):
        item = result.item_json(i)
        if as_json:
            print(json.dumps(item, ensure_ascii=False))
        else:
            print(tasks.format_item(item) if file is None else f"{item['label']}\t{max(item['probs'].values()):.4f}")


@app.command()
def info(path: str = typer.Argument(..., help="A dataset folder (meta.json) or a run / checkpoint folder.")) -> None:
    """Describe a dataset or a training run."""
    folder = Path(path)
    if (folder / "meta.json").is_file():
        from gpt.shards import load_dataset

        _print_dataset(load_dataset(folder))
        return
    from gpt.checkpoint import read_checkpoint
    from gpt.formats import RunFolder

    ckpt = read_checkpoint(folder)
    model = ckpt.config.model
    print(f"checkpoint {ckpt.path}: iter {ckpt.state.get('iter')}, tokens {ckpt.state.get('tokens', 0):,}")
    print(f"  model: {model.n_layer} layers, {model.n_head} heads, {model.n_embd} wide, context "
          f"{model.block_size}, vocab {model.vocab_size}, {model.pos_encoding} positions")
    print(f"  tokenizer: {ckpt.tokenizer_spec.name}; losses: {ckpt.state.get('losses')}")
    from gpt.tasks import describe_task

    task = describe_task(ckpt)
    if task is not None:
        print(f"  {task}")
    for other in RunFolder(folder).checkpoints():
        print(f"  {other.name}")


def main() -> None:
    """Console entry point: user mistakes become one line on stderr and exit code 2."""
    command = typer.main.get_command(app)
    try:
        code = command.main(standalone_mode=False)
    except GptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except (KeyboardInterrupt, typer.Abort):
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)
    except Exception as exc:
        # Usage errors of typer's click (vendored in new typer, a dependency in older ones):
        # recognised by their interface so that both work.
        if not (hasattr(exc, "format_message") and hasattr(exc, "exit_code")):
            raise
        if type(exc).__name__ == "NoArgsIsHelpError":
            print(exc.format_message())
            sys.exit(0)
        print(f"error: {exc.format_message()} (see gpt --help)", file=sys.stderr)
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
