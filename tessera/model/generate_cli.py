"""`tessera generate`: generate from a trained run and write .txt, .png and .wav files."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from tessera.unimodal.media import Audio, load_audio, load_image


def add_generate_arguments(p) -> None:
    p.add_argument("--model", required=True, metavar="RUN")
    p.add_argument("--prompt", default="", help="prompt text (after any --image/--audio, in that order)")
    p.add_argument("--image", action="append", default=[], metavar="PATH", help="prompt image (repeatable)")
    p.add_argument("--audio", action="append", default=[], metavar="PATH", help="prompt audio (repeatable)")
    p.add_argument("--output", default="text", choices=["text", "image", "audio", "any"])
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--samples", type=int, default=1, help="how many samples (seeds seed, seed+1, ...)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--cfg-scale", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"))
    p.add_argument("--max-audio-seconds", type=float)
    p.add_argument("--device", default=None)


def run_generate(args) -> int:
    from tessera.errors import TesseraError
    from tessera.model.api import load
    from tessera.model.generate import GenerationConfig

    if args.samples < 1:
        raise TesseraError(f"--samples must be >= 1, got {args.samples}")
    try:  # the options a user typed: a bad one is one line naming it, before the model loads
        config = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                  top_k=args.top_k, top_p=args.top_p, cfg_scale=args.cfg_scale,
                                  image_size=tuple(args.image_size) if args.image_size else None,
                                  max_audio_seconds=args.max_audio_seconds)
    except ValueError as e:
        raise TesseraError(str(e).replace("max_new_tokens", "--max-new-tokens")) from None
    m = load(args.model, device=args.device)
    prompt: list = [load_image(p) for p in args.image]
    prompt += [load_audio(p) for p in args.audio]
    if args.prompt:
        prompt.append(args.prompt)
    if not prompt:
        prompt = [""]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    batch = [list(prompt) for _ in range(args.samples)]
    written = []
    for k in range(args.samples):
        try:  # what depends on the model (an image size its codec cannot make, a budget past its context)
            segs = m.generate(batch[k], output=args.output, config=config, seed=args.seed + k)
        except ValueError as e:
            raise TesseraError(str(e)) from None
        for j, s in enumerate(segs):
            stem = out / (f"{k}" if len(segs) == 1 else f"{k}_{j}")
            if isinstance(s, str):
                path = stem.with_suffix(".txt")
                path.write_text(s, encoding="utf-8")
                print(f"{path}: {s!r}")
            elif isinstance(s, Image.Image):
                path = stem.with_suffix(".png")
                s.save(path)
                print(f"{path}: image {s.width}x{s.height}")
            elif isinstance(s, Audio):
                path = stem.with_suffix(".wav")
                s.save(path)
                print(f"{path}: audio {s.duration:.2f}s @ {s.sample_rate} Hz")
            written.append(path)
    if not written:
        print("the model generated nothing (it ended at once)")
    return 0
