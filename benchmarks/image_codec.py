"""Image codec throughput next to Pillow JPEG, in one run: encode and decode images/s at 64 and 256 px.

    python benchmarks/image_codec.py          # CPU (and CUDA when present) -> results/image_codec.json
    python benchmarks/image_codec.py --presets tiny --sizes 64 --seconds 1

- tessera: `ImageCodec.encode` (pixels -> codes) and `.decode` (codes -> pixels) on batches, with the
  weights of a freshly initialized preset (throughput does not depend on training), fp32, no grad.
- peer: Pillow JPEG (libjpeg) encode (RGB array -> bytes, quality 75, the default) and decode (bytes ->
  RGB array), one image at a time on one thread, as a data pipeline would call it.
- Images are crops of scikit-image's bundled photographs resized to the size (JPEG speed depends on
  content; the codec's does not).
- Each timing is the median over repeats of at least `--seconds` in total, after a warm-up.
  `ratio` = tessera images/s / JPEG images/s at the same size (on CPU, torch uses `--threads` threads and
  JPEG one, as each is normally run).
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import machine, write_result  # noqa: E402

from tessera.unimodal.image import ImageCodec, image_preset  # noqa: E402


def photos(size: int, n: int) -> list[Image.Image]:
    import skimage

    src = Path(skimage.__file__).parent / "data"
    names = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "camera.png"]
    out = []
    rng = np.random.default_rng(0)
    while len(out) < n:
        im = Image.open(src / names[len(out) % len(names)]).convert("RGB")
        s = int(min(im.size) * rng.uniform(0.5, 1.0))
        x0, y0 = rng.integers(0, im.width - s + 1), rng.integers(0, im.height - s + 1)
        out.append(im.crop((x0, y0, x0 + s, y0 + s)).resize((size, size), Image.Resampling.BICUBIC))
    return out


def timeit(fn, seconds: float, sync=lambda: None) -> float:
    """Median seconds per call, after one warm-up call."""
    fn()
    sync()
    times, total = [], 0.0
    while total < seconds or len(times) < 3:
        t = time.perf_counter()
        fn()
        sync()
        dt = time.perf_counter() - t
        times.append(dt)
        total += dt
    return statistics.median(times)


def bench_jpeg(images: list[Image.Image], seconds: float, quality: int = 75) -> dict:
    arrays = [np.asarray(im) for im in images]
    blobs = []
    for a in arrays:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="JPEG", quality=quality)
        blobs.append(buf.getvalue())

    def enc():
        for a in arrays:
            Image.fromarray(a).save(io.BytesIO(), format="JPEG", quality=quality)

    def dec():
        for b in blobs:
            np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))

    n = len(images)
    return {"encode_images_per_s": n / timeit(enc, seconds), "decode_images_per_s": n / timeit(dec, seconds),
            "quality": quality, "bytes_per_image": float(np.mean([len(b) for b in blobs]))}


def bench_codec(preset: str, size: int, device: torch.device, batch: int, seconds: float) -> dict:
    cfg = image_preset(preset)
    torch.manual_seed(0)
    codec = ImageCodec(cfg).to(device).eval()
    x = torch.stack([torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1) for im in photos(size, batch)])
    x = (x.float() / 255.0).to(device)
    codes = codec.encode(x)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t_enc = timeit(lambda: codec.encode(x), seconds, sync)
    t_dec = timeit(lambda: codec.decode(codes), seconds, sync)
    return {"preset": preset, "parameters_m": round(codec.num_parameters() / 1e6, 2), "batch": batch,
            "grid": list(codes.shape[1:]), "codebook_size": codec.info.codebook_size,
            "encode_images_per_s": batch / t_enc, "decode_images_per_s": batch / t_dec}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", default="tiny,base")
    p.add_argument("--sizes", default="64,256")
    p.add_argument("--devices", default="cpu,cuda", help="cuda is skipped when unavailable")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "image_codec.json"))
    args = p.parse_args(argv)
    load0 = [round(x, 2) for x in os.getloadavg()]
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]
    devices = [torch.device(d) for d in args.devices.split(",") if d != "cuda" or torch.cuda.is_available()]
    jpeg = {}
    for size in sizes:
        jpeg[size] = bench_jpeg(photos(size, 16), args.seconds)
        print(f"JPEG q75 {size}px: encode {jpeg[size]['encode_images_per_s']:.1f}/s, "
              f"decode {jpeg[size]['decode_images_per_s']:.1f}/s", flush=True)
    rows = []
    for dev in devices:
        for preset in args.presets.split(","):
            for size in sizes:
                pixels = size * size
                if dev.type == "cpu":
                    batch = max(1, min(64, (64 * 64 * 32) // pixels))
                else:
                    batch = max(4, min(256, 2**22 // pixels))
                r = bench_codec(preset, size, dev, batch, args.seconds)
                r.update(device=dev.type, size=size,
                         encode_ratio_vs_jpeg=r["encode_images_per_s"] / jpeg[size]["encode_images_per_s"],
                         decode_ratio_vs_jpeg=r["decode_images_per_s"] / jpeg[size]["decode_images_per_s"])
                rows.append(r)
                print(f"tessera {preset} {dev.type} {size}px (batch {batch}): "
                      f"encode {r['encode_images_per_s']:.1f}/s ({r['encode_ratio_vs_jpeg']:.2g}x JPEG), "
                      f"decode {r['decode_images_per_s']:.1f}/s ({r['decode_ratio_vs_jpeg']:.2g}x JPEG)", flush=True)
    result = {
        "benchmark": "image_codec",
        "peer": "Pillow JPEG (libjpeg), quality 75, one image at a time, one thread",
        "machine": machine("cuda" if torch.cuda.is_available() else "cpu", load_average_at_start=load0),
        "jpeg": {str(k): v for k, v in jpeg.items()},
        "tessera": rows,
        "note": "untrained weights (speed does not depend on them); fp32; images/s; ratio = tessera / JPEG",
    }
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
