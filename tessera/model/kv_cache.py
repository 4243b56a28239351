"""A key/value cache preallocated for a whole generation.

Every layer's keys and values live in one tensor each, (n_layers, B, n_kv_heads, max_len, head_dim),
allocated once; decoding writes into it in place, so no step allocates or concatenates. Rows of a batch
share one write position; left padding is handled by `key_valid`, which marks the slots that hold real
tokens, so padded prompts attend exactly as unpadded ones. When no row is padded, a one-token step needs no
mask at all (its query sees every filled slot), and `mask` stays None.

Positions never exceed the slot count, so `for_model` makes sure the model's rotary table (which a decode
step indexes by position) covers every slot: it grows the table of a model asked to decode past its own
max_seq_len (a draft shorter than the model it drafts for).

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
        self.padded = False  # does any written slot of any row hold padding
        self.mask: torch.Tensor | None = None  # (B, 1, T, S) for the step in progress
        self.write_slots: torch.Tensor | None = None  # (T,) slots the step in progress writes
        self._slots = torch.arange(max_len, device=device)
        self._layers = list(zip(self.k.unbind(0), self.v.unbind(0)))  # per-layer views, made once

    @classmethod
    def for_model(cls, model, batch: int, max_len: int, dtype=None, device=None, static: bool = False) -> "KVCache":
        c = model.cfg
        p = next(model.parameters())
        if max_len > model.rope.shape[1]:
            model.init_rope(max_len)
        return cls(c.n_layers, batch, c.kv_heads, c.head_dim, max_len, dtype or p.dtype, device or p.device, static)

    def begin(self, n_new: int, valid: torch.Tensor | None = None) -> None:
        """Prepare the mask for `n_new` tokens about to be written; `valid` (B, n_new) marks real tokens (None: all)."""
        s = self.length
        if s + n_new > self.max_len:
            raise RuntimeError(f"KV cache overflow: {s} + {n_new} tokens > {self.max_len} slots")
        if valid is None:  # every new token is real
            self.key_valid[:, s : s + n_new] = True
        else:
            self.key_valid[:, s : s + n_new] = valid
            self.padded = self.padded or not bool(valid.all())
        q_slot = self._slots[s : s + n_new]
        self.write_slots = q_slot
        if n_new == 1 and not self.padded and not self.static:
            self.mask = None  # one query over unpadded rows: every filled slot is visible
            return
        span = self.max_len if self.static else s + n_new
        causal = self._slots[None, :span] <= q_slot[:, None]  # (T, S)
        self.mask = (causal[None] & self.key_valid[:, None, :span])[:, None]  # (B, 1, T, S)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.static:  # tensor-indexed writes: no Python int reaches a compiled graph
            self.k[layer].index_copy_(2, self.write_slots, k)
            self.v[layer].index_copy_(2, self.write_slots, v)
            return self.k[layer], self.v[layer]
        s, n = self.length, k.shape[2]
        kc, vc = self._layers[layer]
        kc[:, :, s : s + n] = k
        vc[:, :, s : s + n] = v
        return kc[:, :, : s + n], vc[:, :, : s + n]

    def advance(self, n_new: int) -> None:
        self.length += n_new
        self.mask = None

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows `index` (for batch compaction)."""
        self.k = self.k[:, index]
        self.v = self.v[:, index]
        self._layers = list(zip(self.k.unbind(0), self.v.unbind(0)))
        self.key_valid = self.key_valid[index]
        self.padded = self.padded and not bool(self.key_valid[:, : self.length].all())

    def keep(self, start: int, counts: torch.Tensor) -> None:
        """Of the slots written since slot `start`, row i keeps its first `counts[i]` (speculative decoding's
        roll-back after a rejected draft). The length becomes `start + max(counts)`; a row's slots past its
        own count become holes, masked out of attention like padding."""
        n = int(counts.max())
        end = start + n
        if not bool((counts == n).all()):
            hole = self._slots[None, start:end] >= (start + counts)[:, None]
            self.key_valid[:, start:end] &= ~hole
            self.padded = True
        self.length = end
        self.mask = None

    def compact(self) -> None:
        """Squeeze the holes out of the filled slots: each row's real slots move, in order, to the end of the
        new filled prefix (left-padded, as a prompt batch is); the length becomes the largest count of real
        slots in a row. Positions are the caller's, so attention computes the same after a compaction."""
        L = self.length
        valid = self.key_valid[:, :L]
        n = int(valid.sum(1).max())
        # holes first, then real slots, each in slot order (a stable sort), and the last n of them
        order = torch.sort(valid.to(torch.int8), dim=1, stable=True).indices[:, L - n:]  # (B, n)
        nl, _, h, _, d = self.k.shape
        idx = order[None, :, None, :, None].expand(nl, -1, h, -1, d)
        self.k[:, :, :, :n] = self.k[:, :, :, :L].gather(3, idx)
        self.v[:, :, :, :n] = self.v[:, :, :, :L].gather(3, idx)
        self.key_valid[:, :n] = valid.gather(1, order)
        self.key_valid[:, n:L] = False
        self.length = n
        self.padded = not bool(self.key_valid[:, :n].all())
        self.mask = None
