"""Parity with transformers' GPT-2 and nanoGPT's checkpoint format: `gpt convert`, `init_from: hf:`.

The reference models are small random GPT2LMHeadModels built here (no download): every
parameter, norms and biases included, is randomised so that a swapped or untransposed tensor
shows in the logits.
"""

from __future__ import annotations

import json
import os
import pathlib
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from conftest import SHAKESPEARE, shakespeare_data
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

from gpt.checkpoint import load_model, read_checkpoint, save_model_folder
from gpt.config import apply_overrides, build_config
from gpt.convert import read_hf, save_imported
from gpt.data.formats import RunState
from gpt.data.shards import load_dataset
from gpt.data.tokenizer import GPT2Tokenizer, TokenizerSpec
from gpt.errors import GptError
from gpt.inference.sample import decode
from gpt.model import GPT
from gpt.training.objectives import check_init_from, init_weights

VOCAB, CONTEXT = 50257, 128


def random_gpt2(seed: int = 0, **config) -> GPT2LMHeadModel:
    """A 2-layer, 64-wide GPT-2 with every parameter randomised (biases and norm gains too)."""
    torch.manual_seed(seed)
    settings = dict(n_layer=2, n_head=4, n_embd=64, n_positions=CONTEXT, vocab_size=VOCAB, initializer_range=0.1,
                    bos_token_id=None, eos_token_id=None)  # generate() must not stop early
    model = GPT2LMHeadModel(GPT2Config(**{**settings, **config})).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model


def hf_logits(model: GPT2LMHeadModel, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(idx).logits


def our_logits(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(idx)[0]


@pytest.fixture(scope="module")
def hf_model() -> GPT2LMHeadModel:
    return random_gpt2()


@pytest.fixture(scope="module")
def hf_dir(hf_model, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hf") / "gpt2"
    hf_model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def imported_dir(hf_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ours") / "gpt2"
    save_imported(read_hf(hf_dir), out)
    return out


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (3, CONTEXT), generator=torch.Generator().manual_seed(1))


def assert_one_line_error(result: tuple[int, str, str], message: str) -> None:
    code, _, err = result
    assert code == 2, err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


# ----------------------------------------------------------------------------- Hugging Face in

def test_imported_model_reproduces_transformers_logits(hf_model, imported_dir, ids):
    model = load_model(read_checkpoint(imported_dir))
    assert model.config.activation == "gelu_tanh" and model.config.norm_eps == 1e-5
    assert torch.allclose(our_logits(model, ids), hf_logits(hf_model, ids), atol=1e-4, rtol=0)


def test_greedy_generation_agrees_with_transformers_generate(hf_model, imported_dir, ids):
    model = load_model(read_checkpoint(imported_dir)).eval()
    prompt = ids[:1, :8]
    expected = hf_model.generate(prompt, max_new_tokens=50, do_sample=False, pad_token_id=0)[0, 8:].tolist()
    ours = [token.item() for token in decode(model, prompt, 50, lambda logits: logits.argmax(dim=-1))]
    assert ours == expected and len(set(expected)) > 10  # a varied sequence, not one repeated token


def test_cli_imports_and_samples_greedily_like_transformers(cli, hf_model, hf_dir, tmp_path):
    out = tmp_path / "ckpt"
    code, stdout, err = cli("convert", "from-hf", hf_dir, out)
    assert code == 0, err
    assert f"wrote {out}" in stdout and "3,324,736 parameters" in stdout
    code, stdout, err = cli("sample", out, "--prompt", "Hello world", "--temperature", "0", "--max-new-tokens", "12",
                            "--ignore-eot", "--json")
    assert code == 0, err
    tokenizer = GPT2Tokenizer()
    prompt = torch.tensor([tokenizer.encode("Hello world")])
    expected = hf_model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)[0, 2:].tolist()
    assert json.loads(stdout)["text"] == tokenizer.decode(expected)


def test_info_json_describes_an_imported_model(cli, hf_model, hf_dir, imported_dir):
    code, stdout, err = cli("info", imported_dir, "--json")
    assert code == 0, err
    info = json.loads(stdout)
    assert info["model"]["params"] == hf_model.num_parameters() and info["tokenizer"] == "gpt2"
    assert (info["model"]["n_layer"], info["model"]["block_size"], info["model"]["bias"]) == (2, CONTEXT, True)
    assert info["state"]["converted_from"] == str(hf_dir)


def test_pytorch_model_bin_with_bare_names_and_mask_buffers(hf_model, hf_dir, tmp_path, ids):
    """The layout of OpenAI's original upload: GPT2Model names (no `transformer.`), the
    attention-mask buffers saved along, a pickled state dict instead of safetensors."""
    folder = tmp_path / "legacy"
    folder.mkdir()
    shutil.copy(hf_dir / "config.json", folder)
    state = {k.removeprefix("transformer."): v for k, v in hf_model.state_dict().items() if k != "lm_head.weight"}
    for layer in range(2):
        state[f"h.{layer}.attn.bias"] = torch.tril(torch.ones(CONTEXT, CONTEXT)).view(1, 1, CONTEXT, CONTEXT)
        state[f"h.{layer}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, folder / "pytorch_model.bin")
    out = tmp_path / "ckpt"
    save_imported(read_hf(folder), out)
    assert torch.allclose(our_logits(load_model(read_checkpoint(out)), ids), hf_logits(hf_model, ids), atol=1e-4)


def write_hf_folder(folder: Path, hf_dir: Path, config_changes: dict | None = None,
                    files: tuple[str, ...] = ("config.json", "model.safetensors")) -> Path:
    folder.mkdir()
    for name in files:
        shutil.copy(hf_dir / name, folder)
    if config_changes is not None:
        config = json.loads((hf_dir / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **config_changes}))
    return folder


@pytest.mark.parametrize("config_changes, files, message", [
    (None, ("model.safetensors",), "config.json not found"),
    (None, ("config.json",), "has no model.safetensors or pytorch_model.bin"),
    ({"model_type": "llama"}, ("config.json", "model.safetensors"), "model_type 'llama' is not GPT-2"),
    ({"n_embd": 32}, ("config.json", "model.safetensors"), "has shape [50257, 64] but the config implies [50257, 32]"),
    ({"n_positions": 256}, ("config.json", "model.safetensors"), "wpe.weight has shape"),
    ({"n_layer": 3}, ("config.json", "model.safetensors"), "has no tensor h.2.ln_1.weight"),
    ({"n_layer": 1}, ("config.json", "model.safetensors"), "no place for: h.1."),
    ({"activation_function": "swish"}, ("config.json", "model.safetensors"), "activation_function 'swish'"),
    ({"scale_attn_by_inverse_layer_idx": True}, ("config.json", "model.safetensors"), "is not supported"),
    ({"n_inner": 100}, ("config.json", "model.safetensors"), "n_inner=100 is not supported"),
    ({"n_head": 5}, ("config.json", "model.safetensors"), "divisible by model.n_head"),
])
def test_bad_hf_folders_are_one_line_and_write_nothing(cli, hf_dir, tmp_path, config_changes, files, message):
    folder = write_hf_folder(tmp_path / "in", hf_dir, config_changes, files)
    assert_one_line_error(cli("convert", "from-hf", folder, tmp_path / "out"), message)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


def test_existing_output_needs_overwrite_and_then_is_replaced(cli, hf_dir, tmp_path):
    out = tmp_path / "out"
    assert cli("convert", "from-hf", hf_dir, out)[0] == 0
    assert_one_line_error(cli("convert", "from-hf", hf_dir, out), "already exists; choose a new folder or pass")
    code, _, err = cli("convert", "from-hf", hf_dir, out, "--overwrite")
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    assert_one_line_error(cli("convert", "from-hf", hf_dir, tmp_path / "notes", "--overwrite"), "not a model folder")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"


# ----------------------------------------------------------------------------- Hugging Face out

def test_export_round_trips_every_tensor_exactly(cli, hf_dir, imported_dir, tmp_path):
    code, _, err = cli("convert", "to-hf", imported_dir, tmp_path / "back")
    assert code == 0, err
    original, exported = load_file(hf_dir / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert original.keys() == exported.keys()
    assert all(torch.equal(original[name], exported[name]) for name in original)
    _, loading = GPT2LMHeadModel.from_pretrained(tmp_path / "back", output_loading_info=True)
    assert not any(loading.values()), loading


def test_exported_tokenizer_files_encode_like_ours(cli, imported_dir, tmp_path):
    assert cli("convert", "to-hf", imported_dir, tmp_path / "back")[0] == 0
    hf_tokenizer = GPT2TokenizerFast.from_pretrained(tmp_path / "back")
    excerpt = SHAKESPEARE.read_text(encoding="utf-8")[:5000] + "naïve café — 日本語 🤖\n\n   tabs\tI'll 1234567"
    assert hf_tokenizer.encode("hello world") == [31373, 995]
    assert hf_tokenizer.encode(excerpt) == GPT2Tokenizer().encode(excerpt)
    assert hf_tokenizer.eos_token_id == 50256 and len(hf_tokenizer) == VOCAB


@pytest.mark.parametrize("model", [dict(activation="gelu_tanh"), dict(activation="gelu"), dict(activation="relu"),
                                   dict(bias=False), dict(tie_embeddings=False), dict(norm_eps=1e-6)])
def test_our_gpt2_shaped_models_export_exactly_and_come_back(cli, tmp_path, model, ids):
    """Byte-tokenizer models of every variant GPT-2's config can express (no biases are
    written as zero biases): transformers gives our logits, and importing gives the model back."""
    config = build_config({"model": {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": CONTEXT,
                                     "vocab_size": 257, "bias": True, **model}})
    torch.manual_seed(0)
    ours = GPT(config.model)
    with torch.no_grad():
        for param in ours.parameters():
            param.add_(0.1 * torch.randn_like(param))
    save_model_folder(tmp_path / "ckpt", ours, config, TokenizerSpec("byte"), RunState(iter=7))
    assert cli("convert", "to-hf", tmp_path / "ckpt", tmp_path / "hf")[0] == 0
    idx = ids % 257
    hf_model, loading = GPT2LMHeadModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not any(loading.values()), loading
    assert torch.allclose(hf_logits(hf_model.eval(), idx), our_logits(ours, idx), atol=1e-4, rtol=0)
    assert cli("convert", "from-hf", tmp_path / "hf", tmp_path / "again")[0] == 0
    again = read_checkpoint(tmp_path / "again")
    assert again.tokenizer_spec == TokenizerSpec("byte")
    assert again.config.model.bias == config.model.bias  # a bias-free model comes back bias-free
    assert torch.equal(our_logits(load_model(again), idx), our_logits(ours, idx))
    check_init_from(f"hf:{tmp_path / 'hf'}", config, TokenizerSpec("byte"))  # accepted against the original


def test_biases_trained_in_transformers_after_a_bias_free_export_are_kept(cli, tmp_path, ids):
    config = build_config({"model": {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": CONTEXT,
                                     "vocab_size": 257, "bias": False}})
    save_model_folder(tmp_path / "ckpt", GPT(config.model), config, TokenizerSpec("byte"), RunState(iter=1))
    assert cli("convert", "to-hf", tmp_path / "ckpt", tmp_path / "hf")[0] == 0
    hf_model = GPT2LMHeadModel.from_pretrained(tmp_path / "hf")
    with torch.no_grad():
        hf_model.transformer.h[0].mlp.c_fc.bias.fill_(0.5)
    hf_model.save_pretrained(tmp_path / "hf")  # its config.json still says "bias": false
    assert cli("convert", "from-hf", tmp_path / "hf", tmp_path / "again")[0] == 0
    again = read_checkpoint(tmp_path / "again")
    assert again.config.model.bias is True
    assert torch.allclose(our_logits(load_model(again), ids % 257), hf_logits(hf_model.eval(), ids % 257), atol=1e-4)


@pytest.mark.parametrize("model, message", [
    (dict(pos_encoding="rope"), "model.pos_encoding=rope cannot be expressed"),
    (dict(pos_encoding="sinusoidal"), "model.pos_encoding=sinusoidal cannot be expressed"),
    (dict(norm="rmsnorm"), "model.norm=rmsnorm cannot be expressed"),
    (dict(norm_position="post"), "model.norm_position=post cannot be expressed"),
    (dict(qk_norm=True), "model.qk_norm=True cannot be expressed"),
    (dict(logit_softcap=30.0), "model.logit_softcap=30.0 cannot be expressed"),
    (dict(activation="relu2"), "model.activation=relu2 cannot be expressed"),
])
def test_models_gpt2_cannot_express_are_refused_by_field(cli, tmp_path, model, message):
    config = build_config({"model": {"preset": "tiny", "vocab_size": 257, **model}})
    save_model_folder(tmp_path / "ckpt", GPT(config.model), config, TokenizerSpec("byte"), RunState(iter=0))
    assert_one_line_error(cli("convert", "to-hf", tmp_path / "ckpt", tmp_path / "hf"), message)
    assert not (tmp_path / "hf").exists()


# ----------------------------------------------------------------------------- train.init_from

@pytest.fixture(scope="module")
def gpt2_data(tmp_path_factory) -> Path:
    return shakespeare_data(tmp_path_factory.mktemp("gpt2data"), 20_000, "gpt2")


def finetune_config(data: Path, init_from: str, block_size: int = CONTEXT):
    return build_config({"model": {"preset": "gpt2", "n_layer": 2, "n_head": 4, "n_embd": 64, "block_size": block_size,
                                   "dropout": 0.1},
                         "data": {"dir": str(data)}, "train": {"init_from": init_from, "device": "cpu"}})


@pytest.mark.parametrize("source", ["hf", "converted"])
def test_init_from_hf_folder_or_converted_checkpoint_starts_from_gpt2(hf_model, hf_dir, imported_dir, gpt2_data,
                                                                      ids, source):
    init_from = f"hf:{hf_dir}" if source == "hf" else str(imported_dir)
    config = finetune_config(gpt2_data, init_from)
    model = GPT(config.model)
    init_weights(model, check_init_from(init_from, config, load_dataset(gpt2_data).meta.tokenizer), config)
    assert torch.allclose(our_logits(model, ids), hf_logits(hf_model, ids), atol=1e-4, rtol=0)


def test_a_fine_tune_may_have_a_shorter_context_than_its_source_not_a_longer(hf_model, hf_dir, gpt2_data, ids):
    """nanoGPT's crop_block_size: the first learned positions carry over, and the model computes
    what the source computes on windows that fit."""
    tokenizer = load_dataset(gpt2_data).meta.tokenizer
    config = finetune_config(gpt2_data, f"hf:{hf_dir}", block_size=CONTEXT // 2)
    model = GPT(config.model)
    init_weights(model, check_init_from(f"hf:{hf_dir}", config, tokenizer), config)
    short = ids[:, :CONTEXT // 2]
    assert torch.allclose(our_logits(model, short), hf_logits(hf_model, short), atol=1e-4, rtol=0)
    longer = finetune_config(gpt2_data, f"hf:{hf_dir}", block_size=CONTEXT * 2)
    with pytest.raises(GptError, match=f"model.block_size={CONTEXT} .here {CONTEXT * 2}."):
        check_init_from(f"hf:{hf_dir}", longer, tokenizer)


def test_a_language_model_with_three_added_tokens_is_not_taken_for_a_task_model(tmp_path):
    """A task model is known by its head's tensors, not by its vocabulary being the tokenizer's
    plus as many ids as a task adds."""
    tokenizer = TokenizerSpec("byte")
    grown = build_config({"model": {"preset": "tiny", "block_size": 8, "vocab_size": tokenizer.build().vocab_size + 3}})
    save_model_folder(tmp_path / "grown", GPT(grown.model), grown, tokenizer, RunState(iter=0))
    config = build_config({"model": {"preset": "tiny", "block_size": 8, "vocab_size": tokenizer.build().vocab_size},
                           "train": {"init_from": str(tmp_path / "grown")}})
    with pytest.raises(GptError, match="the checkpoint's model differs: model.vocab_size=260 .here 257.") as refused:
        check_init_from(str(tmp_path / "grown"), config, tokenizer)
    assert "task model" not in str(refused.value)


def test_a_start_of_another_shape_names_the_overrides_that_fit_it(tmp_path):
    """A base recipe may differ by host (hosts:), so the error spells the settings to add."""
    tokenizer = TokenizerSpec("byte")
    model = {"preset": "tiny", "block_size": 8, "vocab_size": tokenizer.build().vocab_size}
    base = build_config({"model": {**model, "n_layer": 3, "tie_embeddings": True, "logit_softcap": None}})
    save_model_folder(tmp_path / "base", GPT(base.model), base, tokenizer, RunState(iter=0))
    start = {"init_from": str(tmp_path / "base")}
    config = build_config({"model": {**model, "n_layer": 2, "tie_embeddings": False, "logit_softcap": 15.0},
                           "train": start})
    with pytest.raises(GptError) as refused:
        check_init_from(str(tmp_path / "base"), config, tokenizer)
    overrides = str(refused.value).split("; add ")[1].removesuffix(" to the command line").split()
    assert sorted(overrides) == ["model.logit_softcap=None", "model.n_layer=3", "model.tie_embeddings=True"]
    fixed = build_config(apply_overrides({"model": {**model, "n_layer": 2, "tie_embeddings": False,
                                                    "logit_softcap": 15.0}, "train": start}, overrides))
    check_init_from(str(tmp_path / "base"), fixed, tokenizer)


def test_init_from_hf_with_another_model_shape_is_one_line(cli, hf_dir, gpt2_data, tmp_path):
    path = tmp_path / "finetune.yaml"
    path.write_text(f"model: {{preset: gpt2, n_layer: 3, n_head: 4, n_embd: 64, block_size: {CONTEXT}}}\n"
                    f"data: {{dir: {gpt2_data}}}\n"
                    f"train: {{init_from: 'hf:{hf_dir}', out_dir: {tmp_path / 'run'}, device: cpu, compile: false}}\n")
    assert_one_line_error(cli("train", path), "the checkpoint's model differs: model.n_layer=2 (here 3); "
                                              "add model.n_layer=2 to the command line")


# ----------------------------------------------------------------------------- nanoGPT in

def nanogpt_checkpoint(hf_model: GPT2LMHeadModel, bias: bool, vocab_size: int, mask_buffers: bool) -> dict:
    """What nanoGPT's train.py saves for this model: nn.Linear weights (out, in), a compiled
    model's `_orig_mod.` prefixes, the tied lm_head, no biases when bias=False."""
    state = {}
    for name, tensor in hf_model.state_dict().items():
        if name.endswith(".bias") and not bias:
            continue
        if name.endswith(".weight") and any(p in name for p in ("c_attn", "c_proj", "c_fc")):
            tensor = tensor.t()
        state[f"_orig_mod.{name}"] = tensor.contiguous()
    padding = torch.randn(vocab_size - hf_model.config.vocab_size, hf_model.config.n_embd)
    state["_orig_mod.transformer.wte.weight"] = torch.cat([state["_orig_mod.transformer.wte.weight"], padding])
    state["_orig_mod.lm_head.weight"] = state["_orig_mod.transformer.wte.weight"]
    if mask_buffers:
        for layer in range(hf_model.config.n_layer):
            state[f"_orig_mod.transformer.h.{layer}.attn.bias"] = torch.ones(1, 1, CONTEXT, CONTEXT).tril()
    c = hf_model.config
    model_args = dict(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, block_size=c.n_positions, bias=bias,
                      vocab_size=vocab_size, dropout=0.0)
    return {"model": state, "model_args": model_args, "iter_num": 5000, "best_val_loss": torch.tensor(1.25),
            "config": {"dataset": "openwebtext", "learning_rate": 6e-4}, "optimizer": {"state": {}, "param_groups": []}}


@pytest.mark.parametrize("bias, vocab_size, mask_buffers", [(True, VOCAB, False), (False, 50304, True)])
def test_nanogpt_checkpoint_imports_with_its_logits(cli, tmp_path, ids, bias, vocab_size, mask_buffers):
    reference = random_gpt2(activation_function="gelu")  # nanoGPT uses exact GELU
    if not bias:
        with torch.no_grad():
            for name, param in reference.named_parameters():
                if name.endswith(".bias"):
                    param.zero_()
    torch.save(nanogpt_checkpoint(reference, bias, vocab_size, mask_buffers), tmp_path / "ckpt.pt")
    code, _, err = cli("convert", "from-nanogpt", tmp_path / "ckpt.pt", tmp_path / "out")
    assert code == 0, err
    checkpoint = read_checkpoint(tmp_path / "out")
    assert checkpoint.config.model.vocab_size == VOCAB and checkpoint.tokenizer_spec == TokenizerSpec("gpt2")
    assert checkpoint.state.iter == 5000 and checkpoint.state.best_loss == 1.25
    assert torch.allclose(our_logits(load_model(checkpoint), ids), hf_logits(reference, ids), atol=1e-4, rtol=0)


def test_nanogpt_char_run_maps_its_ids_to_our_sorted_vocabulary(cli, tmp_path):
    chars = list("qwe rtyuio\n!")  # nanoGPT's id order, deliberately not sorted
    reference = random_gpt2(vocab_size=len(chars), activation_function="gelu")
    torch.save(nanogpt_checkpoint(reference, True, len(chars), False), tmp_path / "ckpt.pt")
    meta = {"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": {ch: i for i, ch in enumerate(chars)}}
    (tmp_path / "meta.pkl").write_bytes(pickle.dumps(meta))
    code, _, err = cli("convert", "from-nanogpt", tmp_path / "ckpt.pt", tmp_path / "out", "--meta",
                       tmp_path / "meta.pkl")
    assert code == 0, err
    checkpoint = read_checkpoint(tmp_path / "out")
    tokenizer = checkpoint.tokenizer
    assert tokenizer.vocab == "".join(sorted(chars))
    text = "you tote it!\nwet rye"
    ours = our_logits(load_model(checkpoint), torch.tensor([tokenizer.encode(text)]))
    theirs = hf_logits(reference, torch.tensor([[meta["stoi"][ch] for ch in text]]))
    # Column j of ours is the character tokenizer.vocab[j]; in theirs that character is stoi[ch].
    assert torch.allclose(ours, theirs[..., [meta["stoi"][ch] for ch in tokenizer.vocab]], atol=1e-4, rtol=0)


class RunsAShell:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize("content, message", [
    ({"itos": {0: "a"}, "hook": RunsAShell()}, "it names posix.system"),
    ({"itos": {0: "a"}, "path": pathlib.PurePosixPath("/etc")}, "it names pathlib"),
    ({"itos": {0: "a"}, "chars": {"a", "b"}}, "it holds a set"),
    ({"itos": {0: 0.5}}, "it holds a float"),
])
def test_meta_pickle_with_anything_but_plain_data_is_refused(cli, tmp_path, content, message):
    torch.save(nanogpt_checkpoint(random_gpt2(vocab_size=8), True, 8, False), tmp_path / "ckpt.pt")
    (tmp_path / "meta.pkl").write_bytes(pickle.dumps(content))
    result = cli("convert", "from-nanogpt", tmp_path / "ckpt.pt", tmp_path / "out", "--meta", tmp_path / "meta.pkl")
    assert_one_line_error(result, message)
    assert "was refused" in result[2] and not (tmp_path / "out").exists()


@pytest.mark.parametrize("payload, message", [
    ({"weights": {}}, "is not a nanoGPT checkpoint"),
    ({"model": {}, "model_args": {}, "callback": RunsAShell()},
     "was refused: not a safe checkpoint file (it names posix.system"),
])
def test_bad_nanogpt_checkpoints_are_one_line(cli, tmp_path, payload, message):
    torch.save(payload, tmp_path / "ckpt.pt")
    assert_one_line_error(cli("convert", "from-nanogpt", tmp_path / "ckpt.pt", tmp_path / "out"), message)
    assert not (tmp_path / "out").exists()


def test_nanogpt_meta_of_another_run_or_not_a_pickle_is_one_line(cli, tmp_path):
    torch.save(nanogpt_checkpoint(random_gpt2(vocab_size=8), True, 8, False), tmp_path / "ckpt.pt")
    (tmp_path / "meta.pkl").write_bytes(pickle.dumps({"itos": dict(enumerate("abcde"))}))
    result = cli("convert", "from-nanogpt", tmp_path / "ckpt.pt", tmp_path / "out", "--meta", tmp_path / "meta.pkl")
    assert_one_line_error(result, "has 5 characters but the model 8 ids; give the meta.pkl of the same run")
    (tmp_path / "meta.pkl").write_text("garbage\n")
    result = cli("convert", "from-nanogpt", tmp_path / "ckpt.pt", tmp_path / "out", "--meta", tmp_path / "meta.pkl")
    assert_one_line_error(result, "is not a pickle file, or a damaged one")
    assert not (tmp_path / "out").exists()


def test_a_text_file_given_as_nanogpt_checkpoint_is_refused_in_a_few_words(cli, tmp_path):
    (tmp_path / "input.txt").write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n")
    result = cli("convert", "from-nanogpt", tmp_path / "input.txt", tmp_path / "out")
    assert_one_line_error(result, "was refused: not a safe checkpoint file (not written by torch.save, or damaged)")
    assert "PyTorch" not in result[2]


def test_nanogpt_char_model_without_meta_asks_for_it(cli, tmp_path):
    torch.save(nanogpt_checkpoint(random_gpt2(vocab_size=8), True, 8, False), tmp_path / "ckpt.pt")
    assert_one_line_error(cli("convert", "from-nanogpt", tmp_path / "ckpt.pt", tmp_path / "out"), "pass its meta.pkl")


# ----------------------------------------------------------------------------- CLI

@pytest.mark.parametrize("verb, expected", [(["convert"], "from-nanogpt"), (["convert", "from-hf"], "--overwrite"),
                                            (["convert", "from-nanogpt"], "--meta"), (["convert", "to-hf"], "OUT_DIR"),
                                            (["info"], "--preset")])
def test_convert_verbs_have_help(cli, verb, expected):
    code, out, _ = cli(*verb, "--help")
    assert code == 0 and expected in out
