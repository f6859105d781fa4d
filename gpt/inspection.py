"""Look inside a model: how text becomes tokens, what the model predicts next, where each
attention head looks, and which tokens the embedding puts close together.

Each view returns plain data that `gpt tokenize`, `gpt next`, `gpt attention` and `gpt embed`
print or draw (PNGs with matplotlib's Agg backend, written atomically). The numbers come from
the code that samples and runs the model, not from a copy of it: `next` shows the sampler's own
`sampling_probs`, and attention weights are recomputed from each attention module's own
queries and keys (`CausalSelfAttention.heads`), captured during a real forward pass.
"""

from __future__ import annotations

import math
import shlex
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gpt.data.tokenizer import EOT_TEXT, Tokenizer, UnknownCharacter, make_tokenizer, read_hf_tokenizer
from gpt.durable import save_png
from gpt.errors import GptError
from gpt.inference.sample import prompt_ids, sampling_probs
from gpt.model import GPT, CausalSelfAttention

# Enough tokens to rank token frequencies reliably, few enough to count in seconds.
TOKENS_FOR_COUNTS = 20_000_000
DPI = 100
EMBEDDING_FIGSIZE = (8.0, 8.0)


# ----------------------------------------------------------------------------- tokens

def token_piece(tokenizer: Tokenizer, token_id: int) -> bytes:
    """The bytes one token stands for (end-of-text shown by its name)."""
    if token_id == tokenizer.eot:
        return EOT_TEXT.encode()
    return tokenizer.decode_bytes([token_id])


def token_literal(piece: bytes) -> str:
    """An exact, visible form of a token: a Python string literal, or a bytes literal when the
    token holds part of a multi-byte character; `ast.literal_eval` gives the token back."""
    try:
        return repr(piece.decode("utf-8"))
    except UnicodeDecodeError:
        return repr(piece)


def token_label(piece: bytes) -> str:
    """A short label: the literal without its quotes, with spaces shown as the open box ␣."""
    literal = token_literal(piece)
    inner = literal[2:-1] if literal.startswith("b") else literal[1:-1]
    return inner.replace(" ", "\u2423")


def pick_tokenizer(name: str | None, data: str | None, checkpoint: str | None) -> Tokenizer:
    """The tokenizer named (default gpt2), or the one of a dataset or of a checkpoint."""
    if sum(choice is not None for choice in (name, data, checkpoint)) > 1:
        raise GptError("give only one of --tokenizer, --data and --checkpoint")
    if data is not None:
        from gpt.data.formats import DatasetMeta

        return DatasetMeta.read(data).tokenizer.build()
    if checkpoint is not None:
        from gpt.checkpoint import read_checkpoint

        return read_checkpoint(checkpoint).tokenizer
    if name in ("char", "bpe"):
        raise GptError(f"a {name} vocabulary comes from the data: use --data DATA_DIR or --checkpoint RUN instead")
    if name not in (None, "gpt2", "byte"):
        if not Path(name).exists():
            raise GptError(f"unknown tokenizer {name!r}; give gpt2, byte or a Hugging Face tokenizer.json "
                           "(char and bpe come with --data or --checkpoint)")
        return read_hf_tokenizer(name).build()
    return make_tokenizer(name or "gpt2")


@dataclass
class Tokens:
    """A text cut into tokens: ids and the bytes each one stands for."""

    tokenizer: str
    ids: list[int]
    pieces: list[bytes]

    @property
    def num_bytes(self) -> int:
        return sum(len(piece) for piece in self.pieces)


def _encode(tokenizer: Tokenizer, text: str, fix: str) -> list[int]:
    """The ids of `text`; a character outside a char vocabulary (of a model, or of data that
    `gpt tokenize --data` names) is reported with `fix`, the change that helps there."""
    try:
        return tokenizer.encode(text)
    except UnknownCharacter as exc:
        raise GptError(f"character {exc.char!r} (U+{ord(exc.char):04X}) is not in this char vocabulary; {fix}") \
            from None


def tokenize(tokenizer: Tokenizer, text: str) -> Tokens:
    if not text:
        raise GptError("the text is empty; give some text to cut into tokens")
    ids = _encode(tokenizer, text, "remove it from the text, or use --tokenizer byte or gpt2, which cut any text")
    return Tokens(tokenizer=tokenizer.name, ids=ids, pieces=[token_piece(tokenizer, i) for i in ids])


def format_tokens(tokens: Tokens) -> str:
    """The tokens between bars, then a table of position, id, bytes and exact token text."""
    count = len(tokens.ids)
    lines = [f"{count} tokens ({tokens.tokenizer}), {tokens.num_bytes} bytes, "
             f"{tokens.num_bytes / count:.2f} bytes per token",
             "|" + "|".join(token_label(piece) for piece in tokens.pieces) + "|",
             "",
             f"{'#':>5} {'id':>6} {'bytes':>5}  token"]
    for position, (token_id, piece) in enumerate(zip(tokens.ids, tokens.pieces)):
        lines.append(f"{position:>5} {token_id:>6} {len(piece):>5}  {token_literal(piece)}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- next token

def filter_stages(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float
                  ) -> dict[str, torch.Tensor]:
    """The next-token distribution after each step of the sampler, in order: the model's own
    (temperature 1), then temperature, top-k and top-p where they change anything. The last
    one is exactly the distribution `gpt sample` draws from."""
    stages = {"model": sampling_probs(logits, 1.0, None, 1.0)}
    if temperature == 0:
        stages["greedy"] = sampling_probs(logits, 0.0, None, 1.0)
        return stages
    if temperature != 1:
        stages[f"T={temperature:g}"] = sampling_probs(logits, temperature, None, 1.0)
    if top_k is not None and top_k < logits.size(-1):
        stages[f"top-k={top_k}"] = sampling_probs(logits, temperature, top_k, 1.0)
    if top_p < 1:
        stages[f"top-p={top_p:g}"] = sampling_probs(logits, temperature, top_k, top_p)
    return stages


@torch.no_grad()
def next_token_logits(model: GPT, tokenizer: Tokenizer, prompt: str) -> tuple[torch.Tensor, int]:
    """Logits (vocab,) for the token after `prompt` (cropped to the context, as the sampler does)
    and the number of prompt tokens the model saw. Only the tokenizer's tokens: the special
    tokens of a task model are never sampled, and have no text to show."""
    ids = prompt_ids(tokenizer, prompt)[-model.config.block_size:]
    idx = torch.tensor([ids], device=next(model.parameters()).device)
    return model.forward_step(idx, None)[0, :tokenizer.vocab_size].float().cpu(), len(ids)


def format_next(stages: dict[str, torch.Tensor], tokenizer: Tokenizer, top: int) -> str:
    """The `top` most likely tokens with their probability after each stage; tokens a stage
    filters out show '-' and are marked."""
    names = list(stages)
    final = stages[names[-1]]
    order = torch.argsort(stages["model"], descending=True, stable=True)[:top].tolist()
    header = f"{'rank':>4} {'id':>6}  {'token':<16}" + "".join(f"{name:>11}" for name in names)
    lines = [header]
    for rank, token_id in enumerate(order, start=1):
        cells = "".join(f"{_probability(stages[name][token_id].item()):>11}" for name in names)
        mark = "" if final[token_id] > 0 else "  filtered out"
        lines.append(f"{rank:>4} {token_id:>6}  {token_literal(token_piece(tokenizer, token_id)):<16}{cells}{mark}")
    shown = stages["model"][order].sum().item()
    kept = int((final > 0).sum())
    lines.append(f"the rows hold {shown:.1%} of the model's probability; "
                 f"the sampler draws from {kept} of {final.numel()} tokens ({names[-1]})")
    return "\n".join(lines)


def _probability(p: float) -> str:
    return f"{p:.4f}" if p > 0 else "-"


# ----------------------------------------------------------------------------- attention

def attention_weights(attn: CausalSelfAttention, x: torch.Tensor, rope: tuple | None) -> torch.Tensor:
    """softmax(Q K^T / sqrt(head_size)) under the causal mask, (B, n_head, T, T): the weights that
    F.scaled_dot_product_attention applies inside the model without returning them."""
    q, k, _ = attn.heads(x, rope)
    T = q.size(-2)
    scores = (q @ k.transpose(-2, -1)).float() / math.sqrt(q.size(-1))
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(diagonal=1)
    return torch.softmax(scores.masked_fill(future, -float("inf")), dim=-1)


@torch.no_grad()
def attention_maps(model: GPT, ids: list[int]) -> torch.Tensor:
    """Attention weights of every layer and head for one sequence, (n_layer, n_head, T, T):
    row i holds how much token i takes from each token j <= i. A forward pre-hook keeps each
    attention module's input during a normal forward pass; the weights are recomputed from it."""
    inputs: dict[int, tuple] = {}

    def keep_input(module: CausalSelfAttention, args: tuple) -> None:
        inputs[module.layer] = args[:2]  # (x, rope); the cache is None here

    hooks = [block.attn.register_forward_pre_hook(keep_input) for block in model.blocks]
    try:
        model(torch.tensor([ids], device=next(model.parameters()).device))
    finally:
        for hook in hooks:
            hook.remove()
    return torch.stack([attention_weights(block.attn, *inputs[layer])[0].cpu()
                        for layer, block in enumerate(model.blocks)])


def check_index(value: int | None, count: int, what: str) -> None:
    """A --layer or --head that the model has (None means all)."""
    if value is not None and not 0 <= value < count:
        raise GptError(f"--{what} {value} does not exist: this model has {count} {what}s, numbered 0 to {count - 1}")


def context_tokens(model: GPT, tokenizer: Tokenizer, text: str) -> Tokens:
    """The tokens of `text`, which must be non-empty and fit in the model's context."""
    tokens = tokenize(tokenizer, text)
    if len(tokens.ids) > model.config.block_size:
        raise GptError(f"the text is {len(tokens.ids)} tokens, longer than the model's context of "
                       f"{model.config.block_size}; shorten it")
    return tokens


def attention_grid(num_heads: int) -> tuple[int, int]:
    """Rows and columns of a near-square grid with room for every head."""
    cols = math.ceil(math.sqrt(num_heads))
    return math.ceil(num_heads / cols), cols


def attention_figsize(num_heads: int, num_tokens: int) -> tuple[float, float]:
    """Width and height in inches: a square per head that grows with the tokens, plus margins."""
    rows, cols = attention_grid(num_heads)
    cell = min(max(2.5, 0.2 * num_tokens), 7.0)
    return cols * cell + 1.2, rows * cell + 0.8


def plot_attention(weights: torch.Tensor, heads: list[int], labels: list[str], title: str, path: Path) -> None:
    """One heat map per head, queries down, keys across; the masked future stays blank."""
    plt = _pyplot()
    T = weights.size(-1)
    rows, cols = attention_grid(len(heads))
    fig, axes = plt.subplots(rows, cols, figsize=attention_figsize(len(heads), T), squeeze=False,
                             layout="constrained")
    future = np.triu(np.ones((T, T), dtype=bool), k=1)
    step = max(1, math.ceil(T / 48))  # at most ~48 tick labels per axis stay readable
    ticks = list(range(0, T, step))
    tick_labels = [_plain_text(labels[i]) for i in ticks]
    for ax, head in zip(axes.flat, heads):
        image = ax.imshow(np.ma.masked_array(weights[head].numpy(), future), vmin=0.0, vmax=1.0, cmap="viridis")
        ax.set_title(f"head {head}")
        ax.set_xticks(ticks, tick_labels, rotation=90, fontsize=7)
        ax.set_yticks(ticks, tick_labels, fontsize=7)
    for ax in axes.flat[len(heads):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("attended-to token (key)")
    for ax in axes[:, 0]:
        ax.set_ylabel("attending token (query)")
    fig.colorbar(image, ax=axes, shrink=0.6, label="attention weight")
    fig.suptitle(_plain_text(title))
    save_png(fig, path, DPI)


def draw_attention(model: GPT, tokenizer: Tokenizer, text: str, layer: int, head: int | None, path: Path,
                   title: str) -> str:
    """Draw the heads of one layer (or one head) for `text` into `path`; return what was drawn."""
    check_index(layer, model.config.n_layer, "layer")
    check_index(head, model.config.n_head, "head")
    tokens = context_tokens(model, tokenizer, text)
    heads = list(range(model.config.n_head)) if head is None else [head]
    labels = [token_label(piece) for piece in tokens.pieces]
    plot_attention(attention_maps(model, tokens.ids)[layer], heads, labels, title, path)
    return f"wrote {path}: layer {layer}, {len(heads)} head(s), {len(tokens.ids)} tokens"


# ----------------------------------------------------------------------------- embeddings

def single_token(tokenizer: Tokenizer, word: str) -> int:
    """The id of `word`, which must be exactly one token."""
    if not word:
        raise GptError("the word is empty; give one token, e.g. ' king' (GPT-2 words start with a space)")
    ids = _encode(tokenizer, word, "give a word of characters it has")
    if len(ids) != 1:
        split = " + ".join(token_literal(token_piece(tokenizer, i)) for i in ids)
        raise GptError(f"{word!r} is {len(ids)} tokens ({split}), not one; give a single token such as "
                       f"{token_literal(token_piece(tokenizer, ids[0]))} (gpt tokenize shows how text splits)")
    return ids[0]


def nearest_tokens(embedding: torch.Tensor, vector: torch.Tensor, count: int, exclude: tuple[int, ...] = ()
                   ) -> list[tuple[int, float]]:
    """The `count` rows of `embedding` (vocab, C) closest to `vector` by cosine similarity,
    most similar first, as (token id, similarity)."""
    similarity = F.normalize(embedding.float(), dim=-1) @ F.normalize(vector.float(), dim=0)
    similarity[list(exclude)] = -float("inf")
    values, ids = similarity.topk(min(count, embedding.size(0) - len(set(exclude))))
    return list(zip(ids.tolist(), values.tolist()))


def parse_analogy(expression: str) -> list[tuple[int, str]]:
    """'king - man + woman' -> [(1, 'king'), (-1, 'man'), (1, 'woman')]. Terms are separated by
    spaced + and -; quote a term to keep its spaces or to use + or - as a token: "' king' - ' man'"."""
    try:
        parts = shlex.split(expression)
    except ValueError:
        raise GptError(f"--analogy {expression!r} has an unclosed quote") from None
    terms, operators = parts[0::2], parts[1::2]
    if len(parts) < 3 or len(parts) % 2 == 0 or any(op not in ("+", "-") for op in operators):
        raise GptError(f"--analogy {expression!r} is not of the form 'a - b + c' (spaces around + and -)")
    signs = [1] + [1 if op == "+" else -1 for op in operators]
    return list(zip(signs, terms))


def analogy_vector(embedding: torch.Tensor, terms: list[tuple[int, int]]) -> torch.Tensor:
    """The signed sum of the terms' unit embedding vectors, so that no word dominates by its length."""
    return sum(sign * F.normalize(embedding[token_id].float(), dim=0) for sign, token_id in terms)


def format_neighbours(tokenizer: Tokenizer, neighbours: list[tuple[int, float]]) -> str:
    return "\n".join(f"{rank:>4} {token_id:>6}  {token_literal(token_piece(tokenizer, token_id)):<20} {sim:.3f}"
                     for rank, (token_id, sim) in enumerate(neighbours, start=1))


def frequent_tokens(tokenizer: Tokenizer, data_dir: str | None, count: int) -> tuple[list[int], str]:
    """The `count` most frequent tokens of the training data (every token when the vocabulary
    is that small), and a phrase saying which they are."""
    vocab = tokenizer.vocab_size
    if vocab <= count:
        return list(range(vocab)), f"all {vocab} tokens"
    dataset = training_data(tokenizer, data_dir, f"to find the {count} most frequent tokens embed --plot reads "
                            "the training data, but")
    counts, seen = np.zeros(vocab, dtype=np.int64), 0
    for shard in dataset.splits.get("train", []):
        part = np.asarray(shard[:TOKENS_FOR_COUNTS - seen])
        counts += np.bincount(part, minlength=vocab)
        seen += len(part)
    ids = [i for i in np.argsort(-counts, kind="stable")[:count].tolist() if counts[i] > 0]
    return ids, f"the {len(ids)} most frequent tokens in {seen:,} tokens of {data_dir}"


def training_data(tokenizer: Tokenizer, data_dir: str | None, why: str = "--data:"):
    """The dataset in `data_dir`, which must have been made with `tokenizer`."""
    if data_dir is None or not Path(data_dir).is_dir():
        raise GptError(f"{why} {data_dir} is not there; give --data DATA_DIR (made with the model's tokenizer)")
    from gpt.data.shards import load_dataset

    dataset = load_dataset(data_dir)
    if dataset.tokenizer.spec != tokenizer.spec:
        raise GptError(f"{data_dir} does not fit the model: "
                       f"{dataset.tokenizer.spec.difference(tokenizer.spec, 'the data', 'the model')}; "
                       "give --data with the data the model was trained on")
    return dataset


def pca_2d(vectors: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """Coordinates (n, 2) of the rows on their two principal axes, and the share of the
    variance each axis explains."""
    centered = vectors.float() - vectors.float().mean(dim=0)
    _, singular, components = torch.linalg.svd(centered, full_matrices=False)
    variance = singular ** 2
    return centered @ components[:2].T, (variance[:2] / variance.sum()).tolist()


def plot_embedding(coords: torch.Tensor, explained: list[float], labels: list[str], title: str, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=EMBEDDING_FIGSIZE, layout="constrained")
    ax.scatter(coords[:, 0], coords[:, 1], s=8, alpha=0.5)
    for (x, y), label in zip(coords.tolist(), labels):
        ax.annotate(_plain_text(label), (x, y), fontsize=9, xytext=(2, 2), textcoords="offset points")
    ax.set_xlabel(f"principal axis 1 ({explained[0]:.0%} of the variance)")
    ax.set_ylabel(f"principal axis 2 ({explained[1]:.0%} of the variance)")
    ax.grid(alpha=0.3)
    ax.set_title(_plain_text(title))
    save_png(fig, path, DPI)


def token_embedding(model: GPT, tokenizer: Tokenizer) -> torch.Tensor:
    """The token embedding table wte (vocab, n_embd), on the CPU: the tokenizer's rows only (a
    task model's special tokens have rows too, but no text)."""
    return model.wte.weight[:tokenizer.vocab_size].detach().float().cpu()


def describe_nearest(model: GPT, tokenizer: Tokenizer, word: str, count: int) -> str:
    token_id = single_token(tokenizer, word)
    embedding = token_embedding(model, tokenizer)
    neighbours = nearest_tokens(embedding, embedding[token_id], count)
    return (f"nearest to {token_literal(token_piece(tokenizer, token_id))} (id {token_id}) by cosine similarity "
            f"in the token embedding:\n{format_neighbours(tokenizer, neighbours)}")


def describe_analogy(model: GPT, tokenizer: Tokenizer, expression: str, count: int) -> str:
    terms = [(sign, single_token(tokenizer, term)) for sign, term in parse_analogy(expression)]
    embedding = token_embedding(model, tokenizer)
    exclude = tuple(token_id for _, token_id in terms)
    neighbours = nearest_tokens(embedding, analogy_vector(embedding, terms), count, exclude)
    return (f"nearest to {expression} (a sum of unit vectors; its own terms left out):\n"
            f"{format_neighbours(tokenizer, neighbours)}")


def draw_embedding(model: GPT, tokenizer: Tokenizer, data_dir: str | None, count: int, path: Path,
                   title: str) -> str:
    """Draw the 2-D PCA of the most frequent tokens' embeddings into `path`; return what was drawn."""
    ids, which = frequent_tokens(tokenizer, data_dir, count)
    coords, explained = pca_2d(token_embedding(model, tokenizer)[ids])
    labels = [token_label(token_piece(tokenizer, i)) for i in ids]
    plot_embedding(coords, explained, labels, f"{title}, {which}", path)
    return (f"wrote {path}: {which}; the two axes explain {explained[0]:.0%} and {explained[1]:.0%} "
            "of their variance")


# ----------------------------------------------------------------------------- pictures

def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise GptError("drawing needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plain_text(text: str) -> str:
    """Text that matplotlib shows as it is ($...$ would otherwise be read as math)."""
    return text.replace("$", r"\$")


def check_png_path(path: str) -> Path:
    """An output path ending in .png in a folder that exists (checked before any work is done)."""
    out = Path(path)
    if out.suffix.lower() != ".png":
        raise GptError(f"-o {path}: the picture is a PNG; give a file name ending in .png")
    if not out.parent.is_dir():
        raise GptError(f"-o {path}: folder {out.parent} does not exist; create it first")
    return out
