"""Fuzzing: readers given random bytes and random structures raise only our one-line error."""

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpt.checkpoint import load_model, load_training_state, read_checkpoint
from gpt.config import apply_overrides, build_config, load_config
from gpt.data.formats import HEADER_BYTES, SHARD_MAGIC, SHARD_VERSION, DatasetMeta, shard_header
from gpt.data.shards import read_shard
from gpt.errors import GptError

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
KEYS = ["model.n_layer", "model.preset", "model.pos_encoding", "train.lr", "train.compile", "train.lr_decay_iters",
        "sample.stop", "sample.top_k", "sample.top_p", "data.dir", "model.vocab_size", "train.device"]
SECTION_NAMES = {"model", "data", "train", "sample", "task"}
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                       max_size=4), max_leaves=20)


def only_our_error(action, refused: bool | None) -> None:
    """`action` raises nothing but our one-line error, and raises it when `refused` is True (the
    input is known garbage) and not when it is False (known good); None: either may be right."""
    try:
        action()
    except GptError as exc:
        assert "\n" not in str(exc)
        assert refused is not False, f"a good input was refused: {exc}"
        return
    assert refused is not True, "garbage was accepted"


FAILED = object()


def parses(loads, data) -> Any:
    """What `loads` makes of `data`, or FAILED when it cannot (the tests' own view of garbage)."""
    try:
        return loads(data)
    except Exception:
        return FAILED


def unknown_override(override: str) -> bool:
    path, sep, _ = override.partition("=")
    return not sep or path.strip() not in KEYS


@FUZZ
@given(st.lists(st.one_of(st.text(max_size=40), st.builds("{}={}".format, st.sampled_from(KEYS), st.text(max_size=12))),
                max_size=4))
def test_overrides(overrides):
    refused = True if any(map(unknown_override, overrides)) else (False if not overrides else None)
    only_our_error(lambda: build_config(apply_overrides({}, overrides)), refused)


@FUZZ
@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_yaml_config_files(tmp_path, content):
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    text = content.decode("utf-8") if _utf8(content) else None
    raw = parses(yaml.safe_load, text) if text is not None else FAILED
    garbage = raw is FAILED or not isinstance(raw, (dict, type(None))) or (isinstance(raw, dict)
                                                                          and bool(set(raw) - SECTION_NAMES))
    refused = True if garbage else (False if not text.strip() else None)
    only_our_error(lambda: load_config(path), refused)


@FUZZ
@given(st.dictionaries(st.sampled_from(["model", "train", "data", "sample", "other"]),
                       st.dictionaries(st.sampled_from([k.split(".")[1] for k in KEYS]), json_values, max_size=3)
                       | json_values, max_size=3))
def test_config_structures(raw):
    garbage = not isinstance(raw, dict) or "other" in raw or any(
        not isinstance(body, (dict, type(None))) for body in raw.values())
    only_our_error(lambda: build_config(raw), True if garbage else (False if raw == {} else None))


def shard(tokens: list[int], count_change: int) -> bytes:
    return shard_header(len(tokens) + count_change) + np.array(tokens, dtype="<u2").tobytes()


def valid_shard(content: bytes, vocab_size: int) -> bool:
    """The shard format's rules, stated independently of the reader."""
    if len(content) < HEADER_BYTES:
        return False
    magic, version, count = np.frombuffer(content[:12], dtype="<i4")
    tokens = np.frombuffer(content[HEADER_BYTES:], dtype="<u2") if len(content) % 2 == 0 else None
    return (magic == SHARD_MAGIC and version == SHARD_VERSION and tokens is not None and count == len(tokens)
            and bool((tokens < vocab_size).all()))


@FUZZ
@given(st.binary(max_size=2000) | st.builds(shard, st.lists(st.integers(0, 65535), max_size=40),
                                            st.sampled_from([0, 0, 0, 1, -1])))
def test_shard_files(tmp_path, content):
    path = tmp_path / "x_train_000000.bin"
    path.write_bytes(content)
    only_our_error(lambda: read_shard(path, vocab_size=50257), not valid_shard(content, 50257))


@FUZZ
@given(json_values | st.fixed_dictionaries({"format_version": st.just(1), "tokenizer": json_values,
                                            "vocab_size": json_values, "splits": json_values}))
def test_meta_json(tmp_path, meta):
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    vocab = meta.get("vocab_size") if isinstance(meta, dict) else None
    garbage = (not isinstance(meta, dict) or meta.get("format_version") != 1 or not isinstance(meta.get("splits"), dict)
               or not isinstance(vocab, int) or isinstance(vocab, bool) or vocab < 0)
    only_our_error(lambda: DatasetMeta.read(tmp_path), True if garbage else None)


@pytest.fixture(scope="module")
def checkpoint_folder(char_data, tmp_path_factory):
    from conftest import tiny_config

    from gpt.training.loop import train

    out = tmp_path_factory.mktemp("fuzz_run")
    train(tiny_config(char_data, out, max_iters=2))
    return read_checkpoint(out).path


@FUZZ
@given(name=st.sampled_from(["config.yaml", "state.json", "tokenizer.json", "model.safetensors", "optimizer.pt"]),
       content=st.binary(max_size=400), keep=st.integers(0, 4000))
def test_checkpoint_files(checkpoint_folder, name, content, keep):
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "ckpt_000002"
        shutil.copytree(checkpoint_folder, folder)
        original = (folder / name).read_bytes()
        damaged = original[:keep] + content  # a truncated or damaged file
        (folder / name).write_bytes(damaged)

        def read_all():
            load_model(read_checkpoint(folder))
            load_training_state(folder)

        only_our_error(read_all, True if _garbled(name, original, damaged) else None)


def _utf8(data: bytes) -> bool:
    return parses(lambda d: d.decode("utf-8"), data) is not FAILED


def _garbled(name: str, original: bytes, damaged: bytes) -> bool:
    """Whether a damaged checkpoint file can no longer be what it was: binary files cut short,
    text files that no longer parse as the object they hold."""
    if name in ("model.safetensors", "optimizer.pt"):
        return len(damaged) < len(original)
    text = damaged.decode("utf-8") if _utf8(damaged) else None
    loads = yaml.safe_load if name == "config.yaml" else json.loads
    return text is None or not isinstance(parses(loads, text), dict)


task_lines = st.lists(st.one_of(st.text(max_size=60), json_values.map(json.dumps),
                                st.fixed_dictionaries({"context": json_values, "choices": json_values,
                                                       "label": json_values}).map(json.dumps),
                                st.fixed_dictionaries({"text": json_values, "label": json_values}).map(json.dumps)),
                      max_size=5)


@FUZZ
@given(lines=task_lines, kind=st.sampled_from(["classify", "entail", "similar", "choice"]))
def test_task_files(tmp_path, lines, kind):
    from gpt.tasks.items import read_choice_file as read_task
    from gpt.tasks.items import read_task_file

    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(lines), encoding="utf-8", errors="surrogatepass")
    content = path.read_bytes()
    text = content.decode("utf-8") if _utf8(content) else None
    only_our_error(lambda: read_task_file(path, kind), text is None or _jsonl_garbage(text.splitlines()) or None)
    only_our_error(lambda: read_task(path), text is None or _jsonl_garbage(content.splitlines()) or None)


def _jsonl_garbage(lines: list) -> bool:
    """No line holds a JSON object, or a line that is not blank holds something else."""
    filled = [line for line in lines if line.strip()]
    return not filled or any(not isinstance(parses(json.loads, line), dict) for line in filled)
