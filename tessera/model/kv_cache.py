"""A key/value cache preallocated for a whole generation.

Every layer's keys and values live in one tensor each, (n_layers, B, n_kv_heads, max_len, head_dim),
allocated once; decoding writes into it in place, so no step allocates or concatenates. Rows of a batch
share one write position; left padding is handled by `key_valid`, which marks the slots that hold real
tokens, so padded prompts attend exactly as unpadded ones.

`static=True` makes every step attend over the full `max_len` slots with a mask instead of the filled
prefix: shapes never change, which is what CUDA graphs and `torch.compile(mode="reduce-overhead")` need.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, head_dim: int, max_len: int,
                 dtype=torch.float32, device="cpu", static: bool = False):
        shape = (n_layers, batch, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.key_valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.max_len = max_len
        self.length = 0
        self.static = static
        self.mask: torch.Tensor | None = None  # (B, 1, T, S) for the step in progress
        self.write_slots: torch.Tensor | None = None  # (T,) slots the step in progress writes
        self._slots = torch.arange(max_len, device=device)

    @classmethod
    def for_model(cls, model, batch: int, max_len: int, dtype=None, device=None, static: bool = False) -> "KVCache":
        c = model.cfg
        p = next(model.parameters())
        return cls(c.n_layers, batch, c.n_kv_heads, c.head_dim, max_len, dtype or p.dtype, device or p.device, static)

    def begin(self, n_new: int, valid: torch.Tensor | None = None) -> None:
        """Prepare the mask for `n_new` tokens about to be written; `valid` (B, n_new) marks real tokens."""
        s = self.length
        if s + n_new > self.max_len:
            raise RuntimeError(f"KV cache overflow: {s} + {n_new} tokens > {self.max_len} slots")
        self.key_valid[:, s : s + n_new] = True if valid is None else valid
        span = self.max_len if self.static else s + n_new
        q_slot = torch.arange(s, s + n_new, device=self.k.device)
        causal = self._slots[None, :span] <= q_slot[:, None]  # (T, S)
        self.mask = (causal[None] & self.key_valid[:, None, :span])[:, None]  # (B, 1, T, S)
        self.write_slots = q_slot

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.static:  # tensor-indexed writes: no Python int reaches a compiled graph
            self.k[layer].index_copy_(2, self.write_slots, k)
            self.v[layer].index_copy_(2, self.write_slots, v)
            return self.k[layer], self.v[layer]
        s, n = self.length, k.shape[2]
        self.k[layer, :, :, s : s + n] = k
        self.v[layer, :, :, s : s + n] = v
        return self.k[layer, :, :, : s + n], self.v[layer, :, :, : s + n]

    def advance(self, n_new: int) -> None:
        self.length += n_new
        self.mask = None

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows `index` (for batch compaction)."""
        self.k = self.k[:, index]
        self.v = self.v[:, index]
        self.key_valid = self.key_valid[index]
