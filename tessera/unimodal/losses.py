"""Loss and metric pieces shared by the codec trainers; none of them needs downloaded weights.

- `ssim`: structural similarity (Wang et al. 2004) with the usual 11x11 Gaussian window (sigma 1.5),
  K1=0.01, K2=0.03, population covariances and valid-region averaging: the same numbers as
  `skimage.metrics.structural_similarity(..., gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
  data_range=1, channel_axis=0)`. Differentiable, so `1 - ssim` is also a training loss.
- `psnr`: per-image peak signal-to-noise ratio for signals in [0, 1].
- GAN pieces (taming-transformers' VQGAN recipe): hinge losses, discriminator feature matching (MelGAN),
  and the adaptive weight that scales the adversarial gradient to the reconstruction gradient's size at
  the generator's last layer, so one `disc_weight` works across models and stages of training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


# ------------------------------------------------------------------------------------------------ SSIM
def _gaussian_window(size: int, sigma: float, device, dtype) -> torch.Tensor:
    x = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, window: int = 11, sigma: float = 1.5,
         reduction: str = "mean") -> torch.Tensor:
    """SSIM of (B, C, H, W) images; "none" gives one value per image (averaged over channels).

    The window shrinks to the largest odd size that fits images smaller than `window`.
    """
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"ssim needs two (B, C, H, W) tensors of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    x, y = x.float(), y.float()
    C, H, W = x.shape[1:]
    win = min(window, H, W)
    win -= 1 - win % 2  # odd
    k = _gaussian_window(win, sigma, x.device, x.dtype).expand(C, 1, win, win)

    def filt(t):
        return F.conv2d(t, k, groups=C)  # valid region only, like skimage's border crop

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = filt(x), filt(y)
    sxx = filt(x * x) - mx * mx
    syy = filt(y * y) - my * my
    sxy = filt(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    per_image = s.mean(dim=(1, 2, 3))
    return per_image.mean() if reduction == "mean" else per_image


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image PSNR in dB of (B, ...) tensors; identical images give +inf."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(data_range**2 / mse)


# ------------------------------------------------------------------------------------------------- GAN
def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return -logits_fake.mean()


def feature_matching_loss(feats_real: list[torch.Tensor], feats_fake: list[torch.Tensor]) -> torch.Tensor:
    """Mean L1 distance between the discriminator's hidden features on real and generated inputs."""
    losses = [F.l1_loss(f.float(), r.detach().float()) for r, f in zip(feats_real, feats_fake, strict=True)]
    return torch.stack(losses).mean()


def adaptive_weight(rec_loss: torch.Tensor, adv_loss: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float = 1e4) -> torch.Tensor:
    """||d rec / d W_last|| / ||d adv / d W_last||, detached (Esser et al. 2021, eq. 7)."""
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_adv = torch.autograd.grad(adv_loss, last_layer, retain_graph=True)[0]
    w = g_rec.norm() / (g_adv.norm() + 1e-4)
    return w.clamp(0.0, max_weight).detach()
