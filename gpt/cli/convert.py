"""`gpt convert`: Hugging Face GPT-2 and nanoGPT in, Hugging Face out (gpt.convert)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Optional

import typer

from gpt.cli.app import app

convert_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                          help="Import, export and quantize weights: Hugging Face GPT-2 folders, nanoGPT "
                               "checkpoints, int8. Offline.")
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
    from gpt.convert import check_out_dir, save_imported
    from gpt.nanogpt import read_nanogpt

    check_out_dir(Path(out_dir), overwrite)
    _report_import(save_imported(read_nanogpt(ckpt, meta), out_dir), ckpt, out_dir)


@convert_app.command("to-hf")
def convert_to_hf(
    checkpoint: str = typer.Argument(..., help="Run folder (its newest checkpoint) or a checkpoint folder."),
    out_dir: str = typer.Argument(..., help="Hugging Face folder to write."),
    overwrite: bool = typer.Option(False, help="Replace OUT_DIR if it holds an earlier model."),
) -> None:
    """Export a checkpoint as a Hugging Face GPT-2 folder (GPT2LMHeadModel.from_pretrained loads it)."""
    from gpt.convert import check_out_dir, export_hf, left_out_of_export

    check_out_dir(Path(out_dir), overwrite)
    model = export_hf(checkpoint, out_dir)
    print(f"wrote {out_dir}: GPT-2 with {model.num_params():,} parameters; load it with "
          f"transformers.GPT2LMHeadModel.from_pretrained({str(out_dir)!r})")
    if note := left_out_of_export(checkpoint):
        print(note, file=sys.stderr)


@convert_app.command("quantize")
def convert_quantize(
    checkpoint: str = typer.Argument(..., help="Run folder (its newest checkpoint) or a checkpoint folder."),
    out_dir: str = typer.Argument(..., help="Checkpoint folder to write."),
    overwrite: bool = typer.Option(False, help="Replace OUT_DIR if it holds an earlier model."),
) -> None:
    """Write an int8 copy of a checkpoint (per-row scales beside each matrix): about a quarter of the
    bytes, read by sample, chat, eval, next and the other reading verbs; not trainable."""
    from gpt.checkpoint import WEIGHTS
    from gpt.convert import check_out_dir, quantize_checkpoint

    check_out_dir(Path(out_dir), overwrite)
    source = quantize_checkpoint(checkpoint, out_dir)
    before, after = (source.path / WEIGHTS).stat().st_size, (Path(out_dir) / WEIGHTS).stat().st_size
    print(f"wrote {out_dir}: int8 weights, {after / 1e6:.1f} MB ({before / 1e6:.1f} MB in {source.path}); "
          f"try: gpt sample {shlex.quote(str(out_dir))} --prompt 'Hello'")


def _report_import(model, source: str, out_dir: str) -> None:
    c = model.config
    print(f"wrote {out_dir}: {c.n_layer} layers, {c.n_embd} wide, context {c.block_size}, vocab {c.vocab_size}, "
          f"{model.num_params():,} parameters, from {source}")
    print(f"try: gpt sample {shlex.quote(str(out_dir))} --prompt 'Hello'")
