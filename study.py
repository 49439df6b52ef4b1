"""The codebook study of the README: train and test each configuration on one data set, print the table.

Usage: python study.py --data phantom|standin [--volume PATH] [--epochs N] [--out_dir runs/study_DATA]

Every configuration trains with train.py's main at the same compression (8x downsampling, 512 codes)
and the same budget (--epochs), then predict.py's main scores the test split with the project's SSIM.
--data standin first cuts the real stand-in (see cut_standin) from one HipMRI volume into
OUT_DIR/data. Writes OUT_DIR/study.csv, study_val_ssim.png and study_codebook_usage.png and prints a Markdown table with the command of each row.
"""
import argparse
import csv
import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np

import predict
import train
from figures import save_curves
from utils import ProjectError, run_main, write_csv, write_nifti_gz

# Every flag spelled out, so a row means the same thing whatever the defaults become.
SEED = ["--codebook_init", "uniform", "--restart_after", "0", "--ssim_weight", "0", "--lr_schedule", "constant"]
HEALTHY = ["--ema", "--codebook_init", "kmeans", "--restart_after", "2", "--ssim_weight", "0",
           "--lr_schedule", "constant"]
CONFIGS = {  # name: (label in the table, flags)
    "seed": ("seed: gradient codebook with +-1/K init", SEED),
    "ema": ("EMA", ["--ema", *SEED]),
    "grad_init_restart": ("gradient + k-means init + restart", HEALTHY[1:]),
    "ema_init_restart": ("EMA + k-means init + restart", HEALTHY),
    "ema_init_restart_ssim": ("EMA + init + restart + SSIM loss 0.2", [*HEALTHY[:-3], "0.2", "--lr_schedule", "constant"]),
    "ema_init_restart_cosine": ("EMA + init + restart + cosine LR", [*HEALTHY[:-1], "cosine"]),
}
# The real stand-in: slabs of one volume along axis 1 (coronal 256x128 slices), 5 slices apart so
# that no split sees a neighbour of another's slice (adjacent slices are nearly identical).
STANDIN_SLABS = {"validate": range(86, 96), "train": range(101, 171), "test": range(176, 186)}
COLUMNS = ["config", "test_ssim_mean", "test_ssim_std", "test_psnr", "codebook_usage", "perplexity",
           "train_seconds", "best_epoch", "val_codebook_usage", "command"]


def cut_standin(volume, out_dir, slabs=STANDIN_SLABS):
    """One (X, Y, Z) NIfTI volume -> out_dir/keras_slices_{split}/ with one 2D .nii.gz per slice
    [:, k, :] for k in each split's slab, keeping the volume's in-plane voxel sizes. Returns out_dir."""
    volume, out_dir = Path(volume), Path(out_dir)
    if not volume.is_file():
        raise ProjectError(f"volume {volume} does not exist; pass --volume with a HipMRI 3D .nii.gz")
    img = nib.load(volume)
    if len(img.shape) != 3 or img.shape[1] <= max(max(s) for s in slabs.values()):
        raise ProjectError(f"{volume} has shape {img.shape}; the stand-in needs a 3D volume with more "
                           f"than {max(max(s) for s in slabs.values())} slices along axis 1")
    dx, _, dz = img.header.get_zooms()[:3]
    affine = np.diag([float(dx), float(dz), 1.0, 1.0])
    for split, ks in slabs.items():
        folder = out_dir / f"keras_slices_{split}"
        folder.mkdir(parents=True, exist_ok=True)
        for k in ks:
            data = np.asarray(img.dataobj[:, k, :])
            write_nifti_gz(folder / f"{volume.name.split('.')[0]}_slice_{k:03d}.nii.gz",
                           nib.Nifti1Image(data, affine))
    return out_dir


def read_metrics(run_dir):
    with open(Path(run_dir) / "metrics.csv") as f:
        return list(csv.DictReader(f))


def plot_study(out_dir, names, data):
    """Validation SSIM and codebook usage per epoch of every configuration, one line each."""
    curves = {"val_ssim": {}, "codebook_usage": {}}
    for name in names:
        history = read_metrics(Path(out_dir) / name)
        for col, series in curves.items():
            series[CONFIGS[name][0]] = [float(r[col]) * (100 if col == "codebook_usage" else 1) for r in history]
    save_curves(Path(out_dir) / "study_val_ssim.png", curves["val_ssim"], "epoch", "validation SSIM",
                f"validation SSIM per epoch ({data})")
    save_curves(Path(out_dir) / "study_codebook_usage.png", curves["codebook_usage"], "epoch",
                "% of the codebook used", f"codebook usage over the validation split ({data})")


def main(args):
    out_dir = Path(args.out_dir or f"runs/study_{args.data}")
    data = ["--data_dir", str(cut_standin(args.volume, out_dir / "data"))] if args.data == "standin" else []
    names = args.configs or list(CONFIGS)
    rows = []
    for name in names:
        label, config_flags = CONFIGS[name]
        flags = [*data, "--epochs", str(args.epochs), *config_flags]
        run_dir = out_dir / name
        t0 = time.time()
        train.main(train.get_parser().parse_args([*flags, "--out_dir", str(run_dir)]))
        seconds = time.time() - t0
        predict.main(predict.get_parser().parse_args(["--checkpoint", str(run_dir / "best.pt")]))
        m = json.loads((run_dir / "predict" / "metrics.json").read_text())
        last = read_metrics(run_dir)[-1]
        rows.append([label, m["ssim_mean"], m["ssim_std"], m["psnr_mean"], m["codebook_usage"],
                     m["perplexity"], seconds, m["epoch"], float(last["codebook_usage"]),
                     "python train.py " + " ".join(flags)])
        write_csv(out_dir / "study.csv", COLUMNS, rows)  # after each row, so a long study keeps its rows
    plot_study(out_dir, names, args.data)
    print("\n| configuration | test SSIM | PSNR (dB) | codes used: test / validation | perplexity (test) "
          "| train time | best epoch |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r[0]} | {r[1]:.4f} +- {r[2]:.4f} | {r[3]:.2f} | {r[4]:.1%} / {r[8]:.1%} | {r[5]:.1f} | "
              f"{r[6] / 60:.1f} min | {r[7]} |")
    for r in rows:
        print(f"- {r[0]}: `{r[9]}`")


def get_parser():
    p = argparse.ArgumentParser(description="Run the codebook study on one data set.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", choices=["phantom", "standin"], default="phantom",
                   help="the built-in phantom, or the real stand-in cut from --volume")
    p.add_argument("--volume", default="../shared/data/hipmri_3d/Case_018_Week7_LFOV.nii.gz",
                   help="HipMRI 3D volume to cut the stand-in from (with --data standin)")
    p.add_argument("--epochs", type=int, default=20, help="training budget of every configuration")
    p.add_argument("--configs", nargs="*", default=None, choices=list(CONFIGS), metavar="NAME",
                   help=f"configurations to run; None: all of {list(CONFIGS)}")
    p.add_argument("--out_dir", default=None, help="None: runs/study_DATA")
    return p


if __name__ == "__main__":
    run_main(main, get_parser().parse_args())
