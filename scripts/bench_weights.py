"""fp32 vs bf16 vs int8 weights (issue 28): decoding speed and what the rounding costs.

    python scripts/bench_weights.py [--quick] [--tiny] [--json PATH]
    python scripts/bench_weights.py --quality RUN_OR_CKPT:DATA_DIR [...]

- speed: greedy decoding tokens/s of GPT-2 124M's shape (random weights), batch 1 and 8, with
  the weights as `gpt sample --weights fp32|bf16|int8` stores them (`prepare_weights`), plus
  fp32 unpacked (plain nn.Linear) and transformers' `generate` on the same fp32 weights. All of
  them are timed in turn within each repeat (interleaved), and each ratio against our fp32 is
  the median of the per-repeat ratios. The bound is the fp32 memory-bandwidth bound: copy
  bandwidth / bytes of the fp32 weights read per token (`bench.weight_bytes_per_step`).
- quality (--quality): bits per byte over the whole split of the dataset for each choice (the
  same scoring as `gpt eval`, no autocast, so fp32 is fp32), and greedy agreement: for prompts
  taken from the split's text, whether bf16's and int8's first 50 tokens equal fp32's.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from bench import copy_bandwidth, hf_twin, machine, machine_line, model_config, seconds_per_call, weight_bytes_per_step

from gpt.checkpoint import load_model, read_checkpoint
from gpt.evaluation.perplexity import dataset_split_tokens, evaluate_tokens, token_byte_lengths
from gpt.inference.sample import decode
from gpt.inference.weights import prepare_weights
from gpt.model import GPT

CHOICES = ("fp32", "bf16", "int8")
AGREE_TOKENS = 50


def greedy_run(model: GPT, prompt: torch.Tensor, steps: int, batch: int) -> Callable[[], None]:
    def run() -> None:
        for _ in decode(model, prompt, steps, lambda logits: logits.argmax(-1), copies=batch):
            pass
    return run


def bench_speed(args: argparse.Namespace) -> dict[str, Any]:
    config = model_config({"preset": "gpt2"}, args.tiny)
    torch.manual_seed(0)
    base = GPT(config).eval()
    hf = hf_twin(base)
    bound = copy_bandwidth(64 if args.tiny else 512) / weight_bytes_per_step(base)
    models = {"fp32 unpacked": base}
    models.update({choice: prepare_weights(copy.deepcopy(base), choice)[0] for choice in CHOICES})
    steps = min(args.tokens, config.block_size - 1)
    prompt = torch.zeros(1, 1, dtype=torch.long)
    rows = []
    for batch in (1, 8):
        runs = {name: greedy_run(model, prompt, steps, batch) for name, model in models.items()}
        if hf is not None:
            def generate(batch: int = batch) -> None:
                with torch.no_grad():
                    hf.generate(prompt.repeat(batch, 1), attention_mask=torch.ones(batch, 1, dtype=torch.long),
                                max_new_tokens=steps, min_new_tokens=steps, do_sample=False, use_cache=True,
                                pad_token_id=0)
            runs["transformers fp32"] = generate
        for run in runs.values():
            run()  # warm-up: allocation, kernel selection
        times = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, run in runs.items():
                times[name].append(seconds_per_call(run, 1))
        for name in runs:
            rows.append({"batch": batch, "weights": name, "tok_per_s": batch * steps / statistics.median(times[name]),
                         "vs_fp32": statistics.median(f / t for f, t in zip(times["fp32"], times[name])),
                         "fp32_bound_tok_per_s": batch * bound})
    return {"new_tokens": steps, "repeats": args.repeats, "rows": rows}


def bench_quality(spec: str, prompts: int) -> dict[str, Any]:
    """bpb of the whole val split and greedy agreement, for one checkpoint and its dataset."""
    path, data = spec.rsplit(":", 1)
    checkpoint = read_checkpoint(path)
    tokens = dataset_split_tokens(data, "val", checkpoint.tokenizer_spec)
    tokenizer = checkpoint.tokenizer
    lengths = token_byte_lengths(tokenizer)
    block = checkpoint.config.model.block_size
    starts = torch.linspace(0, len(tokens) - block, prompts).long().tolist()
    prompt_ids = torch.from_numpy(np.stack([tokens[s:s + block // 4].astype("int64") for s in starts]))
    result: dict[str, Any] = {"checkpoint": str(checkpoint.path), "data": data, "prompts": prompts}
    continuations = {}
    for choice in CHOICES:
        model, _ = prepare_weights(load_model(checkpoint, keep_int8=True), choice, decoding=False)
        lm = evaluate_tokens(model.eval(), tokens, lengths)
        result[choice] = {"bits_per_byte": lm.bits_per_byte, "loss": lm.loss, "tokens": lm.tokens}
        steps = min(AGREE_TOKENS, block - prompt_ids.size(1))
        continuations[choice] = torch.stack(list(decode(model, prompt_ids, steps, lambda x: x.argmax(-1))), dim=1)
    for choice in CHOICES[1:]:
        same = continuations[choice] == continuations["fp32"]
        first_miss = torch.where(same.all(1), same.size(1), (~same).int().argmax(1))
        result[choice]["bpb_change"] = result[choice]["bits_per_byte"] / result["fp32"]["bits_per_byte"] - 1
        result[choice]["agree_all"] = int(same.all(1).sum())
        result[choice]["agreed_tokens_median"] = float(first_miss.float().median())
    result["agree_tokens"] = steps
    return result


def speed_table(speed: dict[str, Any]) -> str:
    lines = ["| batch | weights | tok/s | vs our fp32 | fp32 bandwidth bound tok/s | of bound |", "|" + "---|" * 6]
    for r in speed["rows"]:
        lines.append(f"| {r['batch']} | {r['weights']} | {r['tok_per_s']:,.1f} | {r['vs_fp32']:.2f}x "
                     f"| {r['fp32_bound_tok_per_s']:,.1f} | {r['tok_per_s'] / r['fp32_bound_tok_per_s']:.0%} |")
    return "\n".join(lines) + f"\n\n{speed['new_tokens']} new tokens, {speed['repeats']} interleaved repeats.\n"


def quality_table(results: list[dict[str, Any]]) -> str:
    lines = ["| checkpoint | weights | val bits/byte | change | greedy: first N tokens equal fp32's |",
             "|" + "---|" * 5]
    for q in results:
        for choice in CHOICES:
            r = q[choice]
            change = "-" if choice == "fp32" else f"{r['bpb_change']:+.2%}"
            agree = "-" if choice == "fp32" else (f"{r['agree_all']} of {q['prompts']} prompts "
                                                 f"(N={q['agree_tokens']}); median {r['agreed_tokens_median']:.0f}")
            lines.append(f"| {q['checkpoint']} | {choice} | {r['bits_per_byte']:.4f} | {change} | {agree} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few repeats and tokens: a smoke test")
    parser.add_argument("--tiny", action="store_true", help="the speed model at a tiny size (for the tests)")
    parser.add_argument("--quality", nargs="*", default=[], metavar="CKPT:DATA",
                        help="measure quality of these checkpoints on their datasets' val split instead of speed")
    parser.add_argument("--prompts", type=int, default=20, help="prompts for greedy agreement")
    parser.add_argument("--json", help="also write the results as JSON to this path")
    args = parser.parse_args(argv)
    args.repeats, args.tokens = (2, 8) if args.quick else (7, 64)
    results: dict[str, Any] = {"machine": machine()}
    print(machine_line(results["machine"]), flush=True)
    if args.quality:
        results["quality"] = [bench_quality(spec, args.prompts) for spec in args.quality]
        print(quality_table(results["quality"]), flush=True)
    else:
        results["speed"] = bench_speed(args)
        print(speed_table(results["speed"]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
