"""The bad-input catalogue: every verb, run as a user runs it (a subprocess), given a mistake,
answers with exit code 2 and one line on stderr naming the problem, shows no traceback, and
creates or changes no file."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_config

from gpt.data.prepare import PrepareOptions, prepare
from gpt.training.loop import train


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """Inputs good and bad that the cases point at: corpora, a dataset, a trained run, configs."""
    root = tmp_path_factory.mktemp("world")
    (root / "good.txt").write_text("To be, or not to be, that is the question.\n" * 200)
    (root / "bad_utf8.txt").write_bytes(b"fine start \xff\xfe broken\n")
    (root / "empty.txt").write_text("")
    (root / "zebra.txt").write_text("To be a Zebra.\n")
    (root / "md_only").mkdir()
    (root / "md_only" / "notes.md").write_text("# notes\n")
    (root / "not_json.jsonl").write_text('{"text": "ok"}\nnot json\n')
    (root / "no_field.jsonl").write_text('{"body": "text"}\n')
    (root / "list.jsonl").write_text('[1, 2]\n')
    (root / "number.jsonl").write_text('{"text": 5}\n')
    (root / "task_bad_label.jsonl").write_text('{"context": "a", "choices": ["b", "c"], "label": 5}\n')
    (root / "task_one_choice.jsonl").write_text('{"context": "a", "choices": ["b", "c"], "label": 0}\n'
                                                '{"context": "a", "choices": ["b"], "label": 0}\n')
    (root / "fake.parquet").write_text("not parquet")
    (root / "llama").mkdir()
    (root / "llama" / "config.json").write_text('{"model_type": "llama"}')
    data = prepare(PrepareOptions(sources=[str(root / "good.txt")], tokenizer="char", out=str(root / "data"),
                                  workers=1))
    prepare(PrepareOptions(sources=[str(root / "good.txt")], tokenizer="bpe", vocab_size=300, out=str(root / "bpe"),
                           workers=1))
    (root / "other.txt").write_text("abc abc, cab.\n" * 200)
    other = prepare(PrepareOptions(sources=[str(root / "other.txt")], tokenizer="char", out=str(root / "other_data"),
                                   workers=1))
    run = root / "run"
    train(tiny_config(data, run, max_iters=2, eval_interval=2, ckpt_interval=2))
    good = {"model": {"preset": "tiny", "block_size": 32}, "data": {"dir": str(data)},
            "train": {"out_dir": str(root / "new_run"), "device": "cpu", "max_iters": 2, "batch_size": 2}}
    (root / "good.yaml").write_text(yaml.safe_dump(good))
    (root / "shape.yaml").write_text(yaml.safe_dump({**good, "model": {"preset": "tiny", "n_layer": 3,
                                                                      "block_size": 32},
                                                     "train": {**good["train"], "out_dir": str(run)}}))
    (root / "bad.yaml").write_text("model:\n  n_layer: [1,\n")
    (root / "list.yaml").write_text("- model\n- train\n")
    (root / "section.yaml").write_text("model: 5\n")
    (root / "init_other_vocab.yaml").write_text(yaml.safe_dump(
        {**good, "data": {"dir": str(other)}, "train": {**good["train"], "init_from": str(run)}}))
    (root / "init_missing.yaml").write_text(yaml.safe_dump(
        {**good, "train": {**good["train"], "init_from": str(root / "nowhere")}}))
    return root


def damaged_copy(world: Path, tmp: Path, what: str) -> Path:
    """A copy of the dataset or the run with one thing broken."""
    if what in ("truncated", "magic", "vocab", "edited"):
        data = shutil.copytree(world / ("bpe" if what == "edited" else "data"), tmp / "data")
        shard = next(data.glob("*_train_*.bin"))
        if what == "edited":
            (data / "tokenizer.json").write_text((data / "tokenizer.json").read_text() + "\n")
        elif what == "truncated":
            shard.write_bytes(shard.read_bytes()[:-3])
        elif what == "magic":
            shard.write_bytes(np.int32(7).tobytes() + shard.read_bytes()[4:])
        else:
            meta = json.loads((data / "meta.json").read_text())
            meta["vocab_size"] += 1
            (data / "meta.json").write_text(json.dumps(meta))
        config = yaml.safe_load((world / "good.yaml").read_text())
        config["data"]["dir"], config["train"]["out_dir"] = str(data), str(tmp / "run")
        (tmp / "c.yaml").write_text(yaml.safe_dump(config))
        return tmp / "c.yaml"
    run = shutil.copytree(world / "run", tmp / "run", symlinks=True)
    ckpt = run / "ckpt_000002"
    if what == "safetensors":
        (ckpt / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    elif what == "pickle":
        torch.save({"optimizer": Evil()}, ckpt / "optimizer.pt")
    elif what == "config":
        (ckpt / "config.yaml").write_text("model: [unclosed\n")
    return run


class Evil:
    def __reduce__(self):
        return (shutil.rmtree, ("/nonexistent-target",))


# (case id, verb and arguments; {w} is the world folder, {t} the case's own scratch folder), expected text
CASES = [
    # prepare
    ("prepare-missing-file", ["prepare", "{w}/nope.txt", "--out", "{t}/d"], "source not found"),
    ("prepare-tokenizer", ["prepare", "{w}/good.txt", "--tokenizer", "wordpiece"], "--tokenizer must be"),
    ("prepare-val-fraction", ["prepare", "{w}/good.txt", "--val-fraction", "1.5", "--out", "{t}/d"],
     "--val-fraction must be in [0, 1)"),
    ("prepare-workers", ["prepare", "{w}/good.txt", "--workers", "0", "--out", "{t}/d"],
     "--workers must be at least 1"),
    ("prepare-shard-size", ["prepare", "{w}/good.txt", "--shard-size", "0", "--out", "{t}/d"],
     "--shard-size must be at least 1"),
    ("prepare-errors-mode", ["prepare", "{w}/good.txt", "--errors", "ignore", "--out", "{t}/d"],
     "--errors must be strict or replace"),
    ("prepare-invalid-utf8", ["prepare", "{w}/bad_utf8.txt", "--out", "{t}/d"], "invalid UTF-8 at byte offset 11"),
    ("prepare-empty", ["prepare", "{w}/empty.txt", "--tokenizer", "char", "--out", "{t}/d"], "the corpus is empty"),
    ("prepare-folder-no-match", ["prepare", "{w}/md_only", "--out", "{t}/d"], "has no files ending in .txt"),
    ("prepare-glob-no-match", ["prepare", "{w}/*.nothing", "--out", "{t}/d"], "no files match"),
    ("prepare-out-exists", ["prepare", "{w}/good.txt", "--out", "{w}/data"], "already exists; pass --overwrite"),
    ("prepare-overwrite-user-folder", ["prepare", "{w}/good.txt", "--out", "{w}/md_only", "--overwrite"],
     "is not a dataset folder (no meta.json)"),
    ("prepare-overwrite-user-file", ["prepare", "{w}/good.txt", "--out", "{w}/good.txt", "--overwrite"],
     "is not a dataset folder"),
    ("prepare-out-current-folder", ["prepare", "{w}/good.txt", "--out", ".", "--overwrite"], "names no new folder"),
    ("prepare-jsonl-not-json", ["prepare", "{w}/not_json.jsonl", "--out", "{t}/d"], "not_json.jsonl:2: not a JSON"),
    ("prepare-jsonl-no-field", ["prepare", "{w}/no_field.jsonl", "--out", "{t}/d"], "no text field 'text'"),
    ("prepare-jsonl-not-object", ["prepare", "{w}/list.jsonl", "--out", "{t}/d"], "list.jsonl:1: not a JSON object"),
    ("prepare-jsonl-text-not-string", ["prepare", "{w}/number.jsonl", "--out", "{t}/d"],
     "number.jsonl:1: field 'text' holds a int, not a string"),
    ("prepare-stdin-twice", ["prepare", "-", "-", "--out", "{t}/d"], "stdin ('-') can be read only once"),
    ("prepare-bad-option", ["prepare", "--bogus"], "gpt prepare --help)"),
    ("prepare-bpe-vocab-size", ["prepare", "{w}/good.txt", "--tokenizer", "bpe", "--vocab-size", "70000", "--out",
                                "{t}/d"], "--vocab-size must be between 257 (256 bytes + end-of-text) and 65,536"),
    ("prepare-bpe-tiny-vocab", ["prepare", "{w}/good.txt", "--tokenizer", "bpe", "--vocab-size", "256", "--out",
                                "{t}/d"], "--vocab-size must be between 257"),
    ("prepare-bpe-no-vocab-size", ["prepare", "{w}/good.txt", "--tokenizer", "bpe", "--out", "{t}/d"],
     "--tokenizer bpe needs --vocab-size N"),
    ("prepare-vocab-size-without-bpe", ["prepare", "{w}/good.txt", "--vocab-size", "500", "--out", "{t}/d"],
     "--vocab-size is the size of a BPE to train"),
    ("prepare-bpe-empty", ["prepare", "{w}/empty.txt", "--tokenizer", "bpe", "--vocab-size", "300", "--out", "{t}/d"],
     "the corpus is empty"),
    ("prepare-bpe-invalid-utf8", ["prepare", "{w}/bad_utf8.txt", "--tokenizer", "bpe", "--vocab-size", "300",
                                  "--out", "{t}/d"], "invalid UTF-8 at byte offset 11"),
    ("prepare-tokenizer-not-tokenizer-json", ["prepare", "{w}/good.txt", "--tokenizer", "{w}/good.yaml", "--out",
                                              "{t}/d"], "good.yaml: not a Hugging Face tokenizer.json"),
    ("prepare-tokenizer-from-missing", ["prepare", "{w}/good.txt", "--tokenizer-from", "{w}/nowhere", "--out",
                                        "{t}/d"], "nowhere: not found; give a dataset, run or checkpoint folder"),
    ("prepare-tokenizer-from-and-tokenizer", ["prepare", "{w}/good.txt", "--tokenizer-from", "{w}/bpe", "--tokenizer",
                                              "gpt2", "--out", "{t}/d"], "drop --tokenizer and --vocab-size"),
    ("prepare-not-parquet", ["prepare", "{w}/fake.parquet", "--out", "{t}/d"], "is not a readable Parquet file"),
    # train
    ("train-no-config", ["train"], "give a config file"),
    ("train-missing-config", ["train", "{w}/nope.yaml"], "config file not found"),
    ("train-bad-yaml", ["train", "{w}/bad.yaml"], "invalid YAML at line"),
    ("train-yaml-not-mapping", ["train", "{w}/list.yaml"], "a config must be a mapping"),
    ("train-section-not-mapping", ["train", "{w}/section.yaml"], "'model' must be a mapping of keys to values"),
    ("train-bad-device", ["train", "{w}/good.yaml", "train.device=cuda:abc"], "unknown device 'cuda:abc'"),
    ("train-huge-seed", ["train", "{w}/good.yaml", "train.seed=99999999999999999999"], "train.seed must be in"),
    ("train-unknown-section", ["train", "{w}/good.yaml", "trian.lr=1"], "did you mean 'train'"),
    ("train-unknown-key", ["train", "{w}/good.yaml", "model.n_layers=2"], "did you mean 'model.n_layer'"),
    ("train-wrong-type", ["train", "{w}/good.yaml", "model.n_layer=four"], "expected an integer"),
    ("train-zero-size", ["train", "{w}/good.yaml", "model.n_layer=0"], "model.n_layer must be at least 1"),
    ("train-negative-lr", ["train", "{w}/good.yaml", "train.lr=-1"], "train.lr must be positive"),
    ("train-heads", ["train", "{w}/good.yaml", "model.n_head=3"], "divisible by model.n_head"),
    ("train-not-key-value", ["train", "{w}/good.yaml", "train.bias"], "section.key=value"),
    ("train-two-configs", ["train", "{w}/good.yaml", "{w}/bad.yaml"], "expected one config file"),
    ("train-no-data", ["train", "{w}/good.yaml", "data.dir={w}/nowhere"], "data folder not found"),
    ("train-no-meta", ["train", "{w}/good.yaml", "data.dir={w}/md_only"], "has no meta.json"),
    ("train-truncated-shard", ["train", "@truncated"], "the shard is truncated or corrupt"),
    ("train-wrong-magic", ["train", "@magic"], "not a token shard"),
    ("train-meta-vocab", ["train", "@vocab"], "does not match its char tokenizer"),
    ("train-edited-tokenizer-json", ["train", "@edited"], "tokenizer.json was edited after"),
    ("train-vocab-mismatch", ["train", "{w}/good.yaml", "model.vocab_size=100"], "set model.vocab_size=null"),
    ("train-no-cuda", ["train", "{w}/good.yaml", "train.device=cuda"], "CUDA is not available"),
    ("train-block-size", ["train", "{w}/good.yaml", "model.block_size=100000"], "lower model.block_size"),
    ("train-nothing-to-resume", ["train", "{w}/good.yaml", "--resume"], "nothing to resume"),
    ("train-resume-other-shape", ["train", "{w}/shape.yaml", "--resume"], "model.n_layer differ"),
    ("train-run-exists", ["train", "{w}/good.yaml", "train.out_dir={w}/run"], "already holds a run"),
    ("train-resume-a-checkpoint", ["train", "--resume", "{w}/run/ckpt_000002"], "--resume takes the run folder"),
    ("train-malicious-pickle", ["train", "--resume", "@pickle"], "refused: not a safe checkpoint file"),
    ("train-init-from-other-vocabulary", ["train", "{w}/init_other_vocab.yaml"],
     "the checkpoint and the data have different char vocabularies (17 and 7 characters): the checkpoint has 11"),
    ("train-peak-flops", ["train", "{w}/good.yaml", "train.peak_flops=-5"], "train.peak_flops must be positive"),
    ("train-init-from-missing", ["train", "{w}/init_missing.yaml"], "checkpoint not found"),
    # sample and chat
    ("sample-missing", ["sample", "{w}/nowhere"], "checkpoint not found"),
    ("sample-corrupt-safetensors", ["sample", "@safetensors"], "the checkpoint is corrupt"),
    ("sample-corrupt-config", ["sample", "@config"], "is incomplete or corrupt"),
    ("sample-top-p-high", ["sample", "{w}/run", "--top-p", "1.5"], "top_p must be in (0, 1]"),
    ("sample-top-p-zero", ["sample", "{w}/run", "--top-p", "0"], "top_p must be in (0, 1]"),
    ("sample-temperature", ["sample", "{w}/run", "--temperature", "-1"], "temperature must be >= 0"),
    ("sample-top-k", ["sample", "{w}/run", "--top-k", "0"], "top_k must be at least 1"),
    ("sample-char-outside-vocab", ["sample", "{w}/run", "--prompt", "Zebra€"], "is not in this model's char"),
    ("sample-two-prompts", ["sample", "{w}/run", "--prompt", "a", "--prompt-file", "{w}/good.txt"],
     "give --prompt or --prompt-file, not both"),
    ("sample-missing-few-shot", ["sample", "{w}/run", "--few-shot", "{w}/nope.txt"], "cannot read --few-shot"),
    ("sample-few-shot-not-utf8", ["sample", "{w}/run", "--few-shot", "{w}/bad_utf8.txt"],
     "bad_utf8.txt is not UTF-8 text; save it as UTF-8"),
    ("sample-missing-prompt-file", ["sample", "{w}/run", "--prompt-file", "{w}/nope.txt"], "cannot read --prompt-file"),
    ("sample-no-cuda", ["sample", "{w}/run", "--device", "cuda"], "CUDA is not available"),
    ("sample-bad-device", ["sample", "{w}/run", "--device", "foo"], "unknown device 'foo'"),
    ("sample-huge-seed", ["sample", "{w}/run", "--seed", "99999999999999999999"], "seed must be in [0, 2**64)"),
    ("sample-interactive-prompt", ["sample", "{w}/run", "--interactive", "--prompt", "To"],
     "--interactive reads each turn from the terminal (or stdin) and replies once; drop --prompt"),
    ("chat-missing", ["chat", "{w}/nowhere"], "checkpoint not found"),
    ("chat-temperature", ["chat", "{w}/run", "--temperature", "-2"], "temperature must be >= 0"),
    # info
    ("info-missing", ["info", "{w}/nowhere"], "checkpoint not found"),
    ("info-unknown-preset", ["info", "--preset", "gpt5"], "unknown preset"),
    # convert
    ("convert-hf-missing", ["convert", "from-hf", "{w}/nowhere", "{t}/out"], "config.json not found"),
    ("convert-nanogpt-missing", ["convert", "from-nanogpt", "{w}/nope.pt", "{t}/out"], "nope.pt"),
    ("convert-hf-other-architecture", ["convert", "from-hf", "{w}/llama", "{t}/out"], "model_type 'llama' is not"),
    ("convert-to-hf-corrupt", ["convert", "to-hf", "@config", "{t}/out"], "is incomplete or corrupt"),
    ("convert-out-exists", ["convert", "to-hf", "{w}/run", "{w}/data"], "already exists; choose a new folder"),
    # eval
    ("eval-nothing", ["eval", "{w}/run"], "nothing to evaluate"),
    ("eval-missing-task", ["eval", "{w}/run", "--task", "{w}/nope.jsonl"], "cannot read task file"),
    ("eval-one-choice", ["eval", "{w}/run", "--task", "{w}/task_one_choice.jsonl"],
     "task_one_choice.jsonl:2: \"choices\" must be a list of at least two texts"),
    ("eval-bad-label", ["eval", "{w}/run", "--task", "{w}/task_bad_label.jsonl"],
     "task_bad_label.jsonl:1: label 5 is not the index"),
    ("eval-split-of-a-text-file", ["eval", "{w}/run", "--data", "{w}/good.txt", "--split", "train"],
     "--split picks a split of a dataset folder"),
    ("eval-float16-on-cpu", ["eval", "{w}/run", "--data", "{w}/data", "--dtype", "float16", "--device", "cpu"],
     "dtype float16 needs a CUDA device"),
    ("eval-stride", ["eval", "{w}/run", "--data", "{w}/data", "--stride", "0"], "--stride must be between"),
    ("eval-other-tokenizer", ["eval", "{w}/run", "--data", "{w}/bad_utf8.txt"], "bad_utf8.txt"),
    ("eval-char-outside-vocab", ["eval", "{w}/run", "--data", "{w}/zebra.txt"],
     "zebra.txt: character 'Z' (U+005A) is not in this model's char vocabulary; remove it from"),
    # classify
    ("classify-no-head", ["classify", "{w}/run", "--text", "hello"], "has no task head"),
    ("classify-missing", ["classify", "{w}/nowhere", "--text", "hello"], "checkpoint not found"),
    # look inside
    ("tokenize-empty", ["tokenize", ""], "the text is empty"),
    ("tokenize-bpe-without-data", ["tokenize", "--tokenizer", "bpe", "hi"], "a bpe vocabulary comes from the data"),
    ("tokenize-two-sources", ["tokenize", "--tokenizer", "gpt2", "--data", "{w}/data", "hi"], "give only one of"),
    ("tokenize-char-outside-vocab", ["tokenize", "--data", "{w}/data", "Zebra"],
     "not in this char vocabulary; remove it from the text, or use --tokenizer byte or gpt2"),
    ("next-missing", ["next", "{w}/nowhere", "To be"], "checkpoint not found"),
    ("next-top-p", ["next", "{w}/run", "To be", "--top-p", "2"], "top_p must be in (0, 1]"),
    ("attention-layer", ["attention", "{w}/run", "To be", "--layer", "9", "-o", "{t}/a.png"], "--layer 9 does not"),
    ("attention-not-png", ["attention", "{w}/run", "To be", "-o", "{t}/a.jpg"], "give a file name ending in .png"),
    ("embed-several-tokens", ["embed", "{w}/run", "To"],
     "is 2 tokens ('T' + 'o'), not one; give a single token such as 'T'"),
    ("embed-plot-missing-data", ["embed", "{w}/run", "--plot", "-o", "{t}/e.png", "--data", "{w}/nowhere"],
     "nowhere is not there; give --data DATA_DIR"),
    ("embed-analogy-form", ["embed", "{w}/run", "--analogy", "a b c"], "is not of the form 'a - b + c'"),
]


def snapshot(*folders: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for folder in folders
            for p in sorted(folder.rglob("*")) if p.is_file()}


# Asking for CUDA is a mistake only where there is none: on a CUDA host that command would train.
NO_CUDA_HERE = pytest.mark.skipif(torch.cuda.is_available(), reason="this host has CUDA")


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    pytest.param(*c[1:], id=c[0], marks=NO_CUDA_HERE if "CUDA is not available" in c[2] else ()) for c in CASES])
def test_a_user_mistake_is_one_line_exit_2_and_leaves_no_trace(world, tmp_path, args, message):
    args = [a.format(w=world, t=tmp_path) for a in args]
    args = [str(damaged_copy(world, tmp_path, a[1:])) if a.startswith("@") else a for a in args]
    before = snapshot(world, tmp_path)
    result = subprocess.run([sys.executable, "-m", "gpt", *args], cwd=tmp_path, capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, timeout=120)
    err = result.stderr.strip()
    assert result.returncode == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
    assert message in err
    assert snapshot(world, tmp_path) == before
    assert not list(tmp_path.glob(".*")), "a hidden temporary file or lock was left behind"


def test_the_catalogue_covers_every_verb_and_forty_mistakes():
    verbs = {case[1][0] for case in CASES}
    assert {"prepare", "train", "sample", "chat", "info", "convert", "eval", "classify", "tokenize", "next",
            "attention", "embed"} <= verbs
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)
