"""How a model's weights are stored for reading: fp32, bf16 or int8 (`--weights`), and the one
place that decides it (`prepare_weights`).

Generating one token reads every weight once, so on a CPU a token costs about the time it
takes to read the weights from memory: half the bytes (bf16) or a quarter (int8) is up to
2x or 4x the speed. int8 here is weight-only: each output row of a matrix has its own scale
(its largest magnitude / 127), activations stay floating point (bf16), and the product is
torch's own `_weight_int8pack_mm`, which is fast only with bf16 activations on a CPU with
native bf16 (BENCHMARKS.md, issue 28). It is kept for few rows at a time (decoding); many rows
(a prompt, `gpt eval`) are computed from the matrix widened to bf16, where the arithmetic,
not the reading, is the cost.

An int8 checkpoint (`gpt convert quantize`) stores each matrix as int8 and its scales beside
it (`NAME.weight`, `NAME.weight_scale`); a tied output matrix is stored once, under the token
embedding's name, and the embedding is read back from it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from gpt.device import cpu_has_native_bf16, pick_dtype
from gpt.errors import GptError
from gpt.model import GPT

if TYPE_CHECKING:
    from gpt.checkpoint import Checkpoint

WEIGHT_CHOICES = ("auto", "fp32", "bf16", "int8")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SCALE_SUFFIX = "_scale"
# Above this many rows at once `_weight_int8pack_mm` is slower than widening the matrix to
# bf16 and using an ordinary product (3072 x 768, this host: equal near 32 rows, 10x slower at 2048).
INT8_KERNEL_MAX_ROWS = 16
# `_weight_int8pack_mm` reads the inner dimension in blocks of 16 (other widths crash it).
INT8_KERNEL_BLOCK = 16
# A matrix smaller than this stays in nn.Linear: oneDNN's fixed cost per call outweighs what
# its packed layout saves in reading (AVX2 host, batch 1: 0.26 MB 0.8x, 1.8 MB 1.2x, 7 MB 1.6x).
PACK_MIN_WEIGHTS = 1 << 18
# A model whose matrices hold fewer weights than this (16 MB in fp32) is read from the CPU's caches,
# not from memory: `auto` keeps it in fp32, which bf16 and int8 only slow down with conversions
# (the CPU config, 0.8M weights, batch 1: fp32 1,288 tokens/s, int8 1,191, bf16 804; BENCHMARKS.md).
CACHED_MAX_WEIGHTS = 1 << 22


def check_choice(choice: str, option: str = "--weights") -> str:
    if choice not in WEIGHT_CHOICES:
        raise GptError(f"{option} must be one of {', '.join(WEIGHT_CHOICES)}, got {choice!r}")
    return choice


def auto_choice(device: torch.device, decoding: bool = True, batched: bool = False,
                matrix_weights: int = CACHED_MAX_WEIGHTS) -> tuple[str, str]:
    """What `auto` stores the weights as on this device, and why (measured, BENCHMARKS.md). `batched`:
    decoding many sequences at once (`gpt serve`), where bf16 weights outrun int8's on a CPU;
    `matrix_weights`: how many weights the model's matrices hold."""
    if not decoding:
        return "fp32", "scoring many tokens at once is bound by arithmetic, not by reading weights"
    if device.type == "cuda":
        if pick_dtype("auto", device) == torch.bfloat16:
            return "bf16", "a GPU with bf16"
        return "fp32", "a GPU without bf16"
    if device.type == "cpu" and matrix_weights < CACHED_MAX_WEIGHTS:
        return "fp32", "a model small enough to be read from the CPU's caches, where fp32 is fastest"
    if device.type == "cpu" and cpu_has_native_bf16():
        if batched:
            return "bf16", "a CPU with native bf16 decoding batches, where bf16 weights are fastest (int8: 1 sequence)"
        return "int8", "a CPU with native bf16, where int8 weights decode one sequence fastest"
    return "fp32", f"{device.type} without native bf16, where int8 and bf16 products are not faster"


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of a matrix rounded to int8 steps of its largest magnitude / 127, and the
    steps (fp32): weight ~= q * scale[:, None]."""
    weight = weight.detach().float()
    scale = (weight.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
    return torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


class Int8Linear(nn.Module):
    """An inference-only nn.Linear whose weight is int8 with one scale per output row:
    W ~= weight * weight_scale[:, None]. Activations stay floating point."""

    def __init__(self, in_features: int, out_features: int, bias: bool, device: torch.device | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, device=device), requires_grad=False) if bias else None

    @classmethod
    def quantize(cls, linear: nn.Module) -> Int8Linear:
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, linear.weight.device)
        module.weight, module.weight_scale = quantize_rows(linear.weight)
        if linear.bias is not None:
            module.bias.data = linear.bias.detach().clone()
        return module

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.weight.float() * self.weight_scale.float()[:, None]).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if (x.device.type == "cpu" and x.dtype == torch.bfloat16 and rows <= INT8_KERNEL_MAX_ROWS
                and self.in_features % INT8_KERNEL_BLOCK == 0):
            # The kernel reads its inputs as dense row-major blocks (a strided view crashes it).
            y = torch.ops.aten._weight_int8pack_mm(x.reshape(rows, self.in_features).contiguous(), self.weight,
                                                   self.weight_scale.to(x.dtype)).view(*x.shape[:-1], -1)
        else:
            y = F.linear(x, self.weight.to(x.dtype)) * self.weight_scale.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)


class PackedLinear(nn.Module):
    """An inference-only nn.Linear whose weight (fp32 or bf16) is stored in oneDNN's blocked
    layout, which its CPU kernels read faster than MKL reads a row-major matrix: a one-token
    step reads every weight once, so its speed is the speed of that read (BENCHMARKS.md, issue 14)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1),
                             persistent=False)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def pack_for_cpu_decoding(model: GPT) -> GPT:
    """Swap the large nn.Linear layers of an fp32 or bf16 model on a CPU for `PackedLinear`, in
    place, for sampling only (the model can no longer train or be saved whole). Elsewhere, or
    where torch lacks oneDNN, the model is returned as it is."""
    param = next(model.parameters())
    if param.device.type != "cpu" or param.dtype not in DTYPES.values() or not torch.backends.mkldnn.is_available():
        return model
    _swap_linears(model, lambda child: PackedLinear(child) if child.weight.numel() >= PACK_MIN_WEIGHTS else child)
    return model


def quantize_linears(model: GPT) -> GPT:
    """Every nn.Linear of the model (the block matrices and the output matrix) as an
    `Int8Linear`, in place. A tied token embedding takes the rounded output matrix's values, as
    it does when read from an int8 checkpoint (one matrix on disk)."""
    head_was_float = type(model.lm_head) is nn.Linear
    _swap_linears(model, Int8Linear.quantize)
    if model.config.tie_embeddings and head_was_float:
        model.wte.weight = nn.Parameter(model.lm_head.dequantized(model.wte.weight.dtype), requires_grad=False)
    return model


def dequantize_linears(model: GPT, dtype: torch.dtype = torch.float32) -> GPT:
    """Every `Int8Linear` back as an nn.Linear holding its rounded values in `dtype`, in place."""
    def widen(child: Int8Linear) -> nn.Linear:
        linear = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None, device="meta")
        linear.weight = nn.Parameter(child.dequantized(dtype), requires_grad=False)
        if child.bias is not None:
            linear.bias = nn.Parameter(child.bias.detach().to(dtype), requires_grad=False)
        return linear
    _swap_linears(model, widen, Int8Linear)
    model.tie_weights()
    return model


def _swap_linears(model: nn.Module, make, kind: type = nn.Linear) -> None:
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is kind:
                setattr(module, name, make(child))


def prepare_weights(model: GPT, choice: str, decoding: bool = True, batched: bool = False) -> tuple[GPT, str]:
    """The model with its weights stored as `choice` (auto, fp32, bf16, int8), changed in place,
    and a line that says what was chosen (and, for auto, why). The model is for reading only
    afterwards. int8 runs the rest of the model in bf16; `decoding` (one token at a time, not
    scoring) also packs fp32 and bf16 matrices for oneDNN on a CPU (`pack_for_cpu_decoding`),
    which one-token steps read faster; `batched` (decoding many sequences at once) steers `auto`."""
    device = next(model.parameters()).device
    matrices = sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Linear, Int8Linear)))
    chosen, reason = (auto_choice(device, decoding, batched, matrices) if check_choice(choice) == "auto"
                      else (choice, ""))
    if chosen == "int8":
        model = quantize_linears(model).to(torch.bfloat16)
        detail = "int8 matrices with per-row scales, bf16 activations"
    else:
        model = dequantize_linears(model, DTYPES[chosen]).to(DTYPES[chosen])
        if decoding:
            model = pack_for_cpu_decoding(model)
        detail = f"{chosen} matrices"
    why = f"; auto: {reason}" if reason else ""
    return model, f"weights: {chosen} ({detail}{why})"


def load_for_reading(checkpoint: Checkpoint, device: torch.device, choice: str | None = None,
                     decoding: bool = True, batched: bool = False) -> tuple[GPT, str]:
    """A checkpoint's model as the reading verbs and `gpt serve` run it: its weights stored as
    `choice` (None: the checkpoint's sample.weights, int8 for an int8 checkpoint) by
    `prepare_weights`, and the line that says so."""
    from gpt.checkpoint import load_model  # checkpoint.py reads int8 tensors through this module

    choice = check_choice(choice or checkpoint.config.sample.weights)
    return prepare_weights(load_model(checkpoint, device, keep_int8=True), choice, decoding, batched)


# ----------------------------------------------------------------------------- int8 checkpoints

def int8_tensors(weights: dict[str, torch.Tensor], model: GPT) -> dict[str, torch.Tensor]:
    """The tensors of an int8 checkpoint made from an fp32 one's: every nn.Linear weight of
    `model` (the shape the weights belong to, e.g. on the meta device) as int8 with its
    per-row scales beside it; everything else (norms, biases, embeddings, a task head) as it was."""
    names = {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    if model.config.tie_embeddings:
        names = (names - {"lm_head.weight"}) | {"wte.weight"}  # the shared matrix, stored once
    out = dict(weights)
    for name in names & weights.keys():
        out[name], out[name + SCALE_SUFFIX] = quantize_rows(weights[name])
    return out


def is_int8(weights: dict[str, torch.Tensor]) -> bool:
    return any(t.dtype == torch.int8 for t in weights.values())


def load_int8(model: GPT, weights: dict[str, torch.Tensor], source: str) -> GPT:
    """Assign an int8 checkpoint's tensors to `model` (built on the meta device): its linear
    layers become `Int8Linear`, a tied token embedding the widened output matrix."""
    _swap_linears(model, lambda child: Int8Linear(child.in_features, child.out_features, child.bias is not None,
                                                  torch.device("meta")))
    # safetensors hands out views at any byte offset; the int8 kernel needs its matrix 64-byte
    # aligned (else it crashes), which a fresh allocation is.
    weights = {name: t.clone() if t.dtype == torch.int8 else t for name, t in weights.items()}
    shared, scale = weights.get("wte.weight"), weights.pop("wte.weight" + SCALE_SUFFIX, None)
    if model.config.tie_embeddings and shared is not None and scale is not None:
        weights["lm_head.weight"], weights["lm_head.weight" + SCALE_SUFFIX] = shared, scale
        weights["wte.weight"] = shared.float() * scale.float()[:, None]
    try:
        model.load_state_dict(weights, strict=True, assign=True)
    except (RuntimeError, TypeError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[-1].strip()
        raise GptError(f"{source}: int8 weights do not fit the model config ({first})") from None
    return model
