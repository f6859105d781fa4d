"""The `gpt` command. Each verb's options live in the module of its group, next to the call into the
code it drives; `app` holds the typer app and the one place that maps errors to exit codes."""

from gpt.cli import data, train, generate, serve, measure, info, convert, views  # noqa: F401, I001 (registers the verbs in --help order)
from gpt.cli.app import app, main

__all__ = ["app", "main"]
