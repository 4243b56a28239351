"""Image data for codec training and evaluation: file lists, held-out splits, robust loading, augmentation.

- Every file goes through `tessera.unimodal.media.load_image`, so grayscale, palette, RGBA (composited on
  white), CMYK and 16-bit images become 8-bit RGB with EXIF orientation applied, and corrupt, truncated or
  over-the-pixel-cap files become a `MediaError` with a reason. Images with a side shorter than one
  token (the codec's factor f) are refused as "too_small". None of these stops a run: a bad file comes back
  as a `Skip` inside the batch, the trainer counts it once per file and reports the totals at the end.
- Training crops are a random resized crop (torchvision's recipe: area scale and aspect ratio drawn
  uniformly, ten tries, then a center crop) and a horizontal flip, both optional.
- Evaluation images are resized (shorter side) and center-cropped to a fixed size, deterministically.
- Decoded images are kept in memory, shrunk to the largest size a crop can use, up to `cache_mb`: small
  corpora (the digits) are decoded once; large ones stream from disk in DataLoader workers.
- `InfiniteBatchSampler` yields batch `b` of a seeded per-epoch permutation, sharded across ranks, so a
  resumed run continues from the same batch it stopped at.

`python -m tessera.unimodal.image_data --out DIR` builds the natural-image crops set used in the docs:
crops of scikit-image's bundled photographs (no download), with whole photographs held out for testing.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tessera.errors import TesseraError
from tessera.unimodal.media import DEFAULT_MAX_PIXELS, MediaError, SkipLog, list_media, load_image

EVAL_DIR_NAMES = ("test", "val", "valid", "validation", "eval")


@dataclass(frozen=True)
class Skip:
    path: str
    reason: str
    message: str


# ------------------------------------------------------------------------------------------ file lists
def find_splits(data: str | Path, eval_data: str | Path | None, eval_fraction: float, max_eval: int,
                skips: SkipLog) -> tuple[list[Path], list[Path], str]:
    """(train files, held-out files, how the split was made).

    `eval_data` if given; else `DATA/train` with `DATA/test` (or val, ...) if the directory has them; else
    every k-th file of the sorted list, evenly spread, `eval_fraction` of them (at most `max_eval`).
    """
    data = Path(data)
    if not data.exists():
        raise FileNotFoundError(f"{data}: no such file or directory")
    if eval_data is not None:
        train = list_media(data, "image", skips)
        held = list_media(eval_data, "image", skips)
        how = f"held-out set {eval_data}"
    elif data.is_dir() and (data / "train").is_dir() and any((data / n).is_dir() for n in EVAL_DIR_NAMES):
        name = next(n for n in EVAL_DIR_NAMES if (data / n).is_dir())
        train = list_media(data / "train", "image", skips)
        held = list_media(data / name, "image", skips)
        how = f"{data / 'train'} / {data / name}"
    else:
        files = list_media(data, "image", skips)
        n_eval = min(max_eval, int(len(files) * eval_fraction)) if len(files) > 1 else 0
        n_eval = max(1, n_eval) if len(files) > 1 else 0
        pick = set(np.linspace(0, len(files) - 1, n_eval).round().astype(int).tolist()) if n_eval else set()
        train = [p for i, p in enumerate(files) if i not in pick]
        held = [p for i, p in enumerate(files) if i in pick]
        how = f"1 file in {len(files) // max(1, n_eval)} held out" if n_eval else "no held-out split"
    if not train:
        raise TesseraError(f"{data}: no image files found (looked for {', '.join(('png', 'jpg', 'webp', '...'))})")
    held = held[:max_eval]
    if not held:  # a single image: evaluate on it rather than not at all
        held, how = train[:max_eval], "no held-out split: evaluating on training images"
    return train, held, how


# ------------------------------------------------------------------------------------------ transforms
def random_resized_crop_box(width: int, height: int, rng: random.Random, scale=(0.08, 1.0),
                            ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a crop with area fraction in `scale` and aspect ratio in `ratio`."""
    area = width * height
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        ar = math.exp(rng.uniform(*log_r))
        w = int(round(math.sqrt(target * ar)))
        h = int(round(math.sqrt(target / ar)))
        if 0 < w <= width and 0 < h <= height:
            x0 = rng.randint(0, width - w)
            y0 = rng.randint(0, height - h)
            return x0, y0, x0 + w, y0 + h
    # fall back to a center crop with the ratio clamped to the allowed range
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    x0, y0 = (width - w) // 2, (height - h) // 2
    return x0, y0, x0 + w, y0 + h


def resize_center_crop(im: Image.Image, size: int) -> Image.Image:
    """Shorter side to `size` (bicubic), then the central `size` x `size` square."""
    w, h = im.size
    if (w, h) != (size, size):
        s = size / min(w, h)
        nw, nh = max(size, round(w * s)), max(size, round(h * s))
        if (nw, nh) != (w, h):
            im = im.resize((nw, nh), Image.Resampling.BICUBIC)
        x0, y0 = (nw - size) // 2, (nh - size) // 2
        im = im.crop((x0, y0, x0 + size, y0 + size))
    return im


def to_uint8_tensor(im: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) uint8 (a quarter of float's size between workers)."""
    return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)


def load_checked(path, min_side: int, max_pixels: int) -> Image.Image:
    """`load_image` plus the one-token minimum; raises `MediaError`."""
    im = load_image(path, max_pixels=max_pixels)
    if min(im.size) < min_side:
        raise MediaError("too_small", f"{path}: {im.width}x{im.height} is smaller than one token ({min_side} px)")
    return im


# ---------------------------------------------------------------------------------------------- datasets
class TrainImages(torch.utils.data.Dataset):
    """Augmented square crops of `size` px; a bad file yields a `Skip` instead of an image."""

    def __init__(self, files: list[Path], size: int, min_side: int, *, crop_scale: tuple[float, float] = (0.5, 1.0),
                 flip: bool = True, max_pixels: int = DEFAULT_MAX_PIXELS, cache_mb: float = 1024.0, seed: int = 0):
        self.files = [str(p) for p in files]
        self.size, self.min_side, self.max_pixels = size, min_side, max_pixels
        self.crop_scale, self.flip = tuple(crop_scale), flip
        self.cache: dict[int, Image.Image | Skip] = {}
        self.cache_bytes, self.cache_limit = 0, int(cache_mb * 2**20)
        self.rng = random.Random(seed)
        # A crop of the smallest allowed area, resized to `size`, is still downsampled at this shorter side.
        self.keep_side = int(math.ceil(size / math.sqrt(max(self.crop_scale[0], 1e-3))))

    def __len__(self) -> int:
        return len(self.files)

    def _image(self, i: int) -> Image.Image | Skip:
        hit = self.cache.get(i)
        if hit is not None:
            return hit
        path = self.files[i]
        try:
            im = load_checked(path, self.min_side, self.max_pixels)
        except MediaError as e:
            out: Image.Image | Skip = Skip(path, e.reason, str(e))
            self.cache[i] = out  # a bad file stays bad: do not decode it again
            return out
        if min(im.size) > self.keep_side:
            s = self.keep_side / min(im.size)
            im = im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.Resampling.BICUBIC)
        nbytes = im.width * im.height * 3
        if self.cache_bytes + nbytes <= self.cache_limit:
            self.cache[i] = im
            self.cache_bytes += nbytes
        return im

    def __getitem__(self, i: int) -> torch.Tensor | Skip:
        im = self._image(i)
        if isinstance(im, Skip):
            return im
        if self.crop_scale[0] < 1.0 or self.crop_scale[1] < 1.0 or im.size != (self.size, self.size):
            box = random_resized_crop_box(im.width, im.height, self.rng, self.crop_scale)
            im = im.resize((self.size, self.size), Image.Resampling.BICUBIC, box=box)
        if self.flip and self.rng.random() < 0.5:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return to_uint8_tensor(im)


def seed_worker(worker_id: int) -> None:
    info = torch.utils.data.get_worker_info()
    info.dataset.rng = random.Random(info.seed)


def collate(items: list) -> tuple[torch.Tensor | None, list[Skip]]:
    images = [t for t in items if isinstance(t, torch.Tensor)]
    skips = [t for t in items if isinstance(t, Skip)]
    return (torch.stack(images) if images else None), skips


class InfiniteBatchSampler(torch.utils.data.Sampler):
    """Batches of a seeded permutation per epoch, each rank taking its own slice; starts at batch `start`.

    Batch `b` is always the same indices for a given (n, batch_size, seed, rank, world), so resuming at
    `start = batches already seen` continues the data order exactly.
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, rank: int = 0, world: int = 1, start: int = 0):
        self.n, self.bs, self.seed, self.rank, self.world, self.start = n, batch_size, seed, rank, world, start
        self.per_rank = max(1, n // world)
        self.per_epoch = max(1, self.per_rank // batch_size)

    def batch(self, b: int) -> list[int]:
        epoch, k = divmod(b, self.per_epoch)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        if len(perm) < self.world:  # fewer images than ranks: repeat
            perm = (perm * self.world)[: self.world]
        mine = perm[self.rank :: self.world][: self.per_rank]
        return mine[k * self.bs : (k + 1) * self.bs]

    def __iter__(self):
        b = self.start
        while True:
            yield self.batch(b)
            b += 1


def load_eval_images(files: list[Path], size: int, min_side: int, max_pixels: int,
                     skips: SkipLog | None = None) -> tuple[torch.Tensor, list[str]]:
    """Held-out images resized and center-cropped to `size`: (N, 3, size, size) uint8 and their paths."""
    out, names = [], []
    for p in files:
        try:
            im = load_checked(p, min_side, max_pixels)
        except MediaError as e:
            if skips is not None:
                skips.add(e.reason, str(e))
            continue
        out.append(to_uint8_tensor(resize_center_crop(im, size)))
        names.append(str(p))
    if not out:
        return torch.zeros(0, 3, size, size, dtype=torch.uint8), names
    return torch.stack(out), names


# ------------------------------------------------------------------------------- natural-image crops set
# scikit-image ships these photographs inside its package (no download). Whole photographs are held out.
PHOTO_TRAIN = ("astronaut.png", "camera.png", "rocket.jpg", "hubble_deep_field.jpg", "retina.jpg",
               "motorcycle_left.png", "ihc.png", "brick.png", "grass.png", "gravel.png", "coins.png", "page.png",
               "moon.png")
PHOTO_TEST = ("chelsea.png", "coffee.png")


def build_photo_crops(out: str | Path, size: int = 64, crops_per_image: int = 200, test_crops: int = 40,
                      seed: int = 0) -> dict:
    """Random `size`-px crops of scikit-image's bundled photographs into OUT/train and OUT/test.

    Half of the training photographs are grayscale; they get a third as many crops as the color ones,
    so that color is not the exception in training while both test photographs are in color.
    """
    import skimage

    src = Path(skimage.__file__).parent / "data"
    out = Path(out)
    rng = random.Random(seed)
    counts = {}
    for split, names, n in (("train", PHOTO_TRAIN, crops_per_image), ("test", PHOTO_TEST, test_crops)):
        d = out / split
        d.mkdir(parents=True, exist_ok=True)
        counts[split] = 0
        for name in names:
            p = src / name
            if not p.is_file():
                continue
            im = load_image(p)
            a = np.asarray(im)
            gray = bool((a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all())
            for k in range(n // 3 if gray and split == "train" else n):
                # crops at a few scales: a crop of side s in [size, 3*size] resized down to `size`
                s = min(rng.randint(size, 3 * size), im.width, im.height)
                x0, y0 = rng.randint(0, im.width - s), rng.randint(0, im.height - s)
                c = im.crop((x0, y0, x0 + s, y0 + s))
                if s != size:
                    c = c.resize((size, size), Image.Resampling.LANCZOS)
                c.save(d / f"{Path(name).stem}_{k:03d}.png")
                counts[split] += 1
    return counts


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="build crops of scikit-image's bundled photographs (offline)")
    p.add_argument("--out", required=True)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--crops-per-image", type=int, default=200)
    p.add_argument("--test-crops", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    counts = build_photo_crops(a.out, a.size, a.crops_per_image, a.test_crops, a.seed)
    print(f"photo crops -> {a.out}: {counts}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
