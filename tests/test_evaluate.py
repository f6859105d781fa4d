import importlib.util
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, SHAKESPEARE

from gpt.checkpoint import save_checkpoint
from gpt.config import build_config
from gpt.data.formats import RunFolder, RunState
from gpt.data.shards import load_dataset
from gpt.data.tokenizer import ByteTokenizer, CharTokenizer, GPT2Tokenizer, TokenizerSpec
from gpt.errors import GptError
from gpt.evaluation.choice import (
    choice_requests,
    continuation,
    continuation_logprobs,
    evaluate_task,
    few_shot_examples,
    few_shot_prompt,
)
from gpt.evaluation.perplexity import (
    count_text_bytes,
    evaluate_lm,
    evaluate_tokens,
    strided_windows,
    token_byte_lengths,
)
from gpt.model import GPT
from gpt.tasks.items import ChoiceItem
from gpt.tasks.items import read_choice_file as read_task


def tiny(pos="learned", vocab=30, block_size=16) -> GPT:
    torch.manual_seed(0)
    config = build_config({"model": {"preset": "tiny", "vocab_size": vocab, "block_size": block_size,
                                     "pos_encoding": pos}}).model
    return GPT(config).eval()


class FixedLogits(torch.nn.Module):
    """A scripted model: the same next-token logits after every input."""

    def __init__(self, logits: torch.Tensor, block_size: int = 64):
        super().__init__()
        self.logits = torch.nn.Parameter(logits)
        self.config = SimpleNamespace(block_size=block_size)

    def forward(self, idx, targets=None):
        return self.logits.expand(*idx.shape, -1), None


def token_losses(model, x: torch.Tensor) -> torch.Tensor:
    """Loss of predicting x[1:] from one unbatched forward over x[:-1]."""
    with torch.no_grad():
        return F.cross_entropy(model(x[None, :-1])[0][0], x[1:], reduction="none")


# ----------------------------------------------------------------------------- language modelling

@pytest.mark.parametrize("n, block, stride", [(1, 8, 4), (7, 8, 4), (8, 8, 4), (9, 8, 4), (50, 8, 4),
                                              (50, 8, 1), (50, 8, 8), (50, 8, 3), (49, 8, 7)])
def test_windows_score_each_prediction_exactly_once_with_enough_context(n, block, stride):
    windows = list(strided_windows(n, block, stride))
    scored = [p for start, end, k in windows for p in range(end - k, end)]
    assert sorted(scored) == list(range(n)) and len(scored) == n
    assert all(end - start == min(block, n) for start, end, _ in windows)
    for start, end, k in windows[1:]:
        assert k <= stride and end - k - start >= block - stride  # the first scored token's context


@pytest.mark.parametrize("pos, stride, batch_size", [("learned", 5, 3), ("rope", 8, 2), ("learned", 16, 4)])
def test_strided_evaluation_equals_a_hand_loop(pos, stride, batch_size):
    model = tiny(pos)
    tokens = torch.randint(0, 30, (70,), generator=torch.Generator().manual_seed(1))
    result = evaluate_tokens(model, tokens.numpy(), np.ones(30, dtype=np.int64), stride=stride,
                             batch_size=batch_size)
    # The rule written out: the first window scores all of its predictions, each later window
    # ends `stride` further on (or at the text's end) and scores only the new ones.
    end = 16
    expected = token_losses(model, tokens[:end + 1]).sum().item()
    while end < 69:
        new_end = min(end + stride, 69)
        expected += token_losses(model, tokens[new_end - 16:new_end + 1])[-(new_end - end):].sum().item()
        end = new_end
    assert result.tokens == 69
    assert result.loss_sum == pytest.approx(expected, rel=1e-5)


def test_stride_one_scores_each_token_with_a_full_window():
    model = tiny("sinusoidal")
    tokens = torch.randint(0, 30, (40,), generator=torch.Generator().manual_seed(2))
    per_token = [token_losses(model, tokens[max(0, p - 15):p + 2])[-1].item() for p in range(39)]
    result = evaluate_tokens(model, tokens.numpy(), np.ones(30, dtype=np.int64), stride=1, batch_size=7)
    assert result.loss == pytest.approx(sum(per_token) / 39, rel=1e-5)


def test_perplexity_is_exp_of_the_mean_loss():
    model = tiny()
    tokens = torch.randint(0, 30, (17,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        mean_loss = model(tokens[None, :-1], tokens[None, 1:])[1].item()
    result = evaluate_tokens(model, tokens.numpy(), np.ones(30, dtype=np.int64))
    assert result.loss == pytest.approx(mean_loss, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(mean_loss), rel=1e-5)


def test_max_tokens_scores_only_the_first_tokens(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("abcab" * 40)
    model, info = tiny(vocab=3), TokenizerSpec("char", "abc")
    capped = evaluate_lm(model, info, text, max_tokens=50)
    first = evaluate_tokens(model, CharTokenizer("abc").encode_array("abcab" * 40)[:51], np.ones(3, dtype=np.int64))
    assert (evaluate_lm(model, info, text).tokens, capped.tokens) == (199, 50)
    assert capped.loss_sum == pytest.approx(first.loss_sum)


TEXT = "Sœur, où est le café? ✓ naïve\n" * 6


@pytest.mark.parametrize("info", [TokenizerSpec("char", "".join(sorted(set(TEXT)))), TokenizerSpec("byte"),
                                  TokenizerSpec("gpt2")])
def test_bits_per_byte_of_a_uniform_model(tmp_path, info):
    path = tmp_path / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    vocab = info.build().vocab_size
    result = evaluate_lm(FixedLogits(torch.zeros(vocab)), info, path)
    assert result.loss == pytest.approx(math.log(vocab))
    assert result.bits_per_byte == pytest.approx(math.log2(vocab) * result.tokens / result.text_bytes)
    # Tokenizers with end-of-text start the file with it, so every byte is scored; char cannot
    # score its first character (nothing precedes it).
    unscored = 0 if info.name != "char" else len(TEXT[0].encode())
    assert result.text_bytes == len(TEXT.encode("utf-8")) - unscored


@pytest.mark.parametrize("tokenizer", [GPT2Tokenizer(), ByteTokenizer(), CharTokenizer("Sœurcafé ✓\nace")],
                         ids=["gpt2", "byte", "char"])
def test_text_bytes_exclude_end_of_text(tokenizer):
    documents = ["Sœur café", "✓ ace\n"]
    pieces = []
    for document in documents:
        pieces += ([tokenizer.eot] if tokenizer.eot is not None else []) + tokenizer.encode(document)
    assert count_text_bytes(tokenizer, np.array(pieces)) == sum(len(d.encode()) for d in documents)
    assert token_byte_lengths(tokenizer).shape == (tokenizer.vocab_size,)


def test_a_split_is_read_window_by_window_across_its_shards(tmp_path):
    """`gpt eval --data DIR` never holds a whole split: memory stays at a batch of windows, and
    windows that straddle shard boundaries score as over one concatenated array."""
    import tracemalloc

    from gpt.data.prepare import PrepareOptions, prepare
    from gpt.evaluation.perplexity import ConcatenatedShards

    rng = np.random.default_rng(0)
    (tmp_path / "train.txt").write_text("train text\n" * 100)
    (tmp_path / "val.txt").write_bytes(bytes(rng.integers(97, 123, 600_000).astype(np.uint8)))
    folder = prepare(PrepareOptions(sources=[str(tmp_path / "train.txt")], val=str(tmp_path / "val.txt"),
                                    tokenizer="byte", out=str(tmp_path / "data"), workers=1, shard_size=200_000))
    dataset = load_dataset(folder)
    shards = dataset.splits["val"]
    assert len(shards) >= 3
    whole = np.concatenate(shards)
    view = ConcatenatedShards(shards)
    for start, stop in [(0, 10), (199_990, 200_020), (199_999, 400_001), (len(whole) - 5, len(whole) + 9)]:
        assert np.array_equal(view[start:stop], whole[start:stop])
    logits = torch.log(torch.arange(1, dataset.vocab_size + 1, dtype=torch.float))
    model = FixedLogits(logits, block_size=256)
    tracemalloc.start()
    try:
        streamed = evaluate_lm(model, dataset.meta.tokenizer, folder, split="val", stride=256, batch_size=64)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < whole.nbytes / 2, peak  # the split is 1.2 MB as uint16: it was concatenated before
    direct = evaluate_tokens(model, whole, token_byte_lengths(dataset.tokenizer), stride=256, batch_size=64)
    assert (streamed.tokens, streamed.text_bytes) == (direct.tokens, direct.text_bytes) == (len(whole) - 1,
                                                                                            len(whole) - 1)
    assert streamed.loss == pytest.approx(direct.loss, rel=1e-9)


def test_dataset_split_is_scored_whole_and_matches_its_text(char_data):
    dataset = load_dataset(char_data)
    tokens = np.asarray(dataset.splits["val"][0])
    model = FixedLogits(torch.zeros(dataset.vocab_size), block_size=32)
    result = evaluate_lm(model, dataset.meta.tokenizer, char_data, split="val", batch_size=64)
    assert result.tokens == len(tokens) - 1
    assert result.text_bytes == len(dataset.tokenizer.decode(tokens[1:].tolist()).encode())
    with pytest.raises(GptError, match="no 'test' split"):
        evaluate_lm(model, dataset.meta.tokenizer, char_data, split="test")
    with pytest.raises(GptError, match="the data uses the char tokenizer, the checkpoint the byte one"):
        evaluate_lm(model, TokenizerSpec("byte"), char_data)
    other_chars = TokenizerSpec("char", dataset.meta.tokenizer.vocab.replace("a", "") + "\u00e9")
    with pytest.raises(GptError, match=r"different char vocabularies .* the data has 1 character \('a'\) that the "
                                       r"checkpoint lacks; the checkpoint has 1 character \('\u00e9'\) that the data "
                                       r"lacks; .* give the text file itself \(--data FILE\)"):
        evaluate_lm(model, other_chars, char_data)


def test_char_not_in_vocab_names_the_file(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("abz")
    with pytest.raises(GptError, match=r"t\.txt: character 'z'") as error:
        evaluate_lm(tiny(vocab=3), TokenizerSpec("char", "abc"), path)
    assert str(error.value).endswith(f"remove it from {path}, or evaluate a model whose data had it")  # no prompt


# ----------------------------------------------------------------------------- multiple choice

def favouring(char: str, boost: float = 3.0) -> FixedLogits:
    """A byte-level scripted model that prefers `char` after anything."""
    logits = torch.zeros(257)
    logits[ord(char)] = boost
    return FixedLogits(logits)


def write_task(path, items):
    path.write_text("".join(json.dumps(item) + "\n" for item in items), encoding="utf-8")
    return path


def test_choice_scoring_picks_what_the_model_favours_and_acc_norm_normalises_by_bytes(tmp_path):
    model = favouring("a")
    logp = torch.log_softmax(model.logits.detach(), dim=-1)
    # Item 1: "a" is favoured outright. Item 2: the long choice has the lower sum but the
    # higher log-probability per byte, so acc and acc_norm disagree.
    task = write_task(tmp_path / "t.jsonl", [{"context": "x", "choices": ["b", "a"], "label": 1},
                                             {"context": "x", "choices": ["b", "aaaaaa"], "label": 1}])
    result = evaluate_task(model, ByteTokenizer(), task, batch_size=3)
    short, long_ = (logp[32] + logp[98]).item(), (logp[32] + 6 * logp[97]).item()
    assert result.scores[0].logprobs == pytest.approx([short, (logp[32] + logp[97]).item()])
    assert result.scores[1].logprobs == pytest.approx([short, long_])
    assert result.scores[1].text_bytes == [2, 7]
    assert [s.prediction for s in result.scores] == [1, 0]
    assert [s.prediction_norm for s in result.scores] == [1, 1]
    assert (result.acc, result.acc_norm, result.chance) == (0.5, 1.0, 0.5)


def test_batched_scoring_equals_one_at_a_time_and_long_contexts_are_cropped_from_the_left():
    model = tiny("rope", vocab=30, block_size=16)
    rng = np.random.default_rng(0)
    requests = [(rng.integers(0, 30, size=n).tolist(), k) for n, k in [(5, 2), (17, 3), (9, 1), (13, 12), (3, 2)]]
    one_by_one = continuation_logprobs(model, requests, batch_size=1)
    assert continuation_logprobs(model, requests, batch_size=4) == pytest.approx(one_by_one, rel=1e-5, abs=1e-5)
    ids, k = requests[1]
    assert one_by_one[1] == pytest.approx(-token_losses(model, torch.tensor(ids))[-k:].sum().item(), rel=1e-5)

    tokenizer = CharTokenizer("abcdefgh \n")
    item = ChoiceItem(context="abcdefgh" * 4, choices=("ab", "hg"), label=0, line=1)
    cropped = choice_requests(item, item.context, tokenizer, 16, "t")
    assert [len(ids) for ids, _ in cropped] == [17, 17]
    assert cropped[0][0] == tokenizer.encode(("abcdefgh" * 4 + " ab")[-17:])


def test_a_task_result_counts_the_items_cropped_to_the_context(tmp_path):
    model = tiny("rope", vocab=30, block_size=16)
    tokenizer = CharTokenizer("abcdefgh \n")
    task = write_task(tmp_path / "t.jsonl", [{"context": "abcdefgh" * 4, "choices": ["ab", "hg"], "label": 0},
                                             {"context": "abc", "choices": ["ab", "hg"], "label": 1},
                                             {"context": "abcdefghab", "choices": ["abcdefg", "h"], "label": 1},
                                             {"context": "abcdefgh", "choices": ["abcdefgh", "h"], "label": 0}])
    result = evaluate_task(model, tokenizer, task)
    # 32 + 3 tokens and 10 + 8 (the choice " abcdefg") do not fit 16 + 1; 3 + 3 and 8 + 9 do.
    assert result.cropped == 2 and result.to_json()["cropped"] == 2
    assert evaluate_task(tiny("rope", vocab=30, block_size=64), tokenizer, task).cropped == 0


@pytest.mark.parametrize("context, choice, scored", [("Q: is it?", "yes", " yes"), ("a line\n", "next", "next"),
                                                     ("", "first", "first"), ("say", " hi", " hi")])
def test_choice_joins_its_context_by_one_space_unless_whitespace_is_there(context, choice, scored):
    assert continuation(context, choice) == scored


def test_gpt2_choice_keeps_its_leading_space_in_its_first_token():
    tokenizer = GPT2Tokenizer()
    item = ChoiceItem(context="The cat sat on the", choices=("mat",), label=0, line=1)
    [(ids, n)] = choice_requests(item, item.context, tokenizer, 64, "t")
    assert ids == tokenizer.encode("The cat sat on the mat") and tokenizer.decode(ids[-n:]) == " mat"


POOL = [ChoiceItem(context=f"question {i}", choices=("yes", "no"), label=i % 2, line=i + 1) for i in range(12)]


@pytest.mark.parametrize("index", range(12))
def test_few_shot_examples_never_include_the_item_and_repeat_with_the_seed(index):
    item = POOL[index]
    pool = POOL + [ChoiceItem(context=item.context, choices=item.choices, label=item.label, line=99)]  # a copy
    examples = few_shot_examples(item, pool, 5, seed=7, index=index)
    assert len(examples) == 5 and len(set(examples)) == 5
    assert all(ex.context != item.context for ex in examples)
    assert few_shot_examples(item, pool, 5, seed=7, index=index) == examples


def test_few_shot_draws_depend_on_the_seed_and_need_enough_items():
    draws = {seed: [few_shot_examples(item, POOL, 3, seed, i) for i, item in enumerate(POOL)] for seed in (1, 2)}
    assert draws[1] != draws[2]
    with pytest.raises(GptError, match="--shots 12 needs 12 examples"):
        few_shot_examples(POOL[0], POOL, 12, seed=0, index=0)


def test_few_shot_prompt_is_solved_examples_then_the_question_separated_by_blank_lines():
    examples = [ChoiceItem(context="2+2 =", choices=("4", "5"), label=0, line=1),
                ChoiceItem(context="Sky:\n", choices=("green", "blue"), label=1, line=2)]
    question = ChoiceItem(context="3+3 =", choices=("6", "7"), label=0, line=3)
    assert few_shot_prompt(question, examples) == "2+2 = 4\n\nSky:\nblue\n\n3+3 ="


@pytest.mark.parametrize("line, message", [
    ('{"choices": ["a", "b"], "label": 0}', "missing key 'context'"),
    ('{"context": "c", "choices": ["a", "b"], "label": 2}', "label 2 is not the index of one of the 2 choices"),
    ('{"context": "c", "choices": ["a", "b"], "label": true}', "label True is not the index"),
    ('{"context": "c", "choices": ["a", "b"]}', "missing key 'label'"),
    ('{"context": "c", "choices": [], "label": 0}', "\"choices\" must be a list of at least two texts"),
    ('{"context": "c", "choices": ["a"], "label": 0}', "\"choices\" must be a list of at least two texts"),
    ('{"context": "c", "choices": ["a", ""], "label": 0}', "every choice must be a non-empty string"),
    ('{"context": 3, "choices": ["a", "b"], "label": 0}', "\"context\" must be a string"),
    ('["c", ["a"], 0]', "not a JSON object"),
    ('{"context": "c", "choices": ["a"], "label": 0', "not valid JSON"),
])
def test_malformed_task_lines_give_one_line_naming_the_line_number(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"context": "c", "choices": ["a", "b"], "label": 0}\n\n' + line + "\n")
    with pytest.raises(GptError) as error:
        read_task(path)
    assert f"bad.jsonl:3: {message}" in str(error.value) and "\n" not in str(error.value)


def test_char_missing_from_the_vocabulary_names_the_task_line(tmp_path):
    task = write_task(tmp_path / "t.jsonl", [{"context": "ab\n", "choices": ["ba", "ab"], "label": 0},
                                             {"context": "ab\n", "choices": ["ba", "az"], "label": 0}])
    with pytest.raises(GptError, match=r"t\.jsonl:2: character 'z'") as error:
        evaluate_task(tiny(vocab=3), CharTokenizer("ab\n"), task)
    assert "prompt" not in str(error.value) and "remove it from that item" in str(error.value)


# ----------------------------------------------------------------------------- the command

@pytest.fixture
def char_checkpoint(tmp_path, char_data):
    dataset = load_dataset(char_data)
    torch.manual_seed(0)
    config = build_config({"model": {"preset": "tiny", "block_size": 32, "vocab_size": dataset.vocab_size},
                           "data": {"dir": str(char_data)}, "train": {"device": "cpu"}})
    return save_checkpoint(RunFolder(tmp_path / "run"), GPT(config.model), config, dataset.meta.tokenizer,
                           RunState(), {}, keep_last=1)


def test_eval_command_reports_lm_and_task_rows(cli, tmp_path, char_data, char_checkpoint):
    task = write_task(tmp_path / "lines.jsonl", [{"context": f"ROMEO:\nLine {letter}\n", "choices": ["Yes.", "No."],
                                                 "label": i % 2} for i, letter in enumerate("abcdef")])
    other = write_task(tmp_path / "more.jsonl", [{"context": name, "choices": ["Go.", "Stay."], "label": 0}
                                                 for name in ("KING:", "QUEEN:", "DUKE:")])
    details = tmp_path / "details.jsonl"
    code, out, err = cli("eval", char_checkpoint, "--data", char_data, "--max-tokens", "300", "--task", task,
                         "--task", other, "--shots", "1", "--json", "--details", details, "--device", "cpu")
    assert code == 0, err
    report = json.loads(out)
    assert report["lm"]["tokens"] == 300
    assert report["lm"]["perplexity"] == pytest.approx(math.exp(report["lm"]["loss"]))
    assert report["lm"]["bits_per_byte"] == pytest.approx(report["lm"]["loss"] * 300 / math.log(2)
                                                          / report["lm"]["bytes"])
    assert [(t["task"], t["items"], t["shots"], t["chance"]) for t in report["tasks"]] == [("lines", 6, 1, 0.5),
                                                                                           ("more", 3, 1, 0.5)]
    rows = [json.loads(line) for line in details.read_text().splitlines()]
    assert len(rows) == 9 and rows[0]["task"] == "lines" and len(rows[0]["logprobs"]) == 2
    code, out, _ = cli("eval", char_checkpoint, "--task", task, "--task", other, "--device", "cpu")
    assert code == 0 and [line.split()[0] for line in out.splitlines()[1:]] == ["lines", "more"]


@pytest.mark.parametrize("args, message", [
    ([], "nothing to evaluate"),
    (["--task", "nowhere.jsonl"], "cannot read task file nowhere.jsonl"),
    (["--data", "nowhere.txt"], "cannot read nowhere.txt"),
    (["--task", "a.jsonl", "--task", "b.jsonl", "--fewshot-file", "c.jsonl"], "give exactly one --task"),
    (["--data", "x.txt", "--stride", "0"], "--stride must be between 1"),
])
def test_eval_mistakes_are_one_line(cli, tmp_path, monkeypatch, char_checkpoint, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.txt").write_text("ROMEO: hello there\n")
    code, _, err = cli("eval", char_checkpoint, *args, "--device", "cpu")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- the shipped task

def load_make_tasks():
    spec = importlib.util.spec_from_file_location("make_tasks", REPO / "scripts" / "make_tasks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_tasks_builds_seeded_cloze_items():
    make_tasks = load_make_tasks()
    lines = [f"line number {i:03d} of the corpus" if i % 5 else "" for i in range(200)]
    items = make_tasks.build_items(lines, context_lines=3, distractors=3, items=20, min_chars=10, seed=4)
    assert items == make_tasks.build_items(lines, context_lines=3, distractors=3, items=20, min_chars=10, seed=4)
    assert len(items) == 20 and {item["label"] for item in items} != {items[0]["label"]}
    for item in items:
        answer = item["choices"][item["label"]]
        number = int(answer.split()[2])
        assert item["context"] == "\n".join(lines[number - 3:number]) + "\n"
        assert len(set(item["choices"])) == 4
        assert all(abs(int(c.split()[2]) - number) > 3 for c in item["choices"] if c != answer)


def test_make_tasks_control_shuffles_the_answers_words():
    make_tasks = load_make_tasks()
    lines = [f"word{i} and then some more words {i}" for i in range(30)]
    for item in make_tasks.build_items(lines, context_lines=2, distractors=3, items=5, min_chars=5, seed=0,
                                       shuffle_words=True):
        answer = item["choices"][item["label"]]
        assert len(set(item["choices"])) == 4
        assert all(sorted(c.split()) == sorted(answer.split()) for c in item["choices"])


@pytest.mark.parametrize("name", ["shakespeare_next_line", "shakespeare_shuffled_words"])
def test_shipped_tasks_come_from_the_validation_part_only(name):
    make_tasks = load_make_tasks()
    val = make_tasks.corpus_text(SHAKESPEARE, "val", 0.1)
    full = SHAKESPEARE.read_text(encoding="utf-8")
    assert full.endswith(val) and 0.09 < len(val) / len(full) < 0.11
    items = read_task(REPO / "tasks" / f"{name}.jsonl")
    val_lines = set(val.splitlines())
    assert len(items) >= 200
    for item in items:
        assert item.context + item.answer + "\n" in val
        if name == "shakespeare_next_line":
            assert all(choice in val_lines for choice in item.choices)
