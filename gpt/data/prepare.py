"""`gpt prepare`: text sources and recipes -> streaming tokenization -> shards + meta.json.

The corpus is never held in memory: files are read in chunks of about a megabyte, cut at
line starts (a boundary GPT-2's pre-tokenizer never merges across, so tokens match encoding
the whole text at once), tokenized in batches across threads and appended to shards. Output
goes to a temporary folder renamed into place at the end, so a failure leaves nothing behind.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from gpt.data.formats import META_FILE, TOKEN_DTYPE, DatasetMeta, SplitInfo
from gpt.data.shards import ShardWriter
from gpt.data.tokenizer import CharTokenizer, Tokenizer, make_tokenizer
from gpt.durable import FolderLock, replace_folder
from gpt.errors import GptError

CHUNK_BYTES = 1 << 18
# Text pieces (of about CHUNK_BYTES) encoded per worker thread in one batch: with many, the
# threads finish a batch together instead of one waiting for another's last piece.
PIECES_PER_WORKER = 16
DEFAULT_SHARD_TOKENS = 100_000_000
BUNDLED_DATA = Path(__file__).resolve().parents[2] / "data"
# Recipes: a bundled corpus and the tokenizer it is usually prepared with.
RECIPES = {
    "shakespeare": ("tinyshakespeare.txt", "gpt2"),
    "shakespeare_char": ("tinyshakespeare.txt", "char"),
}
# A line start whose first character is not whitespace: a safe place to cut the text.
SAFE_CUT = re.compile(r"\n(?=\S)")


@dataclass
class Source:
    """One input as named on the command line, expanded to its documents."""

    spec: str
    files: list[Path]
    jsonl: bool = False
    sha256: str = ""


@dataclass
class PrepareOptions:
    sources: list[str] = field(default_factory=list)
    tokenizer: str | None = None
    out: str | None = None
    val: str | None = None
    val_fraction: float = 0.1
    workers: int = os.cpu_count() or 1
    shard_size: int = DEFAULT_SHARD_TOKENS
    extensions: list[str] = field(default_factory=lambda: [".txt"])
    jsonl_field: str = "text"
    errors: str = "strict"
    overwrite: bool = False
    command: str = ""


def recipe_path(name: str) -> Path:
    path = BUNDLED_DATA / RECIPES[name][0]
    if not path.is_file():
        raise GptError(f"the bundled corpus {path} is missing; pass a text file to `gpt prepare` instead")
    return path


def resolve_source(spec: str, extensions: list[str]) -> Source:
    """Expand a command-line source (file, folder, glob, recipe or '-') to its files."""
    if spec == "-":
        return Source(spec, [Path("-")])
    path = Path(spec)
    if path.is_file():
        return Source(spec, [path], jsonl=path.suffix == ".jsonl")
    if path.is_dir():
        wanted = {e if e.startswith(".") else "." + e for e in extensions}
        files = sorted(p for p in path.rglob("*") if p.is_file() and ("*" in extensions or p.suffix in wanted))
        if not files:
            raise GptError(f"folder {spec} has no files ending in {', '.join(sorted(wanted))}; "
                           "pick other endings with --ext")
        return Source(spec, files)
    if any(c in spec for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
        if not files:
            raise GptError(f"no files match {spec!r}; check the pattern (quote it so the shell leaves it alone)")
        return Source(spec, files)
    if spec in RECIPES:
        return Source(spec, [recipe_path(spec)])
    raise GptError(f"source not found: {spec}; give a file, a folder, a glob, '-' or a recipe "
                   f"({', '.join(RECIPES)})")


def default_out_dir(sources: list[str], tokenizer: str) -> Path:
    first = sources[0] if sources else "shakespeare"
    name = "stdin" if first == "-" else Path(first.split("*")[0].rstrip("/") or "data").stem or "data"
    return Path("data") / (name if name.endswith("_" + tokenizer) else f"{name}_{tokenizer}")


def _decoded_pieces(raw_chunks: Iterator[bytes], label: str, errors: str, offset: int) -> Iterator[str]:
    """Decode UTF-8 chunks (the first one at byte `offset` of the file) and re-cut the text
    at safe line starts."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors=errors)
    pending = ""
    for raw in raw_chunks:
        try:
            pending += decoder.decode(raw)
        except UnicodeDecodeError as exc:
            raise GptError(f"{label}: invalid UTF-8 at byte offset {offset + exc.start}; "
                           "fix the file or pass --errors replace") from None
        offset += len(raw)
        cut = _last_safe_cut(pending)
        if cut:
            yield pending[:cut]
            pending = pending[cut:]
    try:
        pending += decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise GptError(f"{label}: invalid UTF-8 at byte offset {offset - 1} (truncated character at the end); "
                       "fix the file or pass --errors replace") from None
    if pending:
        yield pending


def _last_safe_cut(text: str) -> int:
    """Index just after the last newline followed by a non-space, or 0 if there is none.
    Text with no line breaks at all is cut anyway once it grows large, to bound memory."""
    pos = text.rfind("\n", 0, len(text) - 1)
    while pos >= 0 and text[pos + 1].isspace():
        pos = text.rfind("\n", 0, pos)
    if pos >= 0:
        return pos + 1
    return len(text) if len(text) > 8 * CHUNK_BYTES else 0


def _read_chunks(handle, start: int, end: int | None, hasher, progress: tqdm | None) -> Iterator[bytes]:
    handle.seek(start)
    remaining = math.inf if end is None else end - start
    while remaining > 0:
        raw = handle.read(int(min(CHUNK_BYTES, remaining)))
        if not raw:
            return
        hasher.update(raw)
        if progress is not None:
            progress.update(len(raw))
        remaining -= len(raw)
        yield raw


class Reader:
    """Reads a prepared list of sources document by document, tracking progress and hashes."""

    def __init__(self, errors: str, jsonl_field: str, progress: tqdm | None):
        self.errors, self.jsonl_field, self.progress = errors, jsonl_field, progress

    def documents(self, source: Source) -> Iterator[Iterator[str]]:
        """Yield each document of `source` as an iterator over its text pieces."""
        hasher = hashlib.sha256()
        for path in source.files:
            if source.jsonl:
                yield from self._jsonl_documents(path, hasher)
            else:
                with open(path, "rb") as handle:
                    yield self._pieces(handle, 0, None, hasher, str(path))
        source.sha256 = hasher.hexdigest()

    def text_halves(self, source: Source, fraction: float) -> tuple[Iterator[str], Iterator[str]]:
        """A single text file split into a head (train) and a contiguous tail (val), cut at a
        line start near `1 - fraction` of its bytes."""
        path = source.files[0]
        size = path.stat().st_size
        with open(path, "rb") as handle:
            handle.seek(int(size * (1 - fraction)))
            handle.readline()  # move to the next line start
            split = handle.tell()
        hasher = hashlib.sha256()

        def part(start: int, end: int | None) -> Iterator[str]:
            with open(path, "rb") as handle:
                yield from self._pieces(handle, start, end, hasher, str(path))
            if end is None:
                source.sha256 = hasher.hexdigest()

        return part(0, split), part(split, None)

    def _jsonl_documents(self, path: Path, hasher) -> Iterator[Iterator[str]]:
        with open(path, "rb") as handle:
            for number, raw in enumerate(handle, start=1):
                hasher.update(raw)
                if self.progress is not None:
                    self.progress.update(len(raw))
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    record = None
                if not isinstance(record, dict):
                    raise GptError(f"{path}:{number}: not a JSON object; fix the line or remove it")
                if self.jsonl_field not in record:
                    raise GptError(f"{path}:{number}: no text field {self.jsonl_field!r}; "
                                   "name the field with --jsonl-field")
                text = record[self.jsonl_field]
                if not isinstance(text, str):
                    raise GptError(f"{path}:{number}: field {self.jsonl_field!r} holds a {type(text).__name__}, "
                                   "not a string; fix the line or remove it")
                yield iter([text])

    def _pieces(self, handle, start: int, end: int | None, hasher, label: str) -> Iterator[str]:
        return _decoded_pieces(_read_chunks(handle, start, end, hasher, self.progress), label, self.errors, start)


def _spool_stdin(folder: Path) -> Path:
    """Copy stdin to a file so that it can be read twice and split by size like any file."""
    path = folder / "stdin.txt"
    with open(path, "wb") as out:
        shutil.copyfileobj(sys.stdin.buffer, out, CHUNK_BYTES)
    return path


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
            if self.batch_chars >= PIECES_PER_WORKER * self.workers * CHUNK_BYTES:
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
    limit = np.iinfo(TOKEN_DTYPE).max + 1
    if tokenizer.vocab_size > limit:
        raise GptError(f"vocabulary of {tokenizer.vocab_size} tokens does not fit uint16 shards "
                       f"(at most {limit}); use --tokenizer byte or gpt2 for this corpus")


def _make_progress(total: int | None) -> tqdm:
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="prepare",
                dynamic_ncols=True, file=sys.stderr, disable=None)


def _total_bytes(sources: list[Source]) -> int | None:
    return sum(p.stat().st_size for s in sources for p in s.files)


def _write_splits(opts: PrepareOptions, reader: Reader, encoder: SplitEncoder, train_sources: list[Source],
                  val_sources: list[Source], writers: dict[str, ShardWriter]) -> None:
    if val_sources:
        for split, sources in (("train", train_sources), ("val", val_sources)):
            for source in sources:
                for document in reader.documents(source):
                    encoder.document(writers[split], document)
        return
    single_text = len(train_sources) == 1 and len(train_sources[0].files) == 1 and not train_sources[0].jsonl
    if single_text and opts.val_fraction > 0:
        head, tail = reader.text_halves(train_sources[0], opts.val_fraction)
        encoder.document(writers["train"], head)
        encoder.document(writers["val"], tail)
        return
    # Several documents: every document whose index crosses the next multiple of 1/fraction
    # goes to val (the first one included), so val holds about `fraction` of them.
    index = 0
    for source in train_sources:
        for document in reader.documents(source):
            to_val = math.ceil((index + 1) * opts.val_fraction) > math.ceil(index * opts.val_fraction)
            encoder.document(writers["val" if to_val else "train"], document)
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
    tokenizer_name = opts.tokenizer or (RECIPES[specs[0]][1] if specs[0] in RECIPES and not Path(specs[0]).exists()
                                        else "gpt2")
    out = Path(opts.out) if opts.out else default_out_dir(specs, tokenizer_name)
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
            _prepare_into(opts, train_sources, val_sources, tokenizer_name, out, work)
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
                  tokenizer_name: str, out: Path, work: Path) -> None:
    all_sources = train_sources + val_sources
    for source in all_sources:
        if source.spec == "-":
            source.files = [_spool_stdin(work)]
    # byte reads undecodable input losslessly; the others decode strictly unless told otherwise.
    errors = "surrogateescape" if tokenizer_name == "byte" else opts.errors
    if tokenizer_name == "char":
        tokenizer = CharTokenizer(_char_vocab(Reader(errors, opts.jsonl_field, None), all_sources))
    else:
        tokenizer = make_tokenizer(tokenizer_name)
    _check_vocab(tokenizer)

    prefix = out.name
    writers = {split: ShardWriter(work, prefix, split, opts.shard_size) for split in ("train", "val")}
    with _make_progress(_total_bytes(all_sources)) as progress:
        reader = Reader(errors, opts.jsonl_field, progress)
        encoder = SplitEncoder(tokenizer, opts.workers, progress)
        _write_splits(opts, reader, encoder, train_sources, val_sources, writers)
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
    DatasetMeta(tokenizer=tokenizer.spec, vocab_size=tokenizer.vocab_size, eot_id=tokenizer.eot, splits=splits,
                sources=sources, created_by=opts.command).write(work)
