"""A torchrun entry point for tests/test_distributed.py: `gpt train` in which the rank named by
GPT_TEST_FAULT_RANK misbehaves at its third optimizer step, as GPT_TEST_FAULT says: `raise`
(the process dies with an exception) or `hang` (it stops answering for 20 s, more than the
test's train.dist_timeout, without dying). The fault
is patched in here, so the package itself carries no test hook."""

from __future__ import annotations

import os
import time

import gpt.training.loop
from gpt.cli import main

if os.environ.get("RANK") == os.environ["GPT_TEST_FAULT_RANK"]:
    real_step = gpt.training.loop.optimizer_step
    steps = []

    def faulty_step(*args, **kwargs):
        steps.append(1)
        if len(steps) == 3:
            if os.environ["GPT_TEST_FAULT"] == "raise":
                raise RuntimeError("injected fault in rank " + os.environ["RANK"])
            time.sleep(20)  # longer than the test's train.dist_timeout, shorter than torchrun's kill grace
        return real_step(*args, **kwargs)

    gpt.training.loop.optimizer_step = faulty_step

main()
