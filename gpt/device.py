"""Devices and precision: which device, which dtype, autocast, torch.compile, peak FLOP/s."""

from __future__ import annotations

import contextlib
import functools
import sys
import time
from typing import Callable

import torch

from gpt.errors import GptError

# Dense bf16 peak FLOP/s by GPU name, for MFU when train.peak_flops is not given.
GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
                  "A10": 125e12, "4090": 165e12, "3090": 71e12, "V100": 125e12, "T4": 65e12}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):  # torch's message lists some twenty device types
        raise GptError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GptError("device cuda was asked for but CUDA is not available here; use device auto or cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise GptError("device mps was asked for but MPS is not available here; use device auto or cpu")
    return device


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls run in hardware (1.66x faster training here)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


# The kinds of host a config's `hosts:` section can name (gpt.config.load_config), and what each is.
HOST_KINDS = {"cpu": "a CPU without native bf16", "cpu_bf16": "a CPU with native bf16 (AVX512-BF16 or AMX)",
              "cuda": "a CUDA GPU", "mps": "an Apple GPU (mps)"}


def host_kind(device: torch.device) -> str:
    """Which of HOST_KINDS `device` is: what a training recipe may depend on."""
    if device.type == "cpu":
        return "cpu_bf16" if cpu_has_native_bf16() else "cpu"
    return device.type


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bf16 autocast on GPUs and CPUs with native bf16, fp16 (+ GradScaler) on older
    GPUs, fp32 elsewhere. Weights and optimizer state stay fp32 in every case."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "cpu" and cpu_has_native_bf16():
            return torch.bfloat16
        return torch.float32
    dtype = getattr(torch, name)
    if dtype == torch.float16 and device.type != "cuda":
        raise GptError("dtype float16 needs a CUDA device (it relies on CUDA's loss scaling); use bfloat16 or float32")
    return dtype


def autocast_for(device: torch.device, dtype: torch.dtype) -> Callable[[], contextlib.AbstractContextManager]:
    """Mixed precision for forward passes: weights stay fp32, matmuls run in `dtype`."""
    if dtype == torch.float32:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def peak_flops(config_value: float | None, device: torch.device,
               matmul_shapes: tuple[tuple[int, int, int], ...] = (), dtype: torch.dtype = torch.float32,
               fresh: bool = False) -> float | None:
    """The FLOP/s that MFU divides by: `train.peak_flops` when set, a GPU's datasheet bf16
    peak, or on a CPU what torch.mm measurably reaches in the run's compute `dtype` at the
    model's own matmul shapes (a CPU has no datasheet number worth trusting, its speed depends
    on the shapes, and a native-bf16 CPU multiplies bf16 ~3x faster than fp32). `fresh`
    measures again instead of reusing this process's earlier measurement."""
    if config_value is not None:
        return config_value
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((flops for key, flops in GPU_PEAK_FLOPS.items() if key in name), None)
    if device.type == "cpu" and matmul_shapes:
        if fresh:
            measured_matmul_flops.cache_clear()
        return measured_matmul_flops(matmul_shapes, dtype)
    return None


def training_matmul_shapes(model: torch.nn.Module, rows: int, max_rows: int = 4096) -> tuple[tuple[int, int, int], ...]:
    """The (m, k, n) matmuls a training step runs through each distinct nn.Linear of `model`
    for `rows` tokens: the forward product and the two of the backward pass (input and weight
    gradients). Rows are capped: throughput has levelled off well before 4096, and the
    measurement stays short."""
    m = min(rows, max_rows)
    linears = sorted({(mod.in_features, mod.out_features) for mod in model.modules()
                      if isinstance(mod, torch.nn.Linear)})
    return tuple(shape for k, n in linears for shape in ((m, k, n), (m, n, k), (k, m, n)))


@functools.cache
def measured_matmul_flops(shapes: tuple[tuple[int, int, int], ...], dtype: torch.dtype = torch.float32,
                          repeats: int = 3) -> float:
    """FLOP/s of torch.mm in `dtype` on the CPU over the (m, k, n) shapes together: total FLOPs
    over total time, best of `repeats` for each shape. Measured once per process, shape set and
    dtype (well under a second for the shapes of the CPU configs)."""
    total_flops, total_s = 0.0, 0.0
    # A private generator: drawing from torch's global one would change the dropout masks that
    # follow, and a resumed run would no longer repeat an uninterrupted one bit for bit.
    generator = torch.Generator().manual_seed(0)
    for m, k, n in shapes:
        a, b = (torch.randn(rows, cols, generator=generator).to(dtype) for rows, cols in ((m, k), (k, n)))
        torch.mm(a, b)  # warm-up: first-call allocation and kernel selection
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - start)
        total_flops += 2.0 * m * k * n
        total_s += best
    return total_flops / total_s


def maybe_compile(model: torch.nn.Module, setting: bool | str, device: torch.device) -> torch.nn.Module:
    """torch.compile on CUDA for `auto` (on CPUs it gained ~5% here, less than it costs to
    start), anywhere for `true`. Compilation happens at the first forward; if it fails there,
    this model runs eagerly from then on with one line of warning (`_eager_if_compile_fails`).
    torch's own `suppress_errors` is left alone: it would hold for everything compiled in the
    process and log torch's multi-line report."""
    if setting is False or (setting == "auto" and device.type != "cuda"):
        return model
    try:
        compiled = torch.compile(model)
    except Exception as exc:  # compile support varies by platform; eager always works
        print(f"warning: torch.compile unavailable ({type(exc).__name__}: {exc}); running eagerly", file=sys.stderr)
        return model
    _eager_if_compile_fails(compiled, model)
    return compiled


def _eager_if_compile_fails(compiled: torch.nn.Module, model: torch.nn.Module) -> None:
    """Give `compiled` (torch's OptimizedModule, whose forward is an instance attribute that
    compiles at the first call) a forward that, when dynamo or its backend fails, says so in one
    line and runs `model` eagerly, then and for every later call. Other errors pass through."""
    import torch._dynamo.exc

    compiled_forward = compiled.forward

    def forward(*args, **kwargs):
        try:
            return compiled_forward(*args, **kwargs)
        except torch._dynamo.exc.TorchDynamoException as exc:  # BackendCompilerFailed (inductor's too), Unsupported
            cause = getattr(exc, "inner_exception", exc)  # BackendCompilerFailed wraps the backend's error
            first = next((line.strip() for line in str(cause).splitlines() if line.strip()), "")
            reason = f"{type(cause).__name__}: {first}" if first else type(cause).__name__
            print(f"warning: torch.compile failed on the model ({reason[:160]}); running it eagerly", file=sys.stderr)
            compiled.forward = model.__call__
            return model(*args, **kwargs)

    compiled.forward = forward
