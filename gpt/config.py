"""Run configuration: typed dataclasses, YAML files, `a.b=value` overrides and model presets.

A run is described by five sections (model, data, train, sample, task). Loading goes
YAML -> plain dict -> overrides applied to the dict -> presets expanded -> dataclasses,
and every value is converted to its field's type on the way in, so a wrong key or value
fails early with one line that names it.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from gpt.errors import GptError

SEED_LIMIT = 2**64  # torch.manual_seed takes any seed below this

# Architectures from the papers. Fields not named here keep ModelConfig's defaults.
# GPT-2's MLP uses the tanh approximation of GELU (`gelu_new` in Hugging Face) and LayerNorm
# eps 1e-5; both matter for reproducing its released weights exactly.
_GPT2_COMMON = dict(block_size=1024, vocab_size=50257, pos_encoding="learned", activation="gelu_tanh",
                    norm="layernorm", norm_eps=1e-5, norm_position="pre", bias=True, tie_embeddings=True)
# GPT-3 (Brown et al. 2020, table 2.1): GPT-2's blocks with a 2048 context. Its alternating
# locally banded sparse attention layers are not modelled: every layer attends densely, which
# changes no parameter count. The table lists GPT-3 XL as 2048 wide with 24 heads and 13B as
# 5140 wide, neither divisible by its head count; we keep the listed head size (128) and take
# 16 heads for XL and 5120 = 40 x 128 for 13B. Every GPT-3 preset is within 2% of the paper's
# parameter count (tests/test_info.py checks it).
_GPT3_COMMON = dict(_GPT2_COMMON, block_size=2048)
PRESETS: dict[str, dict[str, Any]] = {
    # GPT-1 (Radford et al. 2018): post-norm blocks, BPE vocabulary of 40,478, 512 context.
    "gpt1": dict(n_layer=12, n_head=12, n_embd=768, block_size=512, vocab_size=40478,
                 pos_encoding="learned", activation="gelu", norm="layernorm",
                 norm_position="post", bias=True, tie_embeddings=True),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, **_GPT2_COMMON),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024, **_GPT2_COMMON),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280, **_GPT2_COMMON),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600, **_GPT2_COMMON),
    "gpt3-small": dict(n_layer=12, n_head=12, n_embd=768, **_GPT3_COMMON),
    "gpt3-medium": dict(n_layer=24, n_head=16, n_embd=1024, **_GPT3_COMMON),
    "gpt3-large": dict(n_layer=24, n_head=16, n_embd=1536, **_GPT3_COMMON),
    "gpt3-xl": dict(n_layer=24, n_head=16, n_embd=2048, **_GPT3_COMMON),
    "gpt3-2.7b": dict(n_layer=32, n_head=32, n_embd=2560, **_GPT3_COMMON),
    "gpt3-6.7b": dict(n_layer=32, n_head=32, n_embd=4096, **_GPT3_COMMON),
    "gpt3-13b": dict(n_layer=40, n_head=40, n_embd=5120, **_GPT3_COMMON),
    "gpt3-175b": dict(n_layer=96, n_head=96, n_embd=12288, **_GPT3_COMMON),
    # Tiny models for a laptop CPU; the vocabulary comes from the data.
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, block_size=64),
    "mini": dict(n_layer=4, n_head=4, n_embd=128, block_size=128),
    "small": dict(n_layer=6, n_head=6, n_embd=384, block_size=256),
}


def option(default: Any, help: str) -> Any:
    """A dataclass field with a help text (shown by `gpt train --help`)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise GptError(message)


@dataclass(kw_only=True)
class ModelConfig:
    preset: Optional[str] = option(None, "named architecture that fills the fields you do not set: "
                                   + ", ".join(PRESETS))
    n_layer: int = option(6, "number of Transformer blocks")
    n_head: int = option(6, "attention heads per block")
    n_embd: int = option(384, "width of the residual stream")
    block_size: int = option(256, "context length in tokens; longer prompts are cropped")
    vocab_size: Optional[int] = option(None, "vocabulary size; null takes it from the data's meta.json")
    pos_encoding: Literal["learned", "sinusoidal", "rope"] = option("learned", "position encoding")
    activation: Literal["gelu", "gelu_tanh", "relu", "relu2"] = option(
        "gelu", "MLP non-linearity: exact GELU, its tanh approximation (GPT-2's), ReLU, or ReLU squared")
    norm: Literal["layernorm", "rmsnorm"] = option("layernorm", "normalisation layer")
    norm_eps: float = option(1e-5, "epsilon added to the variance in every norm layer")
    norm_position: Literal["pre", "post"] = option(
        "pre", "norm before each sublayer (GPT-2) or after the residual add (GPT-1)")
    bias: bool = option(False, "biases in linear layers and LayerNorm")
    tie_embeddings: bool = option(True, "share the token embedding with the output projection")
    dropout: float = option(0.0, "dropout probability during training")
    attn_dropout: Optional[float] = option(
        None, "dropout on attention probabilities; null means model.dropout (0 keeps SDPA's fused kernel)")
    qk_norm: bool = option(False, "RMS-normalise each head's queries and keys (learned gain) before positions "
                           "and attention")
    zero_init_proj: bool = option(False, "start the attention and MLP output projections at zero, so each "
                                  "block begins as the identity")
    logit_softcap: Optional[float] = option(
        None, "soft-cap the output logits to (-cap, cap) with cap * tanh(logits / cap); null disables")

    def __post_init__(self) -> None:
        _require(self.preset is None or self.preset in PRESETS,
                 f"model.preset: unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        for name in ("n_layer", "n_head", "n_embd", "block_size"):
            _require(getattr(self, name) >= 1, f"model.{name} must be at least 1, got {getattr(self, name)}")
        _require(self.n_embd % self.n_head == 0,
                 f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})")
        _require(self.pos_encoding != "rope" or (self.n_embd // self.n_head) % 2 == 0,
                 "model.pos_encoding=rope needs an even head size (n_embd / n_head)")
        _require(self.pos_encoding != "sinusoidal" or self.n_embd % 2 == 0,
                 "model.pos_encoding=sinusoidal needs an even model.n_embd")
        _require(self.vocab_size is None or self.vocab_size >= 2,
                 f"model.vocab_size must be at least 2, got {self.vocab_size}")
        _require(self.norm_eps > 0, f"model.norm_eps must be positive, got {self.norm_eps}")
        _require(0.0 <= self.dropout < 1.0, f"model.dropout must be in [0, 1), got {self.dropout}")
        _require(self.attn_dropout is None or 0.0 <= self.attn_dropout < 1.0,
                 f"model.attn_dropout must be in [0, 1), got {self.attn_dropout}")
        _require(self.logit_softcap is None or self.logit_softcap > 0,
                 f"model.logit_softcap must be positive or null, got {self.logit_softcap}")


@dataclass(kw_only=True)
class DataConfig:
    dir: str = option("data/shakespeare_char", "folder written by `gpt prepare` (shards + meta.json)")


@dataclass(kw_only=True)
class TrainConfig:
    out_dir: str = option("runs/shakespeare_char", "where checkpoints, metrics.csv and loss.png go")
    device: str = option("auto", "auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option(
        "auto", "auto: bf16 autocast on GPUs and CPUs with native bf16, fp16 + GradScaler on older GPUs, "
        "else fp32")
    compile: Union[bool, Literal["auto"]] = option("auto", "torch.compile: auto (CUDA only), true or false")
    seed: int = option(1337, "seed for weights, data order and dropout")
    batch_size: int = option(64, "sequences per micro-batch")
    grad_accum: int = option(1, "micro-batches per optimizer step (effective batch = batch_size * grad_accum)")
    max_iters: int = option(5000, "optimizer steps to train for (a train.max_minutes budget plans its own)")
    max_minutes: Optional[float] = option(
        None, "wall-clock budget: plan as many steps as fit (evals and checkpoints included) from timed steps, "
        "and plan again as the step time drifts; the LR decay ends on the last step; train.max_iters does not "
        "apply; --resume goes on with what is left; null disables")
    optimizer: Literal["adamw", "muon"] = option(
        "adamw", "adamw, or muon: torch.optim.Muon for the blocks' 2-D weights and AdamW for the rest")
    muon_lr: float = option(0.02, "peak learning rate of Muon's weights (train.optimizer=muon); the schedule "
                            "scales it as it scales train.lr")
    lr: float = option(1.0e-3, "peak learning rate")
    min_lr: float = option(1.0e-4, "learning rate at the end of the cosine decay")
    warmup_iters: int = option(100, "steps of linear warmup")
    lr_decay_iters: Optional[int] = option(None, "length of the cosine schedule; null means max_iters")
    weight_decay: float = option(0.1, "AdamW weight decay on 2-D weight matrices")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.99, "AdamW beta2")
    grad_clip: float = option(1.0, "clip the global gradient norm to this; 0 disables")
    eval_interval: int = option(250, "evaluate every this many steps")
    eval_iters: int = option(200, "batches per split in each evaluation")
    ckpt_interval: int = option(250, "save a checkpoint every this many steps")
    keep_last: int = option(3, "checkpoints to keep (older ones are deleted)")
    save_best: bool = option(True, "also keep the weights with the lowest val loss in best/")
    log_interval: int = option(10, "write a metrics row every this many steps")
    init_from: Optional[str] = option(None, "checkpoint to fine-tune from (its weights; fresh optimizer), "
                                      "or hf:DIR for a Hugging Face GPT-2 folder on disk")
    peak_flops: Optional[float] = option(None, "device peak FLOP/s for MFU; null guesses from the device")
    tensorboard: bool = option(False, "also log to TensorBoard (needs the tensorboard package)")
    parallel: Literal["auto", "none", "ddp", "fsdp"] = option(
        "auto", "under torchrun: ddp (a full copy per process) or fsdp (weights and optimizer sharded across "
        "processes); auto is ddp when there are several processes")
    dist_timeout: float = option(600.0, "seconds a process waits in a collective for the others before the "
                                 "job fails (a peer that died or hangs)")

    def __post_init__(self) -> None:
        for name in ("batch_size", "grad_accum", "max_iters", "eval_interval", "eval_iters",
                     "ckpt_interval", "keep_last", "log_interval"):
            _require(getattr(self, name) >= 1, f"train.{name} must be at least 1, got {getattr(self, name)}")
        _require(self.warmup_iters >= 0, f"train.warmup_iters must be >= 0, got {self.warmup_iters}")
        _require(self.lr > 0, f"train.lr must be positive, got {self.lr}")
        _require(self.muon_lr > 0, f"train.muon_lr must be positive, got {self.muon_lr}")
        _require(self.max_minutes is None or self.max_minutes > 0,
                 f"train.max_minutes must be positive or null, got {self.max_minutes}")
        _require(0 <= self.min_lr <= self.lr, f"train.min_lr must be in [0, train.lr], got {self.min_lr}")
        _require(self.lr_decay_iters is None or self.lr_decay_iters >= 1,
                 f"train.lr_decay_iters must be at least 1, got {self.lr_decay_iters}")
        _require(self.lr_decay_iters is None or self.warmup_iters == 0 or self.lr_decay_iters > self.warmup_iters,
                 f"train.lr_decay_iters={self.lr_decay_iters} ends the cosine decay before train.warmup_iters="
                 f"{self.warmup_iters} ends the warmup (the rate would jump from train.lr to train.min_lr); "
                 "make train.lr_decay_iters larger or train.warmup_iters smaller")
        _require(self.weight_decay >= 0, f"train.weight_decay must be >= 0, got {self.weight_decay}")
        for name in ("beta1", "beta2"):
            _require(0 <= getattr(self, name) < 1, f"train.{name} must be in [0, 1), got {getattr(self, name)}")
        _require(self.grad_clip >= 0, f"train.grad_clip must be >= 0, got {self.grad_clip}")
        _require(self.dist_timeout > 0, f"train.dist_timeout must be positive, got {self.dist_timeout}")
        _require(self.device == "auto" or re.fullmatch(r"cpu|mps|cuda(:\d+)?", self.device) is not None,
                 f"train.device: unknown device {self.device!r}; use auto, cpu, cuda, cuda:N or mps")
        _require(0 <= self.seed < SEED_LIMIT, f"train.seed must be in [0, 2**64), got {self.seed}")
        _require(self.peak_flops is None or self.peak_flops > 0,
                 f"train.peak_flops must be positive (FLOP/s, e.g. 312e12) or null, got {self.peak_flops}")

    @property
    def decay_iters(self) -> int:
        return self.lr_decay_iters if self.lr_decay_iters is not None else self.max_iters


@dataclass(kw_only=True)
class SampleConfig:
    max_new_tokens: int = option(500, "tokens to generate per sample")
    temperature: float = option(0.8, "softmax temperature; 0 is greedy (argmax)")
    top_k: Optional[int] = option(200, "sample only among the k most likely tokens; null disables")
    top_p: float = option(1.0, "nucleus sampling: smallest set of tokens whose probability reaches p")
    num_samples: int = option(1, "samples decoded together as one batch")
    stop: list[str] = option([], "strings that end a sample (cut before the string)")
    seed: Optional[int] = option(None, "seed for reproducible samples; null is random")
    ignore_eot: bool = option(False, "keep generating past the end-of-text token")
    kv_cache: bool = option(True, "reuse past keys and values; false recomputes the whole context each step")
    weights: Literal["auto", "fp32", "bf16", "int8"] = option(
        "auto", "how sampling stores the weights: auto (int8 on CPUs with native bf16, bf16 on bf16 GPUs, else "
        "fp32), fp32, bf16, or int8 (per-row scales, bf16 activations); an int8 checkpoint records int8")

    def __post_init__(self) -> None:
        _require(self.max_new_tokens >= 1, f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        _require(self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}")
        _require(self.top_k is None or self.top_k >= 1, f"top_k must be at least 1, got {self.top_k}")
        _require(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        _require(self.num_samples >= 1, f"num_samples must be at least 1, got {self.num_samples}")
        _require(all(self.stop), "stop strings must not be empty")
        _require(self.seed is None or 0 <= self.seed < SEED_LIMIT, f"seed must be in [0, 2**64), got {self.seed}")


@dataclass(kw_only=True)
class TaskConfig:
    kind: Optional[Literal["classify", "entail", "similar", "choice", "chat"]] = option(
        None, "fine-tune for a task as in GPT-1 (classify, entail, similar, choice) or for chat (chat: "
        "conversations, see README: chat fine-tuning); null trains a language model")
    train: Optional[str] = option(None, "JSONL file of training items or conversations (see README: task files)")
    val: Optional[str] = option(None, "JSONL file of validation items; null evaluates on the train file only")
    eval: Optional[str] = option(None, "chat: JSONL file of conversations with an \"answer\", scored by exact match "
                                 "of the greedy reply at every evaluation")
    train_on_prompt: bool = option(False, "chat: learn every token, not only the assistant turns")
    labels: Optional[list[str]] = option(None, "label names in order; null takes the sorted labels of the train file")
    lm_weight: float = option(0.5, "weight of the language-modelling loss on the task text (GPT-1: 0.5)")
    head_dropout: float = option(0.1, "dropout before the task head's linear layer")

    def __post_init__(self) -> None:
        _require(self.kind is None or self.train is not None,
                 f"task.kind is {self.kind} but task.train is not set; give a JSONL file of training items")
        _require(self.kind not in ("choice", "chat") or self.labels is None,
                 f"task.labels is not used by task.kind={self.kind} (a choice's label is the index of the right "
                 "choice; chat has none); remove it")
        _require(self.labels is None or len(self.labels) >= 2,
                 f"task.labels must name at least two labels, got {self.labels}")
        repeated = [label for i, label in enumerate(self.labels or []) if label in self.labels[:i]]
        _require(not repeated, f"task.labels names {repeated[0]!r} twice; list each label once" if repeated else "")
        _require(self.lm_weight >= 0, f"task.lm_weight must be >= 0, got {self.lm_weight}")
        _require(0.0 <= self.head_dropout < 1.0, f"task.head_dropout must be in [0, 1), got {self.head_dropout}")
        _require(self.kind == "chat" or (self.eval is None and not self.train_on_prompt),
                 "task.eval and task.train_on_prompt belong to task.kind=chat; remove them")


@dataclass(kw_only=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    task: TaskConfig = field(default_factory=TaskConfig)


# Section name -> its dataclass (annotations are strings here, so resolve them).
SECTIONS: dict[str, type] = typing.get_type_hints(Config)


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _suggest(key: str, known: list[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if close:
        return f"; did you mean '{prefix}{close[0]}'?"
    return f"; known keys: {', '.join(prefix + k for k in known)}"


def _convert(value: Any, kind: Any, key: str) -> Any:
    """Convert a YAML or command-line value to the field type `kind`, or raise GptError."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
            if type(None) in args:
                return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except GptError:
                pass
        raise GptError(f"{key}: invalid value {value!r}; expected {_describe(kind)}")
    if origin is Literal:
        if isinstance(value, str) and value in args:
            return value
        raise GptError(f"{key}: invalid value {value!r}; choose one of {', '.join(map(str, args))}")
    if origin is list:
        if isinstance(value, str):
            parsed = yaml.safe_load(value) if value.startswith("[") else [value]
            value = parsed
        if not isinstance(value, list):
            raise GptError(f"{key}: expected a list, got {value!r}")
        return [_convert(item, args[0], key) for item in value]
    if isinstance(value, str) and kind is not str:
        value = _parse_scalar(value)
    if kind is bool and isinstance(value, bool):
        return value
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is str and isinstance(value, str):
        return value
    raise GptError(f"{key}: invalid value {value!r}; expected {_describe(kind)}")


def _parse_scalar(text: str) -> Any:
    """'3' -> 3, '3e-4' -> 0.0003 (YAML 1.1 reads that as a string), 'true' -> True."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        pass
    lowered = text.strip().lower()
    if lowered in ("true", "yes", "on"):
        return True
    if lowered in ("false", "no", "off"):
        return False
    return text


def _describe(kind: Any) -> str:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    if origin is Literal:
        return " | ".join(map(str, args))
    if origin is list:
        return f"a list of {_describe(args[0])}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[kind]


def _check_keys(raw: dict[str, Any]) -> None:
    for section, body in raw.items():
        if section not in SECTIONS:
            raise GptError(f"unknown config section {section!r}{_suggest(str(section), list(SECTIONS))}")
        if body is None:  # an empty section in YAML
            continue
        if not isinstance(body, dict):
            raise GptError(f"config section {section!r} must be a mapping of keys to values, got {body!r}")
        known = list(_fields(SECTIONS[section]))
        for key in body:
            if key not in known:
                name = f"{section}.{key}"
                raise GptError(f"unknown config key {name!r}{_suggest(str(key), known, section + '.')}")


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` strings to a raw config dict (a new dict is returned)."""
    _check_keys(raw)
    result = {section: dict(body or {}) for section, body in raw.items()}
    for override in overrides:
        path, sep, value = override.partition("=")
        section, dot, key = path.strip().partition(".")
        if not sep or not dot or not key:
            raise GptError(f"override {override!r} is not of the form section.key=value (e.g. train.lr=3e-4)")
        _check_keys({section: {key: None}})
        result.setdefault(section, {})[key] = value
    return result


def build_config(raw: dict[str, Any]) -> Config:
    """Validate a raw dict (from YAML plus overrides) and build the typed Config."""
    _check_keys(raw)
    sections = {}
    for name, cls in SECTIONS.items():
        body = dict(raw.get(name) or {})
        if name == "model" and body.get("preset") not in (None, "null", "none"):
            preset = _convert(body["preset"], str, "model.preset")
            if preset not in PRESETS:
                raise GptError(f"model.preset: unknown preset {preset!r}{_suggest(preset, list(PRESETS))}")
            body = {**PRESETS[preset], **body}
        hints = typing.get_type_hints(cls)
        values = {key: _convert(value, hints[key], f"{name}.{key}") for key, value in body.items()}
        sections[name] = cls(**values)
    return Config(**sections)


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise GptError(f"config file not found: {path}; pass a YAML file such as configs/shakespeare_char.yaml")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise GptError(f"{path}: not UTF-8 text; save the config as UTF-8") from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where else ""
        raise GptError(f"{path}: invalid YAML{line}; fix the syntax and try again") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise GptError(f"{path}: a config must be a mapping with sections model, data, train, sample")
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] = (),
                say: typing.Callable[[str], None] | None = None) -> Config:
    """Load a YAML config file (or the defaults when path is None) and apply overrides. A file's
    `hosts:` section (see `for_this_host`) applies between the two; `say` gets the line saying so."""
    raw = read_yaml(path) if path is not None else {}
    raw, line = for_this_host(raw, list(overrides))
    if line and say:
        say(line)
    return build_config(apply_overrides(raw, list(overrides)))


def for_this_host(raw: dict[str, Any], overrides: list[str]) -> tuple[dict[str, Any], str | None]:
    """A raw config without its `hosts:` section, with the settings that section gives the kind of
    host the run is on (`gpt.device.HOST_KINDS`, from train.device) merged in, and a line naming
    them. A recipe's best settings can depend on the host (dropout is cheap where bf16 is native,
    dear where it is emulated); the command line still has the last word.

        hosts:
          cpu_bf16:
            model.dropout: 0.1
    """
    from gpt.device import HOST_KINDS, host_kind, pick_device  # torch is imported only when needed

    raw = dict(raw)
    hosts = raw.pop("hosts", None)
    if not hosts:
        return raw, None
    if not isinstance(hosts, dict) or not all(isinstance(body, dict) for body in hosts.values()):
        raise GptError("config section 'hosts' must map host kinds to settings, e.g. hosts: {cpu_bf16: "
                       "{model.dropout: 0.1}}")
    for kind, body in hosts.items():
        if kind not in HOST_KINDS:
            raise GptError(f"hosts: unknown host kind {kind!r}{_suggest(str(kind), list(HOST_KINDS))}")
        for key in body:
            section, dot, name = str(key).partition(".")
            if not dot or not name:
                raise GptError(f"hosts.{kind}: {key!r} is not of the form section.key (e.g. model.dropout)")
            _check_keys({section: {name: None}})
    kind = host_kind(pick_device(build_config(apply_overrides(raw, overrides)).train.device))
    settings = hosts.get(kind) or {}
    merged = {section: dict(body or {}) for section, body in raw.items()}
    for key, value in settings.items():
        section, _, name = str(key).partition(".")
        merged.setdefault(section, {})[name] = value
    if not settings:
        return merged, None
    listed = ", ".join(f"{key}={value}" for key, value in settings.items())
    return merged, f"host: {HOST_KINDS[kind]}: the config's hosts.{kind} sets {listed} (the command line overrides it)"


def to_dict(config: Config) -> dict[str, Any]:
    return dataclasses.asdict(config)


def dump_yaml(config: Config) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def changed_settings(config: Config) -> dict[str, dict[str, Any]]:
    """The settings of `config` that differ from the defaults (those of its model preset, if it
    names one), by section: what a person needs to see of a run's 60-odd settings."""
    defaults = to_dict(build_config({"model": {"preset": config.model.preset}} if config.model.preset else {}))
    changed = {section: {key: value for key, value in body.items() if defaults[section][key] != value}
               for section, body in to_dict(config).items()}
    return {section: body for section, body in changed.items() if body}


def describe_changes(config: Config) -> str:
    """One line per section of `changed_settings`: `  model: n_layer=4, n_head=4, ...`."""
    return "\n".join(f"  {section}: " + ", ".join(f"{key}={value}" for key, value in body.items())
                     for section, body in changed_settings(config).items())


def config_help() -> str:
    """Every config key with its type, default and help, for `gpt train --help`."""
    lines = []
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"{section}.{f.name} ({_describe(hints[f.name])}, default {default!r}): "
                         f"{f.metadata['help']}")
    return "\n".join(lines)
