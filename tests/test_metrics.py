"""The project's one SSIM equals skimage's Gaussian SSIM; PSNR and codebook statistics."""
import math

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from skimage.metrics import structural_similarity

import phantom
from utils import codebook_stats, psnr, ssim


def skimage_ssim(a, b):
    return structural_similarity(a, b, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                 use_sample_covariance=False)


def check_against_skimage(a, b):
    ours = ssim(torch.from_numpy(a)[:, None].float(), torch.from_numpy(b)[:, None].float())
    ref = [skimage_ssim(x.astype(np.float64), y.astype(np.float64)) for x, y in zip(a, b)]
    assert np.abs(ours.numpy() - np.array(ref)).max() < 1e-4, (ours, ref)


@pytest.mark.parametrize("shape", [(11, 11), (32, 16), (256, 128), (37, 53)])
def test_ssim_matches_skimage_on_random_images(shape):
    rng = np.random.default_rng(0)
    a = rng.uniform(size=(3, *shape))
    b = np.clip(a + rng.normal(0, 0.2, size=a.shape), 0, 1)
    check_against_skimage(a, b)


def test_ssim_matches_skimage_on_mr_like_images():
    rng = np.random.default_rng(1)
    p = phantom._patient(rng)
    imgs = np.stack([phantom.render_slice(p, t, (256, 128), rng) for t in (-0.3, 0.0, 0.4)])
    a = imgs / imgs.max()
    blurred = np.clip(gaussian_filter(a, (0, 1.2, 1.2)) + rng.normal(0, 0.02, a.shape), 0, 1)
    check_against_skimage(a, blurred)
    check_against_skimage(a, np.zeros_like(a))  # a black reconstruction


def test_ssim_identity_and_order():
    x = torch.rand(2, 1, 40, 30)
    assert torch.allclose(ssim(x, x), torch.ones(2), atol=1e-6)
    mild, strong = (x + 0.05 * torch.randn_like(x)).clamp(0, 1), (x + 0.3 * torch.randn_like(x)).clamp(0, 1)
    assert (ssim(mild, x) > ssim(strong, x)).all()


def test_ssim_rejects_too_small_images():
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(torch.rand(1, 1, 10, 40), torch.rand(1, 1, 10, 40))


def test_psnr_of_known_error():
    x = torch.zeros(1, 1, 8, 8)
    assert psnr(x + 0.1, x).item() == pytest.approx(20.0, abs=1e-4)  # 10 log10(1 / 0.01)


def test_codebook_stats():
    usage, perplexity = codebook_stats(torch.tensor([5, 5, 5, 5, 0, 0, 0, 0]))
    assert usage == 0.5 and perplexity == pytest.approx(4.0)
    usage, perplexity = codebook_stats(torch.tensor([100, 0, 0, 0]))
    assert usage == 0.25 and perplexity == pytest.approx(1.0)
    assert math.isfinite(codebook_stats(torch.zeros(4, dtype=torch.long))[1])
