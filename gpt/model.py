"""A decoder-only Transformer (GPT): embeddings, causal self-attention, MLP, blocks, logits.

Pure torch, no I/O. `GPT.forward(idx, targets)` is the training path; `GPT.forward_step`
runs new tokens against a `KVCache` for fast generation.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt.config import ModelConfig


def sinusoidal_table(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """The fixed table of "Attention Is All You Need":
    PE[pos, 2i] = sin(pos / 10000^(2i/dim)), PE[pos, 2i+1] = cos(pos / 10000^(2i/dim))."""
    inv_freq = 10000.0 ** (-torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim)
    angles = positions.float()[:, None] * inv_freq[None, :]
    return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(1)


def rope_angles(positions: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles, shape (T, head_dim / 2)."""
    inv_freq = 10000.0 ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[i], x[i + d/2]) of each head by the angle of the token's position."""
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return rotated.type_as(x)


class KVCache:
    """Keys and values of every layer for the tokens seen so far: preallocated buffers plus a
    position counter, so that each new token costs one attention row, not a full recompute."""

    def __init__(self, config: ModelConfig, batch_size: int, device: torch.device, dtype: torch.dtype):
        shape = (config.n_layer, batch_size, config.n_head, config.block_size, config.n_embd // config.n_head)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0

    def positions(self, length: int) -> torch.Tensor:
        """Positions of the next `length` tokens."""
        check_context(self.pos + length, self.keys.size(3))
        return torch.arange(self.pos, self.pos + length, device=self.keys.device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Store this step's k, v for `layer`; return all keys and values up to and including
        them, and the attention mask: None when the new tokens have no past (causal among
        themselves) or are a single token (which sees everything)."""
        past, end = self.pos, self.pos + k.size(2)
        self.keys[layer, :, :, past:end] = k
        self.values[layer, :, :, past:end] = v
        mask = None
        if past and k.size(2) > 1:  # several new tokens after a past: the causal mask shifted by it
            mask = torch.ones(k.size(2), end, dtype=torch.bool, device=k.device).tril(diagonal=past)
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end], mask

    def advance(self, length: int) -> None:
        self.pos += length

    def repeat_interleave(self, copies: int) -> None:
        """Continue each sequence as `copies` streams: row b becomes rows b * copies to
        b * copies + copies - 1, so one prefill serves several samples of the same prompt."""
        self.keys = self.keys.repeat_interleave(copies, dim=1)
        self.values = self.values.repeat_interleave(copies, dim=1)


class StaticKVCache(KVCache):
    """A KVCache whose shapes never change: the position is a device tensor and attention
    always reads the whole buffer through a mask, so a compiled one-token step is compiled
    once and never waits for the host. The caller keeps within the context (nothing here
    reads the position back to check it)."""

    def __init__(self, config: ModelConfig, batch_size: int, device: torch.device, dtype: torch.dtype):
        super().__init__(config, batch_size, device, dtype)
        self.index = torch.zeros((), dtype=torch.long, device=device)
        self.slots = torch.arange(config.block_size, device=device)

    def positions(self, length: int) -> torch.Tensor:
        return self.index + self.slots[:length]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        positions = self.positions(k.size(2))
        self.keys[layer].index_copy_(2, positions, k)
        self.values[layer].index_copy_(2, positions, v)
        return self.keys[layer], self.values[layer], self.slots[None, :] <= positions[:, None]

    def advance(self, length: int) -> None:
        self.index += length


class RaggedKVCache(KVCache):
    """A KVCache whose rows are separate sequences, each at its own length: the cache of
    continuous batching, where a request joins the running batch and leaves when done.

    Before each forward the caller names the rows that run, a range `first` to `first + B`
    (a view of the buffers, not a copy), and how many new tokens each row brings; a forward's
    idx (B, T) is padded on the right to the longest. Padding is written past its row's end,
    where a later token overwrites it and no query ever looks."""

    def __init__(self, config: ModelConfig, batch_size: int, device: torch.device, dtype: torch.dtype):
        super().__init__(config, batch_size, device, dtype)
        self.lengths = [0] * batch_size
        self.slots = torch.arange(config.block_size, device=device)
        self.run(0, [])

    def run(self, first: int, counts: list[int]) -> None:
        """The next forward runs rows first .. first + len(counts) - 1, row first + b adding
        counts[b] new tokens after its `lengths`."""
        self.rows, self.counts = slice(first, first + len(counts)), counts
        starts, longest = self.lengths[self.rows], max(counts, default=0)
        self.end = max(starts, default=0) + longest  # padding included
        check_context(self.end, self.keys.size(3))
        self.batch_positions = torch.tensor(starts, device=self.keys.device)[:, None] + self.slots[:longest]
        self.batch_index = torch.arange(len(counts), device=self.keys.device)[:, None]
        self.mask = self.slots[:self.end] <= self.batch_positions[:, None, :, None]  # (B, 1, T, end)

    def positions(self, length: int) -> torch.Tensor:
        """(B, length): row b's new tokens sit at lengths[b], lengths[b] + 1, ..."""
        return self.batch_positions[:, :length]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self.keys[layer, self.rows][self.batch_index, :, self.batch_positions] = k.transpose(1, 2)
        self.values[layer, self.rows][self.batch_index, :, self.batch_positions] = v.transpose(1, 2)
        return self.keys[layer, self.rows, :, :self.end], self.values[layer, self.rows, :, :self.end], self.mask

    def advance(self, length: int) -> None:
        for row, count in zip(range(self.rows.start, self.rows.stop), self.counts):
            self.lengths[row] += count

    def move(self, source: int, target: int) -> None:
        """Put the sequence of row `source` in row `target` (whose sequence is dropped), so that
        the running rows stay a block at the top of the buffers."""
        length = self.lengths[source]
        self.keys[:, target, :, :length] = self.keys[:, source, :, :length]
        self.values[:, target, :, :length] = self.values[:, source, :, :length]
        self.lengths[target], self.lengths[source] = length, 0


def check_context(length: int, block_size: int) -> None:
    """Refuse a sequence longer than the model's context: its positions do not exist."""
    if length > block_size:
        raise ValueError(f"sequence of {length} tokens is longer than the model's context "
                         f"(block_size={block_size}); crop the input to its last {block_size} tokens")


class HeadRMSNorm(nn.RMSNorm):
    """RMSNorm of queries or keys in the dtype they arrive in. Under autocast they come out of
    the qkv product in bf16 while the gain is fp32; torch's fused kernel wants the two alike
    (else it warns and runs a slower unfused version), so the 64-odd gains are cast instead."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.eps)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.n_head = config.n_head
        self.layer = layer
        self.attn_dropout_p = config.dropout if config.attn_dropout is None else config.attn_dropout
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        # QK-norm bounds the attention logits, which lets higher learning rates train stably;
        # the learned gain (per head dimension) gives back the sharpness a unit norm would cap.
        head_size = config.n_embd // config.n_head
        self.q_norm = HeadRMSNorm(head_size, eps=config.norm_eps) if config.qk_norm else None
        self.k_norm = HeadRMSNorm(head_size, eps=config.norm_eps) if config.qk_norm else None
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.proj.residual_projection = True
        self.resid_dropout = nn.Dropout(config.dropout)

    def heads(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values of x (B, T, C), each (B, n_head, T, head_size), rotary
        positions applied to queries and keys."""
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for t in self.qkv(x).split(C, dim=2))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return q, k, v

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                cache: KVCache | None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.heads(x, rope)
        mask = None
        if cache is not None:
            k, v, mask = cache.update(self.layer, k, v)
        # Without a mask: causal among the new tokens, or one new token that sees everything.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=(mask is None and T > 1),
                                           dropout_p=self.attn_dropout_p if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.proj(y))


class ReLUSquared(nn.Module):
    """relu(x)^2 (So et al. 2021, "Primer"): as cheap as ReLU, learns faster per step."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x).square()


ACTIVATIONS = {"gelu": nn.GELU, "gelu_tanh": functools.partial(nn.GELU, approximate="tanh"), "relu": nn.ReLU,
               "relu2": ReLUSquared}


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.act = ACTIVATIONS[config.activation]()
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.proj.residual_projection = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(self.act(self.fc(x))))


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


class Block(nn.Module):
    """Attention then MLP, each wrapped in a residual connection and a norm: before the
    sublayer (pre-norm, GPT-2) or after the residual add (post-norm, GPT-1)."""

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.pre_norm = config.norm_position == "pre"
        self.norm1 = make_norm(config)
        self.attn = CausalSelfAttention(config, layer)
        self.norm2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                cache: KVCache | None) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.attn(self.norm1(x), rope, cache)
            return x + self.mlp(self.norm2(x))
        x = self.norm1(x + self.attn(x, rope, cache))
        return self.norm2(x + self.mlp(x))


class GPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.vocab_size is None:
            raise ValueError("ModelConfig.vocab_size must be set before building a model")
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd) if config.pos_encoding == "learned" else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, layer) for layer in range(config.n_layer))
        # Post-norm blocks already end in a norm; pre-norm ones need a final one.
        self.norm_f = make_norm(config) if config.norm_position == "pre" else nn.Identity()
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self._tables: dict[torch.device, torch.Tensor | tuple[torch.Tensor, torch.Tensor]] = {}
        self.tie_weights()
        self.apply(self._init_weights)

    def tie_weights(self) -> None:
        """Share the token embedding with the unembedding (call again after assigning weights)."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.wte.weight

    def _init_weights(self, module: nn.Module) -> None:
        # GPT-2 init: N(0, 0.02), with projections into the residual stream scaled down by
        # sqrt(2 * n_layer) so the stream's variance does not grow with depth, or (zero_init_proj,
        # as in modded-nanogpt) zero, so that every block starts as the identity.
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "residual_projection", False):
                std = 0.0 if self.config.zero_init_proj else std / math.sqrt(2 * self.config.n_layer)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        """Number of parameters, each shared tensor counted once."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self) -> int:
        """Training FLOPs per token (forward + backward) at full context, as in the PaLM paper:
        6 per weight (excluding position embeddings) plus the attention score/value products."""
        c = self.config
        n = self.num_params() - (self.wpe.weight.numel() if self.wpe is not None else 0)
        return 6 * n + 12 * c.n_layer * c.n_embd * c.block_size

    def _embed(self, idx: torch.Tensor, cache: KVCache | None) -> tuple[torch.Tensor, tuple | None]:
        T = idx.size(1)
        if cache is None:
            check_context(T, self.config.block_size)
            positions = torch.arange(T, device=idx.device)
        else:
            positions = cache.positions(T)  # (T,), or (B, T) where each row is at its own position
        x = self.wte(idx)
        rope = None
        if self.config.pos_encoding == "learned":
            x = x + self.wpe(positions)
        elif self.config.pos_encoding == "sinusoidal":
            x = x + self._position_table(idx.device)[positions].to(x.dtype)
        else:
            rope = tuple(table[positions] for table in self._position_table(idx.device))
            if positions.dim() == 2:  # per-row angles: (B, 1, T, head_dim / 2) against (B, n_head, T, head_dim)
                rope = tuple(table.unsqueeze(1) for table in rope)
        return self.drop(x), rope

    def _position_table(self, device: torch.device) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The sinusoidal table, or rotary cos and sin, of every position in the context, made
        once per device (as nanochat does) instead of on every forward, i.e. every decoded token.
        A plain attribute, not a buffer: `model.to(bf16)` must not round the angles, and a model
        built on the meta device gets its table where it runs."""
        table = self._tables.get(device)
        if table is None:
            positions = torch.arange(self.config.block_size, device=device)
            if self.config.pos_encoding == "sinusoidal":
                table = sinusoidal_table(positions, self.config.n_embd)
            else:
                table = rope_angles(positions, self.config.n_embd // self.config.n_head)
            self._tables[device] = table
        return table

    def hidden_states(self, idx: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        """The final normalised hidden state (B, T, n_embd) of each position: what the
        unembedding (or a task head) reads."""
        x, rope = self._embed(idx, cache)
        for block in self.blocks:
            x = block(x, rope, cache)
        if cache is not None:
            cache.advance(idx.size(1))
        return self.norm_f(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) token ids -> logits (B, T, vocab) and, given targets (B, T), the mean
        cross-entropy of predicting each next token; targets of -1 are skipped (the prompt and
        padding of a chat fine-tuning batch)."""
        logits = self.logits(self.hidden_states(idx, None))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def forward_step(self, idx: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        """Run new tokens idx (B, T) after those already in `cache` (or alone, without one);
        return the logits (B, vocab) for the token that follows. Only the last position is
        unembedded, which matters with a 50k vocabulary."""
        x = self.hidden_states(idx, cache)
        return self.logits(x[:, -1, :])

    def logits(self, states: torch.Tensor) -> torch.Tensor:
        """Unembed hidden states; with logit_softcap, squash them smoothly into (-cap, cap)
        (Gemma 2, modded-nanogpt): no logit can grow without bound, which steadies training."""
        logits = self.lm_head(states)
        cap = self.config.logit_softcap
        return logits if cap is None else cap * torch.tanh(logits / cap)


def size_on_meta(config: ModelConfig) -> tuple[int, int]:
    """Parameters and training FLOPs per token of the model `config` describes, counted on the
    meta device: nothing is allocated, so even a 175B model is measured in a moment."""
    with torch.device("meta"):
        model = GPT(config)
    return model.num_params(), model.flops_per_token()


@contextlib.contextmanager
def evaluating(module: nn.Module) -> Iterator[nn.Module]:
    """`module` in eval mode (no dropout) for the block, then back in the mode it was in."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)
