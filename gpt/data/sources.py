"""What `gpt prepare` reads: the sources named on the command line (files, folders, globs,
recipes, stdin) expanded to files, and read document by document with their sha256. Text files
are read in chunks of about CHUNK_BYTES, decoded and cut at line starts (a boundary GPT-2's and
GPT-4's pre-tokenizers never merge across); JSONL files give one document a line, Parquet files
one a row, read one row group at a time.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import json
import math
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

from gpt.errors import GptError

CHUNK_BYTES = 1 << 18
BUNDLED_DATA = Path(__file__).resolve().parents[2] / "data"
# Recipes: a bundled corpus and the tokenizer it is usually prepared with.
RECIPES = {
    "shakespeare": ("tinyshakespeare.txt", "gpt2"),
    "shakespeare_char": ("tinyshakespeare.txt", "char"),
}
# Rows of a Parquet file turned into Python strings at a time (pyarrow reads a row group, then slices it).
PARQUET_BATCH_ROWS = 1024


@dataclass
class Source:
    """One input as named on the command line, expanded to its documents."""

    spec: str
    files: list[Path]
    sha256: str = ""


def file_kind(path: Path) -> str:
    """How a file is read: `jsonl` (a document per line), `parquet` (a document per row) or `text`."""
    return {".jsonl": "jsonl", ".parquet": "parquet"}.get(path.suffix.lower(), "text")


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
        return Source(spec, [path])
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


def small_pieces(text: str, size: int) -> Iterator[str]:
    """`text` in pieces of at most about `size` characters, cut at safe line starts where there
    are any (else anywhere: this feeds the BPE trainer, for which a rare cut word is no harm)."""
    start = 0
    while len(text) - start > size:
        cut = _last_safe_cut(text[start:start + size]) or size
        yield text[start:start + cut]
        start += cut
    yield text[start:]


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

    def __init__(self, errors: str, text_field: str, progress: tqdm | None):
        self.errors, self.text_field, self.progress = errors, text_field, progress

    def documents(self, source: Source) -> Iterator[Iterator[str]]:
        """Yield each document of `source` as an iterator over its text pieces."""
        hasher = hashlib.sha256()
        for path in source.files:
            kind = file_kind(path)
            if kind == "jsonl":
                yield from self._jsonl_documents(path, hasher)
            elif kind == "parquet":
                yield from self._parquet_documents(path, hasher)
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
                if self.text_field not in record:
                    raise GptError(f"{path}:{number}: no text field {self.text_field!r}; "
                                   "name the field with --field")
                text = record[self.text_field]
                if not isinstance(text, str):
                    raise GptError(f"{path}:{number}: field {self.text_field!r} holds a {type(text).__name__}, "
                                   "not a string; fix the line or remove it")
                yield iter([text])

    def _parquet_documents(self, path: Path, hasher) -> Iterator[Iterator[str]]:
        """One document per row of the text column. pyarrow reads one row group at a time (a
        file's row groups are written to fit in memory), handed out in slices of rows."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        with open(path, "rb") as handle:  # the sha256 of the file's bytes, as for any source
            for raw in iter(lambda: handle.read(CHUNK_BYTES), b""):
                hasher.update(raw)
        try:
            parquet = pq.ParquetFile(path)
            column = parquet.schema_arrow.field(self.text_field) if self.text_field in parquet.schema_arrow.names \
                else None
        except (pa.ArrowException, OSError) as exc:
            raise GptError(f"{path} is not a readable Parquet file ({_first_line(exc)}); check the file") from None
        if column is None:
            names = ", ".join(parquet.schema_arrow.names)
            raise GptError(f"{path} has no column {self.text_field!r} (it has {names}); "
                           "name the text column with --field")
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            raise GptError(f"{path}: column {self.text_field!r} holds {column.type}, not text; "
                           "name the text column with --field")
        size, rows, row = path.stat().st_size, max(1, parquet.metadata.num_rows), 0
        batches = parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[self.text_field])
        while True:
            try:
                batch = next(batches, None)
            except (pa.ArrowException, OSError) as exc:
                raise GptError(f"{path}: cannot read rows after row {row} ({_first_line(exc)}); the file is "
                               "damaged") from None
            if batch is None:
                return
            for text in batch.column(0).to_pylist():
                row += 1
                if text is None:
                    raise GptError(f"{path}: row {row} has no text (null in column {self.text_field!r}); "
                                   "drop or fill that row")
                yield iter([text])
            if self.progress is not None:
                self.progress.update(size * row // rows - size * (row - batch.num_rows) // rows)

    def _pieces(self, handle, start: int, end: int | None, hasher, label: str) -> Iterator[str]:
        return _decoded_pieces(_read_chunks(handle, start, end, hasher, self.progress), label, self.errors, start)


def _first_line(exc: BaseException) -> str:
    """A library's message, cut to one line for ours."""
    text = str(exc).strip()
    return text.splitlines()[0][:160] if text else type(exc).__name__


def spool_stdin(folder: Path) -> Path:
    """Copy stdin to a file so that it can be read twice and split by size like any file."""
    path = folder / "stdin.txt"
    with open(path, "wb") as out:
        shutil.copyfileobj(sys.stdin.buffer, out, CHUNK_BYTES)
    return path
