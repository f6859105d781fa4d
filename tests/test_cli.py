import subprocess
import sys

import pytest
from conftest import REPO

from gpt import __version__


@pytest.mark.parametrize("verb, expected", [("prepare", "--val-fraction"), ("train", "train.lr_decay_iters"),
                                            ("sample", "--top-p"), ("chat", "--system"), ("info", "meta.json"),
                                            ("eval", "--fewshot-file"),
                                            ("classify", "--text-a"), ("serve", "--max-batch")])
def test_every_verb_has_help(cli, verb, expected):
    code, out, _ = cli(verb, "--help")
    assert code == 0 and expected in out


def test_version_and_bare_command(cli):
    assert cli("--version")[:2] == (0, f"gpt {__version__}\n")
    code, out, _ = cli()
    assert code == 0 and "prepare" in out and "sample" in out


@pytest.mark.parametrize("args, message", [
    (["train", "configs/nope.yaml"], "config file not found"),
    (["train", "configs/shakespeare_char.yaml", "model.n_layers=2"], "did you mean 'model.n_layer'"),
    (["train", "configs/shakespeare_char.yaml", "train.lr=abc"], "train.lr: invalid value 'abc'"),
    (["train"], "give a config file"),
    (["train", "--resume", "runs/nowhere"], "--resume takes a run folder"),
    (["prepare", "--tokenizer", "wordpiece"],
     "--tokenizer must be gpt2, char, byte, bpe or a Hugging Face tokenizer.json"),
    (["prepare", "--bogus"], "No such option"),
    (["info", "nowhere"], "checkpoint not found"),
    (["serve", "nowhere"], "checkpoint not found"),
])
def test_user_mistakes_are_one_line_and_exit_2(cli, args, message):
    code, out, err = cli(*args)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_console_script_reports_errors_without_traceback():
    result = subprocess.run([sys.executable, "-m", "gpt.cli", "train", "configs/missing.yaml"], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.startswith("error: config file not found") and "Traceback" not in result.stderr


def test_prepare_and_info_end_to_end(cli, tmp_path):
    corpus = tmp_path / "poem.txt"
    corpus.write_text("Shall I compare thee to a summer's day?\n" * 20)
    code, out, err = cli("prepare", corpus, "--tokenizer", "byte", "--out", tmp_path / "d", "--workers", "1")
    assert code == 0, err
    code, out, _ = cli("info", tmp_path / "d")
    assert code == 0 and "tokenizer byte, vocab_size 257" in out and "train:" in out and "val:" in out


def test_train_prints_what_differs_from_the_defaults_and_saves_every_setting(cli, tmp_path, char_data):
    from conftest import tiny_config

    from gpt.config import dump_yaml, load_config

    config = tmp_path / "run.yaml"
    config.write_text(dump_yaml(tiny_config(char_data, tmp_path / "run", max_iters=2, eval_interval=2,
                                            ckpt_interval=2)))
    code, out, err = cli("train", config, "model.n_layer=1")
    assert code == 0, err
    header = out[:out.index("\ndata: ")]
    assert f"every setting in {tmp_path / 'run' / 'config.yaml'}" in header
    assert "n_layer=1" in header and "max_iters=2" in header
    assert "weight_decay" not in header and len(header.splitlines()) <= 6  # not the ~60 lines of the whole config
    saved = load_config(tmp_path / "run" / "config.yaml", [])
    assert saved.model.n_layer == 1 and saved.train.weight_decay == 0.1
    code, out, err = cli("train", config, "model.n_layer=1", "--overwrite", "--show-config")
    assert code == 0, err
    assert "weight_decay: 0.1" in out
