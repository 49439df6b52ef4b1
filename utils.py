"""Shared helpers: the project error, device and seeding, SSIM and PSNR, codebook statistics,
checkpoints and run folders, evaluation, and figures."""
import gzip
import json
import os
import pickle
import random
import re
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

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


def pick_device(name=None):
    """The one device picker: `name` if given, else cuda, then mps, then cpu."""
    if name:
        try:
            device = torch.device(name)
        except RuntimeError:
            raise ProjectError(f"--device {name} is not a device name; use cuda, cuda:N, mps or cpu") from None
        available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
        if not available.get(device.type, True):
            raise ProjectError(f"--device {name} was asked for but is not available here; use --device cpu")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


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


def ssim(x, y):
    """The project's one SSIM: Wang et al. 2004 with an 11-tap Gaussian window (sigma 1.5),
    data_range 1.0, population covariances, averaged over the valid (uncropped) region.

    Equals skimage.metrics.structural_similarity(a, b, data_range=1.0, gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False) per image: skimage filters the whole image and then
    crops the 5-pixel border where the window left the image, which is a 'valid' convolution.
    x, y: (B, 1, H, W) in [0, 1], H, W >= 11 -> (B,) SSIM per image.
    """
    if x.shape != y.shape or x.dim() != 4 or x.shape[1] != 1:
        raise ValueError(f"ssim expects two (B, 1, H, W) tensors, got {tuple(x.shape)} and {tuple(y.shape)}")
    x, y = x.float(), y.float()
    g = _gaussian_window().float().to(x.device)
    if min(x.shape[-2:]) < len(g):
        raise ValueError(f"ssim needs images of at least {len(g)}x{len(g)} pixels, got {tuple(x.shape[-2:])}")

    def filt(img):  # separable valid Gaussian filter: (N, 1, H, W) -> (N, 1, H-10, W-10)
        img = F.conv2d(img, g.view(1, 1, -1, 1))
        return F.conv2d(img, g.view(1, 1, 1, -1))

    B = x.shape[0]
    stats = filt(torch.cat([x, y, x * x, y * y, x * y]))  # one pass for all five local moments
    mu_x, mu_y, e_xx, e_yy, e_xy = stats.split(B)
    var_x, var_y, cov = e_xx - mu_x ** 2, e_yy - mu_y ** 2, e_xy - mu_x * mu_y
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1)


def psnr(x, y):
    """Peak signal-to-noise ratio in dB of images in [0, 1]: x, y (B, 1, H, W) -> (B,)."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def to_unit(x):
    """Model range [-1, 1] -> [0, 1], clamped: metrics and figures work on [0, 1]."""
    return ((x.float() + 1) / 2).clamp(0, 1)


def codebook_stats(counts):
    """counts: (K,) code use over a whole split -> (usage = fraction of codes used, perplexity)."""
    p = counts.double() / counts.sum().clamp_min(1)
    perplexity = torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum()).item()
    return (counts > 0).float().mean().item(), perplexity


@torch.no_grad()
def evaluate(model, loader, device, keep=False):
    """Reconstruct every batch of `loader` (in order) in eval mode.

    Returns a dict: loss, recon_loss, vq_loss (means over slices), ssim and psnr (per slice, (N,)
    tensors), counts (K,) code use, and with keep=True recons (N, 1, H, W) in [0, 1] and
    indices (N, h, w).
    """
    was_training = model.training
    model.eval()
    K = model.cfg.num_embeddings
    sums = {"recon_loss": 0.0, "vq_loss": 0.0}
    ssims, psnrs, recons, indices = [], [], [], []
    counts = torch.zeros(K, dtype=torch.long, device=device)
    n = 0
    for x in loader:
        x = x.to(device)
        out = model(x)
        b = x.shape[0]
        sums["recon_loss"] += F.mse_loss(out["x_recon"], x).item() * b
        sums["vq_loss"] += out["vq_loss"].item() * b
        counts += torch.bincount(out["indices"].flatten(), minlength=K)
        r, t = to_unit(out["x_recon"]), to_unit(x)
        ssims.append(ssim(r, t).cpu())
        psnrs.append(psnr(r, t).cpu())
        if keep:
            recons.append(r.cpu())
            indices.append(out["indices"].cpu())
        n += b
    model.train(was_training)
    res = {k: v / max(n, 1) for k, v in sums.items()}
    res["loss"] = res["recon_loss"] + res["vq_loss"]
    res["ssim"], res["psnr"], res["counts"] = torch.cat(ssims), torch.cat(psnrs), counts.cpu()
    if keep:
        res["recons"], res["indices"] = torch.cat(recons), torch.cat(indices)
    return res


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
    atomic_write(path, lambda f: f.write(gzip.compress(img.to_bytes(), compresslevel=6)))


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
        raise ProjectError(f"{path} is a {ckpt['kind']} checkpoint, but a {kind} checkpoint is needed "
                           f"here; pass the run's best.pt")
    return ckpt


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
