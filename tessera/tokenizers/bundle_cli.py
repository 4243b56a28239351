"""`tessera tokenizer build` and `tessera tokenizer info`."""

from __future__ import annotations

import json
from pathlib import Path

from tessera.tokenizers.bundle import BundleError, build_bundle, read_bundle_spec
from tessera.tokenizers.layout import DEFAULT_MAX_GRID, DEFAULT_RESERVED, VocabLayout


def add_build_arguments(p) -> None:
    text = p.add_mutually_exclusive_group(required=True)
    text.add_argument("--text", metavar="DIR", help="text codec directory (tessera tokenizer train text)")
    text.add_argument("--text-from-hf", metavar="DIR",
                      help="an existing model's Hugging Face tokenizer folder (tokenizer.json): its ids, unchanged, "
                           "are the text range")
    p.add_argument("--bos", metavar="TOKEN", help="with --text-from-hf: the token that starts a document (default: "
                                                  "the tokenizer's bos_token, else its eos_token)")
    p.add_argument("--eos", metavar="TOKEN", help="with --text-from-hf: the token that ends a document (default: the "
                                                  "tokenizer's eos_token)")
    p.add_argument("--image", metavar="DIR", help="image codec directory")
    p.add_argument("--audio", metavar="DIR", help="audio codec directory")
    p.add_argument("--out", required=True, metavar="BUNDLE")
    p.add_argument("--max-grid", type=int, default=DEFAULT_MAX_GRID, help="largest image grid side, in codes")
    p.add_argument("--reserved", type=int, default=DEFAULT_RESERVED, help="reserved special slots")
    p.add_argument("--audio-levels", type=int, default=None, metavar="K",
                   help="keep the audio codec's first K residual levels (default: all)")
    p.add_argument("--chat-template", metavar="FILE",
                   help='a JSON file of role prefixes, e.g. {"system": "system:", "user": "user:", "assistant": '
                        '"assistant:"} (default: those)')
    p.add_argument("--force", action="store_true", help="replace an existing bundle in --out (never a directory that is not a bundle)")


def run_build(args) -> int:
    chat = None
    if args.chat_template:
        try:
            chat = json.loads(Path(args.chat_template).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise BundleError(f"--chat-template {args.chat_template}: {e}") from None
    spec = build_bundle(args.out, args.text, args.image, args.audio, text_from_hf=args.text_from_hf, bos=args.bos,
                        eos=args.eos, max_grid=args.max_grid, n_reserved=args.reserved,
                        audio_levels=args.audio_levels, chat_template=chat, force=args.force)
    print(describe(spec))
    print(f"bundle -> {args.out}")
    return 0


def describe(spec: dict) -> str:
    L = VocabLayout.from_dict(spec["layout"])
    lines = [f"bundle {spec['hash'][:12]}  vocab {L.vocab_size} (embedding rows {L.padded_vocab_size})"]
    t = spec["text"]
    if t.get("kind") == "hf":
        lines.append(f"  text: a Hugging Face tokenizer, documents {t['bos']['token']} ({t['bos']['id']}) ... "
                     f"{t['eos']['token']} ({t['eos']['id']})")
    else:
        lines.append("  text: SentencePiece, documents <s> ... </s>")
    for name, r in L.ranges.items():
        if r.size:
            lines.append(f"  {name:<8} [{r.offset:>7}, {r.end:>7})  {r.size}")
    return "\n".join(lines)


def add_info_arguments(p) -> None:
    p.add_argument("bundle")
    p.add_argument("--json", action="store_true")


def run_info(args) -> int:
    spec = read_bundle_spec(args.bundle)
    print(json.dumps(spec, indent=2) if args.json else describe(spec))
    return 0
