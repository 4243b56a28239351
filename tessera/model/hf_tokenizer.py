"""A transformers tokenizer for an HF export, built offline from a tokenizer bundle.

A bundle whose text part is an existing model's HF tokenizer (`--text-from-hf`, `hf_text_tokenizer`) exports
that tokenizer as it is, its vocabulary, normalizer, pre-tokenizer, decoder and added tokens unchanged, with
every id past its text range added as a special token named as below, at exactly the bundle's id (a name the
original already has, such as `<pad>`, becomes `<tessera:pad>`). The post
processor is replaced by one that prepends the bundle's BOS, as tessera's prompts start (for a tokenizer
without a BOS, its EOS); `clean_up_tokenization_spaces` is off, so decoding is tessera's. The original's
chat template is replaced by the bundle's (`ChatTemplate.jinja`), the one `Tessera.chat` renders and stage-two
conversations are trained with. As in transformers for any added token, text that spells a token's name ("<boi>",
"<img:3>") encodes to that token, so a string can spell a code span and `decode` gives one back; tessera's own
encoding spells such text as text pieces, the one place where the two tokenizers differ.

For a SentencePiece bundle (`hf_tokenizer`):

- Text: the bundle's SentencePiece BPE model rebuilt as a `tokenizers` BPE model with byte fallback: the same
  pieces at the same ids, and merges ranked by the score of the piece they make (SentencePiece merges the
  adjacent pair whose result scores highest; `tokenizers` merges the pair of lowest rank). " " becomes "▁"
  with no dummy prefix and nothing pre-splits the text (SentencePiece does not either), so ids and decoded
  text are `TextTokenizer`'s exactly. One difference is left, in decoding ids no text encodes to: a run of
  byte pieces that is not valid UTF-8 decodes to one "\ufffd" per byte (`tokenizers`' ByteFallback), where
  SentencePiece keeps the valid characters inside the run.
- Every other id of the unified vocabulary is an added special token at that id, named as
  `VocabLayout.token_name` names it (`<boi>`, `<h:3>`, `<reserved:0>`, `<img:123>`, `<aud0:45>`); the
  embedding table's padding rows are `<unused:N>`. So `len(tokenizer)` is the model's vocabulary size and
  every id the model can emit converts to a token.
- Encoding text never yields a special or code id: `split_special_tokens` is on, so "<boi>" in a string is
  spelled as text pieces, as tessera spells it. Prompts start with `<s>` and get no `</s>`, as tessera's do.
- `<unk>` is a plain piece that decodes to " ⁇ ", as SentencePiece decodes it, so greedy text matches
  tessera's even where a model emits it; the tokenizer has no `unk_token` (byte fallback never needs one).
"""

from __future__ import annotations

from pathlib import Path

from tessera.errors import TesseraError
from tessera.storage import atomic_write_json, read_json
from tessera.tokenizers.bundle import load_text, read_bundle_spec, text_kind
from tessera.tokenizers.chat import ChatTemplate
from tessera.tokenizers.layout import VocabLayout
from tessera.unimodal.hf_text import HFTextTokenizer, read_hf_config
from tessera.unimodal.text import TextTokenizer


def added_token_name(layout: VocabLayout, i: int, taken=frozenset()) -> str:
    """The name of non-text id `i` in the exported tokenizer; a name the text tokenizer already has (in
    `taken`) is spelled `<tessera:NAME>` instead."""
    name = f"<unused:{i - layout.vocab_size}>" if i >= layout.vocab_size else layout.token_name(i)
    return f"<tessera:{name[1:-1]}>" if name in taken else name


def text_backend(text: TextTokenizer):
    """The SentencePiece BPE model as a `tokenizers.Tokenizer` that gives the same ids and text."""
    from tokenizers import Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE

    sp = text.sp
    unk = sp.IdToPiece(text.unk_id)
    vocab = {sp.IdToPiece(i): i for i in range(text.vocab_size)}
    # Only normal pieces take part in merges: control pieces (<unk>, <s>, </s>) and byte pieces (<0x41>) are
    # never spelled by text.
    normal = {p: i for p, i in vocab.items() if not (sp.IsControl(i) or sp.IsUnknown(i) or sp.IsByte(i))}
    merges = []
    for piece, i in normal.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in normal and right in normal:
                merges.append((-sp.GetScore(i), i, normal[left], (left, right)))
    merges.sort()
    bpe = BPE(vocab=vocab, merges=[m[-1] for m in merges], unk_token=unk, byte_fallback=True, fuse_unk=True)
    tok = Tokenizer(bpe)
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    # SentencePiece writes <unk> as " ⁇ " when decoding; byte pieces become bytes, then UTF-8 text.
    tok.decoder = decoders.Sequence([decoders.Replace(unk, " \u2047 "), decoders.Replace("\u2581", " "),
                                     decoders.ByteFallback(), decoders.Fuse()])
    bos = sp.IdToPiece(text.bos_id)
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1",
                                                       special_tokens=[(bos, text.bos_id)])
    return tok


def hf_tokenizer(layout: VocabLayout, text: TextTokenizer, model_max_length: int | None = None,
                 chat_template: str | None = None):
    """A `PreTrainedTokenizerFast` over the whole padded vocabulary of `layout` (`chat_template`: Jinja)."""
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    if text.vocab_size != layout.text_size:
        raise TesseraError(f"the text model has {text.vocab_size} pieces, the layout's text range "
                           f"{layout.text_size}")
    backend = text_backend(text)
    start = layout.ranges["text"].end
    names = [added_token_name(layout, i) for i in range(start, layout.padded_vocab_size)]
    clash = [n for n in names if backend.token_to_id(n) is not None]
    if clash:
        raise TesseraError(f"text pieces {clash[:5]} have the names of special or code tokens")
    backend.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in names])
    if backend.get_vocab_size(with_added_tokens=True) != layout.padded_vocab_size:
        raise TesseraError("the exported tokenizer's ids do not line up with the vocabulary layout")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=text.piece(text.bos_id),
        eos_token=text.piece(text.eos_id),
        pad_token=added_token_name(layout, layout.pad),
        add_bos_token=True,
        add_eos_token=False,
        split_special_tokens=True,
        clean_up_tokenization_spaces=False,
        **({"model_max_length": model_max_length} if model_max_length else {}),
        **({"chat_template": chat_template} if chat_template else {}),
    )


def hf_text_tokenizer(layout: VocabLayout, text: HFTextTokenizer, model_max_length: int | None = None,
                      config: dict | None = None, chat_template: str | None = None):
    """A `PreTrainedTokenizerFast` over the whole padded vocabulary of `layout`, whose text part is `text`, an
    existing model's tokenizer (`config`: its tokenizer_config.json, for the unk token; `chat_template`: Jinja,
    in place of the original's)."""
    from tokenizers import AddedToken, Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    if text.vocab_size != layout.text_size:
        raise TesseraError(f"the text tokenizer has {text.vocab_size} ids, the layout's text range "
                           f"{layout.text_size}")
    config = config or {}
    backend = Tokenizer.from_str(text.tok.to_str())
    start = layout.ranges["text"].end
    taken = set(backend.get_vocab(with_added_tokens=True))
    names = [added_token_name(layout, i, taken) for i in range(start, layout.padded_vocab_size)]
    backend.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in names])
    wrong = [(n, i, backend.token_to_id(n)) for i, n in enumerate(names, start) if backend.token_to_id(n) != i]
    if wrong:
        n, i, got = wrong[0]
        raise TesseraError(f"the exported tokenizer's ids do not line up with the vocabulary layout: {n} is id {got}, "
                           f"the layout's {i} (the text tokenizer's ids are not contiguous)")
    bos, eos = text.bos_token, text.eos_token
    backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1",
                                                           special_tokens=[(bos, text.bos_id)])
    unk = config.get("unk_token")
    unk = unk.get("content") if isinstance(unk, dict) else unk
    extra = {"chat_template": chat_template} if chat_template else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=eos,
        pad_token=added_token_name(layout, layout.pad, taken),
        **({"unk_token": unk} if unk and backend.token_to_id(unk) is not None else {}),
        add_bos_token=True,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        **({"model_max_length": model_max_length} if model_max_length else {}),
        **extra,
    )


def save_hf_tokenizer(bundle_dir: str | Path, out: str | Path, model_max_length: int | None = None) -> None:
    """Write a bundle's tokenizer.json and tokenizer_config.json into `out`.

    The config names `PreTrainedTokenizerFast`, which every transformers version loads from tokenizer.json
    alone (no sentencepiece, no remote code); transformers 5 saves its own `TokenizersBackend` name."""
    bundle_dir = Path(bundle_dir)
    spec = read_bundle_spec(bundle_dir)
    layout = VocabLayout.from_dict(spec["layout"])
    text = load_text(bundle_dir, spec)
    chat = ChatTemplate.from_dict(spec.get("chat")).jinja()
    if text_kind(spec) == "hf":
        config = read_hf_config(bundle_dir / spec["text"]["path"])
        hf_text_tokenizer(layout, text, model_max_length, config, chat).save_pretrained(out)
    else:
        hf_tokenizer(layout, text, model_max_length, chat).save_pretrained(out)
    cfg_path = Path(out) / "tokenizer_config.json"
    cfg = read_json(cfg_path)
    cfg.update(tokenizer_class="PreTrainedTokenizerFast", add_bos_token=True, add_eos_token=False)
    atomic_write_json(cfg_path, cfg)
