"""`tessera tokenizer eval image|audio`: the codec evaluations of `tessera.unimodal.image_eval` and
`audio_eval`, with `--digits-corpus`.

The evaluations take a judge as an argument (`tessera.unimodal.protocol.MediaJudge`); this command line
builds the digits corpus's judge (`judges.CorpusJudge`), so the codec package needs nothing of the
evaluation's.
"""

from __future__ import annotations

from tessera.eval.judges import CorpusJudge
from tessera.unimodal import audio_eval, image_eval


def add_image_eval_arguments(p) -> None:
    image_eval.add_eval_arguments(p)
    p.add_argument("--digits-corpus", default=None,
                   help="a digits corpus: train its image judge on the real training images and report its "
                        "accuracy on the originals and on the reconstructions (the ceiling of generated images)")


def run_image_eval(args) -> int:
    judge = CorpusJudge(args.digits_corpus, "images") if args.digits_corpus else None
    return image_eval.run_eval(args, judge=judge)


def add_audio_eval_arguments(p) -> None:
    audio_eval.add_eval_arguments(p)
    p.add_argument("--digits-corpus", default=None,
                   help="a digits corpus: train its speech judge on the real training clips and report its "
                        "accuracy on the originals and on the reconstructions (labels from meta.json)")


def run_audio_eval(args) -> int:
    judge = CorpusJudge(args.digits_corpus, "speech") if args.digits_corpus else None
    return audio_eval.run_eval(args, judge=judge)
