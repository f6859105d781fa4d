"""`gpt sample` and `gpt chat`: text from a checkpoint (gpt.inference.sample)."""

from __future__ import annotations

import json
import sys
from typing import Iterator, List, Optional

import typer

from gpt.chat import ChatTemplate
from gpt.cli.app import WEIGHTS_HELP, app, load_for_sampling, read_prompt, read_text_option, sample_settings
from gpt.config import SampleConfig
from gpt.errors import GptError


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
    weights: Optional[str] = typer.Option(None, help=WEIGHTS_HELP),
) -> None:
    """Generate text from a trained checkpoint (settings default to the run's sample section)."""
    from gpt.checkpoint import read_checkpoint
    from gpt.inference.sample import few_shot_prompt

    if interactive:
        given = {"--prompt": prompt is not None, "--prompt-file": prompt_file is not None,
                 "--num-samples": num_samples not in (None, 1), "--json": as_json}
        ignored = [flag for flag, is_given in given.items() if is_given]
        if ignored:
            raise GptError(f"--interactive reads each turn from the terminal (or stdin) and replies once; "
                           f"drop {ignored[0]}")
    ckpt = read_checkpoint(checkpoint)
    settings = sample_settings(ckpt.config.sample, max_new_tokens=max_new_tokens, temperature=temperature,
                                top_k=top_k, top_p=top_p, num_samples=num_samples, seed=seed,
                                stop=list(stop) if stop else None, ignore_eot=ignore_eot,
                                kv_cache=False if no_cache else None)
    examples = read_text_option(few_shot, "--few-shot") if few_shot else None
    tokenizer = ckpt.tokenizer
    if interactive:
        _chat(load_for_sampling(ckpt, device, weights), tokenizer, settings, system, examples,
              ChatTemplate.of(ckpt.config))
        return
    text = read_prompt(prompt, prompt_file)
    if examples is not None:
        text = few_shot_prompt(examples, text)
    tokenizer.encode(text)  # a character the model cannot read is refused before the model loads
    _print_samples(load_for_sampling(ckpt, device, weights), tokenizer, text, settings, as_json, stream)


@app.command()
def chat(
    checkpoint: str = typer.Argument(..., help="Run folder or ckpt_* folder."),
    system: Optional[str] = typer.Option(None, help="A system message that opens the conversation."),
    max_new_tokens: Optional[int] = typer.Option(None, help="Longest reply in tokens."),
    temperature: Optional[float] = typer.Option(None, help="0 = greedy; higher = more random."),
    top_k: Optional[int] = typer.Option(None, help="Sample among the k most likely tokens."),
    top_p: Optional[float] = typer.Option(None, help="Nucleus sampling threshold in (0, 1]."),
    seed: Optional[int] = typer.Option(None, help="Seed for reproducible replies."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or mps."),
    weights: Optional[str] = typer.Option(None, help=WEIGHTS_HELP),
) -> None:
    """Talk to a model: a chat model (fine-tuned with task.kind=chat) through its chat template, a
    base model through a plain-text transcript (prompt framing); the same as `gpt sample --interactive`."""
    from gpt.checkpoint import read_checkpoint

    ckpt = read_checkpoint(checkpoint)
    settings = sample_settings(ckpt.config.sample, max_new_tokens=max_new_tokens, temperature=temperature,
                                top_k=top_k, top_p=top_p, seed=seed)
    model, tokenizer = load_for_sampling(ckpt, device, weights), ckpt.tokenizer
    _chat(model, tokenizer, settings, system, None, ChatTemplate.of(ckpt.config))


def _print_samples(model, tokenizer, text: str, settings: SampleConfig, as_json: bool, stream: Optional[bool]) -> None:
    from gpt.inference.sample import generate

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


def _chat(model, tokenizer, settings: SampleConfig, system: Optional[str], examples: Optional[str],
          template: Optional[ChatTemplate]) -> None:
    from gpt.inference.sample import chat

    tty = sys.stdin.isatty()
    if tty:
        how = "its chat template" if template else "a plain-text transcript (a base model)"
        print(f"Chatting through {how}. Ctrl-D to quit.", file=sys.stderr)

    def on_drop() -> None:
        print(f"note: the conversation outgrew the model's context ({model.config.block_size} tokens); its oldest "
              "turns are left out from now on", file=sys.stderr, flush=True)

    for reply in chat(model, tokenizer, settings, _user_turns(tty, tokenizer), system, examples, template, on_drop):
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
