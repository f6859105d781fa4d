"""`gpt info`: presets counted on the meta device, --json, and `python -m gpt`."""

import json
import subprocess
import sys

import pytest
from conftest import REPO

from gpt.checkpoint import save_model_folder
from gpt.config import build_config
from gpt.data.formats import RunState
from gpt.data.tokenizer import TokenizerSpec
from gpt.model import GPT

# GPT-3 paper, table 2.1: total parameters of each model.
GPT3_PAPER_PARAMS = {"gpt3-small": 125e6, "gpt3-medium": 350e6, "gpt3-large": 760e6, "gpt3-xl": 1.3e9,
                     "gpt3-2.7b": 2.7e9, "gpt3-6.7b": 6.7e9, "gpt3-13b": 13e9, "gpt3-175b": 175e9}


@pytest.mark.parametrize("preset, paper", GPT3_PAPER_PARAMS.items())
def test_gpt3_presets_match_the_paper_parameter_counts(cli, preset, paper):
    code, out, err = cli("info", "--preset", preset, "--json")
    assert code == 0, err
    model = json.loads(out)["model"]
    assert abs(model["params"] - paper) / paper < 0.02
    assert model["block_size"] == 2048 and model["n_embd"] % model["n_head"] == 0
    # PaLM's count: 6 per weight outside the position table, plus attention over the full context.
    n, width, layers = model["params"] - 2048 * model["n_embd"], model["n_embd"], model["n_layer"]
    assert model["flops_per_token"] == 6 * n + 12 * layers * width * 2048


def test_info_preset_prints_size_and_flops(cli):
    code, out, _ = cli("info", "--preset", "gpt2")
    assert code == 0
    assert "124,439,808 parameters (124.4M)" in out and "training FLOPs per token" in out


@pytest.mark.parametrize("args, message", [([], "give a dataset / run / checkpoint folder or --preset"),
                                           (["runs/x", "--preset", "gpt2"], "one of them"),
                                           (["--preset", "gtp2"], "did you mean 'gpt2'"),
                                           (["--preset", "tiny"], "takes its vocabulary size from the data")])
def test_info_needs_one_thing_to_describe(cli, args, message):
    code, _, err = cli("info", *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_info_json_of_a_dataset_is_its_meta(cli, char_data):
    code, out, _ = cli("info", char_data, "--json")
    info = json.loads(out)
    assert code == 0 and info["tokenizer"]["name"] == "char" and info["vocab_size"] == len(info["tokenizer"]["vocab"])


def test_python_dash_m_gpt_runs_the_cli():
    result = subprocess.run([sys.executable, "-m", "gpt", "info", "--preset", "gpt3-small", "--json"], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["model"]["n_layer"] == 12


def test_info_names_the_architecture_options_of_a_checkpoint(cli, tmp_path):
    config = build_config({"model": {"preset": "tiny", "vocab_size": 257, "activation": "relu2", "qk_norm": True,
                                     "logit_softcap": 15.0, "zero_init_proj": True, "tie_embeddings": False}})
    save_model_folder(tmp_path / "ckpt", GPT(config.model), config, TokenizerSpec("byte"), RunState(iter=0))
    code, out, _ = cli("info", tmp_path / "ckpt")
    assert code == 0
    assert ("pre-layernorm, relu2 MLP, qk-norm, logits soft-capped at 15, zero-initialised output projections, "
            "untied head") in out
    code, out, _ = cli("info", "--preset", "gpt2")
    assert "pre-layernorm, gelu_tanh MLP, tied head" in out


def test_info_of_a_checkpoint_prints_its_losses_in_words(cli, tmp_path):
    config = build_config({"model": {"preset": "tiny", "vocab_size": 257}})
    model = GPT(config.model)
    save_model_folder(tmp_path / "new", model, config, TokenizerSpec("byte"), RunState())
    save_model_folder(tmp_path / "run", model, config, TokenizerSpec("byte"),
                      RunState(iter=5, tokens=640, best_loss=2.25, best_split="train", losses={"train": 2.5}))
    code, out, _ = cli("info", tmp_path / "new")
    assert code == 0 and "tokenizer: byte; no evaluation recorded" in out and "None" not in out
    code, out, _ = cli("info", tmp_path / "run")
    assert code == 0 and "tokenizer: byte; evaluation losses: train 2.5000 (best train 2.2500)" in out
