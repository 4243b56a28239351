"""Does a generative model draw new images, or copies of its training images? A nearest-neighbour check.

Each generated image is compared, as a small grayscale thumbnail in L2, with its nearest training image.
The yardstick is the held-out data: a generated image is a *near-copy* when it lies closer to a training
image than 90% of the held-out images lie to theirs (real, unseen images of the same kind are rarely that
close to one training image). Reported:

- `near_copy_share`: the share of generated images that are near-copies;
- `near_copy_label_agreement`: among near-copies, the share whose nearest training image carries the label
  the generation was asked for (a memorizing model with a weak binding to its prompt copies the wrong ones);
- `mean_distance` of generated images to their nearest training image, next to `heldout_median_distance`.

Generation papers report such memorization checks beside sample quality; this one needs no network.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

THUMB = 16
NEAR_QUANTILE = 0.10


def thumbnails(images: list[Image.Image], size: int = THUMB) -> np.ndarray:
    """(N, size * size) float32 in [0, 1]: grayscale, resized with a box filter."""
    return np.stack([np.asarray(im.convert("L").resize((size, size), Image.Resampling.BOX), np.float32).ravel() / 255.0
                     for im in images]) if images else np.zeros((0, size * size), np.float32)


def nearest(queries: np.ndarray, refs: np.ndarray, exclude_self: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """L2 distance of each query to its nearest reference, and that reference's index."""
    d2 = (queries ** 2).sum(1)[:, None] + (refs ** 2).sum(1)[None, :] - 2.0 * queries @ refs.T
    if exclude_self:
        np.fill_diagonal(d2, np.inf)
    idx = d2.argmin(1)
    return np.sqrt(np.maximum(d2[np.arange(len(queries)), idx], 0.0)), idx


def memorization_report(generated: list[Image.Image], prompted: list, train: list[Image.Image], train_labels: list,
                        heldout: list[Image.Image]) -> dict:
    """The numbers of the module docstring; `prompted` are the labels the generations were asked for."""
    if not generated or not train or not heldout:
        return {}
    tr = thumbnails(train)
    g_dist, g_idx = nearest(thumbnails(generated), tr)
    h_dist, _ = nearest(thumbnails(heldout), tr)
    threshold = float(np.quantile(h_dist, NEAR_QUANTILE))
    near = g_dist < threshold
    labels = np.asarray(train_labels)[g_idx]
    agree = labels[near] == np.asarray(prompted)[near]
    return {
        "near_copy_share": round(float(near.mean()), 4),
        "near_copy_label_agreement": round(float(agree.mean()), 4) if near.any() else None,
        "mean_distance": round(float(g_dist.mean()), 4),
        "heldout_median_distance": round(float(np.median(h_dist)), 4),
        "near_threshold": round(threshold, 4),
        "n": len(generated),
    }
