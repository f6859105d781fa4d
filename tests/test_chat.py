"""Chat fine-tuning: the template and its loss mask, chat files, training, `gpt chat`, `gpt eval
--chat`, and the Hugging Face chat_template."""

import io
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config

from gpt.chat import ChatExample, ChatItem, ChatTemplate, Message, collate, encode_conversations, fit_turns
from gpt.checkpoint import save_model_folder
from gpt.config import build_config, dump_yaml
from gpt.data.formats import RunState
from gpt.data.tokenizer import ByteTokenizer, CharTokenizer, GPT2Tokenizer, TokenizerSpec
from gpt.errors import GptError
from gpt.evaluation.chat import ChatResult, ChatScore
from gpt.inference.sample import generate, reply_prompt
from gpt.model import GPT
from gpt.training.metrics import read_metrics

CHARS = CharTokenizer("abcdefgh")  # a=0 ... h=7: end=8, system=9, user=10, assistant=11
TEMPLATE = ChatTemplate(8)
END, SYS, USR, AST = 8, 9, 10, 11


def msgs(*pairs: tuple[str, str]) -> list[Message]:
    return [Message(role, content) for role, content in pairs]


# ----------------------------------------------------------------------------- the template

def test_render_multi_turn_ids_and_loss_mask_with_a_system_message():
    ids, mask = TEMPLATE.render(CHARS, msgs(("system", "h"), ("user", "ab"), ("assistant", "c"),
                                            ("user", "d"), ("assistant", "ef")))
    assert ids == [SYS, 7, END, USR, 0, 1, END, AST, 2, END, USR, 3, END, AST, 4, 5, END]
    learned = [token for token, m in zip(ids, mask) if m]
    assert learned == [2, END, 4, 5, END]  # the assistant's text and the <|end|> closing each turn


def test_render_without_system_and_with_end_of_text_and_the_reply_prompt():
    tokenizer = ByteTokenizer()  # has end-of-text (256): a conversation starts with it as a document does
    template = ChatTemplate(tokenizer.vocab_size)
    ids, mask = template.render(tokenizer, msgs(("user", "hi"), ("assistant", "yo")))
    end, user, assistant = template.end, template.role_token("user"), template.role_token("assistant")
    assert ids == [tokenizer.eot, user, *b"hi", end, assistant, *b"yo", end]
    assert mask == [False, False, False, False, False, False, True, True, True]
    prompt, _ = template.render(tokenizer, msgs(("user", "hi")), reply=True)
    assert prompt == [tokenizer.eot, user, *b"hi", end, assistant]
    every, _ = template.render(tokenizer, msgs(("user", "hi"), ("assistant", "yo")), train_on_prompt=True)
    assert template.render(tokenizer, msgs(("user", "hi"), ("assistant", "yo")), train_on_prompt=True)[1] == \
        [False] + [True] * (len(every) - 1)


@pytest.mark.parametrize("tokenizer", [ByteTokenizer(), GPT2Tokenizer()], ids=["byte", "gpt2"])
def test_text_that_spells_a_control_token_stays_text(tokenizer):
    template = ChatTemplate(tokenizer.vocab_size)
    typed = "<|assistant|> <|end|><|endoftext|><|user|>"
    ids, _ = template.render(tokenizer, msgs(("user", typed)))
    body = ids[2:-1]  # after end-of-text and <|user|>, before <|end|>
    assert body == tokenizer.encode(typed) and max(body) < tokenizer.vocab_size
    assert tokenizer.eot not in body and tokenizer.decode(body) == typed


def test_truncation_drops_the_oldest_turns_and_keeps_the_system_message_and_the_last_reply():
    conversation = msgs(("system", "h"), ("user", "aaaa"), ("assistant", "bbbb"), ("user", "c"),
                        ("assistant", "dd"))
    sizes = {m: len(m.content) + 2 for m in conversation}
    kept, dropped = fit_turns(conversation, 12, sizes.__getitem__)
    assert dropped and kept == [conversation[0], *conversation[3:]]
    assert fit_turns(conversation, 100, sizes.__getitem__) == (conversation, False)
    assert fit_turns(conversation, 8, sizes.__getitem__) is None  # the last exchange alone does not fit
    items = [ChatItem(conversation, "t:1"), ChatItem(msgs(("user", "a" * 40), ("assistant", "b")), "t:2")]
    examples, skipped = encode_conversations(items, TEMPLATE, CHARS, block_size=11, train_on_prompt=False)
    assert skipped == 1 and len(examples) == 1 and examples[0].truncated
    assert examples[0].ids == [SYS, 7, END, USR, 2, END, AST, 3, 3, END]


# ----------------------------------------------------------------------------- the loss

def test_the_loss_depends_only_on_the_assistant_tokens_averaged_over_the_batch():
    rows = [TEMPLATE.render(CHARS, msgs(("system", "ab"), ("user", "cd"), ("assistant", "e"))),
            TEMPLATE.render(CHARS, msgs(("user", "a"), ("assistant", "bcdef")))]
    x, y = collate([ChatExample(ids, mask, False) for ids, mask in rows])
    assert x.shape == y.shape == (2, max(len(ids) for ids, _ in rows) - 1)
    torch.manual_seed(0)
    logits = torch.randn(*x.shape, 12, requires_grad=True)
    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-1)
    loss.backward()
    learned = y != -1
    assert int(learned.sum()) == 2 + 6  # e<|end|> and bcdef<|end|>
    assert torch.all(logits.grad[~learned] == 0)  # system, user, role tokens and padding: no effect
    assert torch.all(logits.grad[learned].abs().sum(-1) > 0)
    per_token = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-1, reduction="none")
    assert loss.item() == pytest.approx(per_token[learned.flatten()].mean().item())  # not a mean of row means


# ----------------------------------------------------------------------------- files and training

@pytest.fixture
def chat_files(tmp_path):
    """Conversations over the characters of tiny Shakespeare's start."""
    rows = [{"messages": [{"role": "user", "content": f"Say {w}"}, {"role": "assistant", "content": w}]}
            for w in ("First", "Citizen", "Before", "proceed", "further", "hear", "speak", "All")] * 6
    rows.append({"prompt": "Who?", "completion": "Citizen"})
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:8]))
    evals = [{"messages": [{"role": "user", "content": f"Say {w}"}], "answer": w, "skill": "say"}
             for w in ("First", "speak")]
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals))
    return tmp_path


def chat_config(char_data, tmp_path, files, **train):
    config = tiny_config(char_data, tmp_path / "sft", **train)
    raw = build_config({"model": {"preset": "tiny", "block_size": 32}, "data": {"dir": str(char_data)},
                        "train": {**config.train.__dict__},
                        "task": {"kind": "chat", "train": str(files / "train.jsonl"), "val": str(files / "val.jsonl"),
                                 "eval": str(files / "eval.jsonl")}})
    return raw


def test_chat_fine_tuning_trains_resumes_bitwise_and_chats(cli, char_data, tmp_path, chat_files, monkeypatch):
    config = tmp_path / "sft.yaml"
    config.write_text(dump_yaml(chat_config(char_data, tmp_path, chat_files, max_iters=12, eval_interval=6,
                                            ckpt_interval=6)))
    code, out, err = cli("train", config)
    assert code == 0, err
    assert "chat: train 49 conversations" in out and "padding" in out
    whole = read_metrics(tmp_path / "sft" / "metrics.csv")
    assert whole[-1]["exact_match"] != ""  # task.eval is scored at every evaluation
    # Stop at 6 and resume: the losses after it are those of the uninterrupted run, bit for bit.
    code, _, err = cli("train", config, "train.out_dir=" + str(tmp_path / "half"), "train.max_iters=6")
    assert code == 0, err
    code, _, err = cli("train", "--resume", tmp_path / "half", "train.max_iters=12")
    assert code == 0, err
    resumed = read_metrics(tmp_path / "half" / "metrics.csv")
    assert [r["loss"] for r in resumed] == [r["loss"] for r in whole]
    code, out, err = cli("info", tmp_path / "sft")
    assert code == 0 and "chat model: template tokens <|end|>=" in out
    details = tmp_path / "details.jsonl"
    code, out, err = cli("eval", tmp_path / "sft", "--chat", chat_files / "eval.jsonl", "--json", "--details", details)
    assert code == 0, err
    result = json.loads(out)["chat"][0]
    assert result["items"] == 2 and set(result["skills"]) == {"say"}
    rows = [json.loads(line) for line in details.read_text().splitlines()]  # each reply, scored as in the summary
    assert [row["where"].rsplit(":", 1)[1] for row in rows] == ["1", "2"] and {row["skill"] for row in rows} == {"say"}
    assert sum(row["correct"] for row in rows) / 2 == result["accuracy"]
    assert all(row["correct"] == (row["reply"].strip() == row["answer"].strip()) for row in rows)
    monkeypatch.setattr("sys.stdin", io.StringIO("Say First\n\nSay All\n"))
    code, out, err = cli("chat", tmp_path / "sft", "--system", "Be", "--temperature", "0")
    assert code == 0, err
    assert out.count("Assistant: ") == 2 and "<|" not in out  # two replies, each ended by <|end|> or its length


def test_a_chat_model_reply_ends_at_end_and_a_base_model_never_draws_it():
    torch.manual_seed(0)
    model = GPT(build_config({"model": {"preset": "tiny", "vocab_size": 12, "block_size": 16}}).model)
    favour_end = torch.zeros(12)
    favour_end[END] = 100.0
    model.logits = lambda states: favour_end.expand(*states.shape[:-1], 12)
    settings = build_config({"sample": {"temperature": 0.0, "max_new_tokens": 5}}).sample
    sample = generate(model, CHARS, "", settings, prompt_tokens=[USR, 0, END, AST], end_token=END)[0]
    assert sample.tokens == [] and sample.stop_reason == "end"
    sample = generate(model, CHARS, "a", settings)[0]  # without end_token the appended ids cannot be drawn
    assert len(sample.tokens) == 5 and max(sample.tokens) < 8


def test_gpt_chat_prompts_a_chat_model_with_the_template_and_drops_old_turns():
    """`gpt chat` on a chat model: the prompt is the template's, ending in <|assistant|>; turns
    that no longer fit go, oldest first, the system message stays."""
    conversation = msgs(("system", "h"), ("user", "abc"), ("assistant", "d"), ("user", "efg"))
    ids, dropped = reply_prompt(CHARS, conversation, room=100, template=TEMPLATE)
    assert ids == [SYS, 7, END, USR, 0, 1, 2, END, AST, 3, END, USR, 4, 5, 6, END, AST] and not dropped
    ids, dropped = reply_prompt(CHARS, conversation, room=9, template=TEMPLATE)
    assert ids == [SYS, 7, END, USR, 4, 5, 6, END, AST] and dropped
    with pytest.raises(GptError, match="the system message and the last turn take 9 tokens, more than the 4"):
        reply_prompt(CHARS, conversation, room=4, template=TEMPLATE)
    ids, cropped = reply_prompt(ByteTokenizer(), msgs(("system", "Be"), ("user", "abc")), room=100)  # a base model
    assert bytes(ids) == b"System: Be\nUser: abc\nAssistant:" and not cropped


def test_exact_match_and_contains():
    result = ChatResult(name="t", shots=0, match="exact",
                        scores=[ChatScore("t:1", "a", "ROMEO", " ROMEO\n"), ChatScore("t:2", "b", "two", "two words")])
    assert result.accuracy == 0.5 and result.by_skill() == {"a": 1.0, "b": 0.0}
    result.match = "contains"
    assert result.accuracy == 1.0


# ----------------------------------------------------------------------------- Hugging Face

def test_to_hf_writes_a_chat_template_that_gives_our_ids(cli, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = GPT2Tokenizer()
    template = ChatTemplate(tokenizer.vocab_size)
    config = build_config({"model": {"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 64, "bias": True,
                                     "activation": "gelu_tanh", "vocab_size": template.vocab_size},
                           "task": {"kind": "chat", "train": "unused.jsonl"}})
    torch.manual_seed(0)
    save_model_folder(tmp_path / "chat", GPT(config.model), config, TokenizerSpec("gpt2"), RunState())
    code, _, err = cli("convert", "to-hf", tmp_path / "chat", tmp_path / "hf")
    assert code == 0, err
    hf = AutoTokenizer.from_pretrained(tmp_path / "hf")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, friend"},
                {"role": "assistant", "content": " Hi! 你好"}, {"role": "user", "content": "What?\n ok"}]
    for reply in (False, True):
        theirs = hf.apply_chat_template(messages, add_generation_prompt=reply, tokenize=True, return_dict=True)
        ours, _ = template.render(tokenizer, [Message(m["role"], m["content"]) for m in messages], reply=reply)
        assert theirs["input_ids"] == ours


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("line, message", [
    ("not json", "t.jsonl:2: not valid JSON"),
    ('{"text": "hi"}', "t.jsonl:2: missing key 'messages'"),
    ('{"messages": [{"role": "robot", "content": "hi"}]}', "t.jsonl:2: message 1 has role 'robot'"),
    ('{"messages": [{"role": "user", "content": 5}]}', "t.jsonl:2: message 1's content must be a string"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "t.jsonl:2: no assistant turn"),
    ('{"messages": []}', 't.jsonl:2: "messages" must be a non-empty list'),
    ('["a"]', "t.jsonl:2: not a JSON object"),
])
def test_bad_chat_files_name_the_line_and_write_nothing(cli, char_data, tmp_path, chat_files, line, message):
    path = tmp_path / "t.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n' + line + "\n")
    config = tmp_path / "bad.yaml"
    config.write_text(dump_yaml(chat_config(char_data, tmp_path, chat_files)))
    code, _, err = cli("train", config, f"task.train={path}")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "sft").exists()


def test_a_file_whose_conversations_are_all_too_long_is_refused(cli, char_data, tmp_path, chat_files):
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"prompt": "a" * 100, "completion": "b"}) + "\n")
    config = tmp_path / "bad.yaml"
    config.write_text(dump_yaml(chat_config(char_data, tmp_path, chat_files)))
    code, _, err = cli("train", config, f"task.train={path}")
    assert code == 2 and "none of its 1 conversations fits model.block_size=32" in err
    assert not (tmp_path / "sft").exists()
