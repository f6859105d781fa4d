"""--weights fp32|bf16|int8 and int8 checkpoints (gpt.inference.weights, gpt convert quantize, gpt serve)."""

import copy
import io
import json
import signal
import subprocess
import sys
import time

import httpx
import pytest
import torch
from conftest import REPO, SHAKESPEARE, tiny_yaml
from conftest import tiny_config as trained_config
from safetensors.torch import load_file

from gpt.chat import CHAT_TOKENS, ChatTemplate
from gpt.checkpoint import load_model, load_weights, read_checkpoint, save_model_folder
from gpt.config import build_config
from gpt.convert import quantize_checkpoint
from gpt.data.formats import RunFolder, RunState
from gpt.data.tokenizer import TokenizerSpec, train_bpe
from gpt.inference import weights as weights_module
from gpt.inference.engine import Engine, Sequence
from gpt.inference.sample import decode, decoding_autocast
from gpt.inference.weights import Int8Linear, PackedLinear, load_for_reading, prepare_weights
from gpt.model import GPT
from gpt.training.loop import train

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def bpe_spec() -> TokenizerSpec:
    """A small trained BPE: its file must travel into the int8 checkpoint."""
    text = SHAKESPEARE.read_text(encoding="utf-8")[:20_000]
    return TokenizerSpec("bpe", file=train_bpe(iter(text.splitlines(keepends=True)), 300))


def tiny_config(vocab_size: int = 257, task: dict | None = None, **model):
    """Width 64, 4 heads: every matrix's inner size is a multiple of 16, as the int8 kernel needs."""
    return build_config({"model": {"preset": "tiny", "n_embd": 64, "n_head": 4, "vocab_size": vocab_size,
                                   "block_size": 64, "bias": True, **model}, "sample": {"max_new_tokens": 8},
                         "task": task or {}})


def tiny_model(**model) -> GPT:
    torch.manual_seed(0)
    return GPT(tiny_config(**model).model).eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, bpe_spec):
    """A chat model's fp32 checkpoint (a trained BPE, its chat template) and its int8 copy,
    written by `gpt convert quantize`."""
    from gpt.cli import main

    root = tmp_path_factory.mktemp("weights")
    vocab = bpe_spec.build().vocab_size + len(CHAT_TOKENS)
    config = tiny_config(vocab, task={"kind": "chat", "train": "chat.jsonl"})
    torch.manual_seed(0)
    save_model_folder(root / "fp32", GPT(config.model).eval(), config, bpe_spec, RunState(iter=3))
    argv = sys.argv
    sys.argv = ["gpt", "convert", "quantize", str(root / "fp32"), str(root / "int8")]
    try:
        with pytest.raises(SystemExit) as done:
            main()
    finally:
        sys.argv = argv
    assert done.value.code == 0
    return root / "fp32", root / "int8"


@pytest.mark.parametrize("tied", [True, False])
def test_int8_logits_stay_within_a_bound_of_fp32(tied):
    """Per-row int8 rounds each weight by at most half a step (row max / 254); on a random
    model the logits move by a few percent of their range at most, on both int8 paths: the
    kernel (one row at a time) and the widened matrix (many rows)."""
    model = tiny_model(tie_embeddings=tied)
    int8, line = prepare_weights(copy.deepcopy(model), "int8")
    assert line.startswith("weights: int8") and isinstance(int8.lm_head, Int8Linear)
    assert int8.blocks[0].mlp.fc.weight.dtype == torch.int8
    idx = torch.randint(0, 257, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(idx)[0]
        many_rows = int8(idx)[0].float()
        one_row = int8.forward_step(idx[:, :1], None).float()
    bound = 0.03 * reference.abs().max()
    assert (many_rows - reference).abs().max() < bound
    assert (one_row - reference[:, 0]).abs().max() < bound
    assert (many_rows - reference).abs().max() > 0  # it did round


def test_the_int8_kernel_and_the_widened_matrix_agree():
    torch.manual_seed(0)
    layer = Int8Linear.quantize(torch.nn.Linear(64, 48, bias=True)).to(torch.bfloat16)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    kernel = layer(x).float()  # 3 rows: torch's _weight_int8pack_mm
    widened = (x.float() @ layer.dequantized(torch.float32).t() + layer.bias.float())
    torch.testing.assert_close(kernel, widened, rtol=2e-2, atol=2e-2)


def test_auto_takes_int8_on_a_cpu_with_native_bf16_bf16_for_batches_packed_fp32_elsewhere_fp32_for_scoring(monkeypatch):
    monkeypatch.setattr(weights_module, "cpu_has_native_bf16", lambda: True)
    model, line = prepare_weights(tiny_model(n_embd=256), "auto")  # read from the caches: fp32
    assert type(model.blocks[0].mlp.fc) is not Int8Linear and model.wte.weight.dtype == torch.float32
    assert "small enough to be read from the CPU's caches" in line
    monkeypatch.setattr(weights_module, "CACHED_MAX_WEIGHTS", 0)  # from here on, as if the model were large
    model, line = prepare_weights(tiny_model(n_embd=256), "auto")
    assert isinstance(model.blocks[0].mlp.fc, Int8Linear) and "auto: a CPU with native bf16" in line
    model, line = prepare_weights(tiny_model(n_embd=256), "auto", decoding=False)
    assert type(model.blocks[0].mlp.fc) is torch.nn.Linear and line.startswith("weights: fp32")
    model, line = prepare_weights(tiny_model(n_embd=256), "auto", batched=True)  # gpt serve: batches
    assert isinstance(model.blocks[0].mlp.fc, PackedLinear) and model.wte.weight.dtype == torch.bfloat16
    assert line.startswith("weights: bf16") and "decoding batches" in line
    monkeypatch.setattr(weights_module, "cpu_has_native_bf16", lambda: False)
    model, line = prepare_weights(tiny_model(n_embd=256), "auto")
    assert isinstance(model.blocks[0].mlp.fc, PackedLinear) and model.wte.weight.dtype == torch.float32
    assert line.startswith("weights: fp32")


def test_bf16_weights_decode_from_a_bf16_cache():
    model, _ = prepare_weights(tiny_model(), "bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    tokens = list(decode(model, torch.tensor([[1, 2, 3]]), 5, lambda logits: logits.argmax(-1)))
    assert len(tokens) == 5


def test_quantized_checkpoint_is_smaller_and_reads_back_as_the_in_memory_int8_model(checkpoints, bpe_spec):
    fp32, int8 = checkpoints
    size = {path: (path / "model.safetensors").stat().st_size for path in checkpoints}
    assert size[int8] < 0.4 * size[fp32]
    tensors = load_file(str(int8 / "model.safetensors"))
    assert tensors["blocks.0.attn.qkv.weight"].dtype == torch.int8
    assert tensors["blocks.0.attn.qkv.weight_scale"].shape == (192,)
    assert "lm_head.weight" not in tensors and tensors["wte.weight"].dtype == torch.int8  # tied: stored once
    checkpoint = read_checkpoint(int8)
    assert checkpoint.config.sample.weights == "int8" and checkpoint.state.converted_from == str(fp32)
    assert checkpoint.state.iter == 3 and ChatTemplate.of(checkpoint.config) is not None
    for name in (RunFolder.TOKENIZER, RunFolder.TOKENIZER_FILE):  # the BPE's file, byte for byte
        assert (int8 / name).read_bytes() == (fp32 / name).read_bytes()
    assert checkpoint.tokenizer_spec == bpe_spec
    from_disk, _ = prepare_weights(load_model(checkpoint, keep_int8=True), "int8")
    in_memory, _ = prepare_weights(load_model(read_checkpoint(fp32)), "int8")
    idx = torch.randint(0, 300, (1, 30))
    with torch.no_grad():
        assert torch.equal(from_disk(idx)[0], in_memory(idx)[0])
    widened = load_model(checkpoint)  # readers that need nn.Linear get the rounded values in fp32
    assert type(widened.lm_head) is torch.nn.Linear and widened.lm_head.weight is widened.wte.weight


def test_every_reading_verb_takes_an_int8_checkpoint(cli, checkpoints, tmp_path, monkeypatch):
    _, int8 = checkpoints
    code, out, err = cli("sample", int8, "--prompt", PROMPT, "--temperature", "0", "--json")
    assert code == 0 and json.loads(out)["tokens"] == 8 and err.startswith("weights: int8")
    text = tmp_path / "t.txt"
    text.write_text("To be, or not to be, that is the question.\n" * 3, encoding="utf-8")
    for weights, said in (("int8", "int8 (int8 matrices"), ("auto", "fp32 (fp32 matrices; auto: scoring")):
        code, out, err = cli("eval", int8, "--data", text, "--weights", weights, "--json")
        assert code == 0 and json.loads(out)["lm"]["bits_per_byte"] > 0 and json.loads(out)["weights"].startswith(said)
    code, out, err = cli("eval", int8, "--data", text, "--weights", "int8")
    assert code == 0 and err.startswith("weights: int8") and "bpb" in out
    assert cli("next", int8, PROMPT)[0] == 0
    code, out, _ = cli("info", int8)
    assert code == 0 and "iter 3" in out and "weights: int8 with per-row scales" in out and "chat model" in out
    assert json.loads(cli("info", int8, "--json")[1])["weights"] == "int8"
    assert cli("tokenize", "--checkpoint", int8, PROMPT)[0] == 0
    assert cli("attention", int8, PROMPT, "-o", tmp_path / "a.png")[0] == 0
    assert cli("embed", int8, "a", "--nearest", "3")[0] == 0
    assert cli("convert", "to-hf", int8, tmp_path / "hf")[0] == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))
    code, out, _ = cli("chat", int8, "--max-new-tokens", "4", "--temperature", "0")
    assert code == 0 and out.startswith("Assistant:")
    code, _, err = cli("sample", int8, "--prompt", PROMPT, "--weights", "fp32")
    assert code == 0 and err.startswith("weights: fp32")


def test_training_or_classifying_from_an_int8_checkpoint_is_refused_in_one_line(cli, checkpoints, char_data,
                                                                                 tmp_path):
    fp32, int8 = checkpoints
    code, _, err = cli("train", tiny_yaml(tmp_path, char_data), f"train.init_from={int8}")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "int8 weights" in err
    assert not (tmp_path / "run").exists()
    with torch.device("meta"):
        model = GPT(read_checkpoint(fp32).config.model)
    with pytest.raises(Exception, match="int8 weights .* train or classify from the checkpoint"):
        load_weights(model, int8)  # what --resume and gpt classify load through
    code, _, err = cli("convert", "quantize", int8, tmp_path / "again")
    assert code == 2 and "already int8" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("verb", [["sample", "--prompt", "x"], ["eval", "--data", "README.md"], ["chat"],
                                  ["next", "x"], ["serve"]])
def test_a_bad_weights_value_is_one_line(cli, checkpoints, verb):
    code, _, err = cli(verb[0], checkpoints[1], *verb[1:], "--weights", "int4")
    assert code == 2 and err.strip() == "error: --weights must be one of auto, fp32, bf16, int8, got 'int4'"


# ----------------------------------------------------------------------------- serving

@pytest.fixture(scope="module")
def trained_int8(char_data, tmp_path_factory):
    """A char model trained a little (its next tokens are far from ties) and its int8 copy."""
    root = tmp_path_factory.mktemp("trained")
    config = trained_config(char_data, root / "run", max_iters=40, eval_interval=40, ckpt_interval=40)
    config.model.n_head, config.model.dropout = 4, 0.0
    train(config)
    quantize_checkpoint(root / "run", root / "int8")
    return root / "int8"


@pytest.mark.parametrize("choice", ["int8", "bf16"])
def test_the_serving_engine_decodes_with_int8_and_bf16_weights(trained_int8, choice):
    """Three prompts sampled together by `gpt serve`'s engine (rows at their own positions in
    one cache): each drawn token's log-probability is the one the same model gives it when run
    over the whole text at once, up to bf16 rounding."""
    checkpoint = read_checkpoint(trained_int8)
    model, line = load_for_reading(checkpoint, torch.device("cpu"), choice)
    assert line.startswith(f"weights: {choice}")
    tokenizer = checkpoint.tokenizer
    prompts = [tokenizer.encode(text) for text in ("ROMEO", "KING:", "Thou")]
    drawn = {i: [] for i in range(len(prompts))}
    ended = []
    engine = Engine(model, tokenizer.vocab_size, max_batch=len(prompts))
    engine.submit([Sequence(prompt, 12, lambda token, i=i: drawn[i].append(token) and False, ended.append,
                            temperature=1.0, seed=i, logprobs=0) for i, prompt in enumerate(prompts)])
    with torch.inference_mode(), decoding_autocast(torch.device("cpu")):
        while engine.busy():
            engine.step()
    assert ended == ["length"] * 3
    for i, prompt in enumerate(prompts):
        ids = [token.id for token in drawn[i]]
        with torch.inference_mode():
            logits = model(torch.tensor([prompt + ids]))[0][0, len(prompt) - 1:-1].float()
        expected = torch.log_softmax(logits[:, :tokenizer.vocab_size], -1).gather(1, torch.tensor(ids)[:, None])[:, 0]
        assert len(set(ids)) > 2  # drawn, not one token over and over
        torch.testing.assert_close(torch.tensor([token.logprob for token in drawn[i]]), expected, atol=0.05, rtol=0)


def wait_for_health(url: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            time.sleep(0.1)
    return False


@pytest.mark.slow
def test_gpt_serve_answers_from_an_int8_checkpoint_and_says_so_at_start(trained_int8):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "gpt", "serve", str(trained_int8), "--port", str(port), "--max-batch", "2"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        assert wait_for_health(url, 60), "the server did not come up"
        body = {"model": "int8", "prompt": "ROMEO:", "max_tokens": 5, "temperature": 0}
        answer = httpx.post(url + "/v1/completions", json=body, timeout=30).json()
        assert answer["usage"]["completion_tokens"] == 5 and answer["choices"][0]["text"]
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
    output = process.stdout.read()
    assert "gpt serve: model 'int8'" in output and "weights: int8 (int8 matrices" in output
