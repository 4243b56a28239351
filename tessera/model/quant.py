"""Low-memory inference: weight-only int8 for the decoder's Linear layers.

Each Linear weight (out, in) becomes int8 codes and one fp32 scale per output channel, symmetric:
`scale = max|w_row| / 127`, `code = round(w / scale)`. Activations, norms, the embedding table and the KV cache
keep the model's dtype; a matmul reads the int8 codes (a quarter of fp32's bytes) and scales its outputs.
On CPU it runs as torch's int8 weight-only kernel (`_weight_int8pack_mm`) with the activations rounded to
bf16 for the product (the kernel's fast path); elsewhere the codes are dequantized on the fly.

    from tessera.model.quant import quantize_int8
    quantize_int8(model)          # in place; tessera.load(run, dtype="int8") does it for you
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _has_int8pack() -> bool:
    return hasattr(torch, "_weight_int8pack_mm")


class Int8Linear(nn.Module):
    """A Linear whose weight is stored as int8 codes with one scale per output channel."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = (w.abs().amax(1) / 127.0).clamp(min=1e-12)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight_int8", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale)
        self.bias = linear.bias

    def dequantized(self) -> torch.Tensor:
        return self.weight_int8.float() * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and _has_int8pack():
            # The kernel's fast path takes bf16 activations (with fp32 ones it is 10x slower on this kind of
            # CPU): the inputs are rounded to bf16 for the product, the output returns in x's dtype.
            shape = x.shape
            y = torch._weight_int8pack_mm(x.reshape(-1, shape[-1]).to(torch.bfloat16), self.weight_int8,
                                          self.scale.to(torch.bfloat16))
            y = y.reshape(*shape[:-1], self.out_features).to(x.dtype)
        else:
            y = F.linear(x, self.weight_int8.to(x.dtype)) * self.scale.to(x.dtype)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every nn.Linear of `model` by an Int8Linear, in place (tied embeddings keep their float table)."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.Linear):
            setattr(model, name, Int8Linear(child))
        else:
            quantize_int8(child)
    return model
