import ast
import collections
import struct

import pytest
import torch
from conftest import tiny_config

from gpt.checkpoint import load_model, read_checkpoint
from gpt.config import build_config
from gpt.data.shards import load_dataset
from gpt.data.tokenizer import make_tokenizer
from gpt.errors import GptError
from gpt.inference.sample import pick_tokens, sampling_probs
from gpt.inspection import (
    DPI,
    EMBEDDING_FIGSIZE,
    analogy_vector,
    attention_figsize,
    attention_maps,
    attention_weights,
    filter_stages,
    format_next,
    frequent_tokens,
    nearest_tokens,
    next_token_logits,
    parse_analogy,
    pca_2d,
    token_embedding,
)
from gpt.model import GPT
from gpt.tasks.framing import NUM_SPECIAL
from gpt.training.loop import train

POS_ENCODINGS = ["learned", "sinusoidal", "rope"]


@pytest.fixture(scope="module")
def run(char_data, tmp_path_factory):
    """A briefly trained 2-layer, 2-head char model."""
    out = tmp_path_factory.mktemp("run")
    train(tiny_config(char_data, out, max_iters=10))
    return out


def tiny(**model) -> GPT:
    torch.manual_seed(0)
    return GPT(build_config({"model": {"preset": "tiny", "vocab_size": 40, "block_size": 16, **model}}).model).eval()


def png_size(path) -> tuple[int, int]:
    """Width and height from the IHDR chunk, after checking the PNG signature."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def table_pieces(out: str) -> list[bytes]:
    """The token column of `gpt tokenize`'s table, read back as bytes."""
    rows = out.split("\n\n", 1)[1].splitlines()[1:]
    literals = [ast.literal_eval(row.split(maxsplit=3)[3]) for row in rows]
    return [x if isinstance(x, bytes) else x.encode("utf-8") for x in literals]


# ----------------------------------------------------------------------------- tokenize

@pytest.mark.parametrize("tokenizer", ["gpt2", "byte"])
@pytest.mark.parametrize("text", ["First Citizen:\nBefore we proceed, hear me speak.", "  tabs\tand  'quotes\"",
                                  "naïve café – 東京 🙂", "$x$ + \\n"])
def test_token_table_round_trips_to_the_text(cli, tokenizer, text):
    code, out, err = cli("tokenize", "--tokenizer", tokenizer, text)
    assert code == 0, err
    pieces = table_pieces(out)
    assert b"".join(pieces) == text.encode("utf-8")
    num_bytes = len(text.encode("utf-8"))
    assert out.startswith(f"{len(pieces)} tokens ({tokenizer}), {num_bytes} bytes, "
                          f"{num_bytes / len(pieces):.2f} bytes per token\n")


def test_tokenize_with_a_checkpoint_uses_its_char_vocabulary(cli, run):
    code, out, _ = cli("tokenize", "--checkpoint", run, "To be, or not")
    assert code == 0
    assert out.splitlines()[1] == "|T|o|␣|b|e|,|␣|o|r|␣|n|o|t|"
    assert b"".join(table_pieces(out)) == b"To be, or not"


def test_tokenize_with_a_dataset(cli, char_data):
    code, out, _ = cli("tokenize", "--data", char_data, "hi")
    vocab = load_dataset(char_data).tokenizer.vocab
    assert code == 0 and out.startswith("2 tokens (char)") and f"{vocab.index('h'):>6}" in out


# ----------------------------------------------------------------------------- next

SETTINGS = [(1.0, None, 1.0), (0.7, None, 1.0), (1.3, 5, 1.0), (0.8, None, 0.6), (0.8, 4, 0.9), (0.0, 3, 0.5)]


@pytest.mark.parametrize("temperature, top_k, top_p", SETTINGS)
def test_filter_stages_sum_to_one_and_end_in_the_samplers_distribution(temperature, top_k, top_p):
    logits = torch.randn(40, generator=torch.Generator().manual_seed(0)) * 3
    stages = filter_stages(logits, temperature, top_k, top_p)
    for probs in stages.values():
        assert probs.sum().item() == pytest.approx(1.0, abs=1e-6)
    final = list(stages.values())[-1]
    assert torch.equal(final, sampling_probs(logits, temperature, top_k, top_p))
    # A token a stage removes stays removed.
    kept = [probs > 0 for probs in stages.values()]
    assert all(bool((later <= earlier).all()) for earlier, later in zip(kept, kept[1:]))


@pytest.mark.parametrize("temperature, top_k, top_p", [s for s in SETTINGS if s[0] > 0])
def test_sampler_draws_from_the_shown_distribution(temperature, top_k, top_p):
    logits = torch.randn(1, 40, generator=torch.Generator().manual_seed(1)) * 3
    final = list(filter_stages(logits[0], temperature, top_k, top_p).values())[-1]
    drawn = [pick_tokens(logits, temperature, top_k, top_p, torch.Generator().manual_seed(s)).item()
             for s in range(50)]
    expected = [torch.multinomial(final, 1, generator=torch.Generator().manual_seed(s)).item() for s in range(50)]
    assert drawn == expected


def test_stage_names_follow_the_settings():
    logits = torch.randn(40)
    assert list(filter_stages(logits, 1.0, None, 1.0)) == ["model"]
    assert list(filter_stages(logits, 0.5, 40, 1.0)) == ["model", "T=0.5"]  # top-k = vocab changes nothing
    assert list(filter_stages(logits, 0.5, 3, 0.9)) == ["model", "T=0.5", "top-k=3", "top-p=0.9"]
    assert list(filter_stages(logits, 0.0, 3, 0.9)) == ["model", "greedy"]


def test_next_prints_the_models_probabilities_and_marks_filtered_tokens(cli, run):
    code, out, err = cli("next", run, "ROMEO:", "--top", "6", "--top-k", "2", "--temperature", "1", "--device", "cpu",
                         "--weights", "fp32")  # as the fp32 model below computes them (auto may round to int8)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "after 6 prompt tokens; temperature 1, top-k 2, top-p 1"
    assert lines[1].split()[-2:] == ["model", "top-k=2"]
    rows = lines[2:8]
    assert [row.endswith("filtered out") for row in rows] == [False, False, True, True, True, True]
    # The model column is the softmax of the model's logits for the next token.
    ckpt = read_checkpoint(run)
    model = load_model(ckpt).eval()
    ids = torch.tensor([ckpt.tokenizer.encode("ROMEO:")])
    with torch.no_grad():
        probs = torch.softmax(model(ids)[0][0, -1], dim=-1)
    top = torch.argsort(probs, descending=True, stable=True)[:6]
    assert [int(row[5:11]) for row in rows] == top.tolist()
    assert [float(row[29:40]) for row in rows] == pytest.approx(probs[top].tolist(), abs=6e-5)
    assert "the sampler draws from 2 of" in lines[-1]


def test_a_task_models_special_tokens_are_left_out_of_next_and_embed(run):
    tokenizer = read_checkpoint(run).tokenizer
    text_vocab = tokenizer.vocab_size
    model = tiny(vocab_size=text_vocab + NUM_SPECIAL)  # a task model: three special tokens after the text
    with torch.no_grad():
        model.wte.weight[text_vocab:] = 10 * model.wte.weight[:text_vocab].std()  # most likely next, by far
    logits, _ = next_token_logits(model, tokenizer, "ROMEO:")
    assert logits.shape == (text_vocab,)
    table = format_next(filter_stages(logits, 1.0, None, 1.0), tokenizer, top=text_vocab + NUM_SPECIAL)
    assert table.endswith(f"the sampler draws from {text_vocab} of {text_vocab} tokens (model)")
    assert token_embedding(model, tokenizer).shape == (text_vocab, model.config.n_embd)


# ----------------------------------------------------------------------------- attention

def run_capturing_attention(model: GPT, idx: torch.Tensor) -> dict[int, tuple]:
    """Each attention module's (input x, rope, real output) during a forward pass."""
    seen = {}

    def keep(module, args, output):
        seen[module.layer] = (args[0], args[1], output)

    hooks = [block.attn.register_forward_hook(keep) for block in model.blocks]
    with torch.no_grad():
        model(idx)
    for hook in hooks:
        hook.remove()
    return seen


@pytest.mark.parametrize("model_settings", [dict(pos_encoding=p) for p in POS_ENCODINGS] + [dict(norm_position="post"),
                                                                                         dict(bias=True)])
def test_explicit_attention_weights_reproduce_the_sdpa_output(model_settings):
    model = tiny(**model_settings)
    with torch.no_grad():  # larger query/key weights than at init: peaked attention, not near-uniform
        for block in model.blocks:
            block.attn.qkv.weight.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(block.attn.layer))
    idx = torch.randint(0, 40, (2, 16), generator=torch.Generator().manual_seed(2))
    for layer, (x, rope, output) in run_capturing_attention(model, idx).items():
        attn = model.blocks[layer].attn
        with torch.no_grad():
            weights = attention_weights(attn, x, rope)
            _, _, v = attn.heads(x, rope)
            mixed = (weights @ v).transpose(1, 2).reshape(x.shape)
            assert torch.allclose(attn.proj(mixed), output, atol=1e-5)


@pytest.mark.parametrize("pos", POS_ENCODINGS)
def test_attention_rows_sum_to_one_with_zeros_above_the_diagonal(pos):
    model = tiny(pos_encoding=pos)
    maps = attention_maps(model, list(range(12)))
    assert maps.shape == (2, 2, 12, 12)
    assert torch.allclose(maps.sum(dim=-1), torch.ones(2, 2, 12))
    past = torch.ones(12, 12, dtype=torch.bool).tril()
    assert bool((maps[..., ~past] == 0).all()) and bool((maps[..., past] > 0).all())


@pytest.mark.parametrize("head_args, heads", [([], 2), (["--head", "1"], 1)])
def test_attention_png_has_the_expected_size(cli, run, tmp_path, head_args, heads):
    out = tmp_path / "attn.png"
    code, stdout, err = cli("attention", run, "First Citizen:", "-o", out, "--layer", "1", *head_args)
    assert code == 0, err
    assert stdout.strip() == f"wrote {out}: layer 1, {heads} head(s), 14 tokens"
    width, height = attention_figsize(heads, 14)
    assert png_size(out) == (round(width * DPI), round(height * DPI))
    assert [p.name for p in tmp_path.iterdir()] == ["attn.png"]  # no temporary file left behind


# ----------------------------------------------------------------------------- embed

@pytest.mark.parametrize("word", ["e", "A", " ", "\n"])
def test_nearest_token_is_itself_with_similarity_one(cli, run, word):
    code, out, err = cli("embed", run, word, "--nearest", "5")
    assert code == 0, err
    rows = out.splitlines()[1:]
    assert len(rows) == 5
    assert ast.literal_eval(rows[0].split(maxsplit=2)[2].rsplit(maxsplit=1)[0]) == word
    assert rows[0].endswith(" 1.000")
    similarities = [float(row.split()[-1]) for row in rows]
    assert similarities == sorted(similarities, reverse=True)


def test_nearest_tokens_by_cosine_similarity():
    embedding = torch.tensor([[1.0, 0.0], [10.0, 1.0], [0.0, 1.0], [-1.0, 0.0]])
    neighbours = nearest_tokens(embedding, embedding[0], 4)
    assert [i for i, _ in neighbours] == [0, 1, 2, 3]
    assert [s for _, s in neighbours] == pytest.approx([1.0, 10 / 101 ** 0.5, 0.0, -1.0])
    assert [i for i, _ in nearest_tokens(embedding, embedding[0], 4, exclude=(0, 1))] == [2, 3]


def test_analogy_finds_the_fourth_word_when_the_offsets_match():
    # king - man + woman = queen exactly, among distractors.
    words = torch.tensor([[1.0, 1, 0, 0], [1, 0, 1, 0], [0, 0, 1, 1], [0, 1, 0, 1]]) / 2 ** 0.5
    embedding = torch.cat([words, torch.randn(30, 4, generator=torch.Generator().manual_seed(3))])
    vector = analogy_vector(embedding, [(1, 0), (-1, 1), (1, 2)])
    best, similarity = nearest_tokens(embedding, vector, 1, exclude=(0, 1, 2))[0]
    assert best == 3 and similarity == pytest.approx(1.0)


@pytest.mark.parametrize("expression, terms", [
    ("king - man + woman", [(1, "king"), (-1, "man"), (1, "woman")]),
    ("' king' - ' man' + ' woman'", [(1, " king"), (-1, " man"), (1, " woman")]),
    ("'-' + a", [(1, "-"), (1, "a")]),
])
def test_parse_analogy(expression, terms):
    assert parse_analogy(expression) == terms


@pytest.mark.parametrize("expression", ["king", "king - man +", "a-b+c", "a * b", "'king - man"])
def test_parse_analogy_rejects_other_forms(expression):
    with pytest.raises(GptError, match="--analogy"):
        parse_analogy(expression)


def test_analogy_cli_leaves_out_its_terms(cli, run):
    code, out, err = cli("embed", run, "--analogy", "a - e + o", "--nearest", "3")
    assert code == 0, err
    listed = [ast.literal_eval(row.split(maxsplit=2)[2].rsplit(maxsplit=1)[0]) for row in out.splitlines()[1:]]
    assert len(listed) == 3 and not {"a", "e", "o"} & set(listed)


def test_embedding_plot_of_a_small_vocabulary_draws_every_token(cli, run, tmp_path):
    out = tmp_path / "emb.png"
    code, stdout, err = cli("embed", run, "--plot", "-o", out)
    assert code == 0, err
    vocab = read_checkpoint(run).tokenizer.vocab_size
    assert stdout.startswith(f"wrote {out}: all {vocab} tokens;")
    assert png_size(out) == (round(EMBEDDING_FIGSIZE[0] * DPI), round(EMBEDDING_FIGSIZE[1] * DPI))


def test_frequent_tokens_are_counted_in_the_training_data(char_data):
    dataset = load_dataset(char_data)
    ids, which = frequent_tokens(dataset.tokenizer, str(char_data), 5)
    counts = collections.Counter(dataset.splits["train"][0].tolist())
    assert [counts[i] for i in ids] == sorted(counts.values(), reverse=True)[:5]
    assert which == f"the 5 most frequent tokens in {sum(counts.values()):,} tokens of {char_data}"


def test_frequent_tokens_need_data_of_the_same_tokenizer(char_data, tmp_path):
    with pytest.raises(GptError, match="give --data DATA_DIR"):
        frequent_tokens(make_tokenizer("byte"), str(tmp_path / "missing"), 10)
    with pytest.raises(GptError, match="the data uses the char tokenizer, the model the byte one"):
        frequent_tokens(make_tokenizer("byte"), str(char_data), 10)


def test_pca_of_points_on_a_line_puts_all_variance_on_the_first_axis():
    direction = torch.tensor([1.0, 2.0, -1.0])
    points = torch.linspace(-1, 1, 9)[:, None] * direction + torch.tensor([5.0, 0.0, 1.0])
    coords, explained = pca_2d(points)
    assert explained == pytest.approx([1.0, 0.0], abs=1e-6)
    assert torch.allclose(coords[:, 0].abs(), torch.linspace(-1, 1, 9).abs() * direction.norm(), atol=1e-5)


# ----------------------------------------------------------------------------- the commands

@pytest.mark.parametrize("verb, expected", [("tokenize", "--checkpoint"), ("next", "--top-p"),
                                            ("attention", "--layer"), ("embed", "--analogy")])
def test_inspection_verbs_have_help(cli, verb, expected):
    code, out, _ = cli(verb, "--help")
    assert code == 0 and expected in out


@pytest.mark.parametrize("args, message", [
    (["tokenize", ""], "the text is empty"),
    (["tokenize", "--tokenizer", "char", "hi"], "use --data DATA_DIR or --checkpoint RUN"),
    (["tokenize", "--tokenizer", "gpt2", "--data", "d", "hi"], "give only one of"),
    (["tokenize", "--tokenizer", "wordpiece", "hi"], "unknown tokenizer 'wordpiece'"),
    (["attention", "{run}", "", "-o", "{tmp}/a.png"], "the text is empty"),
    (["attention", "{run}", "First", "-o", "{tmp}/a.png", "--layer", "2"], "--layer 2 does not exist: this model "
                                                                            "has 2 layers, numbered 0 to 1"),
    (["attention", "{run}", "First", "-o", "{tmp}/a.png", "--head", "-1"], "--head -1 does not exist"),
    (["attention", "{run}", "First", "-o", "{tmp}/a.jpg"], "give a file name ending in .png"),
    (["attention", "{run}", "First", "-o", "{tmp}/no/a.png"], "does not exist; create it first"),
    (["attention", "{run}", "x" * 40, "-o", "{tmp}/a.png"], "the text is 40 tokens, longer than the model's context"),
    (["embed", "{run}", "the"], "'the' is 3 tokens ('t' + 'h' + 'e'), not one"),
    (["embed", "{run}", ""], "the word is empty"),
    (["embed", "{run}", "e", "--plot", "-o", "{tmp}/e.png"], "give one of WORD"),
    (["embed", "{run}"], "give one of WORD"),
    (["embed", "{run}", "--plot"], "--plot needs -o FILE.png"),
    (["embed", "{run}", "--analogy", "a - e + %"], "'%' (U+0025) is not in this char vocabulary; give a word of "
                                                   "characters it has"),
    (["tokenize", "--checkpoint", "{run}", "caf\u00e9"], "character '\u00e9' (U+00E9) is not in this char vocabulary; "
                                                        "remove it from the text, or use --tokenizer byte or gpt2"),
    (["next", "{run}", "hi", "--top", "0"], "--top must be at least 1"),
])
def test_bad_input_is_one_line_and_exit_2(cli, run, tmp_path, args, message):
    code, out, err = cli(*(a.format(run=run, tmp=tmp_path) for a in args))
    assert code == 2, out
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not any(tmp_path.iterdir())  # nothing half-written
