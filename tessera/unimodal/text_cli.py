"""`tessera tokenizer train text`: train the SentencePiece text tokenizer."""

from __future__ import annotations

import time

from tessera.unimodal.text import TextTrainConfig, train_text_tokenizer


def add_train_arguments(p) -> None:
    p.add_argument("--input", nargs="+", required=True, metavar="FILE", help="UTF-8 text files, one sentence per line")
    p.add_argument("--vocab-size", type=int, default=TextTrainConfig.vocab_size)
    p.add_argument("--out", required=True, help="output text tokenizer directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--character-coverage", type=float, default=TextTrainConfig.character_coverage)
    p.add_argument("--input-sentence-size", type=int, default=TextTrainConfig.input_sentence_size,
                   help="sentences kept by seeded reservoir sampling (bounds memory on huge inputs)")
    p.add_argument("--threads", type=int, default=TextTrainConfig.num_threads)


def run_train(args) -> int:
    cfg = TextTrainConfig(
        vocab_size=args.vocab_size,
        seed=args.seed,
        character_coverage=args.character_coverage,
        input_sentence_size=args.input_sentence_size,
        num_threads=args.threads,
    )
    t = time.perf_counter()
    tok = train_text_tokenizer(args.input, args.out, cfg)
    print(f"text tokenizer: {tok.vocab_size} pieces -> {args.out} ({time.perf_counter() - t:.1f}s)")
    return 0
