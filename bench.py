"""Benchmark: how long the prior takes to generate new slices (sampling the code maps, then decoding).

Usage: python bench.py [--checkpoint runs/NNN/best.pt] [--num_samples 64] [--device cuda] [--quick]

With a run's checkpoint (default: the newest run, if any) it times that run's VQ-VAE and prior; without
one, freshly initialised models of the default configuration, which cost the same per step. One
untimed warm-up pass, then the timed pass. Prints the figure; nothing is written.
"""
import argparse
import time
from pathlib import Path

import torch

from modules import VQVAE, PriorConfig, VQVAEConfig, build_prior
from utils import ProjectError, latest_checkpoint, load_checkpoint, load_prior, load_vqvae, pick_device, run_main


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_sampling(prior, vqvae, n, device, seed=0):
    """Seconds to sample n code maps with the prior and decode them -> (sample s, decode s)."""
    sync(device)
    t0 = time.perf_counter()
    codes = prior.sample(n, generator=torch.Generator(device).manual_seed(seed))
    sync(device)
    t1 = time.perf_counter()
    with torch.no_grad():
        vqvae.decode_indices(codes)
    sync(device)
    return t1 - t0, time.perf_counter() - t1


def main(args):
    device = pick_device(args.device)
    if args.checkpoint:
        path = Path(args.checkpoint)
        load_checkpoint(path)  # a named checkpoint must exist: one clear error, not a silent fallback
    else:
        try:
            path = latest_checkpoint()
        except ProjectError:
            path = None
    prior_path = path and Path(path).with_name("prior_best.pt")
    if prior_path and prior_path.is_file():
        vqvae = load_vqvae(load_checkpoint(path), path, device)
        prior = load_prior(load_checkpoint(prior_path, kind="prior"), prior_path, device)
        what = f"the run's models ({path}, {prior_path.name})"
    else:
        torch.manual_seed(0)
        vqvae = VQVAE(VQVAEConfig()).to(device).eval()
        prior = build_prior(PriorConfig()).to(device).eval()
        what = "freshly initialised default models (no trained run found)"
    n = 8 if args.quick else args.num_samples
    time_sampling(prior, vqvae, min(n, 4), device)  # warm-up: allocations, kernels
    sample_s, decode_s = time_sampling(prior, vqvae, n, device)
    cfg = prior.cfg
    print(f"device {device} ({torch.get_num_threads()} CPU threads), {what}")
    print(f"prior sampling: {n} slices ({cfg.latent_h}x{cfg.latent_w} codes of {cfg.num_embeddings}, "
          f"{cfg.arch}) in {sample_s:.2f} s, decoding {decode_s:.2f} s: {n / (sample_s + decode_s):.1f} slices/s")


def get_parser():
    p = argparse.ArgumentParser(description="Time the generation of new slices.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="a run's best.pt; None: the newest run, if any")
    p.add_argument("--num_samples", type=int, default=64, help="slices generated in the timed pass")
    p.add_argument("--quick", action="store_true", help="8 slices instead of --num_samples")
    p.add_argument("--device", default=None, help="cuda, mps or cpu; None picks cuda, then mps, then cpu")
    return p


if __name__ == "__main__":
    run_main(main, get_parser().parse_args())
