"""Import and export weights: Hugging Face GPT-2 folders and nanoGPT checkpoints, offline.

Both formats hold GPT-2's tensors under GPT-2's names, with or without a `transformer.` prefix:
    wte, wpe, h.N.{ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj}, ln_f, lm_head
Hugging Face stores the four projection matrices as Conv1D, shaped (in, out): the transpose of
nn.Linear's (out, in), which nanoGPT and this package use. Files are read as safetensors or
with `torch.load(weights_only=True)`. Hugging Face in and out is here, with what both imports
share (the tensor renaming, `ImportedModel`, writing it as a checkpoint); nanoGPT's reader is
`gpt.nanogpt`. Nothing here uses the network.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tiktoken.load import load_tiktoken_bpe

from gpt.chat import ChatTemplate
from gpt.checkpoint import (
    WEIGHTS,
    Checkpoint,
    assign_weights,
    load_model,
    read_checkpoint,
    read_weights,
    refuse_int8,
    safe_torch_load,
    save_model_folder,
)
from gpt.config import Config, ModelConfig, build_config
from gpt.data.formats import RunState
from gpt.data.tokenizer import (
    EOT_TEXT,
    GPT2_RANKS,
    GPT2_RANKS_SHA256,
    TOKENIZER_FILE,
    HFTokenizer,
    Tokenizer,
    TokenizerSpec,
    byte_spelling,
    read_hf_tokenizer,
)
from gpt.durable import replacing_folder, write_durably
from gpt.errors import GptError
from gpt.inference.weights import int8_tensors, is_int8
from gpt.model import GPT

HF_PREFIX = "hf:"
GPT2_VOCAB = 50257
# Our tokenizer description, kept beside an export whose tokenizer Hugging Face's GPT-2 files
# cannot describe (char, byte) or that is a tokenizer.json of its own (bpe, hf), so that
# importing the folder again restores it exactly.
TOKENIZER_SIDECAR = "gpt_tokenizer.json"
# Hugging Face activation names -> ours. gelu_new, gelu_pytorch_tanh and gelu_fast are all
# the tanh approximation; "gelu" is the exact erf form.
HF_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
                  "gelu": "gelu", "relu": "relu"}
EXPORT_ACTIVATIONS = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}
# GPT2Config's defaults, for config.json files that leave a field out.
HF_DEFAULTS = dict(n_layer=12, n_head=12, n_embd=768, n_positions=1024, vocab_size=GPT2_VOCAB,
                   activation_function="gelu_new", layer_norm_epsilon=1e-5, tie_word_embeddings=True)
# Per block: our module name, GPT-2's, and whether its weight is a projection matrix (Conv1D).
BLOCK_NAMES = [("norm1", "ln_1", False), ("attn.qkv", "attn.c_attn", True), ("attn.proj", "attn.c_proj", True),
               ("norm2", "ln_2", False), ("mlp.fc", "mlp.c_fc", True), ("mlp.proj", "mlp.c_proj", True)]


@dataclass
class ImportedModel:
    """A model read from elsewhere: its architecture, tokenizer and weights under our names."""

    config: ModelConfig
    tokenizer: TokenizerSpec
    weights: dict[str, torch.Tensor]
    state: RunState


# ----------------------------------------------------------------------------- tensor names

def _gpt2_names(config: ModelConfig) -> dict[str, tuple[str, bool]]:
    """Our tensor name -> (GPT-2's name without the `transformer.` prefix, is a projection)."""
    names = {"wte.weight": ("wte.weight", False), "wpe.weight": ("wpe.weight", False),
             "norm_f.weight": ("ln_f.weight", False), "norm_f.bias": ("ln_f.bias", False)}
    for i in range(config.n_layer):
        for ours, theirs, projection in BLOCK_NAMES:
            names[f"blocks.{i}.{ours}.weight"] = (f"h.{i}.{theirs}.weight", projection)
            names[f"blocks.{i}.{ours}.bias"] = (f"h.{i}.{theirs}.bias", False)
    if not config.tie_embeddings:
        names["lm_head.weight"] = ("lm_head.weight", False)
    return names


def _short_name(name: str) -> str:
    """GPT-2's name without torch.compile's `_orig_mod.` (nanoGPT) or the `transformer.` prefix."""
    return name.removeprefix("_orig_mod.").removeprefix("transformer.")


def _skipped(name: str, config: ModelConfig) -> bool:
    """The attention mask buffers (`h.N.attn.bias`, `h.N.attn.masked_bias`) are not weights,
    and a tied output matrix is the token embedding again."""
    parts = name.split(".")
    mask_buffer = len(parts) == 4 and parts[0] == "h" and parts[2] == "attn" and parts[3] in ("bias", "masked_bias")
    return mask_buffer or (name == "lm_head.weight" and config.tie_embeddings)


def from_gpt2_tensors(tensors: dict[str, torch.Tensor], config: ModelConfig, conv1d: bool,
                     source: str) -> dict[str, torch.Tensor]:
    """Rename GPT-2-named tensors to ours (transposing Conv1D projections) as float32, checking
    that every tensor the config implies is there with its shape and that nothing is left over."""
    given = {_short_name(k): v for k, v in tensors.items() if not _skipped(_short_name(k), config)}
    names = _gpt2_names(config)
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in GPT(config).state_dict().items()}
    weights = {}
    for ours, shape in expected.items():
        if ours == "lm_head.weight" and config.tie_embeddings:
            continue
        theirs, projection = names[ours]
        transpose = projection and conv1d
        if theirs not in given:
            raise GptError(f"{source} has no tensor {theirs}; the file is incomplete or not a GPT-2 model")
        tensor = given.pop(theirs)
        stored_shape = shape[::-1] if transpose else shape
        if tuple(tensor.shape) != stored_shape:
            raise GptError(f"{source}: {theirs} has shape {list(tensor.shape)} but the config implies "
                           f"{list(stored_shape)}; the weights and the config do not belong together")
        weights[ours] = (tensor.t() if transpose else tensor).float().contiguous()
    if given:
        raise GptError(f"{source} holds a tensor this GPT-2 config has no place for: {sorted(given)[0]}; "
                       "the weights and the config do not belong together")
    return weights


def _to_gpt2_tensors(model: GPT) -> dict[str, torch.Tensor]:
    """Our weights under Hugging Face GPT2LMHeadModel's names, projections as Conv1D. GPT-2
    always has biases: a model without them gets zero biases, which change nothing (and
    config.json says `"bias": false`, so that importing gives the bias-free model back)."""
    state = model.state_dict()
    tensors = {}
    for ours, (theirs, projection) in _gpt2_names(model.config).items():
        tensor = state.get(ours)
        if tensor is None:
            tensor = torch.zeros(state[ours.removesuffix(".bias") + ".weight"].shape[0])
        key = theirs if theirs == "lm_head.weight" else f"transformer.{theirs}"
        tensors[key] = (tensor.t() if projection else tensor).detach().float().contiguous()
    return tensors


# ----------------------------------------------------------------------------- Hugging Face in

def read_hf(folder: str | Path) -> ImportedModel:
    """A Hugging Face GPT-2 folder on disk (config.json + model.safetensors or pytorch_model.bin)."""
    folder = Path(folder)
    hf = _read_json(folder / "config.json", "a Hugging Face model folder")
    config = _config_from_hf(hf, folder / "config.json")
    weights_file, tensors = _read_hf_weights(folder)
    weights = from_gpt2_tensors(tensors, config, conv1d=True, source=str(weights_file))
    if hf.get("bias") is False:
        weights, config = _without_zero_biases(weights, config)
    spec = _folder_tokenizer(folder)
    tokenizer = spec.build()
    if tokenizer.vocab_size > config.vocab_size:
        raise GptError(f"{folder}: vocab_size {config.vocab_size} is smaller than the {tokenizer.name} tokenizer's "
                       f"{tokenizer.vocab_size}; the model cannot read that tokenizer's ids")
    return ImportedModel(config, spec, weights, RunState(converted_from=str(folder)))


def _without_zero_biases(weights: dict[str, torch.Tensor], config: ModelConfig
                         ) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """A model we exported without biases (config.json `"bias": false`) comes back without
    them, so that it matches its original config (init_from, resume). Biases that are no longer
    all zero (trained in transformers since) are kept: dropping them would change the model."""
    biases = [name for name in weights if name.endswith(".bias")]
    if any(weights[name].count_nonzero() for name in biases):
        return weights, config
    kept = {name: tensor for name, tensor in weights.items() if name not in biases}
    return kept, dataclasses.replace(config, bias=False)


def _folder_tokenizer(folder: Path) -> TokenizerSpec:
    """A Hugging Face folder's tokenizer: the one our export described, else its tokenizer.json
    (GPT-2's own vocabulary is our gpt2 tokenizer), else GPT-2's."""
    sidecar = folder / TOKENIZER_SIDECAR
    if sidecar.is_file():
        return TokenizerSpec.from_json(_read_json(sidecar, "our tokenizer description"), str(sidecar), folder)
    if not (folder / TOKENIZER_FILE).is_file():
        return TokenizerSpec("gpt2")
    spec = read_hf_tokenizer(folder / TOKENIZER_FILE)
    vocab = spec.build().backend.get_vocab(with_added_tokens=True)
    return TokenizerSpec("gpt2") if vocab == gpt2_vocab() else spec


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise GptError(f"{path} not found; give {what}")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GptError(f"{path} is not valid JSON ({exc}); download it again") from None
    if not isinstance(value, dict):
        raise GptError(f"{path} must hold a JSON object")
    return value


def _config_from_hf(hf: dict[str, Any], path: Path) -> ModelConfig:
    """Our model config for a Hugging Face GPT2Config, or one line naming what GPT-2 in this
    package cannot express."""
    if hf.get("model_type") != "gpt2":
        raise GptError(f"{path}: model_type {hf.get('model_type')!r} is not GPT-2; only gpt2 models can be imported")
    hf = {**HF_DEFAULTS, **{k: v for k, v in hf.items() if v is not None}}
    unsupported = [("scale_attn_weights", False), ("scale_attn_by_inverse_layer_idx", True),
                   ("add_cross_attention", True)]
    for key, bad in unsupported:
        if hf.get(key) is bad:
            raise GptError(f"{path}: {key}={json.dumps(bad)} is not supported; only standard GPT-2 attention is")
    if hf.get("n_inner", 4 * hf["n_embd"]) != 4 * hf["n_embd"]:
        raise GptError(f"{path}: n_inner={hf['n_inner']} is not supported; the MLP is 4 x n_embd wide")
    if hf["activation_function"] not in HF_ACTIVATIONS:
        raise GptError(f"{path}: activation_function {hf['activation_function']!r} is not supported; "
                       f"use one of {', '.join(HF_ACTIVATIONS)}")
    model = dict(n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
                 block_size=hf["n_positions"], vocab_size=hf["vocab_size"],
                 activation=HF_ACTIVATIONS[hf["activation_function"]], norm_eps=hf["layer_norm_epsilon"],
                 pos_encoding="learned", norm="layernorm", norm_position="pre", bias=True,
                 tie_embeddings=hf["tie_word_embeddings"], dropout=0.0)
    try:
        return build_config({"model": model}).model
    except GptError as exc:
        raise GptError(f"{path}: {exc}") from None


def _read_hf_weights(folder: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    safetensors, pickled = folder / "model.safetensors", folder / "pytorch_model.bin"
    if safetensors.is_file():
        try:
            return safetensors, load_file(str(safetensors))
        except (OSError, SafetensorError) as exc:
            raise GptError(f"{safetensors} cannot be read ({exc}); download it again") from None
    if pickled.is_file():
        tensors = safe_torch_load(pickled)
        if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
            raise GptError(f"{pickled} is not a state dict of tensors; download it again")
        return pickled, tensors
    sharded = " (sharded checkpoints are not supported)" if any(folder.glob("*.index.json")) else ""
    raise GptError(f"{folder} has no model.safetensors or pytorch_model.bin{sharded}; "
                   "download the model's weights into it")


# ----------------------------------------------------------------------------- writing

def check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse to write over anything but an earlier model folder, and that only with --overwrite."""
    if not out_dir.exists() or (out_dir.is_dir() and not any(out_dir.iterdir())):
        return
    if not overwrite:
        raise GptError(f"{out_dir} already exists; choose a new folder or pass --overwrite")
    if not (out_dir / WEIGHTS).is_file():
        raise GptError(f"{out_dir} is not a model folder (no {WEIGHTS}); --overwrite only replaces model folders")


def save_imported(imported: ImportedModel, out_dir: str | Path) -> GPT:
    """Write an imported model as one of our checkpoint folders; returns the model."""
    with torch.device("meta"):
        model = GPT(imported.config)
    assign_weights(model, imported.weights, imported.state.converted_from)
    save_model_folder(Path(out_dir), model, Config(model=imported.config), imported.tokenizer, imported.state)
    return model


def read_model_source(source: str) -> ImportedModel:
    """What `train.init_from` names: a run or checkpoint folder, or hf:DIR (converted in memory)."""
    if source.startswith(HF_PREFIX):
        return read_hf(source.removeprefix(HF_PREFIX))
    checkpoint = read_checkpoint(source)
    weights = read_weights(checkpoint.path)
    refuse_int8(weights, checkpoint.path)  # before a run folder is touched
    return ImportedModel(checkpoint.config.model, checkpoint.tokenizer_spec, weights, checkpoint.state)


# ----------------------------------------------------------------------------- int8

def quantize_checkpoint(checkpoint_path: str | Path, out_dir: str | Path) -> Checkpoint:
    """Write an int8 copy of a checkpoint (`gpt.inference.weights.int8_tensors`): the same
    config with sample.weights=int8, tokenizer (its file included) and state, whose
    converted_from names the source. Returns the source checkpoint."""
    checkpoint = read_checkpoint(checkpoint_path)
    weights = read_weights(checkpoint.path)
    if is_int8(weights):
        raise GptError(f"{checkpoint.path} is already int8; quantize the fp32 checkpoint it was made from")
    with torch.device("meta"):
        model = GPT(checkpoint.config.model)
    config = dataclasses.replace(checkpoint.config,
                                 sample=dataclasses.replace(checkpoint.config.sample, weights="int8"))
    state = dataclasses.replace(checkpoint.state, converted_from=str(checkpoint.path))
    save_model_folder(Path(out_dir), model, config, checkpoint.tokenizer_spec, state, int8_tensors(weights, model))
    return checkpoint


# ----------------------------------------------------------------------------- Hugging Face out

def export_hf(checkpoint_path: str | Path, out_dir: str | Path) -> GPT:
    """Write a checkpoint as a Hugging Face GPT-2 folder (config.json, model.safetensors and
    the tokenizer's files) that transformers.GPT2LMHeadModel.from_pretrained loads as is."""
    checkpoint = read_checkpoint(checkpoint_path)
    config = checkpoint.config.model
    for field, needed in [("pos_encoding", "learned"), ("norm", "layernorm"), ("norm_position", "pre"),
                          ("qk_norm", False), ("logit_softcap", None)]:
        value = getattr(config, field)
        if value != needed:
            raise GptError(f"model.{field}={value} cannot be expressed as Hugging Face GPT-2, which needs "
                           f"model.{field}={needed}; only GPT-2-shaped models can be exported")
    if config.activation not in EXPORT_ACTIVATIONS:
        raise GptError(f"model.activation={config.activation} cannot be expressed as Hugging Face GPT-2, which "
                       f"has {', '.join(EXPORT_ACTIVATIONS)}; only GPT-2-shaped models can be exported")
    model = load_model(checkpoint)
    tokenizer, spec = checkpoint.tokenizer, checkpoint.tokenizer_spec
    files = gpt2_tokenizer_files() if spec.name == "gpt2" else {
        TOKENIZER_SIDECAR: json.dumps(spec.to_json(), ensure_ascii=False) + "\n"}
    if spec.file is not None:
        files[TOKENIZER_FILE] = spec.file
    settings = _tokenizer_config(tokenizer, config.block_size, ChatTemplate.of(checkpoint.config))
    if settings is not None:
        files["tokenizer_config.json"] = json.dumps(settings, ensure_ascii=False, indent=2) + "\n"
    files["config.json"] = json.dumps(_hf_config(config, tokenizer.eot), indent=2) + "\n"
    with replacing_folder(Path(out_dir)) as tmp:
        tmp.mkdir(parents=True)
        save_file(_to_gpt2_tensors(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for name, text in files.items():
            write_durably(tmp / name, text)
    return model


def left_out_of_export(checkpoint_path: str | Path) -> str | None:
    """What an export to Hugging Face GPT-2 drops: a GPT-1 task run's head, which GPT-2 has no
    place for (the folder then holds the language model the head sits on)."""
    checkpoint = read_checkpoint(checkpoint_path)
    kind = checkpoint.config.task.kind
    if kind in (None, "chat"):
        return None
    return (f"note: {checkpoint.path} is a {kind} task model: Hugging Face GPT-2 has no place for its task head, "
            "so the export holds its language model only (the head is left out; the vocabulary keeps the task's "
            f"special tokens); classify with gpt classify {checkpoint.path}")


def _hf_config(config: ModelConfig, eot: int | None) -> dict[str, Any]:
    attn_dropout = config.dropout if config.attn_dropout is None else config.attn_dropout
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": config.vocab_size,
            "n_positions": config.block_size, "n_embd": config.n_embd, "n_layer": config.n_layer,
            "n_head": config.n_head, "n_inner": None, "activation_function": EXPORT_ACTIVATIONS[config.activation],
            "layer_norm_epsilon": config.norm_eps, "resid_pdrop": config.dropout, "embd_pdrop": config.dropout,
            "attn_pdrop": attn_dropout, "initializer_range": 0.02, "scale_attn_weights": True,
            "tie_word_embeddings": config.tie_embeddings, "bos_token_id": eot, "eos_token_id": eot,
            **({} if config.bias else {"bias": False})}


def _tokenizer_config(tokenizer: Tokenizer, block_size: int, template: ChatTemplate | None) -> dict[str, Any] | None:
    """tokenizer_config.json: for a tokenizer.json of our own (bpe) or brought (hf), the generic
    fast tokenizer with end-of-text as bos and eos (GPT-2's convention) and special tokens'
    spelling inside text encoded as text, as `gpt` encodes it; for GPT-2's files only when a
    chat template needs one. A chat model's template adds its tokens, which must then be read
    as special tokens (so its text is not split as ours would be)."""
    if isinstance(tokenizer, HFTokenizer):
        settings: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": block_size,
                                    "split_special_tokens": template is None, "clean_up_tokenization_spaces": False}
        eot = None if tokenizer.eot is None else tokenizer.backend.id_to_token(tokenizer.eot)
        if eot is not None:
            settings.update(bos_token=eot, eos_token=eot)
    elif tokenizer.name == "gpt2" and template is not None:  # transformers reads GPT-2's files, not ours
        eot = EOT_TEXT
        settings = {"tokenizer_class": "GPT2Tokenizer", "bos_token": EOT_TEXT, "eos_token": EOT_TEXT,
                    "unk_token": EOT_TEXT, "model_max_length": block_size}
    else:
        return None
    if template is not None:
        settings.update(template.hf_tokenizer_config(eot))
    return settings


def gpt2_vocab() -> dict[str, int]:
    """GPT-2's vocab.json: each token spelled with one printable character per byte (as Hugging
    Face spells them), then end-of-text (as in gpt.data.tokenizer.gpt2_encoding)."""
    ranks = load_tiktoken_bpe(str(GPT2_RANKS), expected_hash=GPT2_RANKS_SHA256)
    spell = byte_spelling()
    vocab = {"".join(spell[b] for b in token): rank for token, rank in ranks.items()}
    vocab[EOT_TEXT] = len(ranks)
    return vocab


def gpt2_tokenizer_files() -> dict[str, str]:
    """GPT-2's vocab.json and merges.txt, derived from the bundled tiktoken ranks.

    Hugging Face lists the merges in rank order; a token's merge is the pair that BPE, using
    only merges of lower rank, leaves it as."""
    ranks = load_tiktoken_bpe(str(GPT2_RANKS), expected_hash=GPT2_RANKS_SHA256)
    spell = byte_spelling()
    text = {token: "".join(spell[b] for b in token) for token in ranks}
    merges = [" ".join(text[part] for part in _last_merge(token, ranks))
              for token, _ in sorted(ranks.items(), key=lambda item: item[1]) if len(token) > 1]
    return {"vocab.json": json.dumps(gpt2_vocab(), ensure_ascii=False) + "\n",
            "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n"}


def _last_merge(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """Run BPE on the token's bytes, lowest-ranked pair first, until two parts remain."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        _, i = min((ranks.get(parts[j] + parts[j + 1], len(ranks)), j) for j in range(len(parts) - 1))
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts[0], parts[1]
