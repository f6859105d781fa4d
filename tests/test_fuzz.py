"""Fuzzing: readers given random bytes and random structures raise only our one-line error."""

import json
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpt.checkpoint import load_model, load_training_state, read_checkpoint
from gpt.config import apply_overrides, build_config, load_config
from gpt.data.formats import DatasetMeta
from gpt.data.shards import read_shard
from gpt.errors import GptError

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
KEYS = ["model.n_layer", "model.preset", "model.pos_encoding", "train.lr", "train.compile", "train.lr_decay_iters",
        "sample.stop", "sample.top_k", "sample.top_p", "data.dir", "model.vocab_size", "train.device"]
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                       max_size=4), max_leaves=20)


def only_our_error(action) -> None:
    try:
        action()
    except GptError as exc:
        assert "\n" not in str(exc)


@FUZZ
@given(st.lists(st.one_of(st.text(max_size=40), st.builds("{}={}".format, st.sampled_from(KEYS), st.text(max_size=12))),
                max_size=4))
def test_overrides(overrides):
    only_our_error(lambda: build_config(apply_overrides({}, overrides)))


@FUZZ
@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_yaml_config_files(tmp_path, content):
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    only_our_error(lambda: load_config(path))


@FUZZ
@given(st.dictionaries(st.sampled_from(["model", "train", "data", "sample", "other"]),
                       st.dictionaries(st.sampled_from([k.split(".")[1] for k in KEYS]), json_values, max_size=3)
                       | json_values, max_size=3))
def test_config_structures(raw):
    only_our_error(lambda: build_config(raw))


@FUZZ
@given(st.binary(max_size=2000))
def test_shard_files(tmp_path, content):
    path = tmp_path / "x_train_000000.bin"
    path.write_bytes(content)
    only_our_error(lambda: read_shard(path, vocab_size=50257))


@FUZZ
@given(json_values | st.fixed_dictionaries({"format_version": st.just(1), "tokenizer": json_values,
                                            "vocab_size": json_values, "splits": json_values}))
def test_meta_json(tmp_path, meta):
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    only_our_error(lambda: DatasetMeta.read(tmp_path))


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
        (folder / name).write_bytes(original[:keep] + content)  # a truncated or damaged file

        def read_all():
            load_model(read_checkpoint(folder))
            load_training_state(folder)

        only_our_error(read_all)


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
    only_our_error(lambda: read_task_file(path, kind))
    only_our_error(lambda: read_task(path))
