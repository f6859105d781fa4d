import contextlib
import json
import random
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, tiny_config
from safetensors.torch import load_file

from gpt.checkpoint import read_checkpoint
from gpt.config import apply_overrides, build_config, to_dict
from gpt.data.tokenizer import CharTokenizer
from gpt.errors import GptError
from gpt.inference.sample import pick_tokens
from gpt.model import GPT
from gpt.tasks.framing import Example, collate, crop, encode_items, task_sampler
from gpt.tasks.items import item_from_record, label_names, read_task_file
from gpt.tasks.model import TaskHead, TaskModel
from gpt.training import distributed
from gpt.training.loop import train
from gpt.training.metrics import read_metrics
from gpt.training.trainer import build_trainer

# A char tokenizer over "abcdefgh": a=0 ... h=7, so start=8, delim=9, extract=10.
CHARS = CharTokenizer("abcdefgh")
S, D, E = 8, 9, 10


@pytest.mark.parametrize("kind, record, rows", [
    ("classify", {"text": "abc"}, [[S, 0, 1, 2, E]]),
    ("entail", {"premise": "ab", "hypothesis": "c"}, [[S, 0, 1, D, 2, E]]),
    ("similar", {"text_a": "ab", "text_b": "c"}, [[S, 0, 1, D, 2, E], [S, 2, D, 0, 1, E]]),
    ("choice", {"context": "ab", "choices": ["c", "de"]}, [[S, 0, 1, D, 2, E], [S, 0, 1, D, 3, 4, E]]),
])
def test_each_input_transformation_builds_the_documented_rows(kind, record, rows):
    item = item_from_record(record, kind, "test")
    names = ["0", "1"] if kind == "choice" else ["x"]
    [example] = encode_items([item], names, CHARS, block_size=16, labelled=False)
    assert example.rows == rows and not example.cropped


@pytest.mark.parametrize("first, second, room, kept", [
    (5, 2, 7, (5, 2)),     # fits
    (10, 2, 6, (4, 2)),    # the first text loses its start, the second stays whole
    (2, 10, 6, (2, 4)),    # a long second part keeps its start and leaves the first whole
    (10, 10, 6, (3, 3)),   # both long: the second keeps half the room
    (10, 0, 6, (6, 0)),    # classification: the end of the text
])
def test_crop_keeps_the_end_of_the_first_text_and_the_start_of_the_second(first, second, room, kept):
    a, b = list(range(first)), list(range(100, 100 + second))
    got_a, got_b = crop(a, b, room)
    assert (len(got_a), len(got_b)) == kept
    assert got_a == a[len(a) - kept[0]:] and got_b == b[:kept[1]]


def test_cropped_items_are_counted():
    items = [item_from_record({"premise": "abcdefgh" * 3, "hypothesis": "ab"}, "entail", "t"),
             item_from_record({"premise": "ab", "hypothesis": "cd"}, "entail", "t")]
    examples = encode_items(items, ["x"], CHARS, block_size=8, labelled=False)
    assert [e.cropped for e in examples] == [True, False]
    assert examples[0].rows == [[S, 5, 6, 7, D, 0, 1, E]]  # "...fgh", delim, the whole "ab"


def test_collate_pads_on_the_right_and_masks_specials_padding_and_missing_choices():
    short = Example(rows=[[S, 0, D, 1, E], [S, 0, D, 2, 3, E]], label=1, cropped=False)
    longer = Example(rows=[[S, 0, D, 1, E], [S, 0, D, 2, E], [S, 0, D, 3, E]], label=0, cropped=False)
    ids, targets, extract, labels = collate([short, longer], text_vocab=S)
    assert ids.shape == (6, 6) and labels.tolist() == [1, 0]
    assert ids[1].tolist() == [S, 0, D, 2, 3, E] and ids[0].tolist() == [S, 0, D, 1, E, 0]
    assert targets[0].tolist() == [0, -1, 1, -1, -1, -1]  # delim, extract and padding are not LM targets
    assert extract.tolist() == [4, 5, -1, 4, 4, 4]  # item 0 has no third choice


def _tiny_task_model(kind: str, labels: int = 3, lm_weight: float = 0.5, tie: bool = True) -> TaskModel:
    torch.manual_seed(0)
    config = build_config({"model": {"preset": "tiny", "vocab_size": CHARS.vocab_size + 3, "block_size": 16,
                                     "tie_embeddings": tie}}).model
    gpt = GPT(config)
    return TaskModel(gpt, TaskHead(kind, config.n_embd, labels, dropout=0.1), lm_weight).eval()


def _batch(kind, records):
    items = [item_from_record(r, kind, "t") for r in records]
    names = label_names(items, kind, "t") if kind == "choice" else ["x", "y", "z"]
    return collate(encode_items(items, names, CHARS, 16, labelled=False), text_vocab=CHARS.vocab_size)


def test_similarity_head_is_symmetric_in_its_two_texts():
    model = _tiny_task_model("similar")
    ab = _batch("similar", [{"text_a": "abc", "text_b": "hhgd"}])
    ba = _batch("similar", [{"text_a": "hhgd", "text_b": "abc"}])
    torch.testing.assert_close(model.logits(ab[0], ab[2], 1), model.logits(ba[0], ba[2], 1))
    states = model.gpt.hidden_states(ab[0], None)
    assert not torch.allclose(states[0, ab[2][0]], states[1, ab[2][1]])  # the two orders read differently


def test_multiple_choice_softmax_runs_over_the_choices_of_one_item():
    model = _tiny_task_model("choice")
    records = [{"context": "abc", "choices": ["d", "ee", "f"], "label": 2},
               {"context": "gh", "choices": ["a", "b"], "label": 0}]
    ids, targets, extract, labels = _batch("choice", records)
    logits, loss = model(ids, targets, extract, labels)
    probs = torch.softmax(logits, dim=-1)
    assert logits.shape == (2, 3) and probs[1, 2] == 0  # item 1 has two choices
    torch.testing.assert_close(probs.sum(-1), torch.ones(2))
    changed = _batch("choice", [records[0], {**records[1], "choices": ["h", "g"]}])
    torch.testing.assert_close(torch.softmax(model.logits(changed[0], changed[2], 2), -1)[0], probs[0])
    task_loss = -(torch.log(probs[0, 2]) + torch.log(probs[1, 0])) / 2
    lm_logits = model.gpt.lm_head(model.gpt.hidden_states(ids, None))
    lm_loss = F.cross_entropy(lm_logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
    torch.testing.assert_close(loss, task_loss + 0.5 * lm_loss)


@pytest.mark.parametrize("lm_weight", [0.0, 0.5])
def test_lm_weight_zero_leaves_the_lm_loss_out_of_the_gradient(lm_weight):
    model = _tiny_task_model("classify", lm_weight=lm_weight, tie=False).train()
    model.head.dropout.p = 0.0
    ids, targets, extract, labels = _batch("classify", [{"text": "abc"}, {"text": "hg"}])
    labels = torch.tensor([0, 2])
    logits, loss = model(ids, targets, extract, labels)
    loss.backward()
    lm_head_grad = model.gpt.lm_head.weight.grad
    if lm_weight == 0:
        assert lm_head_grad is None and torch.equal(loss, F.cross_entropy(logits, labels))
    else:
        assert lm_head_grad is not None and lm_head_grad.abs().sum() > 0
        assert loss > F.cross_entropy(logits, labels)


def test_task_sampler_resumes_at_the_same_batch_across_epochs():
    examples = [Example(rows=[[S, i % 8, E]], label=i % 2, cropped=False) for i in range(10)]
    sampler = task_sampler(examples, batch_size=4, text_vocab=S, seed=[1, 0, 0])
    for _ in range(2):
        sampler.next_batch()
    state = sampler.state_dict()
    expected = [sampler.next_batch() for _ in range(4)]  # crosses two epoch boundaries
    other = task_sampler(examples, batch_size=4, text_vocab=S, seed=[9])
    other.load_state_dict(state)
    for want, got in zip(expected, (other.next_batch() for _ in range(4))):
        assert all(torch.equal(a, b) for a, b in zip(want, got))


def test_task_sampler_batches_items_of_similar_length_in_random_order():
    examples = [Example(rows=[[S] + [1] * n + [E]], label=0, cropped=False) for n in range(64)]
    sampler = task_sampler(examples, batch_size=4, text_vocab=S, seed=0)
    lengths = [(sampler.next_batch()[0] != 0).sum(1) for _ in range(16)]  # one epoch: a window of its own
    assert sorted(int(n.min()) for n in lengths) == list(range(2, 66, 4))  # lengths 4k+2 .. 4k+5 together
    assert all(int(n.max() - n.min()) == 3 for n in lengths)
    assert [int(n.min()) for n in lengths] != sorted(int(n.min()) for n in lengths)  # in random order


def test_task_batches_under_torchrun_are_disjoint_rows_of_the_one_process_batch():
    """N ranks with batch b read, step by step, exactly the items one process reads with batch N x b
    (each item once an epoch across the ranks), as language modelling does."""
    examples = [Example(rows=[[S] + [i % 8] * (1 + i % 13) + [E]], label=i % 2, cropped=False) for i in range(50)]

    def items(batch):  # an item is recognised by its row (first token after start, length)
        ids = batch[0]
        return sorted((int(row[1]), int((row != 0).sum())) for row in ids)

    single = task_sampler(examples, batch_size=6, text_vocab=S, seed=[3, 0])
    ranks = [task_sampler(examples, batch_size=3, text_vocab=S, seed=[3, 0], rank=r, world_size=2) for r in (0, 1)]
    for _ in range(20):  # more than two epochs
        want = items(single.next_batch())
        got = [items(sampler.next_batch()) for sampler in ranks]
        assert sorted(got[0] + got[1]) == want
        assert len(got[0]) == len(got[1]) == 3


def test_labels_from_the_data_sort_numbers_numerically(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"text_a": "a", "text_b": "b", "label": n}) + "\n" for n in (10, 2, 9, 2)))
    assert label_names(read_task_file(path, "similar"), "similar", path) == ["2", "9", "10"]


@pytest.mark.parametrize("line, message", [
    ('{"text": "abc"', "t.jsonl:2: not valid JSON"),
    ('{"txt": "abc", "label": "x"}', "t.jsonl:2: missing key 'text'"),
    ('{"text": "  ", "label": "x"}', "t.jsonl:2: empty or non-text field"),
    ('{"text": "abc", "label": "nope"}', "t.jsonl:2: unknown label 'nope'"),
    ('{"text": "abc"}', "t.jsonl:2: missing key 'label'"),
    ('{"text": "abc", "label": true}', "t.jsonl:2: label True must be"),
    ('{"text": "abz", "label": "x"}', "t.jsonl:2: character 'z'"),
], ids=["json", "key", "empty", "unknown-label", "no-label", "bool-label", "char"])
def test_a_bad_row_gives_one_line_with_its_line_number(tmp_path, line, message):
    path = tmp_path / "t.jsonl"
    path.write_text('{"text": "ab", "label": "x"}\n' + line + "\n")
    with pytest.raises(GptError, match=message) as info:
        encode_items(read_task_file(path, "classify"), ["x", "y"], CHARS, 16)
    assert "\n" not in str(info.value)


def test_a_choice_label_must_index_a_choice():
    with pytest.raises(GptError, match="label 2 is not the index of one of the 2 choices"):
        item_from_record({"context": "a", "choices": ["b", "c"], "label": 2}, "choice", "f:1")


@pytest.mark.parametrize("task, message", [
    ({"kind": "classify"}, "task.train is not set"),
    ({"kind": "choice", "train": "t.jsonl", "labels": ["a", "b"]}, "task.labels is not used"),
    ({"kind": "classify", "train": "t.jsonl", "labels": ["a", "b", "a"]}, "task.labels names 'a' twice"),
    ({"kind": "classify", "train": "t.jsonl", "labels": ["a"]}, "at least two labels"),
    ({"kind": "regress", "train": "t.jsonl"}, "expected classify | entail | similar | choice or null"),
    ({"kind": "classify", "train": "t.jsonl", "lm_weight": -1}, "task.lm_weight must be >= 0"),
])
def test_task_config_is_validated(task, message):
    with pytest.raises(GptError, match=message):
        build_config({"task": task})


# ----------------------------------------------------------------------------- training runs

def _synthetic(kind: str, rng: random.Random) -> dict:
    """Items a tiny model learns in seconds: which letter repeats, or whether two texts repeat
    the same letter."""
    if kind == "classify":
        letter = rng.choice("abc")
        text = [letter] * rng.randint(3, 6)
        text.insert(rng.randrange(len(text)), rng.choice("xyz"))
        return {"text": "".join(text), "label": letter}
    a, b = rng.choice("ab"), rng.choice("ab")
    if kind == "entail":
        return {"premise": a * rng.randint(2, 5), "hypothesis": b * rng.randint(2, 5),
                "label": "entail" if a == b else "contradict"}
    if kind == "similar":
        return {"text_a": a * rng.randint(2, 5), "text_b": b * rng.randint(2, 5), "label": int(a == b)}
    context, order = rng.choice("abc"), rng.sample("abc", 3)
    return {"context": context * rng.randint(2, 5), "choices": [c * rng.randint(1, 2) for c in order],
            "label": order.index(context)}


def task_config(char_data, tmp_path, kind: str, **train):
    """A tiny model fine-tuned from scratch on a synthetic task (tokenizer from char_data)."""
    rng = random.Random(0)
    files = {}
    for split, count in (("train", 400), ("val", 100)):
        files[split] = tmp_path / f"{kind}_{split}.jsonl"
        files[split].write_text("".join(json.dumps(_synthetic(kind, rng)) + "\n" for _ in range(count)))
    settings = dict(out_dir=str(tmp_path / f"run_{kind}"), device="cpu", batch_size=16, max_iters=60, lr=3e-3,
                    min_lr=3e-4, warmup_iters=10, eval_interval=30, eval_iters=2, ckpt_interval=30, log_interval=10,
                    compile=False)
    settings.update(train)
    return build_config({"model": {"preset": "tiny", "block_size": 32, "dropout": 0.1}, "data": {"dir": str(char_data)},
                         "train": settings, "task": {"kind": kind, "train": str(files["train"]),
                                                     "val": str(files["val"])}})


@pytest.fixture(scope="module")
def task_run(char_data, tmp_path_factory):
    """Train (once per module and kind) a tiny model on a synthetic task; returns its run folder."""
    runs = {}

    def run(kind: str):
        if kind not in runs:
            folder = tmp_path_factory.mktemp(kind)
            assert train(task_config(char_data, folder, kind)) == 0
            runs[kind] = folder / f"run_{kind}"
        return runs[kind]

    return run


def test_language_model_training_from_a_task_model_is_refused_with_the_reason(task_run, char_data, tmp_path):
    config = build_config({"model": {"preset": "tiny", "block_size": 32}, "data": {"dir": str(char_data)},
                           "train": {"out_dir": str(tmp_path / "lm"), "device": "cpu", "max_iters": 2,
                                     "init_from": str(task_run("classify"))}})
    with pytest.raises(GptError, match="is a task model .it has a task head, and its vocabulary has 3 special tokens.; "
                                       "start from the language model it was fine-tuned from"):
        train(config)
    assert not (tmp_path / "lm").exists()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["classify", "entail", "similar", "choice"])
def test_a_tiny_model_learns_a_synthetic_task_of_each_kind(task_run, kind):
    state = read_checkpoint(task_run(kind)).state
    assert state.accuracy["val"] >= 0.95
    assert read_checkpoint(task_run(kind) / "best").state.accuracy["val"] == state.best_val_acc


def test_resume_of_a_task_run_is_bitwise_identical(char_data, tmp_path):
    straight = task_config(char_data, tmp_path, "entail", max_iters=12, eval_interval=4, ckpt_interval=4,
                           log_interval=1)
    assert train(straight) == 0
    split = build_config(apply_overrides(to_dict(straight), [f"train.out_dir={tmp_path / 'split'}",
                                                             "train.max_iters=8"]))
    assert train(split) == 0
    assert train(build_config(apply_overrides(to_dict(split), ["train.max_iters=12"])), resume=True) == 0
    logged = ("iter", "tokens", "loss", "grad_norm", "eval_train_loss", "val_loss", "train_acc", "val_acc")
    rows = [[{k: r[k] for k in logged} for r in read_metrics(folder / "metrics.csv")]
            for folder in (tmp_path / "run_entail", tmp_path / "split")]
    assert len(rows[0]) == 12 and rows[0] == rows[1]
    weights = [load_file(str(read_checkpoint(folder).path / "model.safetensors"))
               for folder in (tmp_path / "run_entail", tmp_path / "split")]
    assert any(k.startswith("head.") for k in weights[0])
    assert weights[0].keys() == weights[1].keys() and all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_init_from_a_language_model_appends_special_rows_and_a_fresh_head(char_data, tmp_path):
    train(tiny_config(char_data, tmp_path / "base", max_iters=2))
    base = read_checkpoint(tmp_path / "base")
    config = task_config(char_data, tmp_path, "classify", max_iters=2)
    config = build_config(apply_overrides(to_dict(config), [f"train.init_from={tmp_path / 'base'}"]))
    with contextlib.ExitStack() as hold:
        trainer, _ = build_trainer(config, resume=False, overwrite=False, dist=distributed.Dist(), hold=hold)
    vocab = base.config.model.vocab_size
    source = load_file(str(base.path / "model.safetensors"))
    wte = trainer.model.wte.weight.detach()
    assert wte.shape[0] == vocab + 3 and torch.equal(wte[:vocab], source["wte.weight"])
    assert 0.005 < wte[vocab:].std() < 0.05  # the new rows are initialised like the others
    assert trainer.model.lm_head.weight is trainer.model.wte.weight
    assert trainer.head.linear.out_features == 3
    rest = [k for k in source if k != "wte.weight"]
    assert rest and all(torch.equal(trainer.model.state_dict()[k], source[k]) for k in rest)


def test_classify_on_a_language_model_says_it_has_no_task_head(char_data, tmp_path, cli):
    train(tiny_config(char_data, tmp_path / "lm", max_iters=2))
    code, _, err = cli("classify", tmp_path / "lm", "--text", "abc")
    assert code == 2 and "has no task head" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_classify_prints_label_probabilities_and_a_confusion_matrix(task_run, cli, capsys, tmp_path):
    run = task_run("classify")
    capsys.readouterr()  # the training log, if the run was trained just now
    code, out, err = cli("classify", run, "--text", "bbxbb")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "b" and lines[1].split()[0] == "b" and len(lines) == 4
    code, out, _ = cli("classify", run, "--text", "ccc", "--json")
    result = json.loads(out)
    assert result["label"] == "c" and sum(result["probs"].values()) == pytest.approx(1, abs=1e-5)
    code, out, _ = cli("classify", run, "--file", run.parent / "classify_val.jsonl")
    assert code == 0 and out.startswith("accuracy 1.0000 (100/100)") and "confusion matrix" in out
    code, out, _ = cli("classify", run, "--file", run.parent / "classify_val.jsonl", "--json")
    summary = json.loads(out)
    assert summary["labels"] == ["a", "b", "c"] and sum(map(sum, summary["confusion"])) == 100
    code, _, err = cli("classify", run, "--premise", "a", "--hypothesis", "b")
    assert code == 2 and "fine-tuned for classify and does not read --hypothesis: give --text, or --file" in err
    code, _, err = cli("classify", run, "--text", "aaa", "--premise", "b")
    assert code == 2 and "does not read --premise" in err
    code, _, err = cli("classify", run, "--text", "")
    assert code == 2 and err.strip() == "error: --text is empty; give it some text"
    code, _, err = cli("classify", run)
    assert code == 2 and "fine-tuned for classify: give --text, or --file" in err


@pytest.mark.slow
def test_a_task_checkpoint_still_samples_text_and_info_shows_the_task(task_run, cli, capsys):
    run = task_run("classify")
    capsys.readouterr()  # the training log, if the run was trained just now
    code, out, err = cli("sample", run, "--prompt", "ab", "--max-new-tokens", "20", "--seed", "1", "--json")
    assert code == 0, err
    assert json.loads(out)["tokens"] == 20 and len(json.loads(out)["text"]) == 20
    v = read_checkpoint(run).tokenizer.vocab_size
    code, out, _ = cli("info", run)
    assert code == 0 and f"task: classify, labels a, b, c; special tokens start={v} delim={v + 1} extract={v + 2}" \
        in out


def test_exporting_a_task_run_to_hugging_face_says_the_head_is_left_out(char_data, tmp_path, cli):
    assert train(task_config(char_data, tmp_path, "classify", max_iters=1, eval_interval=1)) == 0
    code, out, err = cli("convert", "to-hf", tmp_path / "run_classify", tmp_path / "hf")
    assert code == 0 and f"wrote {tmp_path / 'hf'}" in out
    assert "is a classify task model: Hugging Face GPT-2 has no place for its task head" in err
    assert "the export holds its language model only" in err


def test_the_sampler_never_picks_special_tokens():
    logits = torch.tensor([[0.0, 1.0, 9.0, 9.0, 9.0]])  # ids 2..4 stand for special tokens
    generator = torch.Generator().manual_seed(0)
    assert pick_tokens(logits, 0.0, None, 1.0, None, vocab_size=2).item() == 1
    picked = {pick_tokens(logits, 1.5, None, 1.0, generator, vocab_size=2).item() for _ in range(200)}
    assert picked == {0, 1}


def test_speaker_recipe_never_shares_a_speech_between_train_and_val(tmp_path):
    result = subprocess.run([sys.executable, "scripts/speaker_task.py", "--speakers", "5", "--out", str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    train_items, val_items = ([json.loads(line) for line in (tmp_path / f"{split}.jsonl").read_text().splitlines()]
                              for split in ("train", "val"))
    assert not {item["text"] for item in train_items} & {item["text"] for item in val_items}
    labels = {item["label"] for item in train_items}
    assert len(labels) == 5 and {item["label"] for item in val_items} == labels
    assert all(item["text"].strip() and not item["text"].startswith(item["label"] + ":") for item in train_items)
