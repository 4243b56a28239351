"""`tessera tokenizer build` and `tessera tokenizer info`."""

from __future__ import annotations

import json
from pathlib import Path

from tessera.tokenizers.bundle import BundleError, build_bundle, read_bundle_spec
from tessera.tokenizers.layout import DEFAULT_MAX_GRID, DEFAULT_RESERVED, VocabLayout


def add_build_arguments(p) -> None:
    p.add_argument("--text", required=True, metavar="DIR", help="text tokenizer directory (tessera tokenizer train text)")
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
    spec = build_bundle(args.out, args.text, args.image, args.audio, max_grid=args.max_grid,
                        n_reserved=args.reserved, audio_levels=args.audio_levels, chat_template=chat,
                        force=args.force)
    print(describe(spec))
    print(f"bundle -> {args.out}")
    return 0


def describe(spec: dict) -> str:
    L = VocabLayout.from_dict(spec["layout"])
    lines = [f"bundle {spec['hash'][:12]}  vocab {L.vocab_size} (embedding rows {L.padded_vocab_size})"]
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
