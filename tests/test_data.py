import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import gpt.data.sources
from gpt.data.formats import HEADER_BYTES, SHARD_MAGIC, DatasetMeta
from gpt.data.prepare import PrepareOptions, prepare
from gpt.data.shards import BatchSampler, DeviceBatches, load_dataset, read_shard
from gpt.data.tokenizer import make_tokenizer
from gpt.errors import GptError


def run(tmp_path, sources, **options):
    options.setdefault("out", str(tmp_path / "out"))
    options.setdefault("workers", 1)
    return prepare(PrepareOptions(sources=[str(s) for s in sources], **options))


def shard_tokens(folder, split):
    meta = json.loads((folder / "meta.json").read_text())
    return np.concatenate([read_shard(folder / s["file"], meta["vocab_size"]) for s in meta["splits"][split]["shards"]])


def test_shards_are_written_byte_exactly(tmp_path):
    corpus = tmp_path / "a.txt"
    corpus.write_text("hello world\n" * 50)
    folder = run(tmp_path, [corpus], tokenizer="gpt2", val_fraction=0.0, shard_size=40)
    meta = json.loads((folder / "meta.json").read_text())
    expected = [50256] + make_tokenizer("gpt2").encode("hello world\n" * 50)
    shards = meta["splits"]["train"]["shards"]
    assert [s["tokens"] for s in shards] == [40, 40, 40, len(expected) - 120]
    assert "val" not in meta["splits"]
    for i, shard in enumerate(shards):
        raw = (folder / shard["file"]).read_bytes()
        header = np.frombuffer(raw[:HEADER_BYTES], dtype="<i4")
        assert header[0] == SHARD_MAGIC and header[1] == 1 and header[2] == shard["tokens"]
        assert not header[3:].any()
        assert raw[HEADER_BYTES:] == np.array(expected[40 * i:40 * i + shard["tokens"]], dtype="<u2").tobytes()
    assert meta["sources"][0]["sha256"] == __import__("hashlib").sha256(corpus.read_bytes()).hexdigest()
    assert meta["tokenizer"] == {"name": "gpt2"} and meta["vocab_size"] == 50257 and meta["eot_id"] == 50256


def test_chunked_reading_matches_whole_text_encoding(tmp_path, monkeypatch):
    monkeypatch.setattr(gpt.data.sources, "CHUNK_BYTES", 64)
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n\n  indented line\n" * 30
    corpus = tmp_path / "a.txt"
    corpus.write_text(text)
    folder = run(tmp_path, [corpus], tokenizer="gpt2", val_fraction=0.0)
    assert shard_tokens(folder, "train").tolist() == [50256] + make_tokenizer("gpt2").encode(text)


def test_one_and_two_workers_give_identical_shards(tmp_path, monkeypatch):
    monkeypatch.setattr(gpt.data.sources, "CHUNK_BYTES", 256)
    corpus = tmp_path / "a.txt"
    corpus.write_text("The quick brown fox.\nJumps over the lazy dog!\n" * 400)
    one = run(tmp_path, [corpus], tokenizer="gpt2", workers=1, out=str(tmp_path / "one"))
    two = run(tmp_path, [corpus], tokenizer="gpt2", workers=2, out=str(tmp_path / "two"))
    for split in ("train", "val"):
        assert np.array_equal(shard_tokens(one, split), shard_tokens(two, split))


def test_single_document_splits_off_a_contiguous_tail(tmp_path):
    lines = [f"line {i}\n" for i in range(1000)]
    corpus = tmp_path / "a.txt"
    corpus.write_text("".join(lines))
    folder = run(tmp_path, [corpus], tokenizer="byte", val_fraction=0.1)
    train, val = (bytes(shard_tokens(folder, split)[1:].tolist()) for split in ("train", "val"))
    assert train + val == corpus.read_bytes()
    splits = DatasetMeta.read(folder).splits
    assert (splits["train"].bytes, splits["val"].bytes) == (len(train), len(val))
    assert val.startswith(b"line ") and 0.08 < len(val) / (len(train) + len(val)) < 0.12


def test_folder_glob_jsonl_and_document_split(tmp_path):
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    for i in range(10):
        (docs / ("sub" if i % 2 else "") / f"{i:02d}.txt").write_text(f"document {i}\n")
    (docs / "skip.md").write_text("not this")
    folder = run(tmp_path, [docs], tokenizer="byte", val_fraction=0.1)
    dataset = load_dataset(folder)
    texts = {split: bytes(int(t) for t in shard_tokens(folder, split) if t < 256).decode()
             for split in ("train", "val")}
    assert texts["val"] == "document 0\n"  # the first document goes to val, then every tenth
    assert "not this" not in texts["train"] and texts["train"].count("document") == 9
    assert dataset.meta.splits["train"].tokens == len(texts["train"]) + 9  # one separator per document
    assert dataset.meta.splits["train"].bytes == len(texts["train"].encode())

    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": f"record {i}"}) for i in range(20)) + "\n")
    folder = run(tmp_path, [jsonl], tokenizer="byte", text_field="body", out=str(tmp_path / "j"))
    assert load_dataset(folder).meta.splits["val"].tokens == len("record 0") + len("record 10") + 2

    folder = run(tmp_path, [str(docs / "**" / "0[0-4].txt")], tokenizer="byte", val_fraction=0.0,
                 out=str(tmp_path / "g"))
    assert bytes(int(t) for t in shard_tokens(folder, "train") if t < 256).decode().count("document") == 5


def test_explicit_val_source_and_char_vocab_from_both(tmp_path):
    (tmp_path / "t.txt").write_text("abc abc\n")
    (tmp_path / "v.txt").write_text("xyz\n")
    folder = run(tmp_path, [tmp_path / "t.txt"], tokenizer="char", val=str(tmp_path / "v.txt"))
    dataset = load_dataset(folder)
    assert dataset.tokenizer.vocab == "\n abcxyz"
    assert dataset.tokenizer.decode(shard_tokens(folder, "val").tolist()) == "xyz\n"


def test_stdin_source(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"from stdin\n" * 20)))
    folder = run(tmp_path, ["-"], tokenizer="char")
    assert load_dataset(folder).num_tokens("train") + load_dataset(folder).num_tokens("val") == 220
    assert not (folder / "stdin.txt").exists()


@pytest.mark.parametrize("setup, message", [
    (lambda p: p / "missing.txt", "source not found"),
    (lambda p: (p / "empty.txt").write_text("") and None or p / "empty.txt", "corpus is empty"),
    (lambda p: (p / "d").mkdir() or (p / "d" / "x.md").write_text("x") and None or p / "d", "no files ending in .txt"),
    (lambda p: str(p / "*.nothing"), "no files match"),
])
def test_bad_sources_fail_cleanly(tmp_path, setup, message):
    with pytest.raises(GptError, match=message):
        run(tmp_path, [setup(tmp_path)], tokenizer="char")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_invalid_utf8_names_file_and_offset(tmp_path):
    corpus = tmp_path / "bad.txt"
    corpus.write_bytes(b"fine text\n" * 10 + b"\xff oops\n")
    with pytest.raises(GptError, match=r"bad.txt: invalid UTF-8 at byte offset 100; .*--errors replace"):
        run(tmp_path, [corpus], tokenizer="gpt2")
    folder = run(tmp_path, [corpus], tokenizer="char", errors="replace")
    assert "\ufffd" in load_dataset(folder).tokenizer.vocab


def test_vocab_too_large_for_uint16(tmp_path):
    corpus = tmp_path / "wide.txt"
    corpus.write_text("".join(chr(0x4E00 + i) for i in range(70000) if 0x4E00 + i < 0xD800 or 0x4E00 + i > 0xDFFF))
    with pytest.raises(GptError, match="does not fit uint16"):
        run(tmp_path, [corpus], tokenizer="char")


def test_existing_output_needs_overwrite(tmp_path):
    corpus = tmp_path / "a.txt"
    corpus.write_text("some text\n" * 10)
    run(tmp_path, [corpus], tokenizer="char")
    with pytest.raises(GptError, match="--overwrite"):
        run(tmp_path, [corpus], tokenizer="char")
    corpus.write_text("other words\n" * 10)
    folder = run(tmp_path, [corpus], tokenizer="char", overwrite=True)
    assert "w" in load_dataset(folder).tokenizer.vocab
    (tmp_path / "empty").mkdir()  # an empty folder made beforehand is as good as none
    assert "w" in load_dataset(run(tmp_path, [corpus], tokenizer="char", out=str(tmp_path / "empty"))).tokenizer.vocab


def test_a_val_split_far_from_the_fraction_is_noted(tmp_path, capsys):
    (tmp_path / "one_line.txt").write_text("no line break anywhere in this text")
    run(tmp_path, [tmp_path / "one_line.txt"], tokenizer="byte")
    assert "note: no val split: the text has no line break in its last 10%" in capsys.readouterr().err
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text("some lines of text\n" * 50)
    run(tmp_path, [tmp_path / "a.txt", tmp_path / "b.txt"], tokenizer="byte", out=str(tmp_path / "two"))
    assert "note: the val split holds 50% of the tokens, not 10%" in capsys.readouterr().err
    run(tmp_path, [tmp_path / "a.txt"], tokenizer="byte", out=str(tmp_path / "one"))
    assert "note:" not in capsys.readouterr().err


@pytest.fixture
def dataset_copy(tmp_path):
    corpus = tmp_path / "a.txt"
    corpus.write_text("abcdefgh\n" * 100)
    return run(tmp_path, [corpus], tokenizer="char")


def _shard(folder):
    return folder / json.loads((folder / "meta.json").read_text())["splits"]["train"]["shards"][0]["file"]


@pytest.mark.parametrize("corrupt, message", [
    (lambda f: _poke(_shard(f), 0, np.int32(123)), "not a token shard"),
    (lambda f: _poke(_shard(f), 4, np.int32(7)), "shard version 7"),
    (lambda f: open(_shard(f), "ab").write(b"\0\0"), "the shard is truncated or corrupt"),
    (lambda f: _edit_meta(f, lambda m: m["splits"]["train"]["shards"][0].update(max_id=99)),
     "token id 99 is out of range"),
    (lambda f: _edit_meta(f, lambda m: m["splits"]["train"]["shards"][0].update(max_id=-1)),
     "missing fields or has wrong types"),
    (lambda f: _edit_meta(f, lambda m: m["splits"]["train"]["shards"][0].update(tokens=5)), "meta.json says 5"),
    (lambda f: _edit_meta(f, lambda m: m.update(vocab_size=3)), "does not match its char tokenizer"),
    (lambda f: (f / "meta.json").write_text("{"), "not valid JSON"),
    (lambda f: _edit_meta(f, lambda m: m["splits"]["train"]["shards"][0].update(file="../x.bin")), "not a plain file"),
    (lambda f: _edit_meta(f, lambda m: m.update(tokenizer={"name": "wordpiece"})), "unknown or malformed tokenizer"),
    (lambda f: _edit_meta(f, lambda m: m.update(vocab_size="65")), "missing fields or has wrong types"),
    (lambda f: _edit_meta(f, lambda m: m.pop("splits")), "missing fields or has wrong types"),
])
def test_reader_rejects_damaged_datasets(dataset_copy, corrupt, message):
    corrupt(dataset_copy)
    with pytest.raises(GptError, match=message):
        load_dataset(dataset_copy)


def test_loading_checks_the_id_range_from_meta_json_and_verify_reads_every_token(dataset_copy, cli):
    """Opening a dataset reads each shard's header and meta.json's recorded largest id, never
    the tokens: a token changed behind meta.json's back (at the shard's far end) goes unseen
    until `gpt info --verify` reads them all."""
    meta = json.loads((dataset_copy / "meta.json").read_text())
    shard = meta["splits"]["train"]["shards"][0]
    vocab = meta["vocab_size"]
    assert shard["max_id"] == int(read_shard(_shard(dataset_copy), vocab).max()) < vocab
    _poke(_shard(dataset_copy), HEADER_BYTES + 2 * (shard["tokens"] - 1), np.uint16(vocab + 7))
    assert load_dataset(dataset_copy).splits["train"][0].shape == (shard["tokens"],)
    with pytest.raises(GptError, match=f"token id {vocab + 7} is out of range"):
        load_dataset(dataset_copy, verify=True)
    code, _, err = cli("info", str(dataset_copy), "--verify")
    assert code == 2 and f"token id {vocab + 7} is out of range" in err
    _poke(_shard(dataset_copy), HEADER_BYTES + 2 * (shard["tokens"] - 1), np.uint16(0))
    code, out, _ = cli("info", str(dataset_copy), "--verify")
    assert code == 0 and "verified: every token of the 2 shard(s) is below vocab_size" in out
    _edit_meta(dataset_copy, lambda m: m["splits"]["train"]["shards"][0].update(max_id=shard["max_id"] - 1))
    with pytest.raises(GptError, match="largest token id is .* but meta.json records"):
        load_dataset(dataset_copy, verify=True)


def test_a_dataset_without_recorded_max_ids_is_scanned_as_before(dataset_copy):
    _edit_meta(dataset_copy, lambda m: [s.pop("max_id") for split in m["splits"].values() for s in split["shards"]])
    assert load_dataset(dataset_copy).num_tokens("train") > 0
    _poke(_shard(dataset_copy), HEADER_BYTES, np.uint16(99))
    with pytest.raises(GptError, match="token id 99 is out of range"):
        load_dataset(dataset_copy)


def test_info_verify_needs_a_dataset(cli, tmp_path):
    code, _, err = cli("info", str(tmp_path), "--verify")
    assert code == 2 and "--verify checks a dataset folder" in err


def _poke(path, offset, value):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(value.tobytes())


def _edit_meta(folder, change):
    meta = json.loads((folder / "meta.json").read_text())
    change(meta)
    (folder / "meta.json").write_text(json.dumps(meta))


def test_batch_sampler_windows_are_contiguous_and_resumable(char_data):
    dataset = load_dataset(char_data)
    shards = dataset.splits["train"]
    sampler = BatchSampler(shards, block_size=16, batch_size=4, seed=3)
    x, y = sampler.next_batch()
    assert x.shape == y.shape == (4, 16)
    assert np.array_equal(x[:, 1:], y[:, :-1])
    state = sampler.state_dict()
    expected = sampler.next_batch()
    resumed = BatchSampler(shards, block_size=16, batch_size=4, seed=99)
    resumed.load_state_dict(state)
    assert all(np.array_equal(a, b) for a, b in zip(expected, resumed.next_batch()))
    with pytest.raises(GptError, match="lower model.block_size"):
        BatchSampler(shards, block_size=10**7, batch_size=1, seed=0)


def test_device_batches_run_one_step_ahead_but_resume_at_the_next_step(char_data):
    shards = load_dataset(char_data).splits["train"]
    reference = BatchSampler(shards, block_size=8, batch_size=2, seed=5)
    expected = [[reference.next_batch() for _ in range(3)] for _ in range(4)]
    batches = DeviceBatches(BatchSampler(shards, block_size=8, batch_size=2, seed=5), 3, torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(sum(batches.next(), ()), sum(expected[0], ())))
    state = batches.state_dict()
    resumed = DeviceBatches(BatchSampler(shards, block_size=8, batch_size=2, seed=99), 3, torch.device("cpu"))
    resumed.load_state_dict(state)
    for step in expected[1:]:
        assert all(torch.equal(a, b) for a, b in zip(sum(resumed.next(), ()), sum(step, ())))


MEMORY_PROBE = """
import resource, sys
from gpt.data.prepare import PrepareOptions, prepare
prepare(PrepareOptions(sources=[sys.argv[1]], tokenizer=sys.argv[2], out=sys.argv[3], workers=2))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


@pytest.mark.slow
def test_prepare_memory_does_not_grow_with_corpus_size(tmp_path):
    line = "".join(chr(c) for c in range(0x20, 0x7F)) + " αβγ\n"
    peaks = {}
    for megabytes in (20, 200):
        corpus = tmp_path / f"c{megabytes}.txt"
        with open(corpus, "w") as f:
            block = line * (1 << 14)
            for _ in range(megabytes * (1 << 20) // len(block.encode())):
                f.write(block)
        args = [sys.executable, "-c", MEMORY_PROBE, str(corpus), "char", str(tmp_path / f"o{megabytes}")]
        result = subprocess.run(args, capture_output=True, text=True, check=True)
        peaks[megabytes] = int(result.stdout.strip().splitlines()[-1])  # KiB
        corpus.unlink()
    assert peaks[200] < peaks[20] * 1.15 + 20_000, peaks
