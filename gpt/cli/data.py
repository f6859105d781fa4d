"""`gpt prepare`: text sources -> token shards + meta.json (gpt.data.prepare)."""

from __future__ import annotations

import os
from typing import List, Optional

import typer

from gpt.cli.app import app, command_line


@app.command()
def prepare(
    sources: List[str] = typer.Argument(None, help="Files, folders, globs, '-' for stdin, or a recipe "
                                        "(shakespeare, shakespeare_char). Default: shakespeare."),
    tokenizer: Optional[str] = typer.Option(None, help="gpt2, char, byte, bpe (train one on the sources; give "
                                            "--vocab-size) or a Hugging Face tokenizer.json to use as is "
                                            "(default: the recipe's, else gpt2)."),
    vocab_size: Optional[int] = typer.Option(None, help="Tokens of the BPE that --tokenizer bpe trains "
                                             "(257 to 65,536)."),
    tokenizer_from: Optional[str] = typer.Option(None, help="Reuse the tokenizer of this dataset, run or "
                                                 "checkpoint folder (a val set or fine-tuning text prepared later)."),
    out: Optional[str] = typer.Option(None, help="Output folder (default: data/<name>_<tokenizer>)."),
    val: Optional[str] = typer.Option(None, help="A separate source for the validation split."),
    val_fraction: float = typer.Option(0.1, help="Share held out for validation when --val is not given."),
    workers: int = typer.Option(os.cpu_count() or 1, help="Tokenizer threads."),
    shard_size: int = typer.Option(100_000_000, help="Tokens per shard."),
    ext: List[str] = typer.Option([".txt"], help="File endings to take from folders (repeatable; '*' for all)."),
    text_field: str = typer.Option("text", "--field", "--jsonl-field",
                                   help="Field (column) holding the text in .jsonl and .parquet files."),
    errors: str = typer.Option("strict", help="Invalid UTF-8: strict (stop) or replace."),
    overwrite: bool = typer.Option(False, help="Replace an existing dataset in --out."),
) -> None:
    """Tokenize text into shards + meta.json for training."""
    from gpt.data.prepare import PrepareOptions
    from gpt.data.prepare import prepare as run_prepare
    from gpt.data.shards import load_dataset

    folder = run_prepare(PrepareOptions(
        sources=list(sources or []), tokenizer=tokenizer, vocab_size=vocab_size, tokenizer_from=tokenizer_from,
        out=out, val=val, val_fraction=val_fraction, workers=workers, shard_size=shard_size, extensions=list(ext),
        text_field=text_field, errors=errors, overwrite=overwrite, command=command_line()))
    print_dataset(load_dataset(folder))


def print_dataset(dataset) -> None:
    meta = dataset.meta
    print(f"dataset {dataset.folder}: tokenizer {meta.tokenizer.describe()}, vocab_size {meta.vocab_size}")
    for split, info in meta.splits.items():
        size = f", {info.bytes:,} bytes of text" if info.bytes is not None else ""
        print(f"  {split}: {info.tokens:,} tokens{size} in {len(info.shards)} shard(s)")
        for shard in info.shards:
            print(f"    {shard.file}  {shard.tokens:,} tokens")
