"""Imported by every Python process that `scripts/as_avx2.py` starts (Python imports a module of
this name at start-up from its path): torch's probes for native bf16 answer no there. They are
private functions, and patching them is the only way to have `gpt.device.cpu_has_native_bf16`
and everything that depends on it take the AVX2 host's path in a subprocess too."""

import os

if os.environ.get("GPT_AS_AVX2") == "1":
    import torch

    torch.cpu._is_avx512_bf16_supported = lambda: False
    torch.cpu._is_amx_tile_supported = lambda: False
