"""Run a command as on a CPU with AVX2 and no native bf16, on a CPU that has native bf16: to measure
the recipe `configs/shakespeare_char.yaml` keeps for such hosts where none is at hand.

    python scripts/as_avx2.py python scripts/bench_train.py configs/shakespeare_char.yaml train.max_minutes=6.5

torch's own kernels (ATEN_CPU_CAPABILITY), oneDNN's and MKL's are capped at AVX2, and in every
Python process the command starts (through the `sitecustomize` module in `scripts/as_avx2/`)
torch's probes for AVX512-BF16 and AMX answer no, so `gpt` does what it does on such a host:
`dtype: auto` trains in fp32, a config's `hosts.cpu` settings apply and Muon runs its
Newton-Schulz products in fp32. The speed is not emulated: this host's AVX2 path still has its
own clock and caches, so match the steps of a real AVX2 run by scaling the budget (BENCHMARKS.md).
"""

import os
import subprocess
import sys
from pathlib import Path

CAPS = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def main() -> None:
    if len(sys.argv) < 2:
        print("usage: python scripts/as_avx2.py COMMAND [ARG ...]", file=sys.stderr)
        sys.exit(2)
    paths = [str(Path(__file__).resolve().parent / "as_avx2"), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, **CAPS, GPT_AS_AVX2="1", PYTHONPATH=os.pathsep.join(p for p in paths if p))
    try:
        sys.exit(subprocess.run(sys.argv[1:], env=env).returncode)
    except FileNotFoundError:
        print(f"as_avx2: no command {sys.argv[1]!r} found; give a program on PATH or its path", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
