"""Looking inside a model: `gpt tokenize`, `gpt next`, `gpt attention`, `gpt embed` (gpt.inspection)."""

from __future__ import annotations

from typing import Optional

import typer

from gpt.cli.app import WEIGHTS_HELP, app, load_for_inspection, load_for_sampling, read_prompt, sample_settings
from gpt.errors import GptError


@app.command("tokenize")
def tokenize_text(
    text: str = typer.Argument(..., help="Text to cut into tokens ('-' reads stdin)."),
    tokenizer: Optional[str] = typer.Option(None, help="gpt2 (default), byte or a Hugging Face "
                                            "tokenizer.json; char and bpe need --data or --checkpoint."),
    data: Optional[str] = typer.Option(None, help="Use the tokenizer of this dataset folder."),
    checkpoint: Optional[str] = typer.Option(None, help="Use the tokenizer of this run or ckpt_* folder."),
) -> None:
    """Show how text becomes tokens: boundaries, ids, count and bytes per token."""
    from gpt.inspection import format_tokens, pick_tokenizer, tokenize

    print(format_tokens(tokenize(pick_tokenizer(tokenizer, data, checkpoint), read_prompt(text, None))))


@app.command("next")
def next_token(
    checkpoint: str = typer.Argument(..., help="Run folder or ckpt_* folder."),
    prompt: str = typer.Argument(..., help="Text before the token to predict ('' starts from end-of-text, "
                                 "'-' reads stdin)."),
    top: int = typer.Option(10, help="Rows to show, most likely first."),
    temperature: Optional[float] = typer.Option(None, help="Default: the checkpoint's sample.temperature."),
    top_k: Optional[int] = typer.Option(None, help="Default: the checkpoint's sample.top_k."),
    top_p: Optional[float] = typer.Option(None, help="Default: the checkpoint's sample.top_p."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or mps."),
    weights: Optional[str] = typer.Option(None, help=WEIGHTS_HELP),
) -> None:
    """Next-token probabilities before and after temperature, top-k and top-p (as gpt sample draws)."""
    from gpt.checkpoint import read_checkpoint
    from gpt.inspection import filter_stages, format_next, next_token_logits

    if top < 1:
        raise GptError(f"--top must be at least 1, got {top}")
    ckpt = read_checkpoint(checkpoint)
    cfg = sample_settings(ckpt.config.sample, temperature=temperature, top_k=top_k, top_p=top_p)
    model, tokenizer = load_for_sampling(ckpt, device, weights).eval(), ckpt.tokenizer
    logits, seen = next_token_logits(model, tokenizer, read_prompt(prompt, None))
    print(f"after {seen} prompt tokens; temperature {cfg.temperature:g}, top-k {cfg.top_k}, top-p {cfg.top_p:g}")
    print(format_next(filter_stages(logits, cfg.temperature, cfg.top_k, cfg.top_p), tokenizer, top))


@app.command()
def attention(
    checkpoint: str = typer.Argument(..., help="Run folder or ckpt_* folder."),
    text: str = typer.Argument(..., help="Text whose attention to draw (at most block_size tokens; '-' reads stdin)."),
    out: str = typer.Option(..., "--out", "-o", help="PNG file to write."),
    layer: int = typer.Option(0, help="Layer to draw, from 0."),
    head: Optional[int] = typer.Option(None, help="One head to draw, from 0 (default: all heads as a grid)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or mps."),
) -> None:
    """Draw attention weights as heat maps: tokens on both axes, the causal mask blank."""
    from gpt.inspection import check_png_path, draw_attention

    path = check_png_path(out)
    model, tokenizer, ckpt = load_for_inspection(checkpoint, device)
    print(draw_attention(model, tokenizer, read_prompt(text, None), layer, head, path, f"{ckpt.path}: layer {layer}"))


@app.command()
def embed(
    checkpoint: str = typer.Argument(..., help="Run folder or ckpt_* folder."),
    word: Optional[str] = typer.Argument(None, help="One token whose nearest tokens to list (quote ' king' "
                                         "to include GPT-2's leading space)."),
    nearest: int = typer.Option(10, help="Tokens to list."),
    analogy: Optional[str] = typer.Option(None, help="Vector arithmetic such as 'king - man + woman'; quote a "
                                          "term to keep its spaces: \"' king' - ' man' + ' woman'\"."),
    plot: bool = typer.Option(False, help="Draw a 2-D PCA of the embeddings of the most frequent tokens."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="PNG file for --plot."),
    count: int = typer.Option(100, help="Tokens to draw with --plot."),
    data: Optional[str] = typer.Option(None, help="Training data to count token frequencies in (default: "
                                       "the checkpoint's data.dir)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or mps."),
) -> None:
    """Nearest tokens by cosine similarity in the token embedding, analogies, or a PCA picture."""
    from gpt.inspection import check_png_path, describe_analogy, describe_nearest, draw_embedding, training_data

    if sum((word is not None, analogy is not None, plot)) != 1:
        raise GptError("give one of WORD, --analogy 'a - b + c' and --plot")
    if nearest < 1 or count < 2:
        raise GptError(f"--nearest must be at least 1 and --count at least 2, got {nearest} and {count}")
    if plot and out is None:
        raise GptError("--plot needs -o FILE.png")
    path = check_png_path(out) if plot else None
    model, tokenizer, ckpt = load_for_inspection(checkpoint, device)
    if plot:
        if data is not None:  # checked even when every token is drawn and no counting needs it
            training_data(tokenizer, data)
        print(draw_embedding(model, tokenizer, data or ckpt.config.data.dir, count, path,
                             f"{ckpt.path}: token embedding"))
    elif word is not None:
        print(describe_nearest(model, tokenizer, word, nearest))
    else:
        print(describe_analogy(model, tokenizer, analogy, nearest))
