"""Benchmark: the project's data path, training, evaluation, predict.py and generation against a naive
loop written like the seed, on a synthetic split of the real HipMRI size, in one run on one machine.

Usage: python bench.py [--quick] [--device cuda] [--checkpoint runs/NNN/best.pt]

The synthetic split is the source data set's slices (default: the phantom) copied to 11460 / 660 / 540
files (--quick: a tenth), made once under cache/bench/. The model is the seed configuration at 256x128,
batch 32. The naive baseline reads every slice from its NIfTI file on each access (a torch Dataset
over the files, a DataLoader with one worker), trains in fp32 with a per-step loss.item(), and scores
SSIM per batch on the CPU with skimage (the project's settings: Gaussian window, data range 1).
Each training run is in its own process, so its peak memory is its own. Warm-up steps are not timed.
Prints the figures; writes only the synthetic split and its decoded cache.
"""
import argparse
import contextlib
import io
import multiprocessing as mp
import resource
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from skimage.metrics import structural_similarity
from torch.utils.data import DataLoader, Dataset

import predict
import train
from dataset import CACHE_DIR, SPLITS, epoch_batches, get_batch, load_split, num_batches, place, resolve_data_dir
from files import load_checkpoint, make_checkpoint, save_checkpoint
from metrics import evaluate
from modules import VQVAE
from prior import SAMPLE_STEPS, build_prior
from runs import open_run
from utils import (ProjectError, autocast_for, configure_backends, pick_device, run_main, seed_everything, to_unit,
                   uses_bf16)

REAL_SIZES = {"train": 11460, "validate": 660, "test": 540}  # the HipMRI 2D release
SLICES_PER_PATIENT = 60
# train.py flags on top of its defaults: the seed's net, lookup, loss and batch 32, as every figure of
# STUDIES.md's performance section was measured (the defaults moved to batch 8 later); tests shrink it
MODEL_FLAGS = ["--lookup_dim", "0", "--recon_loss", "mse", "--lr_schedule", "constant", "--best_by", "mse",
               "--batch_size", "32"]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic_split(source, sizes, root):
    """A data folder in the release layout whose splits hold sizes[split] files, copies of the
    source's slices of the same split in turn, named as patients of 60 slices; made once."""
    for split, n in sizes.items():
        folder = root / SPLITS[split]
        if folder.is_dir() and len(list(folder.iterdir())) == n:
            continue
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        files = sorted(p for p in (source / SPLITS[split]).iterdir() if p.name.endswith((".nii", ".nii.gz")))
        for i in range(n):
            src = files[i % len(files)]
            ext = ".nii.gz" if src.name.endswith(".gz") else ".nii"
            shutil.copyfile(src, folder / f"case_{i // SLICES_PER_PATIENT:03d}_week_0_slice_{i % SLICES_PER_PATIENT}{ext}")
    return root


# ----------------------------------------------------------------------------- the naive baseline

class NaiveSlices(Dataset):
    """The seed's way: each item read from its NIfTI file when asked, min-max scaled to [-1, 1]."""

    def __init__(self, folder, image_size):
        self.files = sorted(Path(folder).iterdir())
        self.image_size = image_size

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        a = np.asanyarray(nib.load(self.files[i]).dataobj).astype(np.float32).squeeze()
        a = (a - a.min()) / max(a.max() - a.min(), 1e-8)
        x = torch.from_numpy(a)[None, None]
        if x.shape[-2:] != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bilinear", antialias=True, align_corners=False)
        return x[0] * 2 - 1  # (1, H, W) in [-1, 1]


def naive_loader(folder, image_size, batch_size, shuffle):
    return DataLoader(NaiveSlices(folder, image_size), batch_size=batch_size, shuffle=shuffle, num_workers=1)


def skimage_ssim(recon, x):
    """Per-batch SSIM on the CPU, one skimage call per image. recon, x: (B, 1, H, W) in [-1, 1]."""
    r, t = to_unit(recon.detach()).cpu().numpy(), to_unit(x).cpu().numpy()
    return [structural_similarity(a[0], b[0], data_range=1.0, gaussian_weights=True, sigma=1.5,
                                  use_sample_covariance=False) for a, b in zip(r, t)]


# ----------------------------------------------------------------------------- phases

def train_run(device, image_size):
    """The RunConfig of `python train.py --device D --image_size H W` with MODEL_FLAGS."""
    flags = train.get_parser().parse_args(["--device", str(device), "--image_size", *map(str, image_size), *MODEL_FLAGS])
    return train.RunConfig.from_flags(vars(flags))


def peak_memory(device):
    """Bytes: the device's peak allocation on CUDA, else this process's peak resident set (VmHWM on
    Linux: ru_maxrss would count the parent's memory at the fork that started this process)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    status = Path("/proc/self/status")
    if status.is_file():
        kb = next(int(l.split()[1]) for l in status.read_text().splitlines() if l.startswith("VmHWM:"))
        return kb * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def train_phase(kind, root, image_size, steps, device_name, model_flags, cache):
    """In a fresh process: `steps` timed training steps (after one untimed) -> figures (dict)."""
    global MODEL_FLAGS
    MODEL_FLAGS = model_flags
    device = pick_device(device_name)
    configure_backends(device)
    seed_everything(0)
    run = train_run(device, image_size)
    return (train_ours if kind == "ours" else train_naive)(root, image_size, steps, device, run, cache)


def train_ours(root, image_size, steps, device, run, cache):
    """train.py's training step on the decoded split, on the device -> figures (dict)."""
    args, cfg, res = run.train, run.model, {}
    images = place(load_split(root, "train", image_size, cache_dir=cache), device)
    model, net = train.build_model(cfg, device)
    optimizer = train.build_optimizer(model, args.lr, device)
    batches = []  # steps + 1 batches, over more than one epoch on a small split
    while len(batches) < steps + 1:
        batches += epoch_batches(len(images), args.batch_size, 0, len(batches) + 1, images.device)
    batches = batches[:steps + 1]
    train.train_epoch(net, optimizer, images, batches[:1], device, args, 0, [steps + 1], show=False)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    sums, losses = train.train_epoch(net, optimizer, images, batches[1:], device, args, 1, [steps + 1], show=False)
    losses.tolist()  # the read train.py makes once per epoch
    res["seconds"] = time.perf_counter() - t0
    res["images"] = sum(len(b) for b in batches[1:])
    res["peak"] = peak_memory(device)
    # The step's work outside the model's forward and backward, each part timed alone on the same
    # batches: the data path, the optimizer step, and the metrics summed on the device.
    x = get_batch(images, batches[-1], device)
    with torch.no_grad(), autocast_for(device, args.precision):
        out = net(x)
        loss = recon_loss = F.mse_loss(out["x_recon"].float(), x)

    def outside():
        for idx in batches[1:]:
            get_batch(images, idx, device)
        for _ in batches[1:]:
            optimizer.step()
            train.step_metrics(out, x, loss, recon_loss)
    res["outside_seconds"] = timed(outside, device)[0]
    return res


def train_naive(root, image_size, steps, device, run, cache):
    """The seed-like loop: a DataLoader over the files, a host sync and skimage SSIM per step -> figures."""
    args, cfg, res = run.train, run.model, {}
    model = VQVAE(cfg).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    loader = naive_loader(root / SPLITS["train"], image_size, args.batch_size, shuffle=True)
    t0 = time.perf_counter()
    it = iter(loader)  # starts the worker, as every epoch of the seed's loop does
    batches = [next(it)]
    res["worker_start"] = time.perf_counter() - t0
    n_images = 0
    for i in range(steps + 1):
        if i == 1:  # the first step (kernels, allocations) is not timed
            sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
        try:
            x = batches.pop() if batches else next(it)
        except StopIteration:  # a small split: the next epoch
            it = iter(loader)
            x = next(it)
        x = x.to(device)
        n_images += len(x) if i else 0
        out = model(x)
        loss = F.mse_loss(out["x_recon"], x) + out["vq_loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss.item()
        skimage_ssim(out["x_recon"], x)
    res["seconds"] = time.perf_counter() - t0
    res["peak"] = peak_memory(device)
    res["images"] = n_images
    return res


def run_in_process(fn, *args):
    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:  # not daemonic: loaders may fork
        return pool.submit(fn, *args).result()


def naive_evaluate(model, folder, image_size, device, batch_size=32):
    """The seed's evaluation: per-file loader, model, per-image skimage SSIM -> mean SSIM."""
    scores = []
    with torch.no_grad():
        for x in naive_loader(folder, image_size, batch_size, shuffle=False):
            x = x.to(device)
            scores += skimage_ssim(model(x)["x_recon"], x)
    return float(np.mean(scores))


def naive_predict(model, folder, image_size, device, out_dir, batch_size=32):
    """As naive_evaluate, writing each reconstruction as a .nii.gz, as predict.py does."""
    loader = naive_loader(folder, image_size, batch_size, shuffle=False)
    scores, i = [], 0
    with torch.no_grad():
        for x in loader:
            x = x.to(device)
            r = model(x)["x_recon"]
            scores += skimage_ssim(r, x)
            for img in to_unit(r).cpu().numpy():
                nib.save(nib.Nifti1Image(img[0], np.eye(4)), out_dir / f"recon_{i:05d}.nii.gz")
                i += 1
    return float(np.mean(scores))


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def time_sampling(prior, vqvae, n, device, seed=0):
    """Seconds to sample n code maps with the prior and decode them -> (sample s, decode s)."""
    sample_s, codes = timed(lambda: prior.sample(n, generator=torch.Generator(device).manual_seed(seed)), device)
    with torch.no_grad():
        decode_s, _ = timed(lambda: vqvae.decode_indices(codes), device)
    return sample_s, decode_s


def sampling_models(args, device):
    """The run's VQ-VAE and prior when there is one, else fresh default models (same cost) -> (vqvae, prior, what)."""
    try:
        run = open_run(args.checkpoint, device)
    except ProjectError:
        if args.checkpoint:
            raise
        run = None
    if run and (run.dir / "prior_best.pt").is_file():
        run = open_run(run.path, device, prior=True)
        return run.model, run.prior, f"the models of {run.dir}"
    torch.manual_seed(0)
    cfg = train.RunConfig.from_flags({})  # python train.py's models
    return (VQVAE(cfg.model).to(device).eval(), build_prior(cfg.prior).to(device).eval(),
            "fresh default models (no trained run)")


def row(name, ours, naive=None, ratio=None):
    print(f"{name:<44} {ours:>16} {naive or '':>18} {ratio or '':>7}", flush=True)


def rate(n, seconds):
    return f"{n / seconds:,.1f} img/s"


def main(args):
    device = pick_device(args.device)
    configure_backends(device)
    if args.checkpoint:
        load_checkpoint(args.checkpoint)  # a named checkpoint must exist: one clear error, before the long part
    scale = 10 if args.quick else 1
    sizes = {split: max(n // scale, 4) for split, n in REAL_SIZES.items()}
    image_size = tuple(args.image_size)
    steps = args.steps or (3 if args.quick else 20)
    source = resolve_data_dir(args.data_dir)
    root = synthetic_split(source, sizes, Path(args.bench_dir) / f"synthetic_{sizes['train']}")
    run = train_run(device, image_size)
    targs = run.train
    print(f"device {device} ({torch.get_num_threads()} CPU threads), {'bf16' if uses_bf16(device, targs.precision) else 'fp32'}; "
          f"seed configuration at {image_size[0]}x{image_size[1]}, batch {targs.batch_size}; synthetic split of "
          f"{sizes['train']} / {sizes['validate']} / {sizes['test']} slices ({root})")
    row("", "ours", "naive (seed-like)", "ratio")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cache = tmp / "cache"  # decoded splits: cold first, then warm
        train_set = bench_data(root, image_size, cache, sizes, targs.batch_size, args.quick, device)
        bench_training(root, image_size, steps, cache, sizes, targs.batch_size, train_set, device)
        bench_predict(run, root, image_size, cache, sizes, tmp, device)
    bench_generation(args, device)


def bench_data(root, image_size, cache, sizes, batch_size, quick, device):
    """The data path: decode every file once (cold), then read the decoded split back (warm), and an
    epoch of batches without a model against the naive loader -> the training split."""
    cold, train_set = timed(lambda: load_split(root, "train", image_size, cache_dir=cache), device)
    warms = [timed(lambda: load_split(root, "train", image_size, cache_dir=cache), device) for _ in range(3)]
    warm, train_set = min(warms, key=lambda w: w[0])
    row(f"data load, cold ({sizes['train']} files)", f"{cold:.2f} s")
    row("data load, warm (decoded cache; best of 3)", f"{warm:.2f} s")
    images = place(train_set, device)
    n = len(images)
    def our_epoch():
        for idx in epoch_batches(n, batch_size, 0, 1, images.device):
            get_batch(images, idx, device)  # a step would use the batch, then drop it
    t_ours = min(timed(our_epoch, device)[0] for _ in range(5))  # best of 5: it is short and jittery
    n_naive = min(n, 20 * batch_size if quick else n)
    def naive_epoch():
        for i, x in enumerate(naive_loader(root / SPLITS["train"], image_size, batch_size, shuffle=True)):
            x.to(device)
            if (i + 1) * batch_size >= n_naive:
                break
    t_naive, _ = timed(naive_epoch, device)
    r_ours, r_naive = n / t_ours, n_naive / t_naive
    row("data path, no model (epoch; ours best of 5)", rate(n, t_ours), rate(n_naive, t_naive), f"{r_ours / r_naive:,.0f}x")
    return train_set  # the training runs that follow are separate processes


def bench_training(root, image_size, steps, cache, sizes, batch_size, train_set, device):
    """Training steps of ours and of the naive loop, each in its own process."""
    # ---- training, each in its own process
    # Two rounds, alternating, and the faster of each: on a shared machine a slow spell then
    # hits both sides alike instead of one.
    runs = {"ours": [], "naive": []}
    for _ in range(2):
        for kind in runs:
            runs[kind].append(run_in_process(train_phase, kind, root, image_size, steps, str(device),
                                             MODEL_FLAGS, cache))
    ours, naive = (min(r, key=lambda res: res["seconds"]) for r in runs.values())
    r_ours, r_naive = ours["images"] / ours["seconds"], naive["images"] / naive["seconds"]
    row(f"training ({steps} steps, best of 2)", rate(ours["images"], ours["seconds"]),
        rate(naive["images"], naive["seconds"]), f"{r_ours / r_naive:.2f}x")
    row("  peak memory" + (" (GPU)" if device.type == "cuda" else " (process RSS)"),
        f"{ours['peak'] / 2**30:.2f} GiB", f"{naive['peak'] / 2**30:.2f} GiB")
    split_gib = train_set.images.numel() * train_set.images.element_size() / 2**30
    print(f"  (ours holds the whole training split, {split_gib:.2f} GiB of float16, in that memory; the naive "
          f"loop reads files)")
    row("  share in forward+backward", f"{1 - ours['outside_seconds'] / ours['seconds']:.1%}")
    row("  loader worker start (per epoch)", "none", f"{naive['worker_start']:.2f} s")
    epoch_steps = num_batches(sizes["train"], batch_size)
    row(f"  epoch of {sizes['train']} (estimate)", f"{epoch_steps * ours['seconds'] / steps:.1f} s",
        f"{naive['worker_start'] + epoch_steps * naive['seconds'] / steps:.1f} s")


def bench_predict(run, root, image_size, cache, sizes, tmp, device):
    """Evaluation of the validation split and predict.py on the test split, against the naive loop."""
    # ---- evaluation of the validation split
    torch.manual_seed(0)
    model = VQVAE(run.model).to(device).eval()
    val = place(load_split(root, "validate", image_size, cache_dir=cache), device)
    evaluate(model, val[:run.train.batch_size], device, run.train.batch_size, precision=run.train.precision)  # warm-up
    t_ours, _ = timed(lambda: evaluate(model, val, device, run.train.batch_size, precision=run.train.precision), device)
    t_naive, _ = timed(lambda: naive_evaluate(model, root / SPLITS["validate"], image_size, device), device)
    row(f"evaluation ({len(val)} slices)", rate(len(val), t_ours), rate(len(val), t_naive),
        f"{t_naive / t_ours:.1f}x")

    # ---- predict.py on the test split (reconstructions, SSIM, NIfTI files, figures; no samples)
    ckpt = tmp / "run" / "best.pt"
    ckpt.parent.mkdir()
    save_checkpoint(ckpt, make_checkpoint("vqvae", model, {"data_dir": str(root)}))
    pargs = predict.get_parser().parse_args(["--checkpoint", str(ckpt), "--num_samples", "0",
                                             "--device", str(device), "--out_dir", str(tmp / "predict")])
    with contextlib.redirect_stdout(io.StringIO()):
        predict.main(pargs)  # warm-up; also decodes the test split into the cache
    with contextlib.redirect_stdout(io.StringIO()):
        t_ours, _ = timed(lambda: predict.main(pargs), device)
    (tmp / "naive").mkdir()
    t_naive, _ = timed(lambda: naive_predict(model, root / SPLITS["test"], image_size, device, tmp / "naive"),
                       device)
    n_test = sizes["test"]
    row(f"predict.py ({n_test} test slices)", rate(n_test, t_ours), rate(n_test, t_naive), f"{t_naive / t_ours:.1f}x")


def bench_generation(args, device):
    """Sampling and decoding with the run's prior (or fresh default models)."""
    vqvae, prior, what = sampling_models(args, device)
    n = 8 if args.quick else args.num_samples
    time_sampling(prior, vqvae, min(n, 4), device)  # warm-up: allocations, kernels
    sample_s, decode_s = time_sampling(prior, vqvae, n, device)
    cfg = prior.cfg
    row(f"prior sampling ({n} slices)", f"{sample_s:.2f} s + {decode_s:.2f} s")
    print(f"  ({cfg.latent_h}x{cfg.latent_w} codes of {cfg.num_embeddings}, {cfg.arch}, {what}; sampling + "
          f"decoding: {n / (sample_s + decode_s):.1f} slices/s)")
    # The other kind of the same size (fresh weights: the same cost): masked against autoregressive.
    other = build_prior(replace(cfg, arch="transformer" if cfg.arch == "masked" else "masked")).to(device).eval()
    time_sampling(other, vqvae, min(n, 4), device)
    other_s, _ = time_sampling(other, vqvae, n, device)
    masked_s, ar_s = (sample_s, other_s) if cfg.arch == "masked" else (other_s, sample_s)
    row(f"masked prior sampling, {SAMPLE_STEPS} steps ({n} slices)", f"{masked_s:.2f} s", f"{ar_s:.2f} s",
        f"{ar_s / masked_s:.1f}x")
    print(f"  (against the autoregressive {'transformer' if cfg.arch == 'masked' else cfg.arch} of the same size, "
          f"{cfg.latent_h * cfg.latent_w} steps)")


def get_parser():
    p = argparse.ArgumentParser(description="Time the project's paths against a seed-like naive loop.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="a tenth of the split sizes, 3 training steps and 8 samples (under 2 minutes on 2 CPU cores)")
    p.add_argument("--steps", type=int, default=None, help="timed training steps; None: 20, or 3 with --quick")
    p.add_argument("--image_size", type=int, nargs=2, default=[256, 128], metavar=("H", "W"))
    p.add_argument("--data_dir", default=None, help="slices to copy into the synthetic split; None: the phantom")
    p.add_argument("--bench_dir", default=str(CACHE_DIR / "bench"), help="where the synthetic split is kept")
    p.add_argument("--checkpoint", default=None, help="a run's best.pt whose prior is timed; None: the newest run")
    p.add_argument("--num_samples", type=int, default=64, help="slices generated in the timed sampling")
    p.add_argument("--device", default=None, help="cuda, mps or cpu; None picks cuda, then mps, then cpu")
    return p


if __name__ == "__main__":
    run_main(main, get_parser().parse_args())
