"""`tessera tokenizer eval image`: how well an image codec reconstructs held-out images, next to JPEG.

    tessera tokenizer eval image --codec runs/img --data /tmp/digits/images/test --json

prints one JSON object:

    {"psnr": dB, "ssim": ..., "bpp": bits per pixel, "codebook_usage": fraction of codes used,
     "perplexity": exp(entropy of the code histogram), "n_images": N, "size": [H, W],
     "jpeg": [{"quality": 1, "bpp": ..., "psnr": ..., "ssim": ...}, ... qualities 5, 10, 25]}

- Reconstructions are rounded to 8 bits before scoring, as a saved PNG would be, so the codec and the
  JPEG round trip are scored on the same footing. PSNR and SSIM are means over images (SSIM:
  `tessera.unimodal.losses.ssim`, equal to scikit-image's Gaussian-window SSIM).
- bpp of the codec is the flat code stream: log2(codebook size) bits per code, times the codes, over the
  pixels (no entropy coding). bpp of JPEG is the size of the whole file Pillow writes (headers included,
  Huffman tables optimized), so at 32 px JPEG's fixed header of a few hundred bytes dominates its rate.
- With a judge (a `MediaJudge`; on the command line `--digits-corpus`, the digits corpus's image judge):
  its accuracy on the originals and on the reconstructions (`judge`), the ceiling of generated images.
- Images are resized (shorter side) and center-cropped to `--size` (default: the codec's default size);
  `--native` keeps each image's aspect ratio instead, resized to multiples of f up to the codec's max size.
"""

from __future__ import annotations

import io
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tessera.errors import TesseraError
from tessera.unimodal.image_data import load_checked, resize_center_crop, to_uint8_tensor
from tessera.unimodal.losses import psnr, ssim
from tessera.unimodal.media import DEFAULT_MAX_PIXELS, MediaError, SkipLog, list_media
from tessera.unimodal.protocol import MediaJudge, fit_image_size, judge_accuracy

JPEG_QUALITIES = (1, 5, 10, 25)


# ------------------------------------------------------------------------------------------- metrics
def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] -> uint8, rounded as a PNG writer would."""
    return (x.float().clamp(0, 1) * 255.0).round().to(torch.uint8)


def image_scores(orig: torch.Tensor, recon: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image (PSNR, SSIM) of two uint8 (B, 3, H, W) batches; PSNR of identical images is capped at 100 dB."""
    a, b = orig.float() / 255.0, recon.float() / 255.0
    return psnr(a, b).clamp(max=100.0), ssim(a, b, reduction="none")


def code_statistics(counts: torch.Tensor) -> dict:
    """Usage (fraction of codes seen) and perplexity of a code histogram."""
    total = counts.sum().clamp(min=1)
    p = counts.double() / total
    nz = p[p > 0]
    entropy = float(-(nz * nz.log()).sum())
    return {"codebook_usage": float((counts > 0).float().mean()), "perplexity": math.exp(entropy)}


@torch.no_grad()
def evaluate_codec(codec, images: torch.Tensor, batch_size: int = 64, keep: int = 0) -> dict:
    """Scores of `codec` on uint8 images (N, 3, H, W) of one size.

    Returns psnr, ssim, codebook_usage, perplexity, bpp, n_images, the code histogram under "counts" and,
    if `keep`, the first `keep` reconstructions (uint8) under "recon".
    """
    K = codec.info.codebook_size
    counts = torch.zeros(K, dtype=torch.long)
    ps, ss, kept = [], [], []
    n_codes = 0
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size]
        codes = codec.encode(x.float() / 255.0)
        y = to_uint8(codec.decode(codes)).cpu()
        counts += torch.bincount(codes.reshape(-1).cpu(), minlength=K)
        n_codes += codes.numel()
        p, s = image_scores(x, y)
        ps.append(p)
        ss.append(s)
        if len(kept) * batch_size < keep:
            kept.append(y)
    n = len(images)
    pixels = n * images.shape[-1] * images.shape[-2]
    out = {
        "psnr": float(torch.cat(ps).mean()) if n else float("nan"),
        "ssim": float(torch.cat(ss).mean()) if n else float("nan"),
        "bpp": n_codes * math.log2(K) / max(1, pixels),
        **code_statistics(counts),
        "n_images": n,
        "counts": counts,
    }
    if keep:
        out["recon"] = torch.cat(kept)[:keep] if kept else images[:0]
    return out


def jpeg_round_trip(image: torch.Tensor, quality: int) -> tuple[torch.Tensor, int]:
    """uint8 (3, H, W) -> (JPEG-decoded uint8 (3, H, W), file size in bytes) with Pillow."""
    im = Image.fromarray(image.permute(1, 2, 0).numpy(), mode="RGB")
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality, optimize=True)
    n = buf.tell()
    buf.seek(0)
    back = np.asarray(Image.open(buf).convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(back.copy()).permute(2, 0, 1), n


def evaluate_jpeg(images: list[torch.Tensor], qualities=JPEG_QUALITIES) -> list[dict]:
    """Pillow JPEG at each quality on uint8 (3, H, W) images: bpp (whole file), PSNR, SSIM."""
    rows = []
    for q in qualities:
        bits, pixels, ps, ss = 0, 0, [], []
        for x in images:
            y, nbytes = jpeg_round_trip(x, q)
            bits += 8 * nbytes
            pixels += x.shape[-1] * x.shape[-2]
            p, s = image_scores(x[None], y[None])
            ps.append(float(p))
            ss.append(float(s))
        rows.append({"quality": q, "bpp": bits / max(1, pixels), "psnr": float(np.mean(ps)) if ps else float("nan"),
                     "ssim": float(np.mean(ss)) if ss else float("nan")})
    return rows


def save_grid(orig: torch.Tensor, recon: torch.Tensor, path: str | Path, pad: int = 2) -> None:
    """A PNG with the originals (uint8 (n, 3, H, W)) in the top row and their reconstructions below."""
    n, _, H, W = orig.shape
    grid = np.full((2 * H + 3 * pad, n * W + (n + 1) * pad, 3), 255, dtype=np.uint8)
    for row, batch in enumerate((orig, recon)):
        for i in range(n):
            y0, x0 = pad + row * (H + pad), pad + i * (W + pad)
            grid[y0 : y0 + H, x0 : x0 + W] = batch[i].permute(1, 2, 0).cpu().numpy()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(grid).save(tmp, format="PNG")
    tmp.replace(path)


# ------------------------------------------------------------------------------------------------ CLI
def add_eval_arguments(p) -> None:
    p.add_argument("--codec", required=True, help="image codec directory (codec.json + model.safetensors)")
    p.add_argument("--data", required=True, help="a directory of images or a documents .jsonl")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--size", type=int, default=None,
                   help="resize (shorter side) and center-crop to SIZE x SIZE (default: the codec's default size)")
    p.add_argument("--native", action="store_true",
                   help="keep each image's aspect ratio: sides rounded to multiples of f, up to the codec's max size")
    p.add_argument("--max-images", type=int, default=1000, help="evaluate at most this many images (sorted order)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS)
    p.add_argument("--no-jpeg", action="store_true", help="skip the JPEG comparison")
    p.add_argument("--prior-data", default=None, metavar="DIR_OR_JSONL",
                   help="training images: report the codes' learnability (a small code prior trained on their "
                        "codes, scored on --data's codes; see tessera.unimodal.learnability)")
    p.add_argument("--prior-steps", type=int, default=300, help="training steps of the learnability prior")


def _load_images(files, codec, args, skips: SkipLog) -> list[torch.Tensor]:
    info = codec.info
    f = info.downsample
    if args.size is not None and args.size < 1:
        raise TesseraError(f"--size must be a positive number of pixels, got {args.size}")
    size = args.size or (info.default_size[0] if info.default_size else 256)
    if not args.native and size % f:
        raise TesseraError(f"--size {size} is not a multiple of the codec's downsampling factor {f}")
    out = []
    for p in files:
        try:
            im = load_checked(p, f, args.max_pixels)
        except MediaError as e:
            skips.add(e.reason, str(e))
            continue
        if args.native:
            wh = fit_image_size(im.width, im.height, f, info.max_size)
            if im.size != wh:
                im = im.resize(wh, Image.Resampling.BICUBIC)
        else:
            im = resize_center_crop(im, size)
        out.append(to_uint8_tensor(im))
    return out


@torch.no_grad()
def encode_grids(codec, images: list[torch.Tensor], batch_size: int = 64) -> list[torch.Tensor]:
    """Each uint8 (3, H, W) image's (h, w) code grid; images of one size share a batch."""
    out = []
    for i in range(0, len(images), batch_size):
        group = images[i : i + batch_size]
        if len({tuple(x.shape) for x in group}) == 1:
            out += list(codec.encode(torch.stack(group).float() / 255.0).cpu())
        else:
            out += [codec.encode(x[None].float() / 255.0)[0].cpu() for x in group]
    return out


@torch.no_grad()
def judge_ceiling(codec, images: list[torch.Tensor], grids: list[torch.Tensor], files, judge: MediaJudge) -> dict:
    """The judge's accuracy on the originals and on the codec's reconstructions (decoded from `grids`, the
    images' codes), over the images it has a label for."""
    labels = [judge.label(f) for f in files]
    keep = [i for i, label in enumerate(labels) if label is not None]
    if not keep:
        raise TesseraError(f"none of the evaluated images is in {judge.source}")
    labels = [labels[i] for i in keep]
    to_pil = lambda x: Image.fromarray(x.permute(1, 2, 0).numpy(), mode="RGB")
    originals = [to_pil(images[i]) for i in keep]
    recon = [to_pil(to_uint8(codec.decode(grids[i][None]))[0].cpu()) for i in keep]
    acc_o, acc_r = judge_accuracy(judge, originals, labels), judge_accuracy(judge, recon, labels)
    return {"accuracy_original": round(acc_o, 4), "accuracy_reconstructed": round(acc_r, 4),
            "ratio": round(acc_r / acc_o, 4) if acc_o else None, "n": len(keep)}


def evaluate_files(codec, files, args, skips: SkipLog, judge: MediaJudge | None = None) -> dict:
    """The `--json` result over `files`; with a `judge`, also its accuracy on originals and reconstructions."""
    files = files[: args.max_images]
    images = _load_images(files, codec, args, skips)
    if not images:
        raise TesseraError(f"{args.data}: no usable images ({skips.summary()})")
    by_size: dict[tuple, list[torch.Tensor]] = {}
    for x in images:
        by_size.setdefault(tuple(x.shape[-2:]), []).append(x)
    K = codec.info.codebook_size
    tot = {"psnr": 0.0, "ssim": 0.0, "bits": 0.0, "pixels": 0, "n": 0}
    counts = torch.zeros(K, dtype=torch.long)
    for (H, W), group in by_size.items():
        batch = torch.stack(group)
        r = evaluate_codec(codec, batch, args.batch_size)
        n = r["n_images"]
        tot["psnr"] += r["psnr"] * n
        tot["ssim"] += r["ssim"] * n
        tot["bits"] += r["bpp"] * n * H * W
        tot["pixels"] += n * H * W
        tot["n"] += n
        counts += r["counts"]
    stats = code_statistics(counts)
    n = tot["n"]
    result = {
        "psnr": tot["psnr"] / n,
        "ssim": tot["ssim"] / n,
        "bpp": tot["bits"] / tot["pixels"],
        "codebook_usage": stats["codebook_usage"],
        "perplexity": stats["perplexity"],
        "n_images": n,
        "codebook_size": K,
        "size": list(next(iter(by_size))) if len(by_size) == 1 else "native",
        "jpeg": [] if args.no_jpeg else evaluate_jpeg(images),
        "skipped": skips.to_dict()["counts"],
    }
    prior_data = getattr(args, "prior_data", None)
    grids = encode_grids(codec, images) if judge is not None or prior_data else None
    if judge is not None:
        if len(images) != len(files):
            raise TesseraError(f"the judge ({judge.source}) needs every evaluated image to load")
        result["judge"] = judge_ceiling(codec, images, grids, files, judge)
    if prior_data:
        from tessera.unimodal.learnability import code_learnability

        prior_skips = SkipLog()
        train_images = _load_images(list_media(prior_data, "image", prior_skips), codec, args, prior_skips)
        if not train_images:
            raise TesseraError(f"{prior_data}: no usable training images for the learnability prior")
        raster = lambda gs: [g.reshape(-1).numpy() for g in gs]  # the decoder reads a grid in raster order
        result["learnability"] = code_learnability(raster(encode_grids(codec, train_images)), raster(grids), K,
                                                   steps=args.prior_steps)
    return result


def format_table(r: dict, codec_dir: str) -> str:
    size = r["size"] if isinstance(r["size"], str) else "x".join(map(str, r["size"]))
    lines = [f"image codec {codec_dir}: {r['n_images']} images at {size}, {r['codebook_size']} codes",
             f"{'':12} {'bpp':>7} {'PSNR dB':>8} {'SSIM':>6}   codebook usage / perplexity",
             (f"{'codec':12} {r['bpp']:7.3f} {r['psnr']:8.2f} {r['ssim']:6.3f}   "
              f"{100 * r['codebook_usage']:.1f}% / {r['perplexity']:.1f}")]
    for j in r["jpeg"]:
        lines.append(f"{'JPEG q=' + str(j['quality']):12} {j['bpp']:7.3f} {j['psnr']:8.2f} {j['ssim']:6.3f}")
    if "judge" in r:
        j = r["judge"]
        lines.append(f"digit judge: {j['accuracy_reconstructed']:.3f} on reconstructions, "
                     f"{j['accuracy_original']:.3f} on the originals")
    if "learnability" in r:
        from tessera.unimodal.learnability import format_learnability

        lines.append(format_learnability(r["learnability"]))
    if r["skipped"]:
        lines.append("skipped: " + ", ".join(f"{k}={v}" for k, v in r["skipped"].items()))
    return "\n".join(lines)


def run_eval(args, judge: MediaJudge | None = None) -> int:
    from tessera.runtime.distributed import resolve_device
    from tessera.unimodal.image import ImageCodec

    codec = ImageCodec.load(args.codec, device=resolve_device(args.device))
    skips = SkipLog()
    files = list_media(args.data, "image", skips)
    if not files:
        raise TesseraError(f"{args.data}: no image files found")
    r = evaluate_files(codec, files, args, skips, judge)
    if args.json:
        print(json.dumps(r))
    else:
        print(format_table(r, args.codec))
    sys.stdout.flush()
    return 0
