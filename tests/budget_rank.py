"""A torchrun entry point for tests/test_distributed.py: `gpt train` in which the budget clock of
the rank named by GPT_TEST_FAST_CLOCK_RANK runs 1000 times too fast, so that this rank finds its
first timing window long enough while the others may not, and plans to stop at once. The clock is
patched in here, so the package itself carries no test hook."""

from __future__ import annotations

import os
import time

import gpt.training.budget
from gpt.cli import main

if os.environ.get("RANK") == os.environ["GPT_TEST_FAST_CLOCK_RANK"]:
    gpt.training.budget.clock = lambda: 1000 * time.perf_counter()

main()
