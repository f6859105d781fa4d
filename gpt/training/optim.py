"""Optimizers: AdamW (GPT-2's recipe) or Muon for the hidden matrices with AdamW for the rest.

Every parameter group may carry an `lr_scale`: the loop sets each group's learning rate to the
schedule's value times it, so one schedule (warmup, cosine) drives both optimizers while Muon
keeps its own peak (`train.muon_lr`).
"""

from __future__ import annotations

import contextvars
from typing import Any, Callable

import torch

from gpt.config import TrainConfig
from gpt.device import cpu_has_native_bf16
from gpt.errors import GptError
from gpt.model import Block


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                   device: torch.device, exclude: frozenset[int] = frozenset()) -> torch.optim.AdamW:
    """AdamW with weight decay on the 2-D weight matrices of attention and MLP only; parameters
    whose id is in `exclude` are left to another optimizer.

    Biases, norm gains and embedding tables (the token embedding is also the output matrix
    when tied) are not decayed, as in GPT-2 and minGPT: decaying them shrinks features the
    model needs without regularising anything useful."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay = [], []
    for param in model.parameters():
        if id(param) not in exclude:
            (decay if param.dim() >= 2 and id(param) not in embeddings else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device.type in ("cuda", "cpu"))


def hidden_matrices(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The Transformer blocks' 2-D weights (attention and MLP linears): what Muon orthogonalises.
    Embeddings, the output matrix and a task head are not hidden layers, and Muon is meant for
    matrices only."""
    return [p for m in model.modules() if isinstance(m, Block) for p in m.parameters() if p.dim() == 2]


def orthogonalise_in_fp32(grad: torch.Tensor, ns_coefficients: tuple[float, float, float], ns_steps: int,
                          eps: float) -> torch.Tensor:
    """Muon's Newton-Schulz iteration (the quintic of torch.optim.Muon, with its coefficients
    and step count) computed in fp32 instead of bf16."""
    a, b, c = ns_coefficients
    x = grad.float()
    wide = x.T if grad.size(0) > grad.size(1) else x
    wide = wide / wide.norm().clamp(min=eps)  # spectral norm at most 1
    for _ in range(ns_steps):
        gram = wide @ wide.T
        wide = torch.addmm(wide, torch.addmm(gram, gram, gram, beta=b, alpha=c), wide, beta=a)
    return wide.T if grad.size(0) > grad.size(1) else wide


# True only inside an Fp32Muon step of this thread (a context variable: each thread and task has its own).
_IN_FP32_MUON = contextvars.ContextVar("in_fp32_muon", default=False)


def _route_newton_schulz() -> None:
    """Put, once, a router in place of the function torch's Muon orthogonalises with (a private
    name, and torch has no public hook for it): inside an Fp32Muon step of this thread it runs
    `orthogonalise_in_fp32`, everywhere else torch's own function. Every other optimizer in the
    process, in any thread, computes exactly as before; nothing is swapped per step."""
    module = torch.optim._muon
    if getattr(module._zeropower_via_newtonschulz, "routes_fp32_muon", False):
        return
    original = module._zeropower_via_newtonschulz

    def route(grad: torch.Tensor, ns_coefficients: tuple[float, float, float], ns_steps: int,
              eps: float) -> torch.Tensor:
        chosen = orthogonalise_in_fp32 if _IN_FP32_MUON.get() else original
        return chosen(grad, ns_coefficients, ns_steps, eps)

    route.routes_fp32_muon = True
    module._zeropower_via_newtonschulz = route


# On a torch without Muon (before 2.9) the class derives from Optimizer and is never used.
class Fp32Muon(torch.optim.Muon if hasattr(torch.optim, "Muon") else torch.optim.Optimizer):
    """torch.optim.Muon, unchanged except that its Newton-Schulz products run in fp32. torch runs
    them in bf16, which a CPU without native bf16 emulates: on a 2-core AVX2 host that made a
    step of the char config 900 ms instead of 130 (AdamW: 115), for the same losses to 1e-4
    (BENCHMARKS.md, issue 13). GPUs and bf16 CPUs keep torch's own Muon."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        _route_newton_schulz()

    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        token = _IN_FP32_MUON.set(True)
        try:
            return super().step(closure)
        finally:
            _IN_FP32_MUON.reset(token)


def muon_class(device: torch.device) -> type[torch.optim.Optimizer]:
    """Fp32Muon on a CPU that would emulate bf16 (when this torch's Muon has the function it
    swaps), else torch's Muon."""
    emulated_bf16 = device.type == "cpu" and not cpu_has_native_bf16()
    swappable = hasattr(getattr(torch.optim, "_muon", None), "_zeropower_via_newtonschulz")
    return Fp32Muon if emulated_bf16 and swappable else torch.optim.Muon


class Optimizers:
    """Several optimizers stepped, zeroed and saved as one, each over its own parameters."""

    def __init__(self, **optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [group for optimizer in self.optimizers.values() for group in optimizer.param_groups]

    def step(self) -> None:
        for optimizer in self.optimizers.values():
            optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {name: optimizer.state_dict() for name, optimizer in self.optimizers.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(state[name])


def build_optimizer(model: torch.nn.Module, tc: TrainConfig,
                    device: torch.device) -> torch.optim.Optimizer | Optimizers:
    """The optimizer `train.optimizer` names, over every parameter of `model`."""
    betas = (tc.beta1, tc.beta2)
    if tc.optimizer == "adamw":
        return make_optimizer(model, tc.lr, tc.weight_decay, betas, device)
    if not hasattr(torch.optim, "Muon"):
        raise GptError(f"train.optimizer=muon needs torch.optim.Muon, which torch {torch.__version__} lacks; "
                       "upgrade torch (2.9 or later) or use train.optimizer=adamw")
    hidden = hidden_matrices(model)
    # Muon's decoupled decay shrinks weights by lr * weight_decay per step: scale it so that the
    # matrices decay as fast per step as they would under AdamW at train.lr.
    muon = muon_class(device)(hidden, lr=tc.muon_lr, weight_decay=tc.weight_decay * tc.lr / tc.muon_lr)
    muon.param_groups[0]["lr_scale"] = tc.muon_lr / tc.lr
    adamw = make_optimizer(model, tc.lr, tc.weight_decay, betas, device, exclude=frozenset(map(id, hidden)))
    return Optimizers(adamw=adamw, muon=muon)


def set_lr(optimizer: torch.optim.Optimizer | Optimizers, lr: float) -> None:
    """Give every parameter group the schedule's learning rate times its `lr_scale` (1 if none)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
