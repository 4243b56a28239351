"""The `tessera` command (also `python -m tessera`).

Each subcommand lives beside the code it drives: the module named in COMMANDS defines
`add_<name>_arguments(parser)` and `run_<name>(args)`. Errors a user can fix (`TesseraError`, missing
files) print one line and exit with status 2; set TESSERA_DEBUG=1 for the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys

# (command path, module, function suffix, help)
COMMANDS = [
    (("tokenizer", "train", "text"), "tessera.unimodal.text_cli", "train",
     "train the SentencePiece BPE text tokenizer (byte fallback)"),
    (("tokenizer", "train", "image"), "tessera.unimodal.image_train", "train",
     "train the VQ image codec (single process or torchrun)"),
    (("tokenizer", "train", "audio"), "tessera.unimodal.audio_train", "train",
     "train the residual-VQ audio codec (single process or torchrun)"),
    (("tokenizer", "eval", "image"), "tessera.eval.codec_eval", "image_eval",
     "evaluate an image codec (PSNR, SSIM, bpp, codebook usage) next to JPEG"),
    (("tokenizer", "eval", "audio"), "tessera.eval.codec_eval", "audio_eval",
     "evaluate an audio codec (SI-SDR, mel distance, STOI, kbps) next to Opus"),
    (("tokenizer", "build"), "tessera.tokenizers.bundle_cli", "build",
     "assemble a tokenizer bundle (vocabulary layout) from the trained text tokenizer and codecs"),
    (("tokenizer", "info"), "tessera.tokenizers.bundle_cli", "info",
     "print a bundle's vocabulary layout"),
    (("data", "digits"), "tessera.data.digits", "build",
     "build the offline tri-modal digits corpus (images, espeak-ng speech, text)"),
    (("data", "pretokenize"), "tessera.train.pretokenize", "pretokenize",
     "documents (JSONL, WebDataset tars, Parquet, saved HF datasets, image folders, LibriSpeech, Common Voice) "
     "-> token shards, with worker processes and optionally several ranks"),
    (("data", "pretokenize-merge"), "tessera.train.pretokenize", "pretokenize_merge",
     "merge the parts of a distributed pretokenize into one shard set"),
    (("train",), "tessera.train.pretrain", "pretrain",
     "pretrain the decoder (same as python -m tessera.train.pretrain; use torchrun for several processes)"),
    (("generate",), "tessera.model.generate_cli", "generate",
     "generate text, an image or audio from a trained run"),
    (("eval",), "tessera.eval.harness", "eval",
     "evaluate a trained run on task sets (digits, or your own JSONL)"),
    (("export", "hf"), "tessera.model.hf_export", "export",
     "export a run as a Hugging Face transformers model (Llama, Qwen2 or Qwen3)"),
    (("demo",), "tessera.eval.demo", "demo",
     "the whole pipeline on the offline digits corpus: tokenizers, data, pretraining, eval, report"),
]

GROUP_HELP = {
    ("tokenizer",): ("train, evaluate and assemble the tokenizers: the text tokenizer, the image and audio codecs, "
                     "and the bundle that lays them out in one vocabulary"),
    ("tokenizer", "train"): "train the text tokenizer or a codec",
    ("tokenizer", "eval"): "evaluate a codec",
    ("data",): "build corpora and pretokenize them",
    ("export",): "export a trained run",
}


def _available(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tessera",
        description="tessera: train and run a native discrete-token multimodal model (text, images, audio).",
    )
    subparsers = {(): parser.add_subparsers(dest="cmd0", metavar="COMMAND")}
    parsers = {(): parser}
    for path, module, name, help_ in COMMANDS:
        if not _available(module):
            continue
        for depth in range(1, len(path)):
            prefix = path[:depth]
            if prefix not in parsers:
                sub = subparsers[prefix[:-1]]
                p = sub.add_parser(prefix[-1], help=GROUP_HELP.get(prefix), description=GROUP_HELP.get(prefix))
                parsers[prefix] = p
                subparsers[prefix] = p.add_subparsers(dest=f"cmd{depth}", metavar="COMMAND")
        mod = importlib.import_module(module)
        p = subparsers[path[:-1]].add_parser(path[-1], help=help_, description=help_)
        getattr(mod, f"add_{name}_arguments")(p)
        p.set_defaults(_run=(module, name))
        parsers[path] = p
    for prefix, p in parsers.items():
        if prefix:
            p.set_defaults(_group=p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "_run"):
        (getattr(args, "_group", None) or parser).print_help()
        return 0 if argv is None and len(sys.argv) == 1 or argv == [] else 2
    from tessera.errors import TesseraError

    module, name = args._run
    try:
        rc = getattr(importlib.import_module(module), f"run_{name}")(args)
    except (TesseraError, FileNotFoundError, FileExistsError, NotADirectoryError) as e:
        if os.environ.get("TESSERA_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
