"""torch.compile through gpt.device.maybe_compile: a compile failure falls back to eager for our
model only, with one line of ours."""

import functools

import pytest
import torch
import torch._dynamo

from gpt.device import maybe_compile


def failing_backend(graph_module, example_inputs):
    raise RuntimeError("the backend broke\nsecond line of a long report")


def test_a_failed_compile_runs_our_model_eagerly_with_one_line_and_changes_nothing_else(monkeypatch, capsys):
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=failing_backend))
    torch._dynamo.reset()
    model = torch.nn.Linear(4, 3)
    x = torch.randn(2, 4)
    compiled = maybe_compile(model, True, torch.device("cpu"))
    assert torch.equal(compiled(x), model(x)) and torch.equal(compiled(x), model(x))
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["warning: torch.compile failed on the model (RuntimeError: the backend broke); running it eagerly"]
    assert torch._dynamo.config.suppress_errors is False
    other = torch.compile(torch.nn.Linear(4, 3))  # anything else compiled in the process still fails loudly
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed):
        other(x)
    torch._dynamo.reset()
