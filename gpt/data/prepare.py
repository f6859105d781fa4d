"""`gpt prepare`: text sources and recipes -> streaming tokenization -> shards + meta.json.

The corpus is never held in memory: `gpt.data.sources` reads files in chunks cut at line starts
(a boundary GPT-2's and GPT-4's pre-tokenizers never merge across, so tokens match encoding the
whole text at once), JSONL files a document a line, Parquet files a document a row; the pieces
are tokenized in batches across threads and appended to shards. `--tokenizer bpe` first trains
a BPE on the same stream of the train split's text. Output goes to a temporary folder renamed
into place at the end, so a failure leaves nothing behind.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

import gpt.data.sources
from gpt.data.formats import META_FILE, DatasetMeta, SplitInfo
from gpt.data.shards import ShardWriter
from gpt.data.sources import RECIPES, Reader, Source, file_kind, resolve_source, small_pieces, spool_stdin
from gpt.data.tokenizer import (
    MAX_VOCAB,
    CharTokenizer,
    Tokenizer,
    TokenizerSpec,
    check_bpe_vocab_size,
    read_hf_tokenizer,
    train_bpe,
)
from gpt.durable import FolderLock, replace_folder
from gpt.errors import GptError

# Text pieces (of about gpt.data.sources.CHUNK_BYTES) encoded per worker thread in one batch: with
# many, the threads finish a batch together instead of one waiting for another's last piece.
PIECES_PER_WORKER = 16
DEFAULT_SHARD_TOKENS = 100_000_000
NAMED_TOKENIZERS = ("gpt2", "char", "byte", "bpe")
# Text pieces handed to the BPE trainer: it holds 256 of them at a time, with their pre-tokens.
TRAIN_PIECE_CHARS = 1 << 14


@dataclass
class PrepareOptions:
    sources: list[str] = field(default_factory=list)
    tokenizer: str | None = None  # a name (gpt2, char, byte, bpe) or a Hugging Face tokenizer.json
    vocab_size: int | None = None  # for bpe
    tokenizer_from: str | None = None  # a dataset folder whose tokenizer to reuse
    out: str | None = None
    val: str | None = None
    val_fraction: float = 0.1
    workers: int = os.cpu_count() or 1
    shard_size: int = DEFAULT_SHARD_TOKENS
    extensions: list[str] = field(default_factory=lambda: [".txt"])
    text_field: str = "text"  # of JSONL records and Parquet rows
    errors: str = "strict"
    overwrite: bool = False
    command: str = ""


def default_out_dir(sources: list[str], tokenizer: str) -> Path:
    first = sources[0] if sources else "shakespeare"
    name = "stdin" if first == "-" else Path(first.split("*")[0].rstrip("/") or "data").stem or "data"
    return Path("data") / (name if name.endswith("_" + tokenizer) else f"{name}_{tokenizer}")


class SplitEncoder:
    """Encodes text pieces in batches (parallel for GPT-2) and writes them to a split's shards,
    counting per split the text tokens (separators excluded) and the text's UTF-8 bytes."""

    def __init__(self, tokenizer: Tokenizer, workers: int, progress: tqdm | None):
        self.tokenizer, self.workers, self.progress = tokenizer, workers, progress
        self.batch: list[str | None] = []  # text pieces in order; None marks an end-of-text
        self.batch_chars = 0
        self.writer: ShardWriter | None = None
        self.started = time.time()
        self.tokens = 0
        self.content = {"train": 0, "val": 0}
        self.text_bytes = {"train": 0, "val": 0}

    def document(self, writer: ShardWriter, pieces: Iterator[str]) -> None:
        if self.writer is not writer:
            self.flush()
            self.writer = writer
        if self.tokenizer.eot is not None:
            self.batch.append(None)
        for piece in pieces:
            self.batch.append(piece)
            self.batch_chars += len(piece)
            if self.batch_chars >= PIECES_PER_WORKER * self.workers * gpt.data.sources.CHUNK_BYTES:
                self.flush()

    def flush(self) -> None:
        texts = [piece for piece in self.batch if piece is not None]
        encoded = iter(self.tokenizer.encode_batch(texts, self.workers) if texts else [])
        eot = np.array([self.tokenizer.eot], dtype=np.int64) if self.tokenizer.eot is not None else None
        for piece in self.batch:
            ids = eot if piece is None else next(encoded)
            self._emit(ids)
            if piece is not None:
                self.content[self.writer.split] += len(ids)
                self.text_bytes[self.writer.split] += len(piece.encode("utf-8", errors="surrogateescape"))
        self.batch, self.batch_chars = [], 0

    def _emit(self, ids: np.ndarray) -> None:
        self.writer.write(ids)
        self.tokens += len(ids)
        if self.progress is not None:
            rate = self.tokens / max(time.time() - self.started, 1e-9)
            self.progress.set_postfix_str(f"{self.tokens:,} tokens, {rate:,.0f} tok/s", refresh=False)


def _char_vocab(reader: Reader, sources: list[Source]) -> str:
    chars: set[str] = set()
    for source in sources:
        for document in reader.documents(source):
            for piece in document:
                chars.update(piece)
    if not chars:
        raise GptError("the corpus is empty; give sources that contain text")
    return "".join(sorted(chars))


def _check_vocab(tokenizer: Tokenizer) -> None:
    if tokenizer.vocab_size > MAX_VOCAB:
        raise GptError(f"vocabulary of {tokenizer.vocab_size:,} tokens does not fit uint16 shards "
                       f"(ids below {MAX_VOCAB:,}); use --tokenizer byte, gpt2 or bpe for this corpus")


def _make_progress(total: int | None, desc: str = "prepare") -> tqdm:
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                dynamic_ncols=True, file=sys.stderr, disable=None)


def _total_bytes(sources: list[Source]) -> int | None:
    return sum(p.stat().st_size for s in sources for p in s.files)


def _split_documents(opts: PrepareOptions, reader: Reader, train_sources: list[Source],
                     val_sources: list[Source]) -> Iterator[tuple[str, Iterator[str]]]:
    """Every document with the split it belongs to, in corpus order."""
    if val_sources:
        for split, sources in (("train", train_sources), ("val", val_sources)):
            for source in sources:
                for document in reader.documents(source):
                    yield split, document
        return
    only = train_sources[0].files if len(train_sources) == 1 else []
    if len(only) == 1 and file_kind(only[0]) == "text" and opts.val_fraction > 0:
        head, tail = reader.text_halves(train_sources[0], opts.val_fraction)
        yield "train", head
        yield "val", tail
        return
    # Several documents: every document whose index crosses the next multiple of 1/fraction
    # goes to val (the first one included), so val holds about `fraction` of them.
    index = 0
    for source in train_sources:
        for document in reader.documents(source):
            to_val = math.ceil((index + 1) * opts.val_fraction) > math.ceil(index * opts.val_fraction)
            yield ("val" if to_val else "train"), document
            index += 1


def _note_val_share(splits: dict[str, SplitInfo], fraction: float) -> None:
    """Say so when the val split is far from --val-fraction: whole documents go to val (two
    files give it half), and a single text is cut only at a line break."""
    val = splits["val"].tokens if "val" in splits else 0
    share = val / (val + splits["train"].tokens)
    if val == 0:
        print(f"note: no val split: the text has no line break in its last {fraction:.0%}; gpt train will "
              "evaluate on the train split only (give --val FILE for a val split)", file=sys.stderr)
    elif share > 2 * fraction:
        print(f"note: the val split holds {share:.0%} of the tokens, not {fraction:.0%}: it takes whole documents, "
              "and there are few; give --val FILE, or more documents", file=sys.stderr)


def check_dataset_out(out: Path, overwrite: bool) -> None:
    """Refuse to write over anything but an earlier dataset, and that only with --overwrite:
    --overwrite replaces the whole folder, so a folder of the user's own files must never be it."""
    if not out.name or out.name == "..":
        raise GptError(f"--out {out} names no new folder; give a folder name such as data/mydata")
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not overwrite:
        raise GptError(f"{out} already exists; pass --overwrite to replace it or --out to write elsewhere")
    if not (out / META_FILE).is_file():
        raise GptError(f"{out} is not a dataset folder (no {META_FILE}); --overwrite only replaces datasets, "
                       "so give --out a new folder")


def choose_tokenizer(opts: PrepareOptions, specs: list[str]) -> tuple[str, TokenizerSpec | None]:
    """The tokenizer's kind and, unless it is made from the corpus (char, bpe), its spec: all
    checked before anything is read or written."""
    if opts.tokenizer_from is not None:
        if opts.tokenizer is not None or opts.vocab_size is not None:
            raise GptError("--tokenizer-from reuses a dataset's tokenizer; drop --tokenizer and --vocab-size")
        spec = reused_tokenizer(opts.tokenizer_from)
        return spec.name, spec
    name = opts.tokenizer or (RECIPES[specs[0]][1] if specs[0] in RECIPES and not Path(specs[0]).exists() else "gpt2")
    if name == "bpe":
        if opts.vocab_size is None:
            raise GptError("--tokenizer bpe needs --vocab-size N (a few thousand for a few MB of text, "
                           "32,768 or more for gigabytes)")
        check_bpe_vocab_size(opts.vocab_size)
        return name, None
    if opts.vocab_size is not None:
        raise GptError("--vocab-size is the size of a BPE to train; give it with --tokenizer bpe")
    if name in NAMED_TOKENIZERS:
        return name, None if name == "char" else TokenizerSpec(name)
    if not Path(name).exists():
        raise GptError(f"--tokenizer must be {', '.join(NAMED_TOKENIZERS)} or a Hugging Face tokenizer.json file, "
                       f"got {name!r}")
    return "hf", read_hf_tokenizer(name)


def reused_tokenizer(folder: str) -> TokenizerSpec:
    """The tokenizer of a dataset folder, or of a run or checkpoint folder (its data's)."""
    if not Path(folder).exists():
        raise GptError(f"--tokenizer-from {folder}: not found; give a dataset, run or checkpoint folder")
    if (Path(folder) / META_FILE).is_file():
        return DatasetMeta.read(folder).tokenizer
    from gpt.checkpoint import read_checkpoint

    return read_checkpoint(folder).tokenizer_spec


def prepare(opts: PrepareOptions) -> Path:
    """Run `gpt prepare`: returns the finished dataset folder."""
    if not 0 <= opts.val_fraction < 1:
        raise GptError(f"--val-fraction must be in [0, 1), got {opts.val_fraction}")
    if opts.workers < 1:
        raise GptError(f"--workers must be at least 1, got {opts.workers}")
    if opts.shard_size < 1:
        raise GptError(f"--shard-size must be at least 1 token, got {opts.shard_size}")
    if opts.errors not in ("strict", "replace"):
        raise GptError(f"--errors must be strict or replace, got {opts.errors!r}")
    specs = opts.sources or ["shakespeare"]
    kind, spec = choose_tokenizer(opts, specs)
    out = Path(opts.out) if opts.out else default_out_dir(specs, kind)
    if specs.count("-") + (opts.val == "-") > 1:
        raise GptError("stdin ('-') can be read only once; name it as one source")
    check_dataset_out(out, opts.overwrite)
    # Every source is found before anything is written: a mistake leaves no trace.
    train_sources = [resolve_source(spec, opts.extensions) for spec in specs]
    val_sources = [resolve_source(opts.val, opts.extensions)] if opts.val else []
    with FolderLock(out.parent / f".{out.name}.lock", f"dataset folder {out}"):
        check_dataset_out(out, opts.overwrite)  # again: another `gpt prepare` may have just finished
        for stale in out.parent.glob(f".{out.name}.tmp-*"):  # left by a killed run; nobody else holds the lock
            shutil.rmtree(stale, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        os.chmod(work, 0o755)  # mkdtemp makes it private; a dataset is an ordinary folder
        try:
            _prepare_into(opts, train_sources, val_sources, kind, spec, out, work)
            replace_folder(work, out)
        except OSError as exc:
            shutil.rmtree(work, ignore_errors=True)
            raise GptError(f"{exc.filename or out}: {exc.strerror}; free disk space or fix the permissions, "
                           "then run `gpt prepare` again") from None
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    return out


def _prepare_into(opts: PrepareOptions, train_sources: list[Source], val_sources: list[Source],
                  kind: str, spec: TokenizerSpec | None, out: Path, work: Path) -> None:
    all_sources = train_sources + val_sources
    for source in all_sources:
        if source.spec == "-":
            source.files = [spool_stdin(work)]
    # byte reads undecodable input losslessly; the others decode strictly unless told otherwise.
    errors = "surrogateescape" if kind == "byte" else opts.errors
    if kind == "char" and spec is None:
        spec = CharTokenizer(_char_vocab(Reader(errors, opts.text_field, None), all_sources)).spec
    elif kind == "bpe" and spec is None:
        spec = _trained_bpe(opts, train_sources, val_sources, errors)
    tokenizer = spec.build()
    _check_vocab(tokenizer)

    prefix = out.name
    writers = {split: ShardWriter(work, prefix, split, opts.shard_size) for split in ("train", "val")}
    with _make_progress(_total_bytes(all_sources)) as progress:
        reader = Reader(errors, opts.text_field, progress)
        encoder = SplitEncoder(tokenizer, opts.workers, progress)
        for split, document in _split_documents(opts, reader, train_sources, val_sources):
            encoder.document(writers[split], document)
        encoder.flush()
    splits = {split: SplitInfo(tokens=w.total, shards=w.close(), bytes=encoder.text_bytes[split])
              for split, w in writers.items()}
    if not any(encoder.content.values()):
        raise GptError("the corpus is empty; give sources that contain text")
    if not encoder.content["train"]:
        raise GptError("the train split is empty; lower --val-fraction or add documents")
    if not encoder.content["val"]:
        for shard in splits.pop("val").shards:
            (work / shard.file).unlink()
    if not val_sources and opts.val_fraction > 0:
        _note_val_share(splits, opts.val_fraction)
    sources = [{"spec": s.spec, "files": len(s.files), "sha256": s.sha256,
                "bytes": sum(p.stat().st_size for p in s.files)} for s in all_sources]
    (work / "stdin.txt").unlink(missing_ok=True)
    DatasetMeta(tokenizer=spec, vocab_size=tokenizer.vocab_size, eot_id=tokenizer.eot, splits=splits,
                sources=sources, created_by=opts.command).write(work)


def _trained_bpe(opts: PrepareOptions, train_sources: list[Source], val_sources: list[Source],
                 errors: str) -> TokenizerSpec:
    """A BPE trained on the text of the train split, streamed to the trainer piece by piece
    (the val split stays unseen, as for the model)."""
    fed = 0
    failure: list[BaseException] = []

    def train_text(reader: Reader) -> Iterator[str]:
        nonlocal fed
        try:
            for split, document in _split_documents(opts, reader, train_sources, val_sources):
                for piece in document if split == "train" else ():
                    fed += len(piece)
                    yield from small_pieces(piece, TRAIN_PIECE_CHARS)
        except BaseException as exc:  # the trainer reports a failed iterator in its own words; keep ours
            failure.append(exc)
            raise

    with _make_progress(_total_bytes(train_sources), "train bpe") as progress:
        try:
            file = train_bpe(train_text(Reader(errors, opts.text_field, progress)), opts.vocab_size)
        except Exception:
            if failure:
                raise failure[0] from None
            raise
    if not fed:
        raise GptError("the corpus is empty; give sources that contain text")
    spec = TokenizerSpec("bpe", file=file)
    size = spec.build().vocab_size
    if size < opts.vocab_size:
        print(f"note: the corpus yields {size:,} tokens, not {opts.vocab_size:,} (no pair of tokens is left "
              "to merge); train on more text for a larger vocabulary", file=sys.stderr)
    return spec

