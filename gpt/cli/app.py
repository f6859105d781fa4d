"""The typer app every verb registers on, the helpers verbs share, and the one entry point that
turns a user's mistake into one line on stderr and exit code 2."""

from __future__ import annotations

import dataclasses
import shlex
import sys
from pathlib import Path
from typing import Optional

import typer

from gpt import __version__
from gpt.config import SampleConfig, build_config
from gpt.errors import GptError

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  pretty_exceptions_enable=False,
                  help="Train and sample GPT-style language models: prepare -> train -> sample.")


WEIGHTS_HELP = ("auto, fp32, bf16 or int8 (per-row scales, bf16 activations): how the weights are stored while "
                "reading; auto: on CPUs with native bf16 int8 (bf16 for gpt serve's batches), bf16 on bf16 GPUs, "
                "else fp32, and fp32 on any CPU for models under 4M matrix weights (default: the checkpoint's "
                "sample.weights; the choice is printed).")


def _version(value: bool) -> None:
    if value:
        print(f"gpt {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                              help="Print the version and exit.")) -> None:
    """Train and sample GPT-style language models: prepare -> train -> sample."""


def command_line() -> str:
    """The command as typed, for meta.json and config.yaml."""
    return " ".join(shlex.quote(a) for a in ["gpt", *sys.argv[1:]])


def sample_settings(defaults: SampleConfig, **given) -> SampleConfig:
    """The checkpoint's sample section with the options given on the command line."""
    values = dataclasses.asdict(defaults)
    values.update({k: v for k, v in given.items() if v is not None})
    return build_config({"sample": values}).sample


def read_prompt(prompt: Optional[str], prompt_file: Optional[str]) -> str:
    if prompt is not None and prompt_file is not None:
        raise GptError("give --prompt or --prompt-file, not both")
    if prompt_file == "-" or prompt == "-":
        return sys.stdin.read()
    if prompt_file is not None:
        return read_text_option(prompt_file, "--prompt-file")
    return prompt or ""


def read_text_option(path: str, option: str) -> str:
    """The UTF-8 text of the file an option names."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise GptError(f"cannot read {option} {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise GptError(f"{option} {path} is not UTF-8 text; save it as UTF-8") from None


def load_for_sampling(ckpt, device_name: str, weights: Optional[str] = None, decoding: bool = True):
    """The checkpoint's model with its weights stored as `weights` (auto, fp32, bf16, int8; None
    takes the checkpoint's sample.weights), said in one line on stderr. Check the other options
    first: the line means that the model is loaded. `decoding`: one token at a time, not
    scoring (`gpt.inference.weights.prepare_weights`)."""
    from gpt.device import pick_device
    from gpt.inference.weights import load_for_reading

    model, description = load_for_reading(ckpt, pick_device(device_name), weights, decoding)
    print(description, file=sys.stderr)
    return model


def load_for_inspection(path: str, device_name: str):
    """A checkpoint's model in fp32 and eval mode (no dropout), its tokenizer and the checkpoint."""
    from gpt.checkpoint import load_model, read_checkpoint
    from gpt.device import pick_device

    ckpt = read_checkpoint(path)
    return load_model(ckpt, pick_device(device_name)).eval(), ckpt.tokenizer, ckpt


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


