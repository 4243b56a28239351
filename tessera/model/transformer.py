"""The tessera decoder: one Llama-style transformer over the unified text/image/audio vocabulary.

Architecture choices, and why:
- RMSNorm pre-norm, rotary positions (rotate-half layout), SwiGLU MLP, no biases: the Llama recipe, so a
  trained model exports 1:1 to HF transformers (Llama, or Qwen3 when QK-norm is on). `attn_bias` adds
  Qwen2's biases on the query, key and value projections (off by default; for models started from Qwen2).
- Grouped-query attention (n_kv_heads < n_heads) shrinks the KV cache for long image/audio spans.
- QK-norm: RMSNorm over each head's queries and keys before RoPE. Chameleon found early-fusion models
  diverge without it as image-token logits grow; it is on by default. The optional z-loss (its other half)
  is a training term in `tessera.train`.
- Packed training rows hold several documents: `doc_ids` keeps attention inside each document and
  `positions` restart at every document start, so a packed row trains exactly like separate documents.
- One rotary table (the cos/sin of every position up to max_seq_len, fp32) belongs to the model and is
  looked up by position, in training and in cached decoding alike; each block knows its own `layer_id`
  (its slot in a KV cache) from construction.
- The embedding table has one row per id of the padded vocabulary (a multiple of 128).
- The model knows nothing of DDP/FSDP, activation checkpointing or compile: `tessera.train.parallel`
  applies those from outside (torchtitan's rule). Q/K/V and gate/up projections are fused into single
  matmuls; the HF export splits them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from tessera.config import preset as _preset
from tessera.model.attention import BACKENDS, attention
from tessera.model.chunked_ce import linear_cross_entropy


@dataclass
class ModelConfig:
    vocab_size: int = 0  # rows of the embedding table; set from the tokenizer bundle's padded vocabulary
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 0  # 0: same as n_heads (multi-head attention); read `kv_heads`
    ffn_dim: int = 0  # 0: 8/3 * dim rounded up to a multiple of 64; read `hidden_dim`
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    qk_norm: bool = True
    tie_embeddings: bool = False
    attn_bias: bool = False  # biases on the q, k and v projections (Qwen2's); no other layer has biases
    max_seq_len: int = 2048
    attn_backend: str = "sdpa"  # sdpa | flex | flash
    init_std: float = 0.02
    # Residual dropout (GPT-2's resid_pdrop) on the embeddings and on each attention and MLP output, in
    # training only: a regularizer for small corpora, where the decoder otherwise memorizes; 0 at scale.
    dropout: float = 0.0

    def __post_init__(self):
        # Derived sizes are properties, never written back: a preset overridden with another `dim` or
        # `n_heads` then derives them from the new values instead of keeping the preset's.
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_kv_heads < 0 or self.ffn_dim < 0:
            raise ValueError("n_kv_heads and ffn_dim must be >= 0 (0: derived)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.kv_heads}")
        if (self.dim // self.n_heads) % 2:
            raise ValueError("head_dim must be even for rotary embeddings")
        if self.attn_backend not in BACKENDS:
            raise ValueError(f"attn_backend must be one of {', '.join(BACKENDS)}, got {self.attn_backend!r}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def hidden_dim(self) -> int:
        """The SwiGLU hidden width: `ffn_dim`, or 8/3 * dim rounded up to a multiple of 64."""
        return self.ffn_dim or 64 * math.ceil(8 * self.dim / 3 / 64)


MODEL_PRESETS = {
    "tiny": ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=512),
    "demo": ModelConfig(dim=256, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=512),
    "small": ModelConfig(dim=768, n_layers=12, n_heads=12, n_kv_heads=4, max_seq_len=2048),
    "1b": ModelConfig(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192, rope_theta=500000.0,
                      max_seq_len=4096),
    "7b": ModelConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336, rope_theta=500000.0,
                      max_seq_len=4096),
}


def model_preset(name: str) -> ModelConfig:
    return _preset(MODEL_PRESETS, name, "model")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)  # one fused op, same numbers
        # Normalize in fp32, scale in the input dtype (as HF Llama does, for exact export parity).
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)

    def reset_parameters(self):
        nn.init.ones_(self.weight)


def rope_table(length: int, head_dim: int, theta: float, device=None) -> torch.Tensor:
    """The rotary table of positions 0..length-1: (2, length, head_dim) fp32, cos then sin, in the rotate-half
    layout, with the first half of `sin` negated (so that `apply_rope` needs no negation: the same numbers,
    one op fewer). The fp32 arithmetic of HF Llama's cos/sin, for exact export parity."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.int64).float() / head_dim))
    freqs = torch.arange(length, device=device).float()[:, None] * inv_freq  # (length, hd/2)
    sin = freqs.sin()
    cos = torch.cat([freqs, freqs], dim=-1).cos()
    return torch.stack([cos, torch.cat([-sin, sin], dim=-1)])


def apply_rope(x, cos, sin):
    """x (B, T, H, hd): rotate each pair (x_i, x_{i+hd/2}) by its position's angle.

    Rotate-half: x * cos + (-x2, x1) * sin; with `sin`'s first half pre-negated that is a roll by hd/2."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id  # this layer's slot in a KV cache
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.backend = cfg.attn_backend
        self.wqkv = nn.Linear(cfg.dim, (cfg.n_heads + 2 * cfg.kv_heads) * cfg.head_dim, bias=cfg.attn_bias)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None

    def forward(self, x, cos, sin, doc_ids=None, cache=None):
        B, T, _ = x.shape
        hq, hk, hd = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = self.wqkv(x).view(B, T, hq + 2 * hk, hd)
        if self.q_norm is not None:
            q, k, v = qkv.split([hq, hk, hk], dim=2)
            q, k = apply_rope(self.q_norm(q), cos, sin), apply_rope(self.k_norm(k), cos, sin)
        else:  # queries and keys rotate as one tensor: half the elementwise ops per step
            qk, v = qkv.split([hq + hk, hk], dim=2)
            q, k = apply_rope(qk, cos, sin).split([hq, hk], dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, hd)
        if cache is not None:
            k, v = cache.update(self.layer_id, k, v)
            # the cache's mask says what each query sees; None (one query, no padding): every key
            y = attention(q, k, v, mask=cache.mask, causal=False)
        else:
            y = attention(q, k, v, doc_ids=doc_ids, backend=self.backend)
        return self.wo(y.transpose(1, 2).reshape(B, T, hq * hd))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w13 = nn.Linear(cfg.dim, 2 * cfg.hidden_dim, bias=False)  # gate and up, fused
        self.w2 = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def forward(self, x):
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg, layer_id)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()

    def forward(self, x, cos, sin, doc_ids=None, cache=None):
        x = x + self.dropout(self.attention(self.attention_norm(x), cos, sin, doc_ids, cache))
        return x + self.dropout(self.feed_forward(self.ffn_norm(x)))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("ModelConfig.vocab_size must be set (the bundle's padded vocabulary size)")
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # The rotary cos/sin of every position, (2, max_seq_len, head_dim), shared by all layers and looked up
        # by position in every forward (training and cached decoding). Derived, not learned: non-persistent, so
        # checkpoints do not hold it, and `init_rope` rebuilds it wherever the weights are materialized.
        self.register_buffer("rope", torch.empty(2, cfg.max_seq_len, cfg.head_dim), persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_rope(self, length: int = 0, device=None) -> None:
        """(Re)build the rotary table, in fp32, for max(max_seq_len, `length`) positions, on `device` (default:
        where the table is). Needed after `to_empty` (FSDP2's materialization) or a meta-device build whose
        weights were assigned from a checkpoint, since no state dict holds the table; a KV cache with more
        slots than max_seq_len (a draft model decoding past its own length) grows it. `model.to(dtype)` casts
        the table with the weights: the same numbers as casting the looked-up rows to the activations' dtype,
        which forward does anyway."""
        n = max(self.cfg.max_seq_len, length)
        self.rope = rope_table(n, self.cfg.head_dim, self.cfg.rope_theta, device=device or self.rope.device)

    @torch.no_grad()
    def init_weights(self, seed: int | None = None):
        """The rotary table (`init_rope`), then the weights: Normal(0, std) for matrices, residual output
        projections scaled by 1/sqrt(2 * n_layers) (GPT-2); ones for norm weights, zeros for biases."""
        self.init_rope()
        g = None
        if seed is not None:
            g = torch.Generator(device="cpu").manual_seed(seed)
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.dim() == 1:
                (nn.init.zeros_ if name.endswith(".bias") else nn.init.ones_)(p)
                continue
            s = std / math.sqrt(2 * self.cfg.n_layers) if name.endswith(("wo.weight", "w2.weight")) else std
            if g is None:
                nn.init.normal_(p, 0.0, s)
            else:  # seeded on CPU, then copied: identical weights on every device and rank
                p.copy_(torch.randn(p.shape, generator=g) * s)

    def forward(
        self,
        idx: torch.Tensor,
        positions: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        cache=None,
        logits_to_keep: int = 0,
        loss_targets: torch.Tensor | None = None,
        loss_chunk: int = 0,
    ):
        """idx (B, T) -> logits (B, T, vocab) (the last `logits_to_keep` positions when it is > 0).

        With a KV cache, the caller brackets the call with `cache.begin(T, valid)` and `cache.advance(T)`.

        Training with `loss_targets` (B, T) (ids in range; the caller masks the ones to ignore) and
        `loss_chunk` > 0: no logits are kept; returns (ce, lse), each (B, T) fp32, every token's cross-entropy
        and log-sum-exp, computed `loss_chunk` tokens at a time (`model/chunked_ce.py`).
        """
        B, T = idx.shape
        if loss_chunk and loss_targets is None:
            raise ValueError("loss_chunk needs loss_targets: the chunked head computes losses, not logits")
        if positions is None:
            if cache is not None:
                raise ValueError("decoding with a KV cache needs explicit positions")
            positions = torch.arange(T, device=idx.device)[None].expand(B, T)
        if cache is None and T > self.rope.shape[1]:  # a KV cache grew the table to its slots (for_model)
            raise ValueError(f"{T} positions exceed the model's rotary table ({self.rope.shape[1]}, its max_seq_len)")
        h = self.dropout(self.tok_embeddings(idx))
        cos, sin = self.rope[:, positions, None].to(h.dtype).unbind(0)  # each (B, T, 1, hd)
        for layer in self.layers:
            h = layer(h, cos, sin, doc_ids, cache)
        if loss_targets is not None:
            h = self.norm(h)
            ce, lse = linear_cross_entropy(h.flatten(0, 1), self.output.weight, loss_targets.flatten(), loss_chunk)
            return ce.view(B, T), lse.view(B, T)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        return self.output(self.norm(h))

    # ------------------------------------------------------------------------------------ accounting
    def num_params(self, exclude_embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings and not self.cfg.tie_embeddings:
            n -= self.tok_embeddings.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 N (matmuls, forward and backward) + 12 L d T (attention), PaLM's count."""
        c = self.cfg
        return 6 * self.num_params(exclude_embeddings=True) + 12 * c.n_layers * c.dim * seq_len
