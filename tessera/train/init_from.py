"""Start pretraining from existing weights: `python -m tessera.train.pretrain ... --init-from PATH`.

PATH is one of:

- a tessera run directory (config.json + model.safetensors): its weights, with a new optimizer, schedule and
  loader. The model settings stay the source's; the vocabulary may grow (a bundle that adds a codec, or more
  audio levels), as long as every range the source had means the same ids: the same text tokenizer, the same
  special tokens, the same codecs. Anything else that differs is refused, naming it.
- a local Hugging Face `LlamaForCausalLM`, `Qwen2ForCausalLM` or `Qwen3ForCausalLM` directory (config.json
  and *.safetensors, sharded or not; no code of the model's is run and no pickle is read). The decoder's
  settings are derived from its config (width, layers, heads, KV heads, MLP width, RoPE theta, norm eps;
  QK-norm for Qwen3, biases on q/k/v for Qwen2) and its weights are mapped onto the fused projections. A
  model the decoder cannot compute exactly (sliding-window attention, a RoPE scaling, a head_dim other
  than hidden_size / heads, biases elsewhere, another activation) is refused, naming the setting.

The source's rows of the embedding and output tables are copied to the ids they stand for (an HF model's
ids are the bundle's text ids; its vocabulary must be the size of the bundle's text range, unless
`init_allow_vocab_mismatch`). With a bundle built from the model's own tokenizer (`--text-from-hf`), the
model folder's tokenizer.json must hold the same tokens at the same ids as the bundle's (the message says
whether the number of ids or the tokens differ); the model's embedding rows past its tokenizer's last id
(a table padded for speed) are not copied. Every other row is new: code rows start from the codecs' code vectors
(`init_code_embeddings`, when `code_embedding_init`), mapped to the per-dimension mean and spread of
the copied rows; the rest are drawn from that mean and spread. At step 0 the imported model's logits over
its own vocabulary are the source's.

`freeze` keeps parts fixed: `text_rows` (the copied rows of the text range, in the embedding and the output
table, get no update: their gradient is zeroed and they are restored after every optimizer step, so
weight decay cannot move them either) or `all_but_new_rows` (a warm-up stage: only the new rows train).
The source and `freeze` are recorded in the run's config.json; `--resume` continues such a run from its
checkpoint like any other.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from tessera.config import ConfigError, apply_overrides, from_dict, to_dict
from tessera.errors import TesseraError
from tessera.model.transformer import ModelConfig, Transformer, model_preset
from tessera.storage import load_tensors, read_json
from tessera.tokenizers.bundle import load_bundle, read_bundle_spec
from tessera.tokenizers.layout import VocabLayout

FREEZE_MODES = ("", "text_rows", "all_but_new_rows")
# The settings that decide what the weights compute; the others (max_seq_len, dropout, attention backend,
# init_std) may differ from the source's.
ARCH_KEYS = ("dim", "n_layers", "n_heads", "kv_heads", "hidden_dim", "rope_theta", "norm_eps", "qk_norm",
             "tie_embeddings", "attn_bias")
HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# transformers' defaults for keys a config.json may leave out
_HF_DEFAULTS = {
    "llama": {"num_key_value_heads": None, "head_dim": None, "max_position_embeddings": 2048},
    "qwen2": {"num_key_value_heads": 32, "head_dim": None, "max_position_embeddings": 32768},
    "qwen3": {"num_key_value_heads": 32, "head_dim": 128, "max_position_embeddings": 32768},
}


class InitFromError(TesseraError):
    """A source for --init-from that cannot start this run."""


@dataclass
class Source:
    path: Path
    kind: str  # "tessera" or "hf"
    architecture: str  # "tessera-run" or the transformers class
    cfg: ModelConfig  # vocab_size: the source's embedding rows
    vocab: int  # the ids the source knows
    spec: dict | None = None  # a tessera run's tokenizer bundle
    files: tuple[Path, ...] = ()  # the safetensors files


# ------------------------------------------------------------------------------------------ sources
def open_source(path: str | Path) -> Source:
    """Read a source's config and refuse one the decoder cannot continue; no weights are read yet."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise InitFromError(f"--init-from {path}: no config.json (expected a tessera run directory or a Hugging "
                            f"Face model directory)")
    config = read_json(path / "config.json")
    if not isinstance(config, dict):
        raise InitFromError(f"--init-from {path}: config.json is not a JSON object")
    if config.get("format") == "tessera-run":
        return _tessera_source(path, config)
    if "model_type" in config:
        return _hf_source(path, config)
    raise InitFromError(f"--init-from {path}: config.json is neither a tessera run's (format 'tessera-run') nor a "
                        f"Hugging Face model's (model_type)")


def _tessera_source(path: Path, run: dict) -> Source:
    if not (path / "model.safetensors").is_file():
        raise InitFromError(f"--init-from {path}: the run has no model.safetensors yet")
    try:
        cfg = from_dict(ModelConfig, run["model"])
        spec = read_bundle_spec(path / "tokenizer")
    except (KeyError, ValueError, TesseraError) as e:
        raise InitFromError(f"--init-from {path}: cannot read the run: {e}") from None
    if spec["hash"] != run.get("tokenizer_hash"):
        raise InitFromError(f"--init-from {path}: the run's tokenizer/ is not the bundle it was trained with")
    layout = VocabLayout.from_dict(spec["layout"])
    return Source(path, "tessera", "tessera-run", cfg, layout.vocab_size, spec, (path / "model.safetensors",))


def _hf_source(path: Path, hf: dict) -> Source:
    where = f"--init-from {path}"
    model_type = hf.get("model_type")
    if model_type not in HF_ARCHITECTURES:
        raise InitFromError(f"{where}: model_type {model_type!r} is not one tessera's decoder can start from "
                            f"(supported: {', '.join(HF_ARCHITECTURES)})")
    arch = HF_ARCHITECTURES[model_type]
    if hf.get("architectures") not in (None, [arch]):
        raise InitFromError(f"{where}: architectures is {hf.get('architectures')}; only {arch} (a causal LM with "
                            f"its output head) can start a tessera decoder")
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        if not isinstance(hf.get(key), int) or hf[key] < 1:
            raise InitFromError(f"{where}: config.json has no usable {key} ({hf.get(key)!r})")
    get = {**_HF_DEFAULTS[model_type], **hf}.get
    heads, width = hf["num_attention_heads"], hf["hidden_size"]
    kv_heads = get("num_key_value_heads") or heads
    differs = []  # each: what the source has that the decoder does not compute
    if hf.get("quantization_config"):
        differs.append("its weights are quantized (quantization_config); tessera trains full-precision weights")
    if get("hidden_act", "silu") != "silu":
        differs.append(f"hidden_act is {get('hidden_act')!r}; the decoder's MLP is SwiGLU (silu)")
    head_dim = get("head_dim") or width // heads
    if width % heads or head_dim != width // heads:
        differs.append(f"head_dim is {head_dim}, but the decoder's head_dim is hidden_size / num_attention_heads "
                       f"= {width} / {heads}")
    if get("mlp_bias", False):
        differs.append("mlp_bias is on; the decoder's MLP has no biases")
    if get("attention_bias", False):
        differs.append("attention_bias is on (biases on q, k, v and the output projection); the decoder has "
                       "biases only on q, k and v (Qwen2's)")
    if get("use_sliding_window", False):
        differs.append("use_sliding_window is on; the decoder attends to the whole context")
    layer_types = get("layer_types") or []
    if any(t != "full_attention" for t in layer_types):
        differs.append(f"layer_types has {sorted(set(layer_types) - {'full_attention'})}; the decoder's layers "
                       f"all use full attention")
    theta, rope_issue = _hf_rope(hf)
    if rope_issue:
        differs.append(rope_issue)
    if differs:
        raise InitFromError(f"{where}: this {arch} does not fit tessera's decoder: " + "; ".join(differs))
    try:
        cfg = ModelConfig(vocab_size=hf["vocab_size"], dim=width, n_layers=hf["num_hidden_layers"], n_heads=heads,
                          n_kv_heads=kv_heads, ffn_dim=hf["intermediate_size"], rope_theta=float(theta),
                          norm_eps=float(get("rms_norm_eps", 1e-6)), qk_norm=model_type == "qwen3",
                          tie_embeddings=bool(get("tie_word_embeddings", False)), attn_bias=model_type == "qwen2",
                          max_seq_len=int(get("max_position_embeddings")),
                          init_std=float(get("initializer_range", 0.02)))
    except ValueError as e:
        raise InitFromError(f"{where}: this {arch} does not fit tessera's decoder: {e}") from None
    return Source(path, "hf", arch, cfg, hf["vocab_size"], None, _hf_weight_files(path))


def _hf_rope(hf: dict) -> tuple[float, str | None]:
    """RoPE theta, and what differs from the decoder's plain rotate-half RoPE (None: nothing)."""
    params = hf.get("rope_parameters")  # transformers 5; older configs: rope_theta and rope_scaling
    if params is not None and not (isinstance(params, dict) and all(not isinstance(v, dict) for v in params.values())):
        return 0.0, f"rope_parameters {params} are per layer type; the decoder has one RoPE"
    params = {**(hf.get("rope_scaling") or {}), **(params or {})}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        return theta, f"RoPE type is {kind!r} (a scaling the decoder does not implement; it has plain RoPE)"
    if params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        return theta, "partial_rotary_factor is not 1; the decoder rotates every dimension of a head"
    return theta, None


def _hf_weight_files(path: Path) -> tuple[Path, ...]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(read_json(index).get("weight_map", {}).values()))
        missing = [n for n in names if not (path / n).is_file()]
        if not names or missing:
            raise InitFromError(f"--init-from {path}: model.safetensors.index.json names files that are not "
                                f"there: {', '.join(missing[:3]) or '(none listed)'}")
        return tuple(path / n for n in names)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt*"))
        extra = (f" ({', '.join(pickles[:3])} are pickles, which tessera never loads: convert them to "
                 f"safetensors)") if pickles else ""
        raise InitFromError(f"--init-from {path}: no *.safetensors weights{extra}")
    return tuple(files)


def load_source_weights(src: Source) -> dict[str, torch.Tensor]:
    """The source's weights in the decoder's names, fp32 on CPU (embedding/output: the source's rows)."""
    if src.kind == "tessera":
        sd = {k: v.float() for k, v in load_tensors(src.files[0]).items()}
        if src.cfg.tie_embeddings:
            sd.pop("output.weight", None)
        return sd
    from safetensors import safe_open

    hf = {}
    for f in src.files:
        with safe_open(str(f), framework="pt") as g:
            for k in g.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                hf[k] = g.get_tensor(k)
    cfg = src.cfg
    sd = {}

    def take(name: str) -> torch.Tensor:  # each tensor is taken once: the source's copy is freed as it goes
        if name not in hf:
            raise InitFromError(f"--init-from {src.path}: the weights have no {name}")
        return hf.pop(name).float()

    sd["tok_embeddings.weight"] = take("model.embed_tokens.weight")
    sd["norm.weight"] = take("model.norm.weight")
    if cfg.tie_embeddings:
        hf.pop("lm_head.weight", None)  # some checkpoints store the tied head too
    else:
        sd["output.weight"] = take("lm_head.weight")
    for i in range(cfg.n_layers):
        h, p = f"model.layers.{i}.", f"layers.{i}."
        a = h + "self_attn."
        sd[p + "attention.wqkv.weight"] = torch.cat([take(a + f"{x}_proj.weight") for x in "qkv"])
        if cfg.attn_bias:
            sd[p + "attention.wqkv.bias"] = torch.cat([take(a + f"{x}_proj.bias") for x in "qkv"])
        sd[p + "attention.wo.weight"] = take(a + "o_proj.weight")
        if cfg.qk_norm:
            sd[p + "attention.q_norm.weight"] = take(a + "q_norm.weight")
            sd[p + "attention.k_norm.weight"] = take(a + "k_norm.weight")
        sd[p + "feed_forward.w13.weight"] = torch.cat([take(h + "mlp.gate_proj.weight"), take(h + "mlp.up_proj.weight")])
        sd[p + "feed_forward.w2.weight"] = take(h + "mlp.down_proj.weight")
        sd[p + "attention_norm.weight"] = take(h + "input_layernorm.weight")
        sd[p + "ffn_norm.weight"] = take(h + "post_attention_layernorm.weight")
    unused = sorted(k for k in hf if not k.endswith("rotary_emb.inv_freq"))
    if unused:
        raise InitFromError(f"--init-from {src.path}: weights the decoder has no place for: {', '.join(unused[:5])}"
                            + (f" and {len(unused) - 5} more" if len(unused) > 5 else ""))
    return sd


# --------------------------------------------------------------------------------------------- plan
def plan(path: str | Path, spec: dict, tcfg, preset: str | None, model_over: list[str]) -> tuple[ModelConfig, dict]:
    """The new run's model config and the record of its source (written to config.json as `init_from`).

    `spec` is the run's tokenizer bundle; `preset` and `model_over` (the command line's) may only repeat the
    source's architecture, and may change max_seq_len, dropout, attn_backend and init_std."""
    src = open_source(path)
    layout = VocabLayout.from_dict(spec["layout"])
    try:
        asked = apply_overrides(model_preset(preset) if preset else dataclasses.replace(src.cfg), model_over)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    differs = [f"{k} {getattr(asked, k)} (the {'preset' if preset else '--set'}) vs {getattr(src.cfg, k)} (the source)"
               for k in ARCH_KEYS if getattr(asked, k) != getattr(src.cfg, k)]
    if differs:
        raise InitFromError(f"--init-from {src.path}: the model would differ from the source's: {'; '.join(differs)}"
                            + (". Leave out --preset: the model comes from the source" if preset else ""))
    mcfg = dataclasses.replace(asked, vocab_size=layout.padded_vocab_size, n_kv_heads=src.cfg.kv_heads,
                               ffn_dim=src.cfg.hidden_dim)
    mcfg = from_dict(ModelConfig, to_dict(mcfg))
    rows = _row_map(src, layout, spec, tcfg)
    imported = sum(n for _, _, n in rows)
    record = {"path": str(src.path.resolve()), "kind": src.kind, "architecture": src.architecture,
              "source_vocab": src.vocab, "rows": [list(r) for r in rows],
              "new_rows": layout.padded_vocab_size - imported}
    return mcfg, record


def _row_map(src: Source, layout: VocabLayout, spec: dict, tcfg) -> list[tuple[int, int, int]]:
    """(first id here, first id in the source, count) for every block of rows copied from the source."""
    where = f"--init-from {src.path}"
    allow = tcfg.init_allow_vocab_mismatch
    text = layout.ranges["text"]
    if src.kind == "hf" and spec["text"].get("kind") == "hf":
        return _hf_text_rows(src, spec, text.size, allow)
    if src.kind == "hf":
        if src.vocab != text.size and not allow:
            raise InitFromError(
                f"{where}: the model's vocabulary has {src.vocab} ids, but the bundle's text range has {text.size}: "
                f"the model's ids mean the bundle's text pieces only when the bundle is built from the model's own "
                f"tokenizer. --set init_allow_vocab_mismatch=true imports it anyway (for experiments: ids "
                f"0..{min(src.vocab, text.size) - 1} are copied by number, whatever they stand for)")
        return [(0, 0, min(src.vocab, text.size))]
    old = VocabLayout.from_dict(src.spec["layout"])
    if src.spec["hash"] == spec["hash"]:
        return [(0, 0, layout.vocab_size)]
    rows = []
    if src.spec["text"]["sha256"] != spec["text"]["sha256"] and not allow:
        raise InitFromError(f"{where}: the run's text tokenizer is not this bundle's, so its text rows would stand for "
                            f"other pieces (--set init_allow_vocab_mismatch=true copies them by number, for experiments)")
    rows.append((0, 0, min(text.size, old.text_size)))
    if (old.max_grid, old.n_reserved) != (layout.max_grid, layout.n_reserved):
        raise InitFromError(f"{where}: the special tokens differ (max_grid {old.max_grid} and {old.n_reserved} "
                            f"reserved in the run, {layout.max_grid} and {layout.n_reserved} in this bundle)")
    rows.append((layout.ranges["special"].offset, old.ranges["special"].offset, layout.n_special))
    for kind in ("image", "audio"):
        if not (src.spec.get(kind)):
            continue
        if not spec.get(kind):
            raise InitFromError(f"{where}: the run has {kind} codes but this bundle has no {kind} codec; the "
                                f"vocabulary may grow, not shrink")
        if spec[kind]["sha256"] != src.spec[kind]["sha256"]:
            raise InitFromError(f"{where}: this bundle's {kind} codec is not the run's, so the run's {kind} code rows "
                                f"would stand for other codes")
        if kind == "image":
            rows.append((layout.ranges["image"].offset, old.ranges["image"].offset, old.image_codebook_size))
            continue
        if layout.audio_levels < old.audio_levels:
            raise InitFromError(f"{where}: the run has {old.audio_levels} audio levels, this bundle "
                                f"{layout.audio_levels}; the vocabulary may grow, not shrink")
        for q in range(old.audio_levels):
            rows.append((layout.ranges[f"audio.{q}"].offset, old.ranges[f"audio.{q}"].offset, old.audio_codebook_size))
    return rows


def _hf_text_rows(src: Source, spec: dict, n_text: int, allow: bool) -> list[tuple[int, int, int]]:
    """An HF model and a bundle whose text part is an HF tokenizer: the ids map 1:1 when the bundle was built
    from the model's own tokenizer, which the model folder's tokenizer.json shows (the same (id, token) pairs).
    The model may have more embedding rows than its tokenizer has ids (Qwen pads its table to a multiple of
    128); those rows stand for no token and are not copied."""
    where = f"--init-from {src.path}"
    hint = ("--set init_allow_vocab_mismatch=true imports it anyway (for experiments: ids "
            f"0..{min(src.vocab, n_text) - 1} are copied by number, whatever they stand for)")
    rows = [(0, 0, min(src.vocab, n_text))]
    if allow:
        return rows
    tok_file = src.path / "tokenizer.json"
    if tok_file.is_file():
        from tessera.unimodal.hf_text import HFTextError, load_tokenizers_file, vocab_fingerprint

        try:
            tok = load_tokenizers_file(tok_file)
        except HFTextError as e:
            raise InitFromError(f"{where}: {e}") from None
        vocab = tok.get_vocab(with_added_tokens=True)
        n = max(vocab.values()) + 1 if vocab else 0
        if n != n_text:
            raise InitFromError(f"{where}: the model's tokenizer ({tok_file}) has {n} ids, but the bundle's text "
                                f"tokenizer has {n_text}: the bundle was built from another tokenizer (build it with "
                                f"--text-from-hf {src.path}). {hint}")
        if vocab_fingerprint(tok) != spec["text"]["vocab_sha256"]:
            raise InitFromError(f"{where}: the model's tokenizer ({tok_file}) and the bundle's text tokenizer both have "
                                f"{n} ids, but not the same tokens at them: the bundle was built from another "
                                f"tokenizer (build it with --text-from-hf {src.path}). {hint}")
    elif src.vocab != n_text:
        raise InitFromError(f"{where}: the model's vocabulary has {src.vocab} ids and the bundle's text tokenizer "
                            f"{n_text}, and the folder has no tokenizer.json to show which tokens they are. {hint}")
    if src.vocab < n_text:
        raise InitFromError(f"{where}: the model has {src.vocab} embedding rows, fewer than its tokenizer's {n_text} "
                            f"ids")
    return rows


def check(tcfg, record: dict | None, layout: VocabLayout, resumed_freeze: str | None = None) -> None:
    """Refuse a `freeze` that cannot work: without a source, under FSDP, with nothing left to train, or
    changed on --resume (the checkpoint's optimizer holds the parameters that trained)."""
    if resumed_freeze is not None and tcfg.freeze != resumed_freeze:
        raise ConfigError(f"freeze cannot change on --resume ({resumed_freeze!r} in the run); start a new run with "
                          f"--init-from RUN for the next stage")
    if not tcfg.freeze:
        return
    if record is None:
        raise ConfigError(f"freeze={tcfg.freeze} keeps rows an imported model brought: it needs --init-from")
    if tcfg.fsdp:
        raise ConfigError("freeze does not work with --fsdp yet (FSDP shards the embedding rows across ranks); "
                          "use DDP for a frozen stage")
    if tcfg.freeze == "text_rows" and not frozen_rows(record, layout, tcfg.freeze):
        raise ConfigError("freeze=text_rows: the source brought no rows of the text range")
    if tcfg.freeze == "all_but_new_rows" and record["new_rows"] == 0:
        raise ConfigError("freeze=all_but_new_rows: the source already has every row, so nothing would train")


def frozen_rows(record: dict, layout: VocabLayout, freeze: str) -> list[int]:
    """The ids whose embedding and output rows `freeze` keeps: the copied rows (of the text range only, for
    `text_rows`)."""
    end = layout.ranges["text"].end if freeze == "text_rows" else layout.padded_vocab_size
    return sorted(i for first, _, n in record["rows"] for i in range(first, min(first + n, end)))


# ------------------------------------------------------------------------------------------ weights
@torch.no_grad()
def init_code_embeddings(model: Transformer, bundle: str | Path, seed: int = 0) -> list[str]:
    """Start the embedding (and output) rows of image and audio codes from the codecs' own code vectors.

    A code's id says nothing about which codes resemble it, but the codec knows: FSQ codes are points on a
    grid, RVQ codes are learned vectors. Each range's vectors are standardized and mapped to the model width
    by a fixed random projection, scaled to the init std. Codes that the codec places close together then
    start close together, so the decoder generalizes across codes from far fewer examples; the rows stay
    ordinary trainable parameters. Returns the ranges it initialized.
    """
    tok = load_bundle(bundle)
    g = torch.Generator().manual_seed(seed)
    std, dim = model.cfg.init_std, model.cfg.dim
    done = []
    for kind, codec in (("image", tok.image_codec), ("audio", tok.audio_codec)):
        if codec is None or not hasattr(codec, "code_vectors"):
            continue
        vecs = codec.code_vectors().float().cpu()  # (levels, K, d)
        for q in range(vecs.shape[0] if kind == "image" else tok.layout.audio_levels):  # the levels in the vocabulary
            v = vecs[q]
            v = (v - v.mean(0)) / (v.std(0) + 1e-6)
            proj = torch.randn(v.shape[1], dim, generator=g) / v.shape[1] ** 0.5
            rows = v @ proj
            rows = rows * (std / rows.std())
            name = kind if kind == "image" else f"audio.{q}"
            r = tok.layout.ranges[name]
            model.tok_embeddings.weight[r.offset : r.end] = rows.to(model.tok_embeddings.weight)
            if not model.cfg.tie_embeddings:
                model.output.weight[r.offset : r.end] = rows.to(model.output.weight)
            done.append(name)
    return done


@torch.no_grad()
def initialize(model: Transformer, record: dict, bundle: str | Path, tcfg, log=None) -> None:
    """Fill a freshly built model (already `init_weights(seed)`) from the source in `record`."""
    src = open_source(record["path"])
    sd = load_source_weights(src)
    cfg = model.cfg
    layout = VocabLayout.from_dict(read_bundle_spec(bundle)["layout"])
    target = model.state_dict()
    tables = ["tok_embeddings.weight"] + ([] if cfg.tie_embeddings else ["output.weight"])
    missing = sorted(set(target) - set(sd) - ({"output.weight"} if cfg.tie_embeddings else set()))
    if missing:
        raise InitFromError(f"--init-from {src.path}: the weights have no {', '.join(missing[:5])}")
    for k, v in sd.items():
        if k in tables:
            continue
        if k not in target or target[k].shape != v.shape:
            raise InitFromError(f"--init-from {src.path}: {k} has shape {tuple(v.shape)}, the model needs "
                                f"{tuple(target[k].shape) if k in target else 'no such weight'}")
        target[k].copy_(v)
    imported = torch.zeros(cfg.vocab_size, dtype=torch.bool)
    for first, old, n in record["rows"]:
        if old + n > sd["tok_embeddings.weight"].shape[0]:
            raise InitFromError(f"--init-from {src.path}: the weights have {sd['tok_embeddings.weight'].shape[0]} "
                                f"embedding rows; the vocabulary needs {old + n}")
        imported[first : first + n] = True
    coded = torch.zeros(cfg.vocab_size, dtype=torch.bool)
    done = init_code_embeddings(model, bundle, tcfg.seed) if tcfg.code_embedding_init else []
    for name in done:
        coded[layout.ranges[name].offset : layout.ranges[name].end] = True
    g = torch.Generator().manual_seed(tcfg.seed + 1)
    for name in tables:
        w, old = target[name], sd[name]
        rows = torch.cat([old[o : o + n] for _, o, n in record["rows"]])
        mean, std = rows.mean(0), rows.std(0) if len(rows) > 1 else torch.zeros_like(rows[0])
        fresh = ~imported & ~coded
        w[fresh] = (mean + std * torch.randn(int(fresh.sum()), w.shape[1], generator=g)).to(w)
        codes = ~imported & coded  # the codec's geometry, at the copied rows' scale
        w[codes] = (mean + w[codes].float() / cfg.init_std * std).to(w)
        for first, o, n in record["rows"]:
            w[first : first + n] = old[o : o + n].to(w)
    if log:
        parts = [f"{int(imported.sum())} rows copied"]
        new = int((~imported).sum())
        if new:
            codes = [n for n in done if not imported[layout.ranges[n].offset]]
            parts.append(f"{new} new rows ({'codes of ' + ', '.join(codes) + ' from the codec code vectors, ' if codes else ''}"
                         f"the rest from the copied rows' mean and spread)")
        log(f"[tessera] initialized from {src.path} ({src.architecture}): {', '.join(parts)}")


# ------------------------------------------------------------------------------------------- freeze
def freeze_parameters(model: Transformer, tcfg) -> None:
    """`all_but_new_rows`: every weight but the embedding and output tables stops training. Call before
    DDP wraps the model and before the optimizer is built (they only see what trains)."""
    if tcfg.freeze != "all_but_new_rows":
        return
    for name, p in model.named_parameters():
        if name not in ("tok_embeddings.weight", "output.weight"):
            p.requires_grad_(False)


def freeze_rows(model: Transformer, optimizer: torch.optim.Optimizer, record: dict | None, layout: VocabLayout,
                tcfg) -> None:
    """Keep the frozen rows of the embedding and output tables exactly as they are: their gradient is zeroed
    (so clipping and the optimizer's moments see only what trains) and they are written back after every
    optimizer step (so weight decay does not move them either)."""
    if not tcfg.freeze:
        return
    ids = frozen_rows(record, layout, tcfg.freeze)
    tables = [model.tok_embeddings.weight] + ([] if model.cfg.tie_embeddings else [model.output.weight])
    idx = torch.tensor(ids, dtype=torch.long, device=tables[0].device)
    kept = [w.detach()[idx].clone() for w in tables]
    for w in tables:
        w.register_hook(lambda grad: grad.index_fill(0, idx, 0.0))

    def restore(*_):
        with torch.no_grad():
            for w, k in zip(tables, kept):
                w.index_copy_(0, idx, k)

    optimizer.register_step_post_hook(restore)

