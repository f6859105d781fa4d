"""The `gpt` command: prepare, train, sample, chat, eval, classify, info, convert, and views inside
a model (tokenize, next, attention, embed). Argument parsing and error mapping only; the work
happens in the modules it calls."""

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
from gpt.config import SECTIONS, Config, SampleConfig, apply_overrides, build_config, config_help, load_config, to_dict
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
    for arg in paths[1:]:
        if arg.partition(".")[0] in SECTIONS and not Path(arg).exists():
            raise GptError(f"override {arg!r} is not of the form section.key=value (e.g. train.lr=3e-4)")
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
        from gpt.formats import RunFolder

        if not RunFolder(path).holds_run() and RunFolder(path.parent).holds_run():
            raise GptError(f"{path} is one checkpoint of the run in {path.parent}; --resume takes the run folder: "
                           f"gpt train --resume {path.parent} (it goes on from the newest complete checkpoint)")
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
        return _read_text_option(prompt_file, "--prompt-file")
    return prompt or ""


def _read_text_option(path: str, option: str) -> str:
    """The UTF-8 text of the file an option names."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise GptError(f"cannot read {option} {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise GptError(f"{option} {path} is not UTF-8 text; save it as UTF-8") from None


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
    no_cache: bool = typer.Option(False, "--no-cache",
                                  help="Recompute the whole context each step (slow; for checks)."),
) -> None:
    """Generate text from a trained checkpoint (settings default to the run's sample section)."""
    from gpt.sample import few_shot_prompt, ready_for_decoding

    if interactive:
        given = {"--prompt": prompt is not None, "--prompt-file": prompt_file is not None,
                 "--num-samples": num_samples not in (None, 1), "--json": as_json}
        ignored = [flag for flag, is_given in given.items() if is_given]
        if ignored:
            raise GptError(f"--interactive reads each turn from the terminal (or stdin) and replies once; "
                           f"drop {ignored[0]}")
    model, tokenizer, ckpt = _load_for_sampling(checkpoint, device)
    model = ready_for_decoding(model)
    settings = _sample_settings(ckpt.config.sample, max_new_tokens=max_new_tokens, temperature=temperature,
                                top_k=top_k, top_p=top_p, num_samples=num_samples, seed=seed,
                                stop=list(stop) if stop else None, ignore_eot=ignore_eot,
                                kv_cache=False if no_cache else None)
    examples = _read_text_option(few_shot, "--few-shot") if few_shot else None
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
    from gpt.sample import ready_for_decoding

    model, tokenizer, ckpt = _load_for_sampling(checkpoint, device)
    model = ready_for_decoding(model)
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
    for reply in chat(model, tokenizer, settings, _user_turns(tty, tokenizer), system, examples):
        print(f"Assistant: {reply}", flush=True)


def _user_turns(tty: bool, tokenizer) -> Iterator[str]:
    """The user's turns; one the model cannot read is answered with an error line and skipped,
    so that the conversation goes on."""
    while True:
        try:
            turn = input("User: " if tty else "")
        except EOFError:
            return
        try:
            tokenizer.encode(turn)
        except GptError as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            continue
        yield turn


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
    shots: int = typer.Option(0, help="Solved examples placed before each question (0 = zero-shot)."),
    seed: int = typer.Option(1337, help="Seed for drawing the few-shot examples."),
    fewshot_file: Optional[str] = typer.Option(None, help="Draw the examples from this JSONL file (default: the "
                                               "task's other items)."),
    batch_size: int = typer.Option(8, help="Sequences per forward pass."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as one JSON object."),
    details: Optional[str] = typer.Option(None, help="Write per-item choice scores to this JSONL file."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or mps."),
    dtype: str = typer.Option("auto", help="auto (as in training), float32, bfloat16 or float16 autocast."),
) -> None:
    """Measure a model: perplexity and bits per byte, zero/few-shot multiple-choice accuracy."""
    from gpt.device import autocast_for, pick_dtype
    from gpt.evaluate import evaluate_lm, evaluate_task, results_table, write_details

    if data is None and not task:
        raise GptError("nothing to evaluate; give --data DATA_DIR|TEXT_FILE and/or --task FILE.jsonl")
    if split is not None and (data is None or not Path(data).is_dir()):
        raise GptError(f"--split picks a split of a dataset folder, and --data {data} is none (a text file is "
                       "scored whole); drop --split")
    split = split or "val"
    if fewshot_file is not None and len(task) != 1:
        raise GptError("--fewshot-file holds the examples of one task; give exactly one --task with it")
    if details is not None and not task:
        raise GptError("--details writes per-item task scores; give a --task")
    if batch_size < 1:
        raise GptError(f"--batch-size must be at least 1, got {batch_size}")
    if dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise GptError(f"--dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    model, tokenizer, ckpt = _load_for_sampling(checkpoint, device)
    model_device = next(model.parameters()).device
    autocast = autocast_for(model_device, pick_dtype(dtype, model_device))
    lm = None
    if data is not None:
        lm = evaluate_lm(model, ckpt.tokenizer_spec, data, split=split, stride=stride, max_tokens=max_tokens,
                         batch_size=batch_size, autocast=autocast)
    tasks = [evaluate_task(model, tokenizer, path, shots=shots, seed=seed, fewshot_path=fewshot_file,
                           batch_size=batch_size, autocast=autocast) for path in task]
    for t in tasks:
        if t.cropped:
            room = f"; the {shots} examples take room: lower --shots" if shots else ""
            print(f"note: {t.cropped} of {len(t.scores)} items of {t.name} were cropped from the start to fit the "
                  f"model's context (block_size={model.config.block_size}){room}", file=sys.stderr)
    if details is not None:
        write_details(details, tasks)
    if as_json:
        print(json.dumps({"checkpoint": str(ckpt.path), "data": data, "split": split if lm else None,
                          "lm": lm.to_json() if lm else None, "tasks": [t.to_json() for t in tasks]}))
    else:
        print(results_table((data, lm) if lm else None, tasks))


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
def info(
    path: Optional[str] = typer.Argument(None, help="A dataset folder (meta.json) or a run / checkpoint folder."),
    preset: Optional[str] = typer.Option(None, help="Describe a model preset instead (e.g. gpt2, gpt3-175b)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (for scripts)."),
) -> None:
    """Describe a dataset, a training run or a model preset (parameters and FLOPs per token)."""
    if (path is None) == (preset is None):
        raise GptError("give a dataset / run / checkpoint folder or --preset NAME (one of them)")
    if preset is not None:
        model = build_config({"model": {"preset": preset}}).model
        if model.vocab_size is None:
            raise GptError(f"preset {preset} takes its vocabulary size from the data, so its size is not fixed; "
                           "describe a run or dataset instead")
        _print_info({"preset": preset, "model": _model_info(model)}, as_json)
        return
    folder = Path(path)
    if (folder / "meta.json").is_file():
        from gpt.shards import load_dataset

        dataset = load_dataset(folder)
        if as_json:
            print(json.dumps({"dataset": str(dataset.folder), **dataset.meta.to_json()}, ensure_ascii=False))
        else:
            _print_dataset(dataset)
        return
    from gpt.checkpoint import read_checkpoint
    from gpt.formats import RunFolder

    ckpt = read_checkpoint(folder)
    from gpt.tasks import describe_task

    _print_info({"checkpoint": str(ckpt.path), "state": ckpt.state, "tokenizer": ckpt.tokenizer_spec.name,
                 "model": _model_info(ckpt.config.model), "task": describe_task(ckpt),
                 "checkpoints": [other.name for other in RunFolder(folder).checkpoints()]}, as_json)


def _model_info(model) -> dict:
    """The model's settings with its parameter count and FLOPs per token (counted on the meta device)."""
    from gpt.model import size_on_meta

    params, flops = size_on_meta(model)
    return {**dataclasses.asdict(model), "params": params, "flops_per_token": flops}


def _architecture(model: dict) -> str:
    """The block's choices in words: norm, activation and the options off by default."""
    parts = [f"{model['norm_position']}-{model['norm']}", f"{model['activation']} MLP",
             "qk-norm" if model["qk_norm"] else None,
             f"logits soft-capped at {model['logit_softcap']:g}" if model["logit_softcap"] else None,
             "zero-initialised output projections" if model["zero_init_proj"] else None,
             "tied head" if model["tie_embeddings"] else "untied head"]
    return ", ".join(p for p in parts if p)


def _print_info(info: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(info, ensure_ascii=False))
        return
    model, state = info["model"], info.get("state", {})
    if "checkpoint" in info:
        print(f"checkpoint {info['checkpoint']}: iter {state.get('iter')}, tokens {state.get('tokens', 0):,}")
    else:
        print(f"preset {info['preset']}")
    print(f"  model: {model['n_layer']} layers, {model['n_head']} heads, {model['n_embd']} wide, context "
          f"{model['block_size']}, vocab {model['vocab_size']}, {model['pos_encoding']} positions")
    print(f"  {_architecture(model)}")
    params = model["params"]
    size = f"{params / 1e9:.2f}B" if params >= 1e9 else f"{params / 1e6:.1f}M"
    print(f"  {params:,} parameters ({size}), {model['flops_per_token']:.3g} training FLOPs per token "
          "(forward + backward at full context)")
    if "checkpoint" in info:
        print(f"  tokenizer: {info['tokenizer']}; losses: {state.get('losses')}")
    if info.get("task"):
        print(f"  {info['task']}")
    for name in info.get("checkpoints", []):
        print(f"  {name}")


convert_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                          help="Import and export weights: Hugging Face GPT-2 folders, nanoGPT checkpoints. Offline.")
app.add_typer(convert_app, name="convert")


@convert_app.command("from-hf")
def convert_from_hf(
    folder: str = typer.Argument(..., help="A Hugging Face GPT-2 folder: config.json + model.safetensors "
                                 "(or pytorch_model.bin)."),
    out_dir: str = typer.Argument(..., help="Checkpoint folder to write."),
    overwrite: bool = typer.Option(False, help="Replace OUT_DIR if it holds an earlier model."),
) -> None:
    """Import a Hugging Face GPT-2 folder as a checkpoint for gpt sample / info / train.init_from."""
    from gpt.convert import check_out_dir, read_hf, save_imported

    check_out_dir(Path(out_dir), overwrite)
    _report_import(save_imported(read_hf(folder), out_dir), folder, out_dir)


@convert_app.command("from-nanogpt")
def convert_from_nanogpt(
    ckpt: str = typer.Argument(..., help="nanoGPT's ckpt.pt (read with weights_only=True)."),
    out_dir: str = typer.Argument(..., help="Checkpoint folder to write."),
    meta: Optional[str] = typer.Option(None, help="The run's meta.pkl (stoi/itos) for a character-level model."),
    overwrite: bool = typer.Option(False, help="Replace OUT_DIR if it holds an earlier model."),
) -> None:
    """Import a nanoGPT checkpoint (GPT-2 BPE, or characters with --meta)."""
    from gpt.convert import check_out_dir, read_nanogpt, save_imported

    check_out_dir(Path(out_dir), overwrite)
    _report_import(save_imported(read_nanogpt(ckpt, meta), out_dir), ckpt, out_dir)


@convert_app.command("to-hf")
def convert_to_hf(
    checkpoint: str = typer.Argument(..., help="Run folder (its newest checkpoint) or a checkpoint folder."),
    out_dir: str = typer.Argument(..., help="Hugging Face folder to write."),
    overwrite: bool = typer.Option(False, help="Replace OUT_DIR if it holds an earlier model."),
) -> None:
    """Export a checkpoint as a Hugging Face GPT-2 folder (GPT2LMHeadModel.from_pretrained loads it)."""
    from gpt.convert import check_out_dir, export_hf

    check_out_dir(Path(out_dir), overwrite)
    model = export_hf(checkpoint, out_dir)
    print(f"wrote {out_dir}: GPT-2 with {model.num_params():,} parameters; load it with "
          f"transformers.GPT2LMHeadModel.from_pretrained({str(out_dir)!r})")


def _report_import(model, source: str, out_dir: str) -> None:
    c = model.config
    print(f"wrote {out_dir}: {c.n_layer} layers, {c.n_embd} wide, context {c.block_size}, vocab {c.vocab_size}, "
          f"{model.num_params():,} parameters, from {source}")
    print(f"try: gpt sample {shlex.quote(str(out_dir))} --prompt 'Hello'")


@app.command("tokenize")
def tokenize_text(
    text: str = typer.Argument(..., help="Text to cut into tokens ('-' reads stdin)."),
    tokenizer: Optional[str] = typer.Option(None, help="gpt2 (default) or byte; char needs --data or --checkpoint."),
    data: Optional[str] = typer.Option(None, help="Use the tokenizer of this dataset folder."),
    checkpoint: Optional[str] = typer.Option(None, help="Use the tokenizer of this run or ckpt_* folder."),
) -> None:
    """Show how text becomes tokens: boundaries, ids, count and bytes per token."""
    from gpt.inspection import format_tokens, pick_tokenizer, tokenize

    print(format_tokens(tokenize(pick_tokenizer(tokenizer, data, checkpoint), _read_prompt(text, None))))


@app.command("next")
def next_token(
    checkpoint: str = typer.Argument(..., help="Run folder or ckpt_* folder."),
    prompt: str = typer.Argument(..., help="Text before the token to predict ('' starts from end-of-text, "
                                 "'-' reads stdin)."),
    top: int = typer.Option(10, help="Rows to show, most likely first."),
    temperature: Optional[float] = typer.Option(None, help="Default: the checkpoint's sample.temperature."),
    top_k: Optional[int] = typer.Option(None, help="Default: the checkpoint's sample.top_k."),
    top_p: Optional[float] = typer.Option(None, help="Default: the checkpoint's sample.top_p."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or mps."),
) -> None:
    """Next-token probabilities before and after temperature, top-k and top-p (as gpt sample draws)."""
    from gpt.inspection import filter_stages, format_next, next_token_logits

    if top < 1:
        raise GptError(f"--top must be at least 1, got {top}")
    model, tokenizer, ckpt = _load_for_inspection(checkpoint, device)
    cfg = _sample_settings(ckpt.config.sample, temperature=temperature, top_k=top_k, top_p=top_p)
    logits, seen = next_token_logits(model, tokenizer, _read_prompt(prompt, None))
    print(f"after {seen} prompt tokens; temperature {cfg.temperature:g}, top-k {cfg.top_k}, top-p {cfg.top_p:g}")
    print(format_next(filter_stages(logits, cfg.temperature, cfg.top_k, cfg.top_p), tokenizer, top))


@app.command()
def attention(
    checkpoint: str = typer.Argument(..., help="Run folder or ckpt_* folder."),
    text: str = typer.Argument(..., help="Text whose attention to draw (at most block_size tokens; '-' reads stdin)."),
    out: str = typer.Option(..., "--out", "-o", help="PNG file to write."),
    layer: int = typer.Option(0, help="Layer to draw, from 0."),
    head: Optional[int] = typer.Option(None, help="One head to draw, from 0 (default: all heads as a grid)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or mps."),
) -> None:
    """Draw attention weights as heat maps: tokens on both axes, the causal mask blank."""
    from gpt.inspection import check_png_path, draw_attention

    path = check_png_path(out)
    model, tokenizer, ckpt = _load_for_inspection(checkpoint, device)
    print(draw_attention(model, tokenizer, _read_prompt(text, None), layer, head, path, f"{ckpt.path}: layer {layer}"))


@app.command()
def embed(
    checkpoint: str = typer.Argument(..., help="Run folder or ckpt_* folder."),
    word: Optional[str] = typer.Argument(None, help="One token whose nearest tokens to list (quote ' king' "
                                         "to include GPT-2's leading space)."),
    nearest: int = typer.Option(10, help="Tokens to list."),
    analogy: Optional[str] = typer.Option(None, help="Vector arithmetic such as 'king - man + woman'; quote a "
                                          "term to keep its spaces: \"' king' - ' man' + ' woman'\"."),
    plot: bool = typer.Option(False, help="Draw a 2-D PCA of the embeddings of the most frequent tokens."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="PNG file for --plot."),
    count: int = typer.Option(100, help="Tokens to draw with --plot."),
    data: Optional[str] = typer.Option(None, help="Training data to count token frequencies in (default: "
                                       "the checkpoint's data.dir)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or mps."),
) -> None:
    """Nearest tokens by cosine similarity in the token embedding, analogies, or a PCA picture."""
    from gpt.inspection import check_png_path, describe_analogy, describe_nearest, draw_embedding, training_data

    if sum((word is not None, analogy is not None, plot)) != 1:
        raise GptError("give one of WORD, --analogy 'a - b + c' and --plot")
    if nearest < 1 or count < 2:
        raise GptError(f"--nearest must be at least 1 and --count at least 2, got {nearest} and {count}")
    if plot and out is None:
        raise GptError("--plot needs -o FILE.png")
    path = check_png_path(out) if plot else None
    model, tokenizer, ckpt = _load_for_inspection(checkpoint, device)
    if plot:
        if data is not None:  # checked even when every token is drawn and no counting needs it
            training_data(tokenizer, data)
        print(draw_embedding(model, tokenizer, data or ckpt.config.data.dir, count, path,
                             f"{ckpt.path}: token embedding"))
    elif word is not None:
        print(describe_nearest(model, tokenizer, word, nearest))
    else:
        print(describe_analogy(model, tokenizer, analogy, nearest))


def _load_for_inspection(path: str, device_name: str):
    """A checkpoint's model in eval mode (no dropout), its tokenizer and the checkpoint."""
    model, tokenizer, ckpt = _load_for_sampling(path, device_name)
    return model.eval(), tokenizer, ckpt


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
        command = getattr(getattr(exc, "ctx", None), "command_path", None) or "gpt"
        print(f"error: {exc.format_message()} (see {command} --help)", file=sys.stderr)
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
