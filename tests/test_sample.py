import copy
import json

import pytest
import torch
from conftest import tiny_config

from gpt.config import SampleConfig, build_config
from gpt.data.tokenizer import ByteTokenizer, CharTokenizer
from gpt.inference.sample import (
    chat_prompt,
    crop_to_context,
    decode,
    few_shot_prompt,
    filter_logits,
    generate,
    pick_tokens,
)
from gpt.inference.weights import PackedLinear, pack_for_cpu_decoding, prepare_weights
from gpt.model import GPT
from gpt.training.loop import train

POS_ENCODINGS = ["learned", "sinusoidal", "rope"]


def tiny(pos="learned", vocab=30, block_size=16) -> GPT:
    torch.manual_seed(0)
    config = build_config({"model": {"preset": "tiny", "vocab_size": vocab, "block_size": block_size,
                                     "pos_encoding": pos}}).model
    return GPT(config).eval()


def greedy(logits):
    return logits.argmax(-1)


@pytest.mark.parametrize("pos", POS_ENCODINGS)
def test_kv_cache_gives_the_tokens_of_full_recompute_across_the_crop(pos):
    model = tiny(pos)
    prompt = torch.randint(0, 30, (2, 10))
    cached = torch.stack(list(decode(model, prompt, 25, greedy, use_cache=True)), dim=1)
    # Reference: the textbook loop, recomputing the last block_size tokens every step.
    seq = prompt
    with torch.no_grad():
        for _ in range(25):
            seq = torch.cat([seq, model(seq[:, -16:])[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, seq[:, 10:])
    recomputed = torch.stack(list(decode(model, prompt, 25, greedy, use_cache=False)), dim=1)
    assert torch.equal(recomputed, cached)


@pytest.mark.parametrize("use_cache", [True, False])
def test_prompt_longer_than_context_is_cropped_to_its_end(use_cache):
    model = tiny()
    prompt = torch.randint(0, 30, (1, 40))
    from_long = torch.stack(list(decode(model, prompt, 5, greedy, use_cache)))
    from_end = torch.stack(list(decode(model, prompt[:, -16:], 5, greedy, use_cache)))
    from_start = torch.stack(list(decode(model, prompt[:, :16], 5, greedy, use_cache)))
    assert torch.equal(from_long, from_end) and not torch.equal(from_long, from_start)


def test_crop_to_context_keeps_the_end_of_the_text():
    tok = CharTokenizer("abcdefghij")
    assert crop_to_context("abcdefghij", tok, 4) == "ghij"
    assert crop_to_context("abc", tok, 4) == "abc"


def test_multibyte_characters_stream_whole():
    tok = ByteTokenizer()
    text = "é世🚀"
    pieces = []
    [sample] = generate(Scripted(list(text.encode()) + [256], 257), tok, "x",
                        SampleConfig(max_new_tokens=20, temperature=0), on_text=pieces.append)
    assert sample.text == text and "".join(pieces) == text and "\ufffd" not in "".join(pieces)


def test_top_k_only_emits_the_k_most_likely():
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.0, 2.0, 3.0]])
    generator = torch.Generator().manual_seed(0)
    seen = {pick_tokens(logits, 5.0, 3, 1.0, generator).item() for _ in range(500)}
    assert seen == {1, 3, 5}


def test_top_p_keeps_exactly_the_nucleus():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()

    def kept(p):
        return set(torch.nonzero(filter_logits(logits, None, p)[0] > -float("inf")).flatten().tolist())

    assert kept(0.8) == {1, 3}           # 0.5 + 0.3 reaches 0.8
    assert kept(0.81) == {1, 3, 2}       # 0.8 falls short, so the next most likely joins
    assert kept(0.3) == {1}              # the top token alone already reaches p
    assert kept(0.01) == {1}             # the top token always stays
    assert kept(1.0) == {0, 1, 2, 3}


def test_temperature_zero_is_argmax():
    logits = torch.tensor([[0.1, 2.0, 1.9]])
    assert pick_tokens(logits, 0.0, None, 1.0, None).item() == 1


class Scripted(torch.nn.Module):
    """A stand-in model that emits a fixed token script, to test stopping rules."""

    def __init__(self, script, vocab):
        super().__init__()
        self.config = build_config({"model": {"preset": "tiny", "vocab_size": vocab, "block_size": 64}}).model
        self.script, self.vocab, self.step = script, vocab, 0
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def _next(self, batch):
        logits = torch.full((batch, self.vocab), -1e9)
        logits[:, self.script[min(self.step, len(self.script) - 1)]] = 0.0
        self.step += 1
        return logits

    def forward(self, idx):
        return self._next(idx.size(0))[:, None, :].expand(-1, idx.size(1), -1), None

    def forward_step(self, idx, cache):
        cache.pos += idx.size(1)
        return self._next(idx.size(0))


def test_stop_string_cuts_before_it_and_streaming_never_shows_it():
    tok = CharTokenizer("ab\nUser: x\nmore")
    model = Scripted(tok.encode("ab\nUser: x\nmore"), tok.vocab_size)
    pieces = []
    [sample] = generate(model, tok, "a", SampleConfig(max_new_tokens=50, temperature=0, stop=["\nUser:"]),
                        on_text=pieces.append)
    assert sample.text == "ab" and sample.stop_reason == "stop"
    assert "".join(pieces) == "ab"


def test_end_of_text_stops_unless_ignored():
    tok = ByteTokenizer()
    script = [104, 105, 256, 106]
    [sample] = generate(Scripted(script, 257), tok, "x", SampleConfig(max_new_tokens=10, temperature=0))
    assert (sample.text, sample.stop_reason, len(sample.tokens)) == ("hi", "eot", 2)
    settings = SampleConfig(max_new_tokens=4, temperature=0, ignore_eot=True)
    [sample] = generate(Scripted(script, 257), tok, "x", settings)
    assert (sample.text, sample.stop_reason, len(sample.tokens)) == ("hij", "max_tokens", 4)


def test_same_seed_same_text_and_batches_differ():
    model = tiny(vocab=26)
    tok = CharTokenizer("abcdefghijklmnopqrstuvwxyz")
    settings = SampleConfig(max_new_tokens=30, temperature=1.0, top_k=None, seed=7, num_samples=3)
    first = [s.text for s in generate(model, tok, "abc", settings)]
    second = [s.text for s in generate(model, tok, "abc", settings)]
    assert first == second and len(set(first)) == 3
    settings.seed = 8
    assert [s.text for s in generate(model, tok, "abc", settings)] != first


def test_prompt_framing():
    assert chat_prompt("Be brief.", [("Hi", "Hello.")], "Who are you?") == (
        "System: Be brief.\nUser: Hi\nAssistant: Hello.\nUser: Who are you?\nAssistant:")
    assert few_shot_prompt("Q: 1+1\nA: 2\n\n\n", "Q: 2+2\nA:") == "Q: 1+1\nA: 2\n\nQ: 2+2\nA:"


@pytest.fixture(scope="module")
def trained(char_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    train(tiny_config(char_data, out, max_iters=10))
    return out


def test_sample_cli_json_and_errors(trained, cli, tmp_path):
    code, out, err = cli("sample", trained, "--prompt", "ROMEO:", "--max-new-tokens", "20", "--seed", "1",
                         "--num-samples", "2", "--json")
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == 2 and all(r["prompt"] == "ROMEO:" and r["tokens"] == 20 for r in rows)
    assert rows[0]["stop_reason"] == "max_tokens"
    again = cli("sample", trained, "--prompt", "ROMEO:", "--max-new-tokens", "20", "--seed", "1",
                "--num-samples", "2", "--json")[1]
    assert [json.loads(line)["text"] for line in again.splitlines()] == [r["text"] for r in rows]
    examples = tmp_path / "shots.txt"
    examples.write_text("KING:\nGood morrow.\n")
    code, out, _ = cli("sample", trained, "--few-shot", examples, "--prompt", "QUEEN:", "--max-new-tokens", "5")
    assert code == 0 and out.startswith("KING:\nGood morrow.\n\nQUEEN:")


@pytest.mark.parametrize("args, message", [
    (["--top-k", "0"], "top_k must be at least 1"), (["--top-p", "1.5"], "top_p must be in"),
    (["--temperature", "-1"], "temperature must be >= 0"), (["--prompt", "ROMEO€"], "'€'")])
def test_sample_bad_settings_are_one_line(trained, cli, args, message):
    code, _, err = cli("sample", trained, *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_sample_missing_checkpoint(cli, tmp_path):
    code, _, err = cli("sample", tmp_path / "missing")
    assert code == 2 and "checkpoint not found" in err


def test_corrupt_checkpoint_is_a_clear_error(trained, cli, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(trained / "latest", broken)
    (broken / "model.safetensors").write_bytes(b"garbage")
    code, _, err = cli("sample", broken)
    assert code == 2 and "corrupt" in err


def test_chat_reads_turns_from_stdin(trained, cli, monkeypatch):
    import io
    import sys

    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello there\n\nHow art thou?\n"))
    code, out, err = cli("chat", trained, "--system", "Speak as Shakespeare.", "--max-new-tokens", "8", "--seed", "0")
    assert code == 0, err
    replies = [line for line in out.splitlines() if line.startswith("Assistant:")]
    assert len(replies) == 2
    # `gpt sample --interactive` is the same code path with the same defaults.
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello there\n\nHow art thou?\n"))
    code, again, err = cli("sample", trained, "--interactive", "--system", "Speak as Shakespeare.",
                           "--max-new-tokens", "8", "--seed", "0")
    assert code == 0 and again == out, err


def test_a_chat_turn_the_model_cannot_read_is_refused_and_the_chat_goes_on(trained, cli, monkeypatch):
    import io
    import sys

    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello \u20ac\nHow art thou?\n"))
    code, out, err = cli("chat", trained, "--max-new-tokens", "4", "--seed", "0")
    assert code == 0, err
    assert len([line for line in out.splitlines() if line.startswith("Assistant:")]) == 1
    assert err.startswith("weights: ")  # the model loaded before the first turn was read
    assert err.splitlines()[1].startswith("error: character '\u20ac' (U+20AC) is not in this model's char vocabulary")


def test_info_describes_a_run(trained, cli):
    code, out, err = cli("info", trained)
    assert code == 0, err
    assert "iter 10" in out and "2 layers, 2 heads, 64 wide, context 32, vocab" in out and "ckpt_000010" in out


@pytest.mark.parametrize("use_cache", [True, False])
def test_copies_continue_each_prompt_like_repeated_rows(use_cache):
    model = tiny()
    prompt = torch.randint(0, 30, (2, 6))
    copied = torch.stack(list(decode(model, prompt, 20, greedy, use_cache, copies=3)), dim=1)
    repeated = torch.stack(list(decode(model, prompt.repeat_interleave(3, dim=0), 20, greedy, use_cache)), dim=1)
    assert copied.shape == (6, 20) and torch.equal(copied, repeated)


def test_num_samples_share_one_prefill_of_the_prompt(monkeypatch):
    model = tiny(vocab=26)
    shapes = []
    step = model.forward_step
    monkeypatch.setattr(model, "forward_step", lambda idx, cache: shapes.append(tuple(idx.shape)) or step(idx, cache))
    tok = CharTokenizer("abcdefghijklmnopqrstuvwxyz")
    samples = generate(model, tok, "abcde", SampleConfig(max_new_tokens=4, temperature=1.0, seed=1, num_samples=3))
    assert shapes == [(1, 5), (3, 1), (3, 1), (3, 1)]
    assert [len(s.tokens) for s in samples] == [4, 4, 4]


@pytest.mark.parametrize("pos", POS_ENCODINGS)
def test_static_cache_gives_the_tokens_of_the_growing_cache(pos):
    model = tiny(pos)
    prompt = torch.randint(0, 30, (2, 5))
    static = torch.stack(list(decode(model, prompt, 20, greedy, copies=2, static_cache=True)), dim=1)
    growing = torch.stack(list(decode(model, prompt, 20, greedy, copies=2, static_cache=False)), dim=1)
    assert torch.equal(static, growing)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_static_step_on_cuda_matches_the_eager_growing_cache():
    model = tiny("rope").cuda()
    prompt = torch.randint(0, 30, (1, 5), device="cuda")
    compiled = torch.stack(list(decode(model, prompt, 20, greedy, copies=3)), dim=1)  # static + compile on CUDA
    eager = torch.stack(list(decode(model, prompt, 20, greedy, copies=3, static_cache=False)), dim=1)
    assert torch.equal(compiled, eager)
    tok = CharTokenizer("abcdefghijklmnopqrstuvwxyz")
    [sample] = generate(tiny(vocab=26).cuda(), tok, "abc", SampleConfig(max_new_tokens=10, temperature=0))
    assert len(sample.tokens) == 10  # under bf16/fp16 autocast with a cache in that dtype


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_sampling_stores_the_weights_in_bf16_and_replays_a_graph_per_token(monkeypatch):
    model, _ = prepare_weights(tiny("learned").cuda(), "auto")
    assert next(model.parameters()).dtype == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32)
    replays = []
    replay = torch.cuda.CUDAGraph.replay
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", lambda graph: replays.append(1) or replay(graph))
    tokens = list(decode(model, torch.randint(0, 30, (1, 5), device="cuda"), 12, greedy, copies=2))
    assert len(tokens) == 12 and tokens[0].shape == (2,)
    assert len(replays) == 11  # one per token after the first (drawn from the prefill's logits)
    uncached = list(decode(model, torch.randint(0, 30, (1, 5), device="cuda"), 4, greedy, use_cache=False))
    assert len(uncached) == 4 and len(replays) == 11  # --no-cache: no cache, so nothing to record


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs torch built with oneDNN")
def test_packed_linears_decode_the_tokens_of_the_plain_model():
    """Width 256: the MLP's 256 x 1024 matrices reach the packing size, attention's do not."""
    torch.manual_seed(0)
    config = build_config({"model": {"preset": "tiny", "n_embd": 256, "n_head": 4, "vocab_size": 1000,
                                     "block_size": 32}}).model
    plain = GPT(config).eval()
    packed = pack_for_cpu_decoding(copy.deepcopy(plain))
    kinds = {name: type(module) for name, module in packed.named_modules()}
    assert kinds["blocks.0.mlp.fc"] is PackedLinear and kinds["blocks.0.attn.qkv"] is torch.nn.Linear
    prompt = torch.randint(0, 1000, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(packed(prompt)[0], plain(prompt)[0], rtol=1e-4, atol=1e-4)
    tokens = [torch.stack(list(decode(m, prompt, 30, greedy)), dim=1) for m in (plain, packed)]
    assert torch.equal(tokens[0], tokens[1])


def test_only_fp32_and_bf16_cpu_models_are_packed():
    config = build_config({"model": {"preset": "tiny", "n_embd": 256, "n_head": 4, "vocab_size": 30}}).model
    for dtype, packs in ((torch.float32, True), (torch.bfloat16, True), (torch.float16, False)):
        model = GPT(config).to(dtype)
        assert any(isinstance(m, PackedLinear) for m in pack_for_cpu_decoding(model).modules()) == packs
