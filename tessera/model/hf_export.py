"""Export a tessera decoder as a Hugging Face transformers model, loadable with no remote code.

tessera's decoder is Llama's architecture; with QK-norm on it is Qwen3's (per-head RMSNorm on q and k
before RoPE), and with `attn_bias` (biases on q, k and v) and no QK-norm it is Qwen2's. The export writes
`LlamaForCausalLM`, `Qwen3ForCausalLM` or `Qwen2ForCausalLM` weights and config, splits the
fused QKV and gate/up projections, writes a transformers tokenizer, and copies the tokenizer bundle:

    out/
      config.json, generation_config.json, model.safetensors     (AutoModelForCausalLM.from_pretrained)
      tokenizer.json, tokenizer_config.json                      (AutoTokenizer.from_pretrained)
      tessera_tokenizer/                                         (tessera.tokenizers.load_bundle)

The ids are tessera's unified vocabulary. The transformers tokenizer encodes and decodes text exactly as
tessera does and names every special and code id (`<boi>`, `<img:123>`, `<aud0:45>`; see `hf_tokenizer`); for
a bundle built from an existing model's tokenizer (`--text-from-hf`) it is that tokenizer with the specials
and codes added at the bundle's ids;
turning image and audio codes into pixels and waveforms needs the bundle (`MultimodalTokenizer.decode`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from tessera.model.hf_tokenizer import save_hf_tokenizer
from tessera.model.transformer import ModelConfig, Transformer
from tessera.storage import atomic_write_json, check_output_dir, make_temp_dir, replace_dir, save_tensors


def hf_architecture(cfg: ModelConfig) -> str:
    """The transformers class that computes what the decoder computes."""
    if cfg.qk_norm:
        return "Qwen3ForCausalLM"  # with attn_bias: Qwen3's attention_bias, the output projection's bias zero
    return "Qwen2ForCausalLM" if cfg.attn_bias else "LlamaForCausalLM"


def hf_config(cfg: ModelConfig, bos_id: int = 1, eos_id: int = 2, pad_id: int | None = None):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim,
        intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings,
        hidden_act="silu",
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        initializer_range=cfg.init_std,
    )
    arch = hf_architecture(cfg)
    if arch == "Qwen3ForCausalLM":
        c = Qwen3Config(use_sliding_window=False, attention_bias=cfg.attn_bias, **common)
    elif arch == "Qwen2ForCausalLM":
        c = Qwen2Config(use_sliding_window=False, **common)
    else:
        c = LlamaConfig(mlp_bias=False, attention_bias=False, **common)
    c.architectures = [arch]
    return c


def to_hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    cfg = model.cfg
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    hq, hk, hd = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.head_dim
    out = {"model.embed_tokens.weight": sd["tok_embeddings.weight"], "model.norm.weight": sd["norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["output.weight"]
    for i in range(cfg.n_layers):
        p, h = f"layers.{i}.", f"model.layers.{i}."
        q, k, v = sd[p + "attention.wqkv.weight"].split([hq, hk, hk], dim=0)
        out[h + "self_attn.q_proj.weight"] = q
        out[h + "self_attn.k_proj.weight"] = k
        out[h + "self_attn.v_proj.weight"] = v
        out[h + "self_attn.o_proj.weight"] = sd[p + "attention.wo.weight"]
        if cfg.attn_bias:
            qb, kb, vb = sd[p + "attention.wqkv.bias"].split([hq, hk, hk], dim=0)
            out[h + "self_attn.q_proj.bias"] = qb
            out[h + "self_attn.k_proj.bias"] = kb
            out[h + "self_attn.v_proj.bias"] = vb
            if cfg.qk_norm:  # Qwen3's attention_bias also gives the output projection one
                out[h + "self_attn.o_proj.bias"] = torch.zeros(cfg.dim, dtype=qb.dtype)
        if cfg.qk_norm:
            out[h + "self_attn.q_norm.weight"] = sd[p + "attention.q_norm.weight"]
            out[h + "self_attn.k_norm.weight"] = sd[p + "attention.k_norm.weight"]
        gate, up = sd[p + "feed_forward.w13.weight"].chunk(2, dim=0)
        out[h + "mlp.gate_proj.weight"] = gate
        out[h + "mlp.up_proj.weight"] = up
        out[h + "mlp.down_proj.weight"] = sd[p + "feed_forward.w2.weight"]
        out[h + "input_layernorm.weight"] = sd[p + "attention_norm.weight"]
        out[h + "post_attention_layernorm.weight"] = sd[p + "ffn_norm.weight"]
    assert hd * cfg.n_heads == hq
    return {k: v.contiguous() for k, v in out.items()}


def to_hf_model(model: Transformer, bos_id: int = 1, eos_id: int = 2, pad_id: int | None = None):
    """An in-memory transformers model with the same weights (used by the parity tests and benchmarks)."""
    from transformers import AutoModelForCausalLM

    config = hf_config(model.cfg, bos_id, eos_id, pad_id)
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(model), strict=False)
    missing = [m for m in missing if not (model.cfg.tie_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"HF export mismatch: missing {missing}, unexpected {unexpected}")
    return hf.eval()


def export_hf(model: Transformer, bundle_dir: str | Path, out: str | Path, *, bos_id: int, eos_id: int,
              pad_id: int | None, dtype: torch.dtype = torch.float32) -> Path:
    """Write an HF model directory (atomically): model, transformers tokenizer, and the tokenizer bundle."""
    out = Path(out)
    tmp = make_temp_dir(out.parent, f".{out.name}.")
    try:
        config = hf_config(model.cfg, bos_id, eos_id, pad_id)
        config.dtype = str(dtype).replace("torch.", "")
        config.save_pretrained(tmp)
        sd = {k: v.to(dtype) for k, v in to_hf_state_dict(model).items()}
        save_tensors(tmp / "model.safetensors", sd, metadata={"format": "pt"})
        atomic_write_json(tmp / "generation_config.json", {
            "bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id, "do_sample": False,
        })
        save_hf_tokenizer(bundle_dir, tmp, model.cfg.max_seq_len)
        shutil.copytree(bundle_dir, tmp / "tessera_tokenizer")
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ------------------------------------------------------------------------------------------------ CLI
def add_export_arguments(p) -> None:
    p.add_argument("--model", required=True, metavar="RUN", help="run directory (model.safetensors + config.json)")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--force", action="store_true", help="replace an existing output directory")


def run_export(args) -> int:
    from tessera.errors import TesseraError
    from tessera.model.api import load

    out = Path(args.out)
    # --force replaces an export (it holds the bundle's copy, tessera_tokenizer/), never the run or user files
    check_output_dir(out, [args.model], noun="a Hugging Face export of a tessera run", markers=("tessera_tokenizer",),
                     force=True, inside_inputs=True)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise TesseraError(f"{out} already exists; pass --force to replace it")
    m = load(args.model, device="cpu", dtype=torch.float32)
    tok = m.tokenizer
    export_hf(m.model, Path(args.model) / "tokenizer", out, bos_id=tok.bos_id, eos_id=tok.eos_id,
              pad_id=tok.pad_id, dtype=getattr(torch, args.dtype))
    arch = hf_architecture(m.model.cfg)
    print(f"exported {arch} ({m.model.num_params(False) / 1e6:.1f}M parameters) -> {out}")
    return 0
