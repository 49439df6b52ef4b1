"""Reconstruct the test split with the best checkpoint and report SSIM and PSNR.

Usage: python predict.py [--checkpoint runs/NNN/best.pt] [--data_dir DIR] [--out_dir DIR]

Defaults: the newest run's best.pt, the data that run was trained on, and RUN_DIR/predict/.
Writes metrics.json (SSIM, PSNR, codebook usage and perplexity), per_slice.csv, best_worst.png,
code_histogram.png (how often each code is used) and every reconstruction as a .nii.gz on its source's
grid, affine and header (recon/), so it opens beside its source in ITK-SNAP or 3D Slicer.
"""
import argparse
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from dataset import load_split, make_loader, resolve_data_dir, stem
from modules import VQVAE, VQVAEConfig
from utils import (ProjectError, codebook_stats, evaluate, latest_checkpoint,
                   load_checkpoint, pick_device, run_main, save_code_histogram, save_comparison, write_csv,
                   write_json, write_nifti_gz)

NUM_SHOWN = 4  # best and worst slices each in best_worst.png


def load_model(ckpt, path, device):
    """Rebuild the VQ-VAE from the checkpoint's model_args alone."""
    try:
        cfg = VQVAEConfig.from_dict(ckpt["model_args"])
    except TypeError as e:
        raise ProjectError(f"{path} has model_args this version does not know ({e}); "
                           f"it is not a VQ-VAE checkpoint of this project") from None
    model = VQVAE(cfg)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:  # names each tensor whose shape or presence differs
        detail = "; ".join(line.strip() for line in str(e).splitlines()[1:4])
        raise ProjectError(f"{path}: weights do not fit its model_args ({detail})") from None
    return model.to(device).eval()


def save_recon(path, recon, source, shape, value_range):
    """recon: (H, W) in [0, 1] on the model grid -> .nii.gz on the source's grid and intensity range,
    with the source's affine and header."""
    x = recon[None, None].float()
    if list(x.shape[-2:]) != shape:
        x = F.interpolate(x, size=tuple(shape), mode="bilinear", antialias=True, align_corners=False)
    lo, hi = value_range
    data = x[0, 0].numpy() * (hi - lo) + lo
    src = nib.load(source)
    header = src.header.copy()
    header.set_data_dtype(np.float32)
    data = data.reshape(src.shape)  # keep a singleton axis if the source had one
    img = nib.Nifti1Image(data.astype(np.float32), src.affine, header)
    write_nifti_gz(path, img)


def main(args):
    # ---- setup
    device = pick_device(args.device)
    ckpt_path = Path(args.checkpoint) if args.checkpoint else latest_checkpoint()
    ckpt = load_checkpoint(ckpt_path)
    config = ckpt["config"]
    out_dir = Path(args.out_dir) if args.out_dir else ckpt_path.parent / "predict"
    try:
        (out_dir / "recon").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ProjectError(f"cannot create {out_dir}: {e.strerror}; pick another --out_dir") from None

    # ---- model and data
    model = load_model(ckpt, ckpt_path, device)
    image_size = tuple(config["image_size"])
    data_dir = resolve_data_dir(args.data_dir or config["data_dir"])
    test_set = load_split(data_dir, args.split, image_size)

    # ---- reconstruct and score
    res = evaluate(model, make_loader(test_set, args.batch_size), device, keep=True)
    usage, perplexity = codebook_stats(res["counts"])
    s, p = res["ssim"], res["psnr"]
    metrics = {"n": len(s), "ssim_mean": s.mean().item(), "ssim_std": s.std(unbiased=False).item(),
               "ssim_min": s.min().item(), "ssim_max": s.max().item(), "psnr_mean": p.mean().item(),
               "codebook_usage": usage, "perplexity": perplexity, "checkpoint": str(ckpt_path),
               "epoch": ckpt.get("epoch"), "data_dir": str(data_dir), "split": args.split,
               "image_size": list(image_size),
               "ssim": "Gaussian SSIM (sigma 1.5, 11 taps), data range 1, images in [0, 1], mean per slice"}

    # ---- save
    write_json(out_dir / "metrics.json", metrics)
    write_csv(out_dir / "per_slice.csv", ["file", "ssim", "psnr"],
              [[f.name, si, pi] for f, si, pi in zip(test_set.files, s.tolist(), p.tolist())])
    for i, file in enumerate(test_set.files):
        save_recon(out_dir / "recon" / f"{stem(file)}_recon.nii.gz", res["recons"][i, 0], file,
                   test_set.shapes[i], test_set.ranges[i])
    order = torch.argsort(s, descending=True)
    k = min(NUM_SHOWN, len(s) // 2) or 1
    pick = torch.cat([order[:k], order[-k:]])
    save_comparison(out_dir / "best_worst.png", test_set.images[pick].float(), res["indices"][pick],
                    res["recons"][pick], f"{args.split}: best {k} and worst {k} slices by SSIM",
                    model.cfg.num_embeddings,
                    [f"{textwrap.fill(stem(test_set.files[i]), 16)}\nSSIM {s[i]:.3f}" for i in pick.tolist()])
    save_code_histogram(out_dir / "code_histogram.png", res["counts"],
                        f"{args.split}: code frequencies ({usage:.1%} of the codebook used, "
                        f"perplexity {perplexity:.1f})")
    print(f"{args.split} SSIM {metrics['ssim_mean']:.4f} +- {metrics['ssim_std']:.4f} "
          f"(n={metrics['n']}), PSNR {metrics['psnr_mean']:.2f} dB")
    print(f"codebook: {usage:.1%} of {model.cfg.num_embeddings} codes used, perplexity {perplexity:.1f}")
    print(f"wrote {out_dir}/metrics.json, per_slice.csv, best_worst.png, code_histogram.png and recon/*.nii.gz")


def get_parser():
    p = argparse.ArgumentParser(description="Reconstruct a split with a trained VQ-VAE.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="None: the newest runs/NNN/best.pt")
    p.add_argument("--data_dir", default=None, help="None: the data the checkpoint was trained on")
    p.add_argument("--out_dir", default=None, help="None: RUN_DIR/predict")
    p.add_argument("--split", default="test", choices=["train", "validate", "test"])
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--device", default=None, help="cuda, mps or cpu; None picks cuda, then mps, then cpu")
    return p


if __name__ == "__main__":
    run_main(main, get_parser().parse_args())
