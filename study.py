"""The studies of STUDIES.md: train and test each configuration on one data set, print the table.

Usage: python study.py --data phantom|standin|crops|prostate3t [--configs NAME ...] [--epochs N | --minutes M]
                       [--out_dir runs/study_DATA]
       python study.py --report RUN [RUN ...]   (the swing and test figures of finished runs)
       python study.py --realism RUN [RUN ...]  (KID of the L1 and texture decoders' reconstructions)

Every configuration trains with train.py's main at the same compression (8x downsampling, 512 codes)
and the same budget: --epochs, or --minutes of this machine's time (each configuration's seconds per
step are measured first, alone, and its epochs set so that steps x seconds per step fills the budget,
so a bigger net gets fewer steps), then predict.py's main scores the test split with the project's SSIM.
--data standin first cuts the real stand-in (see cut_standin) from one HipMRI volume into OUT_DIR/data;
--data crops cuts the 27 real prostate crops into 64x64 slices, split by patient (see cut_crops);
--data prostate3t cuts 5 grainy native-resolution volumes into 128x128 tiles, split by patient
(see cut_prostate3t).
Besides SSIM, PSNR and codebook use, each row has the net's parameters, GFLOP per image (forward), seconds
per training step, and the KID of the test reconstructions against the test split beside the
real-vs-real floor (as many training slices as test slices against the test split).
Writes OUT_DIR/study.csv, study_val_ssim.png and study_codebook_usage.png and prints a Markdown table
with the command of each row.
"""
import argparse
import csv
import json
import shutil
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import predict
import train
from dataset import load_split, num_batches, recorded_data_dir, resolve_data_dir, slice_position
from figures import save_curves, save_image_grid
from gan_stage import PatchDiscriminator, hinge_d_loss
from files import load_checkpoint, save_checkpoint, write_csv, write_json, write_nifti_gz
from metrics import against_test, air_summary, blur_ssim_curve, evaluate, evaluate_decoder, ssim
from modules import VQVAE
from runs import load_gan_decoder, open_run
from settings import settings_from
from utils import ProjectError, run_main

# Every flag spelled out, so a row means the same thing whatever the defaults become.
AUG_OFF = ["--aug_flip", "0", "--aug_rotate", "0", "--aug_scale", "0", "--aug_shift", "0", "--aug_gamma", "0"]
# the seed's net, loss, output, data and choice of best.pt
PLAIN = ["--arch", "seed", "--lookup_dim", "0", "--recon_loss", "mse", "--best_by", "mse", "--batch_size", "32",
         "--no-clamp_output", *AUG_OFF]
SEED = [*PLAIN, "--codebook_init", "uniform", "--restart_after", "0", "--ssim_weight", "0", "--lr_schedule", "constant"]
# The codebook study's defaults (DEFAULTS_V1); the quality study's ladder adds one change at a time to them.
# Batch 32 is spelled out too: the defaults' batch changed after these studies (see STUDIES.md).
DEFAULTS_V1 = [*PLAIN, "--codebook_init", "kmeans", "--restart_after", "2", "--ssim_weight", "0",
               "--lr_schedule", "constant"]
HEALTHY = ["--ema", *DEFAULTS_V1]
LOOKUP = [*DEFAULTS_V1, "--lookup_dim", "8"]
LOOKUP_L1 = [*LOOKUP, "--recon_loss", "l1+mse"]
RESNET = [*LOOKUP_L1, "--arch", "resnet", "--channels", "16", "32", "64", "128", "--blocks", "0", "1", "1", "2"]
RESNET_COSINE = [*RESNET, "--lr_schedule", "cosine", "--warmup_steps", "20"]
L1_COSINE = [*LOOKUP, "--recon_loss", "l1", "--lr_schedule", "cosine", "--warmup_steps", "20"]  # the long recipe
AUG = ["--aug_flip", "0.5", "--aug_rotate", "5", "--aug_scale", "0.05", "--aug_shift", "0.03", "--aug_gamma", "0.1"]
CONFIGS = {  # name: (label in the table, flags); later flags win, so each row adds to the one before
    "seed": ("seed: gradient codebook with +-1/K init", SEED),
    "ema": ("EMA", ["--ema", *SEED]),
    "grad_init_restart": ("gradient + k-means init + restart (the defaults before the quality study)", DEFAULTS_V1),
    "grad_init_restart_b8": ("gradient + k-means init + restart + batch 8", [*DEFAULTS_V1, "--batch_size", "8"]),
    "ema_init_restart": ("EMA + k-means init + restart", HEALTHY),
    "ema_init_restart_ssim": ("EMA + init + restart + SSIM loss 0.2", [*HEALTHY, "--ssim_weight", "0.2"]),
    "ema_init_restart_cosine": ("EMA + init + restart + cosine LR",
                                [*HEALTHY, "--lr_schedule", "cosine", "--warmup_steps", "100"]),
    "lookup": ("+ 8-dim l2-normalised lookup", LOOKUP),
    "lookup_l1": ("+ L1 + MSE loss", LOOKUP_L1),
    "lookup_l1_cosine": ("+ L1 + MSE + cosine LR (20 warm-up steps)",
                         [*LOOKUP_L1, "--lr_schedule", "cosine", "--warmup_steps", "20"]),
    "lookup_pure_l1": ("+ 8-dim lookup + L1 loss alone", [*LOOKUP, "--recon_loss", "l1"]),
    "lookup_pure_l1_cosine": ("+ 8-dim lookup + L1 loss alone + cosine LR (20 warm-up steps)", L1_COSINE),
    "lookup_pure_l1_cosine_aug": ("+ 8-dim lookup + L1 loss alone + cosine LR + augmentation", [*L1_COSINE, *AUG]),
    "lookup_pure_l1_b8": ("+ 8-dim lookup + L1 loss alone + batch 8 + last epoch",
                          [*LOOKUP, "--recon_loss", "l1", "--batch_size", "8", "--best_by", "last"]),
    "lookup_pure_l1_cosine_b16": ("+ 8-dim lookup + L1 loss alone + cosine LR + batch 16 + last epoch",
                                  [*L1_COSINE, "--batch_size", "16", "--best_by", "last"]),
    "lookup_pure_l1_cosine_b8": ("+ 8-dim lookup + L1 loss alone + cosine LR + batch 8 + last epoch",
                                 [*L1_COSINE, "--batch_size", "8", "--best_by", "last"]),
    "lookup_pure_l1_cosine_aug_b8": ("+ 8-dim lookup + L1 loss alone + cosine LR + augmentation + batch 8 + last epoch",
                                     [*L1_COSINE, *AUG, "--batch_size", "8", "--best_by", "last"]),
    "lookup_pure_l1_cosine_b8_clamp": ("the batch-8 long recipe + the output clamped in training",
                                       [*L1_COSINE, "--batch_size", "8", "--best_by", "last", "--clamp_output"]),
    "lookup_pure_l1_cosine_aug_b8_clamp": ("the batch-8 long recipe + augmentation + the output clamped in training",
                                           [*L1_COSINE, *AUG, "--batch_size", "8", "--best_by", "last", "--clamp_output"]),
    "resnet": ("+ resnet net (GN+SiLU blocks at every level)", RESNET),
    "resnet_attn": ("+ resnet + attention", [*RESNET, "--attention"]),
    "resnet_cosine": ("+ resnet + cosine LR (20 warm-up steps)", RESNET_COSINE),
    "resnet_cosine_aug": ("+ resnet + cosine + augmentation", [*RESNET_COSINE, *AUG]),
}
# The real stand-in: slabs of one volume along axis 1 (coronal 256x128 slices), 5 slices apart so
# that no split sees a neighbour of another's slice (adjacent slices are nearly identical).
STANDIN_SLABS = {"validate": range(86, 96), "train": range(101, 171), "test": range(176, 186)}
COLUMNS = ["config", "test_ssim_mean", "test_ssim_std", "test_psnr", "codebook_usage", "perplexity",
           "train_seconds", "best_epoch", "val_codebook_usage", "params", "gflop_per_image", "seconds_per_step",
           "epochs", "kid_recon", "kid_recon_sd", "kid_real_vs_real", "kid_real_vs_real_sd", "command"]


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


# The real multi-patient set: 27 prostate T2 crops (64x64x60), whole patients per split (seeded shuffle).
CROPS_SPLIT = {"train": 19, "validate": 4, "test": 4}


def patients_by_split(folder, out_dir, split, seed, flag):
    """The volumes of `folder` (one .nii(.gz) per patient) dealt into whole-patient splits by a seeded
    shuffle -> yields (out_dir/keras_slices_{split}, the patient's index, the (X, Y, Z) nibabel image, its
    in-plane affine); ProjectError naming `flag` when the folder holds too few patients."""
    folder, out_dir = Path(folder), Path(out_dir)
    files = sorted(folder.glob("*.nii*")) if folder.is_dir() else []
    if len(files) < sum(split.values()):
        raise ProjectError(f"{folder} holds {len(files)} volumes, fewer than the {sum(split.values())} patients "
                           f"of the split; pass {flag}")
    order = np.random.default_rng(seed).permutation(len(files))
    start = 0
    for name, n in split.items():
        dest = out_dir / f"keras_slices_{name}"
        dest.mkdir(parents=True, exist_ok=True)
        for case in order[start:start + n]:
            img = nib.load(files[case])
            dx, dy = (float(z) for z in img.header.get_zooms()[:2])
            yield dest, case, img, np.diag([dx, dy, 1.0, 1.0])
        start += n


def cut_crops(folder, out_dir, split=CROPS_SPLIT, seed=0):
    """The crops folder (one (64, 64, 60) .nii.gz per patient) -> out_dir/keras_slices_{split}/, every
    axial slice [:, :, k] of each patient as one 2D .nii.gz named as the release names its slices
    (case_NNN_week_0_slice_K), whole patients per split. Returns out_dir."""
    for dest, case, img, affine in patients_by_split(folder, out_dir, split, seed, "--crops with the prostate_crops "
                                                     "folder"):
        for k in range(img.shape[2]):
            write_nifti_gz(dest / f"case_{case:03d}_week_0_slice_{k}.nii.gz",
                           nib.Nifti1Image(np.asarray(img.dataobj[:, :, k]), affine))
    return Path(out_dir)


# The grainy multi-patient set: 5 prostate T2 volumes (384x384, 0.5 mm, about 20 slices) at native
# resolution, whole patients per split; each slice's central 256x256 cut into four 128x128 tiles.
PROSTATE3T_SPLIT = {"train": 2, "validate": 1, "test": 2}
TILE, TILES_FROM = 128, slice(64, 320)


def cut_prostate3t(folder, out_dir, split=PROSTATE3T_SPLIT, seed=0):
    """The prostate3t folder (one (384, 384, Z) .nii.gz per patient) -> out_dir/keras_slices_{split}/:
    each axial slice's central 256x256 at native resolution (no resampling, so the grain stays as the
    scanner made it) as four 128x128 tiles, one 2D .nii.gz per tile named p3t_PP_tileT_slice_K (so each
    tile position of a patient reads as one volume), whole patients per split. Returns out_dir."""
    for dest, case, img, affine in patients_by_split(folder, out_dir, split, seed, "--prostate3t with the "
                                                     "prostate3t folder"):
        for k in range(img.shape[2]):
            centre = np.asarray(img.dataobj[TILES_FROM, TILES_FROM, k])  # (256, 256)
            for t in range(4):
                tile = centre[t // 2 * TILE:(t // 2 + 1) * TILE, t % 2 * TILE:(t % 2 + 1) * TILE]  # (128, 128)
                write_nifti_gz(dest / f"p3t_{case:02d}_tile{t}_slice_{k}.nii.gz",
                               nib.Nifti1Image(np.ascontiguousarray(tile), affine))
    return Path(out_dir)


def merged(flags):
    """A flag list with each flag once, at its last value (a row's flags are the row before plus changes)."""
    out = {}
    for tok in flags:
        if tok.startswith("--"):
            out.pop(tok, None)
            out[key := tok] = []
        else:
            out[key].append(tok)
    return [t for k, v in out.items() for t in (k, *v)]


def run_config(flags):
    """Flags -> the RunConfig train.py would run."""
    return train.RunConfig.from_flags(vars(train.get_parser().parse_args(flags)))


def measure_cost(run, steps=3):
    """Parameters, forward GFLOP per image, and seconds per training step (the median of `steps` after
    one warm-up, on this machine's CPU, of a synthetic batch of the run's batch size and image size,
    through train_epoch: the loss, augmentation and optimizer included)."""
    cfg, args = run.model, run.train
    torch.manual_seed(0)
    model = VQVAE(cfg)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(torch.zeros(1, 1, *cfg.image_size))
    model.train()
    optimizer = train.build_optimizer(model, args.lr, torch.device("cpu"))
    images = torch.rand(args.batch_size, 1, *cfg.image_size).half()
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        train.train_epoch(model, optimizer, images, [torch.arange(args.batch_size)], torch.device("cpu"), args, 0,
                          [1000], show=False)
        times.append(time.perf_counter() - t0)
    return sum(p.numel() for p in model.parameters()), counter.get_total_flops() / 1e9, float(np.median(times[1:]))


def cached_cost(path, run):
    """measure_cost(run), kept in the JSON file `path` (when given) under the model's and training's
    settings, so that studies running side by side can share costs measured earlier with the machine
    idle (the budget is what decides the epochs, so it must not be measured under load)."""
    key = json.dumps([run.model.to_dict(), {k: v for k, v in vars(run.train).items() if k not in ("data_dir", "out_dir")}],
                     sort_keys=True)
    cache = json.loads(Path(path).read_text()) if path and Path(path).is_file() else {}
    if key not in cache:
        cache[key] = measure_cost(run)
        if path:
            Path(path).write_text(json.dumps(cache, indent=1))
    return tuple(cache[key])


def realism(run_dir, seed=0):
    """How real the test reconstructions of run_dir/best.pt look, through its L1 (or MSE) decoder and,
    when the run has one, its adversarial or texture decoder (decoder_gan.pt) on the same codes: each
    set's KID (mean, sd over subsets) and FID against the test split, its SSIM to the test slices, and its
    blur-SSIM at sigma 1 px (metrics.blur_ssim_curve: grain lowers it, a smooth image scores near 1), beside
    the real-vs-real floor at equal n (as many random training slices as test slices; patients the model
    never saw where the data are split by patient) -> {set: {kid, kid_sd, fid, ssim, blur_ssim_1}}. Draws
    three test slices beside both decoders' renderings at full size in run_dir/realism_test.png."""
    device = torch.device("cpu")
    torch.manual_seed(seed)  # the texture decoder's grain
    run = open_run(run_dir)
    model, data_dir = run.model, run.data_dir()
    test = load_split(data_dir, "test", model.cfg.image_size).images.float()
    train_images = load_split(data_dir, "train", model.cfg.image_size).images.float()
    res = evaluate(model, test, device, 32, keep=True)
    pick = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(seed))[:len(test)]
    sets, ssims = {"floor": train_images[pick], "recon_l1": res["recons"]}, {"recon_l1": res["ssim"].mean().item()}
    gan = load_gan_decoder(run.dir, run.ckpt, device)
    if gan:
        texture = evaluate_decoder(gan, res["indices"], test, model, device, 32, keep=True)
        sets["recon_texture"], ssims["recon_texture"] = texture["recons"], texture["ssim"].mean().item()
    fids, kids = against_test(sets, test, device)
    shown = [test, res["recons"], *([sets["recon_texture"]] if gan else [])]
    k = min(3, len(test))
    pick = torch.linspace(0, len(test) - 1, k).long()  # spread over the test patients
    # at least one figure pixel per image pixel (100 dpi), so the grain is seen as it is
    save_image_grid(Path(run_dir) / "realism_test.png", torch.stack([x[pick] for x in shown], 1).flatten(0, 1),
                    f"test slices of patients never seen in training | L1 decoder (best.pt){' | texture decoder' * bool(gan)}"
                    f" ({run_dir})", ncols=len(shown), cell=max(model.cfg.image_size[0] / 100, 1.3))
    out = {name: {"kid": kids[name][0], "kid_sd": kids[name][1], "fid": fids[name], "ssim": ssims.get(name),
                  "blur_ssim_1": blur_ssim_curve(x, (1,))[0]} for name, x in sets.items()}
    out["test"] = {"blur_ssim_1": blur_ssim_curve(test, (1,))[0]}
    return out


def realism_line(run_dir, r):
    """One Markdown row of realism()'s figures, KIDs also as multiples of the floor."""
    floor = r["floor"]["kid"]

    def kid(name):
        return f"{r[name]['kid']:.4f} ({r[name]['kid'] / floor:.1f}x)" if name in r else "-"

    ssim_of = {k: f"{r[k]['ssim']:.4f}" if k in r else "-" for k in ("recon_l1", "recon_texture")}
    blur = " / ".join(f"{r[k]['blur_ssim_1']:.3f}" if k in r else "-" for k in ("test", "recon_l1", "recon_texture"))
    return (f"| {run_dir} | {ssim_of['recon_l1']} / {ssim_of['recon_texture']} | {kid('recon_l1')} | "
            f"{kid('recon_texture')} | {floor:.4f} | {blur} |")


# ----------------------------------------------------------------------------- grain on the L1 reconstructions

def _reconstructed(run_dir, split, seed=0):
    """run_dir's best.pt, its `split` slices (N, 1, H, W) in [0, 1], their L1 reconstructions and the
    floor's slices (as many random training slices: other patients where the data are split by patient)."""
    run = open_run(run_dir)
    size, data_dir = run.model.cfg.image_size, run.data_dir()
    real = load_split(data_dir, split, size).images.float()
    train_images = load_split(data_dir, "train", size).images.float()
    recons = evaluate(run.model, real, torch.device("cpu"), 32, keep=True)["recons"]
    pick = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(seed))[:len(real)]
    return run, real, recons, train_images[pick]


def _realism_of(sets, real):
    """{name: (N, 1, H, W) in [0, 1]} (the floor among them) -> {name: {kid, kid_x_floor, fid, blur_ssim_1,
    ssim}} against `real` (N, 1, H, W), each set's slice i rendering real[i] (SSIM None for the floor)."""
    fids, kids = against_test(sets, real, torch.device("cpu"))
    return {name: {"kid": kids[name][0], "kid_x_floor": kids[name][0] / kids["floor"][0], "fid": fids[name],
                   "blur_ssim_1": blur_ssim_curve(x, (1,))[0],
                   "ssim": None if name == "floor" else ssim(x, real).mean().item()} for name, x in sets.items()}


def grain_realism(run_dir, split="test", sigmas=(0.005, 0.01, 0.015), seed=0):
    """KID and FID against `split` of run_dir's L1 reconstructions of it, as they are and with white
    Gaussian noise of standard deviation s (of the [0, 1] range) added for each s in sigmas, beside the
    floor -> _realism_of's dict with "noise S" sets. Choose s on the validation split, report it on test."""
    _, real, recons, floor = _reconstructed(run_dir, split, seed)
    g = torch.Generator().manual_seed(seed)
    sets = {"floor": floor, "recon_l1": recons,
            **{f"noise {s}": (recons + s * torch.randn(recons.shape, generator=g)).clamp(0, 1) for s in sigmas}}
    return _realism_of(sets, real)


class GrainHead(nn.Module):
    """A texture head at full resolution on a frozen decoder's output, trained by texture_head:
    x (B, 1, H, W) in [-1, 1] -> x + r, clamped to [-1, 1], with r from n ~ N(0, 1) per pixel and
    four 3x3 convs: free (r = net(x, n), the last conv zero at the start) or, sigma_only, white noise
    whose amplitude alone is learned from the decoded slice (r = softplus(net(x)) * n, about 0.01 of the
    [0, 1] range at the start), which cannot draw a pattern. No transposed convolution follows the noise."""

    def __init__(self, channels=32, sigma_only=False):
        super().__init__()
        self.sigma_only = sigma_only
        self.net = nn.Sequential(nn.Conv2d(2, channels, 3, padding=1), nn.LeakyReLU(0.2),
                                 nn.Conv2d(channels, channels, 3, padding=1), nn.LeakyReLU(0.2),
                                 nn.Conv2d(channels, channels, 3, padding=1), nn.LeakyReLU(0.2),
                                 nn.Conv2d(channels, 1, 3, padding=1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.constant_(self.net[-1].bias, -4.0 if sigma_only else 0.0)

    def forward(self, x):
        n = torch.randn_like(x)
        if self.sigma_only:
            return (x + F.softplus(self.net(torch.cat([x, torch.zeros_like(x)], 1))) * n).clamp(-1, 1)
        return (x + self.net(torch.cat([x, n], 1))).clamp(-1, 1)


def texture_head(run_dir, steps=1500, rec_weight=0.2, sigma_only=False, crop=64, lecam=0.3, seed=0):
    """Train a GrainHead on run_dir's frozen L1 reconstructions of its training slices against a
    conditional PatchGAN (pix2pix: the discriminator sees the slice beside the reconstruction it
    belongs with; 32 channels, 3 layers, hinge loss), regularised for few patients by LeCam (Tseng et
    al. 2021, one-sided as their code, weight `lecam`) and flips applied alike to both; random crop x crop
    windows at batch 8, Adam 2e-4 (0.5, 0.9). Head loss: rec_weight * L1 to the slice + 0.1 * the
    generator's hinge term. Then score the test reconstructions through it (_realism_of) -> (scores, head)."""
    torch.manual_seed(seed)
    run = open_run(run_dir)
    train_images = load_split(run.data_dir(), "train", run.model.cfg.image_size).images.float()
    recons = evaluate(run.model, train_images, torch.device("cpu"), 32, keep=True)["recons"]
    x_all, b_all = train_images * 2 - 1, recons * 2 - 1  # (N, 1, H, W) in [-1, 1]
    head, disc = GrainHead(sigma_only=sigma_only), PatchDiscriminator(2, 32, 3)
    opt_h = torch.optim.Adam(head.parameters(), 2e-4, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(disc.parameters(), 2e-4, betas=(0.5, 0.9))
    ema_real = ema_fake = 0.0  # LeCam's anchors: moving means of the two logits

    def logits(x, fake, b):  # real and fake pairs (slice, its reconstruction) as one batch, flipped alike
        pairs = torch.cat([torch.cat([x, b], 1), torch.cat([fake, b], 1)])  # (2B, 2, crop, crop)
        return disc(pairs.flip(-1) if torch.rand(()) < 0.5 else pairs).chunk(2)

    for step in range(steps):
        idx = torch.randint(len(x_all), (8,))
        i, j = (torch.randint(0, s - crop + 1, ()).item() for s in x_all.shape[-2:])
        x, b = x_all[idx, :, i:i + crop, j:j + crop], b_all[idx, :, i:i + crop, j:j + crop]
        fake = head(b)
        disc.requires_grad_(False)
        loss = rec_weight * (fake - x).abs().mean() - 0.1 * logits(x, fake, b)[1].mean()
        opt_h.zero_grad()
        loss.backward()
        opt_h.step()
        disc.requires_grad_(True)
        real_l, fake_l = logits(x, fake.detach(), b)
        ema_real = 0.99 * ema_real + 0.01 * real_l.mean().item()
        ema_fake = 0.99 * ema_fake + 0.01 * fake_l.mean().item()
        d_loss = hinge_d_loss(real_l, fake_l) + lecam * ((F.relu(real_l - ema_fake) ** 2).mean()
                                                          + (F.relu(ema_real - fake_l) ** 2).mean())
        opt_d.zero_grad()
        d_loss.backward()
        opt_d.step()
    _, test, test_recons, floor = _reconstructed(run_dir, "test", seed)
    with torch.no_grad():
        textured = (head(test_recons * 2 - 1) + 1) / 2
    return _realism_of({"floor": floor, "recon_l1": test_recons, "recon_head": textured}, test), head


def grain_figure(run_dir, head, path, sigma=0.01, seed=0):
    """Three test slices of run_dir (spread over its test patients) beside their L1 reconstructions, the
    same with white noise of sd `sigma` (as grain_realism) and through `head` (a trained GrainHead), at
    full resolution (at least one figure pixel per image pixel) -> path."""
    _, test, recons, _ = _reconstructed(run_dir, "test", seed)
    noisy = (recons + sigma * torch.randn(recons.shape, generator=torch.Generator().manual_seed(seed))).clamp(0, 1)
    torch.manual_seed(seed)
    with torch.no_grad():
        textured = (head(recons * 2 - 1) + 1) / 2
    pick = torch.linspace(0, len(test) - 1, 3).long()
    shown = torch.stack([x[pick] for x in (test, recons, noisy, textured)], 1).flatten(0, 1)  # (12, 1, H, W)
    save_image_grid(path, shown, f"test slices of patients never seen | L1 decoder | + white noise {sigma} | "
                    f"{'sigma-only' if head.sigma_only else 'free'} texture head ({run_dir})", ncols=4,
                    cell=max(test.shape[-2] / 100, 1.3))
    return path


def sample_kid(run_dir, seeds=(0, 1, 2), random_positions=False, num_samples=None, **sampling):
    """KID and FID against the test split of num_samples samples (None: as many as test slices) from
    run_dir's prior (prior_best.pt), once per seed, drawn as predict.py draws its samples with --seed S
    and the sampling flags `sampling` (guidance, temperature, top_k, top_p); random_positions: each
    sample at a position drawn uniformly from the prior's (guided by `guidance`)
    -> [(kid mean, kid sd, fid)] per seed."""
    device = torch.device("cpu")
    run = open_run(run_dir, device, prior=True)
    test = load_split(run.data_dir(), "test", run.model.cfg.image_size)
    n, sets = num_samples or len(test.images), {}
    for seed in seeds:
        args = settings_from(predict.PredictConfig, {"num_samples": n, "seed": seed, **sampling})
        position = None
        if random_positions:
            position = torch.randint(run.prior.cfg.num_positions, (n,), generator=torch.Generator().manual_seed(seed))
        codes = predict.sample_codes(run.prior, n, args, torch.Generator(device).manual_seed(seed), position)
        sets[seed] = predict.decode(run.model, codes, args.batch_size)
    fids, kids = against_test(sets, test.images.float(), device)
    return [(*kids[seed], fids[seed]) for seed in seeds]


def patient_subset(run_dir, num_patients, out_dir, seed=0):
    """A copy of run_dir's VQ-VAE (best.pt, last.pt, config.json) in out_dir whose recorded data is
    out_dir/data: the first num_patients training patients of a seeded shuffle (slices copied) and the
    run's own validation and test slices, so that `train.py --stage prior --resume out_dir` trains a
    prior on fewer patients and is judged on the same unseen ones. Returns out_dir."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    ckpts = {name: load_checkpoint(run_dir / name) for name in ("best.pt", "last.pt")}
    src = recorded_data_dir(ckpts["best.pt"]["config"], run_dir / "best.pt")
    train_files = sorted((src / "keras_slices_train").glob("*.nii*"))
    unnamed = [f.name for f in train_files if slice_position(f) is None]
    if unnamed:
        raise ProjectError(f"{src / 'keras_slices_train' / unnamed[0]} does not name its patient as the release does "
                           f"(case_004_week_0_slice_17.nii.gz); patient_subset needs release names")
    patients = sorted({slice_position(f)[0] for f in train_files})
    if not 1 <= num_patients <= len(patients):
        raise ProjectError(f"{src} has {len(patients)} training patients; pick num_patients in 1..{len(patients)}")
    keep = {patients[i] for i in np.random.default_rng(seed).permutation(len(patients))[:num_patients]}
    data = out_dir / "data"
    for split in ("train", "validate", "test"):
        dest = data / f"keras_slices_{split}"
        dest.mkdir(parents=True, exist_ok=True)
        for f in sorted((src / f"keras_slices_{split}").glob("*.nii*")):
            if split != "train" or slice_position(f)[0] in keep:
                shutil.copy(f, dest / f.name)
    for name, ckpt in ckpts.items():
        ckpt["config"]["data_dir"] = str(data.resolve())
        save_checkpoint(out_dir / name, ckpt)
    config = json.loads((run_dir / "config.json").read_text())
    write_json(out_dir / "config.json", {**config, "data_dir": str(data.resolve())})
    return out_dir


def read_metrics(run_dir):
    with open(Path(run_dir) / "metrics.csv") as f:
        return list(csv.DictReader(f))


def swings(rows, psnr_step=0.2):
    """How much validation SSIM jumps between consecutive epochs of the second half of a run (metrics.csv
    rows) while PSNR barely moves (by less than psnr_step dB): (largest jump, pairs counted)."""
    half = rows[len(rows) // 2:]
    jumps = [abs(float(b["val_ssim"]) - float(a["val_ssim"])) for a, b in zip(half, half[1:])
             if abs(float(b["val_psnr"]) - float(a["val_psnr"])) < psnr_step]
    return max(jumps, default=0.0), len(jumps)


def report(run_dir):
    """One run's line: its last epochs' validation SSIM, the second half's swing, and predict.py's test
    figures (both SSIMs, PSNR, the air's exact zeros). Given a checkpoint instead of a run folder: its
    epoch and the same test figures, scored here (for checkpoints copied from a run's epochs)."""
    if Path(run_dir).is_file():
        run = open_run(run_dir)
        res = evaluate(run.model, load_split(run.data_dir(), "test", run.model.cfg.image_size).images, torch.device("cpu"), 32)
        air = air_summary(res)
        return (f"{run_dir}: epoch {run.ckpt['epoch']}, test SSIM {res['ssim'].mean():.4f}, in the body "
                f"{res['body_ssim'].nanmean():.4f}, PSNR {res['psnr'].mean():.2f} dB; {air['zeros_kept']:.1%} of the "
                f"black pixels exactly black, {air['bright_lost']:.2%} of the bright ones black")
    rows = read_metrics(run_dir)
    jump, pairs = swings(rows)
    m = json.loads((Path(run_dir) / "predict" / "metrics.json").read_text())
    air = m["air"]
    last = ", ".join(f"{float(r['val_ssim']):.4f}" for r in rows[-4:])
    return (f"{run_dir}: {len(rows)} epochs; validation SSIM of the last four {last}; second half: largest jump "
            f"{jump:.4f} over {pairs} consecutive pairs with PSNR within 0.2 dB | test (epoch {m['epoch']}, "
            f"n={m['n']}): SSIM {m['ssim_mean']:.4f}, in the body {m['body_ssim_mean']:.4f}, PSNR "
            f"{m['psnr_mean']:.2f} dB; {air['zeros_kept']:.1%} of the black pixels exactly black, "
            f"{air['bright_lost']:.2%} of the bright ones black")


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


def save_side_by_side(path, out_dir, names, data_dir, title, n=6):
    """n test slices (evenly spread over the split) and their reconstructions by each configuration's
    best.pt, one row each, labelled with the configuration and its SSIM on those slices."""
    images, labels = None, ["input"]
    rows = []
    for name in names:
        model = open_run(Path(out_dir) / name).model
        if images is None:
            test = load_split(data_dir, "test", model.cfg.image_size).images.float()
            images = test[torch.linspace(0, len(test) - 1, n + 2).round().long()[1:-1]]  # (n, 1, H, W)
            rows.append(images)
        res = evaluate(model, images, torch.device("cpu"), n, keep=True)
        rows.append(res["recons"])
        labels.append(f"{name}\nSSIM {res['ssim'].mean():.3f}")
    save_image_grid(path, torch.cat(rows), title, ncols=n, row_labels=labels, cell=2.2)


def main(args):
    if args.report:
        for run_dir in args.report:
            print(report(run_dir))
        return
    if args.realism:
        print("| run | test SSIM: L1 / texture decoder | KID recon L1 (x floor) | KID recon texture (x floor) | "
              "KID floor | blur-SSIM sigma 1: real / L1 / texture |")
        print("| --- | --- | --- | --- | --- | --- |")
        for run_dir in args.realism:
            print(realism_line(run_dir, realism(run_dir)))
        return
    out_dir = Path(args.out_dir or f"runs/study_{args.data}")
    if args.data == "standin":
        data = ["--data_dir", str(cut_standin(args.volume, out_dir / "data"))]
    elif args.data == "crops":
        data = ["--data_dir", str(cut_crops(args.crops, out_dir / "data")), "--image_size", "64", "64"]
    elif args.data == "prostate3t":
        data = ["--data_dir", str(cut_prostate3t(args.prostate3t, out_dir / "data")), "--image_size", str(TILE),
                str(TILE)]
    else:
        data = []
    data_dir = resolve_data_dir(data[1] if data else None)
    n_train = len(load_split(data_dir, "train", run_config(data).model.image_size).files)
    names = args.configs or list(CONFIGS)
    if args.figure:
        path = out_dir / f"test_{'_vs_'.join(names)}.png"
        save_side_by_side(path, out_dir, names, data_dir, f"test slices of the {args.data} set (patients never seen in "
                          f"training where the data allow): input, then each configuration's reconstruction")
        print(f"wrote {path}")
        return
    costs = {name: cached_cost(args.costs, run_config([*data, *CONFIGS[name][1]])) for name in names}  # first
    if args.costs_only:
        for name, (params, gflop, step_seconds) in costs.items():
            print(f"{name}: {params / 1e6:.2f}M parameters, {gflop:.2f} GFLOP per image, {step_seconds:.2f} s per step")
        return
    rows = []
    for name in names:
        label, config_flags = CONFIGS[name]
        params, gflop, step_seconds = costs[name]
        epochs = args.epochs
        if args.minutes:
            batch = run_config([*data, *config_flags]).train.batch_size
            epochs = max(1, round(args.minutes * 60 / (step_seconds * num_batches(n_train, batch))))
        flags = merged([*data, "--epochs", str(epochs), *config_flags])
        run_dir = out_dir / name
        t0 = time.time()
        train.main(train.get_parser().parse_args([*flags, "--stage", "vqvae", "--out_dir", str(run_dir)]))
        seconds = time.time() - t0
        predict.main(predict.get_parser().parse_args(["--checkpoint", str(run_dir / "best.pt"), "--num_samples", "0"]))
        m = json.loads((run_dir / "predict" / "metrics.json").read_text())
        last = read_metrics(run_dir)[-1]
        real = realism(run_dir)
        (kid_recon, kid_sd), (kid_floor, floor_sd) = [(real[k]["kid"], real[k]["kid_sd"]) for k in ("recon_l1", "floor")]
        rows.append([label, m["ssim_mean"], m["ssim_std"], m["psnr_mean"], m["codebook_usage"],
                     m["perplexity"], seconds, m["epoch"], float(last["codebook_usage"]), params, gflop,
                     step_seconds, epochs, kid_recon, kid_sd, kid_floor, floor_sd,
                     "python train.py " + " ".join(flags)])
        write_csv(out_dir / "study.csv", COLUMNS, rows)  # after each row, so a long study keeps its rows
    plot_study(out_dir, names, args.data)
    # The budget is steps x seconds per step measured alone: the runs' own wall time (train_seconds in
    # study.csv) also counts the per-epoch validation and checkpoints, and whatever else the machine ran.
    print("\n| configuration | params | GFLOP / image | s / step | steps (budget) | test SSIM | PSNR (dB) | codes used: "
          "test / validation | perplexity | KID recon (real-vs-real) | best epoch |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in zip(names, rows):
        steps = r[12] * num_batches(n_train, run_config([*data, *CONFIGS[name][1]]).train.batch_size)
        print(f"| {r[0]} | {r[9] / 1e6:.2f}M | {r[10]:.2f} | {r[11]:.2f} | {steps} ({steps * r[11] / 60:.1f} min) | "
              f"{r[1]:.4f} +- {r[2]:.4f} | {r[3]:.2f} | {r[4]:.1%} / {r[8]:.1%} | {r[5]:.1f} | "
              f"{r[13]:.4f} ({r[15]:.4f}) | {r[7]} / {r[12]} |")
    for r in rows:
        print(f"- {r[0]}: `{r[-1]}`")


def get_parser():
    p = argparse.ArgumentParser(description="Run the codebook study on one data set.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", choices=["phantom", "standin", "crops", "prostate3t"], default="phantom",
                   help="the built-in phantom, the real stand-in cut from --volume, the real crops of --crops, or "
                        "the grainy tiles of --prostate3t")
    p.add_argument("--volume", default="../shared/data/hipmri_3d/Case_018_Week7_LFOV.nii.gz",
                   help="HipMRI 3D volume to cut the stand-in from (with --data standin)")
    p.add_argument("--crops", default="../shared/data/prostate_crops",
                   help="folder of the 27 prostate crops (with --data crops)")
    p.add_argument("--prostate3t", default="../shared/data/prostate3t",
                   help="folder of the 5 native-resolution prostate T2 volumes (with --data prostate3t)")
    p.add_argument("--epochs", type=int, default=20, help="training budget of every configuration")
    p.add_argument("--minutes", type=float, default=None,
                   help="instead of --epochs: each configuration's budget in minutes of this machine's time")
    p.add_argument("--configs", nargs="*", default=None, choices=list(CONFIGS), metavar="NAME",
                   help=f"configurations to run; None: all of {list(CONFIGS)}")
    p.add_argument("--costs", default=None, help="JSON file of measured costs to reuse and extend (see cached_cost)")
    p.add_argument("--costs_only", action="store_true", help="measure the configurations' costs, then stop")
    p.add_argument("--figure", action="store_true",
                   help="only draw test slices beside the reconstructions of the --configs already trained in OUT_DIR")
    p.add_argument("--out_dir", default=None, help="None: runs/study_DATA")
    p.add_argument("--realism", nargs="+", default=None, metavar="RUN",
                   help="only print, for trained run folders, the realism of their test reconstructions through "
                        "the L1 decoder and the texture decoder (decoder_gan.pt) beside the real-vs-real floor")
    p.add_argument("--report", nargs="+", default=None, metavar="RUN",
                   help="only print, for run folders already trained and scored by predict.py, the validation "
                        "SSIM's swing between epochs and the test figures (for a checkpoint: its epoch's test figures)")
    return p


if __name__ == "__main__":
    run_main(main, get_parser().parse_args())
