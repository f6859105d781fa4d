"""Trained BPE (`gpt prepare --tokenizer bpe`) and brought Hugging Face tokenizer.json files:
lossless on any text, deterministic, the asked size, the same ids in transformers, identified
by their file everywhere a tokenizer is compared, and Parquet sources."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import SHAKESPEARE, tiny_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from gpt.checkpoint import read_checkpoint, save_model_folder
from gpt.config import Config, apply_overrides, build_config, to_dict
from gpt.data.formats import DatasetMeta, RunState
from gpt.data.prepare import PrepareOptions, prepare
from gpt.data.shards import load_dataset
from gpt.data.tokenizer import EOT_TEXT, HFTokenizer, TextDecoder, TokenizerSpec, byte_spelling, train_bpe
from gpt.errors import GptError
from gpt.evaluation.perplexity import count_text_bytes
from gpt.model import GPT
from gpt.training.loop import train
from gpt.training.objectives import check_init_from

# Written for these tests: Chinese and Japanese run without spaces.
ZH = "机器学习模型从数据中学习规律。语言模型预测下一个词，然后再预测下一个词。"
JA = "東京は日本の首都です。今日はいい天気ですね。"
MIXED = f"{ZH}\n{JA}\nnaïve café, e\u0301 and 🚀🤖 emoji; tabs\tand 12345678 digits; I'll, we've, don't.\n"


def corpus_text(chars: int = 300_000) -> str:
    return SHAKESPEARE.read_text(encoding="utf-8")[:chars] + MIXED * 200


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "mixed.txt"
    path.write_text(corpus_text(), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def bpe_data(corpus) -> Path:
    return prepare(PrepareOptions(sources=[str(corpus)], tokenizer="bpe", vocab_size=700,
                                  out=str(corpus.parent / "bpe"), workers=2))


@pytest.fixture(scope="module")
def bpe(bpe_data) -> HFTokenizer:
    return DatasetMeta.read(bpe_data).tokenizer.build()


# ----------------------------------------------------------------------------- lossless, special text

unicode_text = st.lists(st.one_of(
    st.text(st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF), max_size=8),  # CJK
    st.text(st.characters(min_codepoint=0x1F300, max_codepoint=0x1FAFF), max_size=4),  # emoji
    st.text(st.characters(categories=["Mn"]), max_size=3),  # combining marks
    st.text(st.characters(max_codepoint=0x1F), max_size=3),  # control characters
    st.text(st.characters(codec="utf-8"), max_size=12),
    st.sampled_from([EOT_TEXT, " the", "\n\n", "1234567", "don't"])), max_size=12).map("".join)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=unicode_text)
def test_any_unicode_round_trips_and_special_text_stays_text(bpe, text):
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text
    assert bpe.decode_bytes(ids) == text.encode("utf-8")
    assert bpe.eot not in ids  # '<|endoftext|>' inside a document is text, as gpt2 encodes it
    assert all(0 <= i < bpe.vocab_size for i in ids)
    stream = TextDecoder(bpe)
    assert "".join(stream.add(i) for i in ids) + stream.finish() == text


def test_special_token_text_is_text_in_every_tokenizer_that_has_one(bpe):
    from gpt.data.tokenizer import make_tokenizer

    for tokenizer in (bpe, make_tokenizer("gpt2"), make_tokenizer("byte")):
        ids = tokenizer.encode(f"a{EOT_TEXT}b")
        assert tokenizer.eot not in ids and tokenizer.decode(ids) == f"a{EOT_TEXT}b"


def test_text_bytes_of_the_tokens_are_the_utf8_bytes_of_the_text(bpe):
    text = corpus_text(20_000)
    assert count_text_bytes(bpe, np.array(bpe.encode(text))) == len(text.encode("utf-8"))


def test_gpt4_split_groups_digits_by_three_and_splits_text_without_spaces(bpe):
    unspell = {c: b for b, c in enumerate(byte_spelling())}
    pieces = [bytes(unspell[c] for c in p).decode() for p, _ in
              bpe.backend.pre_tokenizer.pre_tokenize_str("1234567 don't 你好，世界。")]
    assert pieces == ["123", "456", "7", " don", "'t", " 你好", "，世界", "。"]  # one mark may lead letters
    assert len(bpe.encode(ZH)) < len(ZH.encode()) / 2  # merges learned inside unspaced Chinese


# ----------------------------------------------------------------------------- training

def test_the_vocabulary_has_n_tokens_bytes_and_end_of_text(tmp_path, capsys):
    pieces = corpus_text(200_000).splitlines(keepends=True)
    for size in (257, 300, 1000):
        tokenizer = HFTokenizer("bpe", train_bpe(iter(pieces), size))
        assert tokenizer.vocab_size == size == tokenizer.backend.get_vocab_size()
        assert tokenizer.decode_bytes([tokenizer.eot]) == EOT_TEXT.encode()
        assert {tokenizer.decode_bytes([i]) for i in range(size)} >= {bytes([b]) for b in range(256)}
    small = tmp_path / "small.txt"
    small.write_text("abab abab\n" * 50)
    folder = prepare(PrepareOptions(sources=[str(small)], tokenizer="bpe", vocab_size=2000, out=str(tmp_path / "d")))
    assert load_dataset(folder).meta.vocab_size < 2000
    assert "not 2,000 (no pair of tokens is left to merge)" in capsys.readouterr().err


TRAIN_SCRIPT = """
import hashlib, sys
from gpt.data.tokenizer import train_bpe
text = open(sys.argv[1], encoding="utf-8").read()
print(hashlib.sha256(train_bpe(iter(text.splitlines(keepends=True)), 800).encode()).hexdigest())
"""


def test_training_is_deterministic_whatever_the_threads(corpus, bpe_data, tmp_path):
    digests = set()
    for threads in ("1", "2", "4"):
        env = {**os.environ, "RAYON_NUM_THREADS": threads}
        result = subprocess.run([sys.executable, "-c", TRAIN_SCRIPT, str(corpus)], env=env, capture_output=True,
                                text=True, check=True)
        digests.add(result.stdout.strip())
    assert len(digests) == 1
    again = prepare(PrepareOptions(sources=[str(corpus)], tokenizer="bpe", vocab_size=700, out=str(tmp_path / "again"),
                                   workers=1))
    assert (again / "tokenizer.json").read_bytes() == (bpe_data / "tokenizer.json").read_bytes()


def test_the_tokenizer_is_trained_on_the_train_split_only(tmp_path):
    (tmp_path / "train.txt").write_text("abc abc abc\n" * 200)
    (tmp_path / "val.txt").write_text("xyz xyz xyz\n" * 200)
    folder = prepare(PrepareOptions(sources=[str(tmp_path / "train.txt")], val=str(tmp_path / "val.txt"),
                                    tokenizer="bpe", vocab_size=300, out=str(tmp_path / "d")))
    tokenizer = load_dataset(folder).tokenizer
    assert len(tokenizer.encode(" abc")) == 1 and len(tokenizer.encode(" xyz")) == 4


# ----------------------------------------------------------------------------- one tokenizer, one file

def test_dataset_stores_the_file_and_meta_json_its_sha256(bpe_data):
    meta = json.loads((bpe_data / "meta.json").read_text())
    raw = (bpe_data / "tokenizer.json").read_bytes()
    assert meta["tokenizer"] == {"name": "bpe", "sha256": hashlib.sha256(raw).hexdigest()}
    assert meta["vocab_size"] == 700 and meta["eot_id"] == 0
    assert DatasetMeta.read(bpe_data).tokenizer == TokenizerSpec("hf", file=raw.decode())  # same file, same tokenizer


def test_a_dataset_whose_tokenizer_json_was_edited_is_refused(bpe_data, tmp_path):
    import shutil

    copy = shutil.copytree(bpe_data, tmp_path / "edited")
    (copy / "tokenizer.json").write_text((copy / "tokenizer.json").read_text().replace('"ab"', '"ba"', 1) + " ")
    with pytest.raises(GptError, match=r"tokenizer.json was edited after .*meta.json recorded it \(sha256 differs\)"):
        load_dataset(copy)


def test_brought_and_reused_tokenizers_give_the_same_ids(bpe_data, corpus, tmp_path, cli):
    reused = prepare(PrepareOptions(sources=[str(corpus)], tokenizer_from=str(bpe_data), out=str(tmp_path / "r")))
    code, out, err = cli("prepare", corpus, "--tokenizer", bpe_data, "--out", tmp_path / "b")  # a folder with one
    assert code == 0, err
    assert "tokenizer hf (tokenizer.json sha256" in out
    original = load_dataset(bpe_data)
    for folder in (reused, tmp_path / "b"):
        dataset = load_dataset(folder)
        assert dataset.meta.tokenizer == original.meta.tokenizer
        assert np.array_equal(dataset.splits["train"][0], original.splits["train"][0])


@pytest.fixture(scope="module")
def bpe_run(bpe_data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "bpe"
    assert train(tiny_config(bpe_data, run, max_iters=2, eval_interval=2, ckpt_interval=2)) == 0
    return run


@pytest.fixture(scope="module")
def other_bpe_data(tmp_path_factory) -> Path:
    """Another BPE of the same size, trained on other text."""
    folder = tmp_path_factory.mktemp("other")
    (folder / "other.txt").write_text(SHAKESPEARE.read_text(encoding="utf-8")[-300_000:])
    return prepare(PrepareOptions(sources=[str(folder / "other.txt")], tokenizer="bpe", vocab_size=700,
                                  out=str(folder / "d")))


@pytest.mark.slow
def test_every_verb_reads_the_checkpoints_copy(bpe_run, bpe_data, cli, tmp_path):
    ckpt = read_checkpoint(bpe_run)
    assert (ckpt.path / "hf_tokenizer.json").read_bytes() == (bpe_data / "tokenizer.json").read_bytes()
    assert ckpt.tokenizer_spec == DatasetMeta.read(bpe_data).tokenizer
    code, out, err = cli("sample", bpe_run, "--prompt", ZH[:6], "--max-new-tokens", "5", "--seed", "0")
    assert code == 0 and out.startswith(ZH[:6]), err
    code, out, err = cli("tokenize", "--checkpoint", bpe_run, "你好 🚀")
    assert code == 0 and "tokens (bpe)" in out and "|\\xe4|" in out, err  # byte pieces shown as escapes
    for args in (["next", bpe_run, "ROMEO"], ["embed", bpe_run, " the"], ["eval", bpe_run, "--data", bpe_data]):
        code, out, err = cli(*args)
        assert code == 0, err
    code, out, err = cli("info", bpe_run)
    assert "tokenizer: bpe (tokenizer.json sha256 " in out


@pytest.mark.slow
def test_init_from_eval_and_resume_compare_tokenizer_files(bpe_run, bpe_data, other_bpe_data, tmp_path, cli):
    config = build_config(apply_overrides(to_dict(tiny_config(bpe_data, tmp_path / "ft")), ["model.vocab_size=700"]))
    assert check_init_from(str(bpe_run), config, DatasetMeta.read(bpe_data).tokenizer)
    with pytest.raises(GptError, match=r"the checkpoint uses the bpe \(tokenizer.json sha256 [0-9a-f]{12}\) tokenizer, "
                                       r"the data the bpe \(tokenizer.json sha256 [0-9a-f]{12}\) one"):
        check_init_from(str(bpe_run), config, DatasetMeta.read(other_bpe_data).tokenizer)
    code, _, err = cli("eval", bpe_run, "--data", other_bpe_data)
    assert code == 2 and "prepare the data with the checkpoint's tokenizer" in err
    resumed = tiny_config(other_bpe_data, bpe_run, max_iters=4)
    with pytest.raises(GptError, match="cannot resume .*: the checkpoint uses the bpe .* the data the bpe .* one"):
        train(resumed, resume=True)


@pytest.mark.slow
def test_a_checkpoint_whose_tokenizer_copy_was_edited_is_refused(bpe_run, tmp_path, cli):
    import shutil

    run = shutil.copytree(bpe_run, tmp_path / "run", symlinks=True)
    copy = read_checkpoint(run).path / "hf_tokenizer.json"
    copy.write_text(copy.read_text() + "\n")
    code, _, err = cli("sample", run)
    assert code == 2 and "hf_tokenizer.json was edited after" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_task_fine_tuning_appends_its_special_tokens_after_the_bpe(bpe_run, bpe_data, tmp_path, cli):
    from test_tasks import task_config

    config = task_config(bpe_data, tmp_path, "classify", max_iters=2, eval_interval=2, ckpt_interval=2)
    config = build_config(apply_overrides(to_dict(config), [f"train.init_from={bpe_run}"]))
    assert train(config) == 0
    ckpt = read_checkpoint(tmp_path / "run_classify")
    assert ckpt.config.model.vocab_size == 700 + 3 and ckpt.tokenizer_spec == DatasetMeta.read(bpe_data).tokenizer
    code, out, err = cli("classify", tmp_path / "run_classify", "--text", "abca")
    assert code == 0, err


# ----------------------------------------------------------------------------- transformers

def test_exported_tokenizer_encodes_like_ours_in_transformers(bpe, tmp_path, cli):
    from transformers import AutoTokenizer

    config = build_config({"model": {"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 64,
                                     "vocab_size": bpe.vocab_size}})
    save_model_folder(tmp_path / "ckpt", GPT(config.model), Config(model=config.model), bpe.spec, RunState())
    assert cli("convert", "to-hf", tmp_path / "ckpt", tmp_path / "hf")[0] == 0
    theirs = AutoTokenizer.from_pretrained(tmp_path / "hf")
    texts = [corpus_text(3000), MIXED, f"a {EOT_TEXT} b", "  leading\n\n\tspaces  ", "\x00\x07 e\u0301 🚀"]
    for text in texts:
        ids = bpe.encode(text)
        assert theirs(text)["input_ids"] == ids and theirs.decode(ids) == text
    assert theirs.eos_token_id == bpe.eot
    assert cli("convert", "from-hf", tmp_path / "hf", tmp_path / "back")[0] == 0
    assert read_checkpoint(tmp_path / "back").tokenizer_spec == bpe.spec


# ----------------------------------------------------------------------------- brought tokenizers

def sentencepiece_style(tmp_path: Path) -> Path:
    """A Llama-2-like tokenizer: '\u2581' for spaces, byte fallback, <s> and </s>."""
    backend = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials, show_progress=False)
    backend.train_from_iterator([corpus_text(100_000)], trainer)
    path = tmp_path / "sp" / "tokenizer.json"
    path.parent.mkdir()
    backend.save(str(path))
    return path


def test_a_sentencepiece_style_tokenizer_streams_its_bytes(tmp_path):
    spec = TokenizerSpec("hf", file=sentencepiece_style(tmp_path).read_text())
    tokenizer = spec.build()
    assert tokenizer.eot == tokenizer.backend.token_to_id("</s>")
    text = "The king 🚀 said: </s> 東京"
    ids = tokenizer.encode(text)
    assert tokenizer.eot not in ids
    stream = TextDecoder(tokenizer)
    assert ("".join(stream.add(i) for i in ids) + stream.finish()).strip() == text


def test_prepare_with_a_brought_tokenizer_keeps_its_special_tokens(tmp_path, corpus):
    path = sentencepiece_style(tmp_path)
    folder = prepare(PrepareOptions(sources=[str(corpus)], tokenizer=str(path), out=str(tmp_path / "d")))
    dataset = load_dataset(folder)
    assert dataset.meta.tokenizer.name == "hf" and dataset.meta.eot_id == dataset.tokenizer.backend.token_to_id("</s>")
    assert (folder / "tokenizer.json").read_bytes() == path.read_bytes()
    assert dataset.splits["train"][0][0] == dataset.meta.eot_id


def test_a_brought_vocabulary_too_large_for_uint16_is_one_line(tmp_path, corpus, cli):
    big = Tokenizer(models.WordLevel({f"w{i}": i for i in range(70_000)}, unk_token="w0"))
    big.save(str(tmp_path / "big.json"))
    code, _, err = cli("prepare", corpus, "--tokenizer", tmp_path / "big.json", "--out", tmp_path / "d")
    assert code == 2 and "big.json: its vocabulary of 70,000 tokens does not fit uint16 shards" in err
    assert not (tmp_path / "d").exists()


# ----------------------------------------------------------------------------- Parquet

def write_parquet(path: Path, texts: list[str | None], row_group: int, column: str = "text") -> Path:
    pq.write_table(pa.table({"id": list(range(len(texts))), column: texts}), path, row_group_size=row_group)
    return path


def test_parquet_rows_are_documents_read_row_group_by_row_group(tmp_path, cli):
    texts = [f"row {i}: {'é' * (i % 5)} {ZH[: i % 9]}" for i in range(250)]
    path = write_parquet(tmp_path / "docs.parquet", texts, row_group=16, column="body")
    code, out, err = cli("prepare", path, "--tokenizer", "byte", "--field", "body", "--out", tmp_path / "d",
                         "--val-fraction", "0.1")
    assert code == 0, err
    dataset = load_dataset(tmp_path / "d")
    val = [i for i in range(250) if math.ceil((i + 1) * 0.1) > math.ceil(i * 0.1)]  # as prepare splits documents
    expected = {split: b"".join(b"\x00" + t.encode() for i, t in enumerate(texts) if (i in val) == (split == "val"))
                for split in ("train", "val")}
    for split in ("train", "val"):
        ids = np.asarray(dataset.splits[split][0]).astype(np.int64)
        assert bytes(np.where(ids == 256, 0, ids).astype(np.uint8)) == expected[split]
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    assert meta["sources"][0]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_jsonl_field_option_keeps_its_old_name(tmp_path, cli):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"body": f"line {i}"}) + "\n" for i in range(20)))
    for option in ("--field", "--jsonl-field"):
        code, _, err = cli("prepare", tmp_path / "a.jsonl", "--tokenizer", "byte", option, "body",
                           "--out", tmp_path / option.strip("-"))
        assert code == 0, err


@pytest.mark.parametrize("texts, column, message", [
    (["a", None, "b"], "text", "null.parquet: row 2 has no text (null in column 'text'); drop or fill that row"),
    (["a", "b"], "body", "null.parquet has no column 'text' (it has id, body); name the text column with --field"),
])
def test_bad_parquet_rows_and_columns_are_one_line(tmp_path, cli, texts, column, message):
    path = write_parquet(tmp_path / "null.parquet", texts, row_group=2, column=column)
    code, _, err = cli("prepare", path, "--tokenizer", "byte", "--out", tmp_path / "d")
    assert code == 2 and message in err
    assert not (tmp_path / "d").exists()


MEMORY_PROBE = """
import resource, sys
from gpt.data.prepare import PrepareOptions, prepare
prepare(PrepareOptions(sources=[sys.argv[1]], tokenizer=sys.argv[2], vocab_size=int(sys.argv[4]) or None,
                       out=sys.argv[3], workers=2))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def _parquet_corpus(path: Path, megabytes: int) -> None:
    text = SHAKESPEARE.read_text(encoding="utf-8")
    lines = text.splitlines()
    rows = [" ".join(lines[i:i + 8]) for i in range(0, len(lines), 8)]
    with pq.ParquetWriter(path, pa.schema([("text", pa.string())])) as writer:
        for _ in range(megabytes):
            writer.write_table(pa.table({"text": rows}), row_group_size=4096)


@pytest.mark.slow
@pytest.mark.parametrize("kind, tokenizer, vocab", [("text", "bpe", 2000), ("parquet", "byte", 0)])
def test_prepare_memory_stays_flat_as_the_corpus_grows(tmp_path, kind, tokenizer, vocab):
    peaks = {}
    for megabytes in (4, 24):
        corpus = tmp_path / f"c{megabytes}.{'txt' if kind == 'text' else 'parquet'}"
        if kind == "text":
            corpus.write_text(SHAKESPEARE.read_text(encoding="utf-8") * megabytes, encoding="utf-8")
        else:
            _parquet_corpus(corpus, megabytes)
        args = [sys.executable, "-c", MEMORY_PROBE, str(corpus), tokenizer, str(tmp_path / f"o{megabytes}"), str(vocab)]
        result = subprocess.run(args, capture_output=True, text=True, check=True)
        peaks[megabytes] = int(result.stdout.strip().splitlines()[-1])  # KiB
        corpus.unlink()
    assert peaks[24] < peaks[4] * 1.1 + 20_000, peaks


def test_an_empty_corpus_is_refused_before_training(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(GptError, match="the corpus is empty"):
        prepare(PrepareOptions(sources=[str(tmp_path / "empty.txt")], tokenizer="bpe", vocab_size=300,
                               out=str(tmp_path / "d")))
    assert list(tmp_path.iterdir()) == [tmp_path / "empty.txt"]

