"""`gpt serve`: a checkpoint behind an OpenAI-compatible HTTP API and a chat page (gpt.inference.serve)."""

from __future__ import annotations

from typing import Optional

import typer

from gpt.cli.app import WEIGHTS_HELP, app


@app.command()
def serve(
    checkpoint: str = typer.Argument(..., help="Run folder (its latest checkpoint) or a ckpt_* folder."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0 opens it to the network)."),
    port: int = typer.Option(8000, help="Port to listen on."),
    api_key: Optional[str] = typer.Option(None, envvar="GPT_API_KEY",
                                          help="Require 'Authorization: Bearer KEY' on /v1 (or env GPT_API_KEY)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or mps."),
    max_batch: int = typer.Option(8, help="Requests decoded together in one batch."),
    max_queue: int = typer.Option(64, help="Requests that may wait for a place in the batch (more get 429)."),
    weights: Optional[str] = typer.Option(None, help=WEIGHTS_HELP),
) -> None:
    """Serve a checkpoint over HTTP in OpenAI's API shape (/v1/completions, /v1/chat/completions,
    /v1/models) with a chat page at /, until Ctrl-C or SIGTERM."""
    from gpt.inference.serve import serve as run_server
    from gpt.inference.weights import check_choice

    if weights is not None:
        check_choice(weights)  # before the port is taken
    run_server(checkpoint, host, port, api_key, device, max_batch, max_queue, weights)
