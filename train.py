"""Train the VQ-VAE on HipMRI 2D slices (or the built-in phantom), then the prior over its codes.

Usage: python train.py [--data_dir /path/to/keras_slices_data] [--epochs 20] [--ema] ...
       python train.py --stage prior --resume runs/NNN   (a prior for an existing VQ-VAE run)
       python train.py --stage gan --resume runs/NNN --gan_epochs 10   (an adversarial decoder for it)

Stage 1 (VQ-VAE) writes to a new run folder (runs/NNN unless --out_dir): config.json, log.txt,
metrics.csv, best.pt (the last epoch; with --best_by mse the lowest validation reconstruction MSE), last.pt,
epoch_NNN_comparison.png, loss_per_batch.png, ssim_per_epoch.png and codebook_usage_per_epoch.png.
Stage 2 (prior) encodes the training and validation splits once with the frozen best.pt and trains the
autoregressive prior on those code maps, in the same folder: prior_config.json, prior_metrics.csv,
prior_best.pt (lowest validation NLL), prior_last.pt, prior_epoch_NNN_samples.png and
prior_nll_per_epoch.png. A prior that no longer fits the run's best.pt (the VQ-VAE was extended since)
is moved to prior_old_N/ and a new one is trained.
With --gan_epochs N, between the two, a copy of best.pt's decoder is trained adversarially (VQGAN-style:
realistic rather than SSIM-optimal slices) on the codes of the frozen best.pt, which stays as it is, so
the prior's codes do not change: gan_config.json, gan_metrics.csv, gan_epoch_NNN_comparison.png,
decoder_gan_last.pt and decoder_gan.pt (its last epoch).

Every setting is a field of one of the configs below (TrainConfig, PriorTrainConfig and GanTrainConfig
here; VQVAEConfig and PriorConfig in modules.py) with its default, help text and allowed range; the flags
are made from them, and a run's checkpoint holds them (config, model_args), from which a resumed run is
rebuilt.
"""
import argparse
import copy
import math
import os
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from dataset import (augment, epoch_batches, get_batch, load_split, num_batches, place, recorded_data_dir,
                     resolve_data_dir, volume_layout)
from figures import save_comparison, save_curves, save_image_grid
from metrics import (BITS_PER_NAT, check_image_size, codebook_stats, encode_split, evaluate, evaluate_decoder,
                     prior_nll_bits, ssim)
from modules import (VQVAE, PatchDiscriminator, PriorConfig, VQVAEConfig, build_prior, check_settings, conditions,
                     patch_shape, setting)
from utils import (ProjectError, Writer, add_settings, autocast_for, configure_backends, fingerprint, flags_of,
                   load_checkpoint, load_vqvae, make_checkpoint, new_run_dir, pick_device, run_main,
                   save_checkpoint, seed_everything, set_rng_state, setting_names, settings_from, to_unit,
                   uses_bf16, write_csv, write_json)

METRICS = ["epoch", "train_loss", "train_recon_loss", "train_codebook_loss", "train_commitment_loss",
           "val_loss", "val_recon_loss", "train_ssim", "val_ssim", "val_psnr", "codebook_usage",
           "perplexity", "seconds"]
PRIOR_METRICS = ["epoch", "train_nll_bits", "val_nll_bits", "val_conditioned_nll_bits", "seconds"]
STAGE_NAMES = {"prior": "prior", "decoder_gan": "adversarial decoder"}  # by checkpoint kind
GIVEN = {"position": "the position", "position+previous": "the position and previous slice"}
NUM_COMPARISON = 6  # validation slices shown in every epoch's comparison figure (the same each epoch)


# ----------------------------------------------------------------------------- settings

@dataclass
class TrainConfig:
    """How the VQ-VAE is trained, and where and on what (each field is a flag of the same name)."""
    data_dir: str = setting(None, "folder with keras_slices_train/validate/test; None: the built-in phantom")
    out_dir: str = setting(None, "run folder; None: the next runs/NNN")
    epochs: int = setting(20, "passes over the training split (with --resume: the run's own unless given; "
                          "more extends it)", rule=">= 1")
    batch_size: int = setting(8, "slices per Adam step (the global batch under torchrun); the seed's 32 takes four "
                              "times fewer steps per epoch (README: the batch study)", rule=">= 1")
    lr: float = setting(1e-3, "Adam learning rate", rule="> 0")
    recon_loss: str = setting("l1", "the reconstruction term: mse (-log p(x|z_q) of a Gaussian decoder, as the "
                              "paper and the seed), l1 (of a Laplacian one) or l1+mse (their sum)",
                              choices=("mse", "l1", "l1+mse"))
    ssim_weight: float = setting(0.0, "adds ssim_weight * (1 - SSIM) to the reconstruction loss; 0: none",
                                 rule=">= 0")
    # Augmentation of the training batches (dataset.augment), on the device, drawn from (seed, step);
    # every one 0 (off) by default, so the seed configuration trains exactly as before.
    aug_flip: float = setting(0.0, "probability of a left-right flip (of the first image axis, H) of each "
                              "training slice", rule="in [0, 1]")
    aug_rotate: float = setting(0.0, "largest rotation of a training slice, in degrees (each drawn uniform in "
                                "[-aug_rotate, aug_rotate])", rule="in [0, 45]")
    aug_scale: float = setting(0.0, "largest relative zoom of a training slice (0.1: uniform in [0.9, 1.1])",
                               rule="in [0, 0.5]")
    aug_shift: float = setting(0.0, "largest shift of a training slice on each axis, as a fraction of its size",
                               rule="in [0, 0.5]")
    aug_gamma: float = setting(0.0, "largest |log gamma| of a training slice's intensity gamma (the [0, 1] image "
                               "to the power exp(uniform(-g, g)))", rule="in [0, 1]")
    lr_schedule: str = setting("cosine", "constant as in the seed, or linear warm-up then cosine decay to 0",
                               choices=("constant", "cosine"))
    warmup_steps: int = setting(20, "warm-up steps (with --lr_schedule cosine)", rule=">= 0")
    best_by: str = setting("last", "which epoch best.pt (and so the prior's codes and predict.py) keeps: the lowest "
                           "validation MSE, or the last (for --lr_schedule cosine, whose last epochs sharpen the "
                           "decoder while the MSE rises: README)", choices=("mse", "last"))
    seed: int = setting(0, "seeds the model init and the data order", rule=">= 0")
    device: str = setting(None, "cuda, mps or cpu; None picks cuda, then mps, then cpu")
    precision: str = setting("auto", "of the VQ-VAE's forward pass; auto: bf16 autocast on CUDA, fp32 elsewhere "
                             "(the quantizer's distances and EMA updates and SSIM are always fp32)",
                             choices=("auto", "fp32", "bf16"))
    compile: bool = setting(False, "torch.compile the VQ-VAE's training step")
    resume: str = setting(None, "continue the run in RUN_DIR (or from a checkpoint file) where it stopped",
                          metavar="RUN_DIR")
    stage: str = setting("all", "all: the VQ-VAE, the adversarial decoder (with --gan_epochs) and the prior; "
                         "gan or prior: only that, for the run named by --resume",
                         choices=("all", "vqvae", "gan", "prior"))

    def __post_init__(self):
        check_settings(self)


@dataclass
class PriorTrainConfig:
    """How the prior is trained (each field is a flag prior_<field>)."""
    epochs: int = setting(18, "passes over the training codes", rule=">= 1")
    batch_size: int = setting(32, "code maps per AdamW step", rule=">= 1")
    lr: float = setting(2e-3, "AdamW learning rate of the prior", rule="> 0")
    lr_schedule: str = setting("constant", "the prior's own: constant, or linear warm-up then cosine decay to 0 "
                               "at the last step of --prior_epochs", choices=("constant", "cosine"))
    warmup_steps: int = setting(50, "the prior's warm-up steps (with --prior_lr_schedule cosine)", rule=">= 0")
    weight_decay: float = setting(0.01, "AdamW weight decay of the prior", rule=">= 0")
    num_samples: int = setting(16, "samples in each epoch's grid", rule=">= 1")
    position_drop: float = setting(0.1, "probability of training a code map without its slice position, so the "
                                   "prior also samples without one", rule="in [0, 1]")
    previous_drop: float = setting(0.5, "probability of training a code map without the previous slice's, so the "
                                   "prior also samples single slices and first slices", rule="in [0, 1]")
    aug_flip: float = setting(0.5, "probability of training on the codes of a left-right flipped slice (and its "
                              "previous slice, flipped with it) instead; 0.5 lowered the validation NLL on unseen "
                              "patients (README)", rule="in [0, 1]")
    aug_copies: int = setting(0, "augmented copies of the training slices, encoded once, that the prior trains on "
                              "beside the slices themselves (each map drawn from one of the copies + 1 alike): "
                              "in a copy each slice and its previous slice share one random rotation (up to 5 degrees), "
                              "zoom (up to 0.05), shift (up to 0.03 of the size) and gamma (0.1); 0: none", rule=">= 0")

    def __post_init__(self):
        check_settings(self)


@dataclass
class GanTrainConfig:
    """The optional adversarial decoder (VQGAN, Esser et al. 2021): a copy of best.pt's decoder trained
    on the frozen codes with a PatchGAN discriminator (each field is a flag gan_<field>)."""
    epochs: int = setting(0, "passes over the training codes; 0: no adversarial decoder", rule=">= 0")
    batch_size: int = setting(32, "code maps (and real slices) per step", rule=">= 1")
    lr: float = setting(1e-4, "Adam learning rate of the decoder and the discriminator (betas 0.5, 0.9 as "
                        "taming-transformers)", rule="> 0")
    disc_weight: float = setting(0.8, "weight of the adaptive-weighted adversarial term (taming's VQGAN "
                                 "configs: 0.8)", rule=">= 0")
    disc_start: int = setting(200, "steps in which only the discriminator learns to tell reconstructions from "
                              "slices, while the decoder trains on the reconstruction loss alone", rule=">= 0")
    disc_channels: int = setting(64, "channels of the discriminator's first conv (doubled per layer, at most 8x)",
                                 rule=">= 1")
    disc_layers: int = setting(3, "stride-2 convs of the discriminator (3: 70x70-pixel patches)", rule="in [1, 12]")

    def __post_init__(self):
        check_settings(self)


# (attribute, config, flag prefix): every setting of a run, in the order --help lists them
SECTIONS = (("train", TrainConfig, ""), ("model", VQVAEConfig, ""), ("prior_train", PriorTrainConfig, "prior_"),
            ("prior", PriorConfig, "prior_"), ("gan", GanTrainConfig, "gan_"))
# What a resumed run may change: how it goes on, not what it is (--epochs extends it). The prior's
# and the adversarial decoder's flags may change too until that stage has started; after that its
# own checkpoint rules them.
RESUMABLE = ("resume", "epochs", "device", "precision", "compile", "stage")


@dataclass
class RunConfig:
    """A run's settings: how it trains, the VQ-VAE, and how the prior trains and what it is."""
    train: TrainConfig
    model: VQVAEConfig
    prior_train: PriorTrainConfig
    prior: PriorConfig  # its code-map size and codes are the VQ-VAE's (PriorConfig.for_vqvae)
    gan: GanTrainConfig

    @classmethod
    def from_flags(cls, flags):
        """Flat flags {name: value} (absent ones at their defaults) -> RunConfig; a value out of its
        range is a ProjectError naming the flag."""
        parts = {}
        for name, config, prefix in SECTIONS:
            make = partial(PriorConfig.for_vqvae, parts["model"]) if config is PriorConfig else None
            parts[name] = settings_from(config, flags, prefix, make)
        return cls(**parts)

    def flags(self):
        """The run's settings as flat flags {name: value}, as typed and as config.json holds them."""
        return {k: v for name, _, prefix in SECTIONS for k, v in flags_of(getattr(self, name), prefix).items()}


def prior_flag_names():
    """The flags of the prior's two sections: free on resume until the prior has started."""
    return section_flag_names("prior_train", "prior")


def gan_flag_names():
    """The flags of the adversarial decoder: free on resume until it has started."""
    return section_flag_names("gan")


def section_flag_names(*names):
    """The flags of the SECTIONS called `names`."""
    return [n for name, config, prefix in SECTIONS if name in names for n in setting_names(config, prefix)]


def get_parser():
    p = argparse.ArgumentParser(description="Train the VQ-VAE on HipMRI 2D slices, then the prior over its codes.")
    for _, config, prefix in SECTIONS:
        add_settings(p, config, prefix)
    return p


def refuse_changes(old, typed, free, what, fix):
    """Raise ProjectError naming every flag typed now, other than those in `free`, whose value differs
    from the run's (`old`); data and run folders compare as resolved paths."""
    def same(k, a, b):
        if k in ("data_dir", "out_dir"):
            return (a and str(Path(a).resolve())) == (b and str(Path(b).resolve()))
        return a == b
    differ = {k: (old.get(k), v) for k, v in typed.items() if k not in free and not same(k, old.get(k), v)}
    if differ:
        was = ", ".join(f"{k}={a}" for k, (a, _) in differ.items())
        now = ", ".join(f"{k}={b}" for k, (_, b) in differ.items())
        raise ProjectError(f"{what} {was} but this command asks {now}; {fix}")


# How a run trained before these flags were recorded in its config: the seed's loss, constant rate and
# best.pt by validation MSE. The defaults changed later (README: the batch study); a resumed old run
# must go on as it began.
TRAIN_BEFORE = {"recon_loss": "mse", "lr_schedule": "constant", "warmup_steps": 100, "best_by": "mse"}


def resume_run(flags):
    """--resume RUN_DIR or CHECKPOINT -> (checkpoint, the run's RunConfig rebuilt from it). Of the flags
    typed now, only RESUMABLE, the prior's and the adversarial decoder's may differ from the run's; any
    other is refused by name."""
    path = Path(flags["resume"])
    path = path / "last.pt" if path.is_dir() else path
    ckpt = load_checkpoint(path)
    last = path.with_name("last.pt")
    if path.name != "last.pt" and last.is_file() and (last_epoch(last) or 0) > ckpt["epoch"]:
        raise ProjectError(f"{path} is from epoch {ckpt['epoch']} but the run went on (see {last}); "
                           f"resume the run folder {path.parent}, which continues from its last epoch")
    # The run's flags: the model's from model_args, the rest from config; flags added since the run
    # was made take the values runs had before them (the model's those of the seed codebook, see
    # VQVAEConfig.from_dict; the training's TRAIN_BEFORE), else their defaults.
    defaults = RunConfig.from_flags({}).flags()
    old = {**defaults, **TRAIN_BEFORE, **{k: v for k, v in ckpt["config"].items() if k in defaults},
           **flags_of(VQVAEConfig.from_dict(ckpt["model_args"])), "out_dir": str(path.parent)}
    refuse_changes(old, flags, RESUMABLE + tuple(prior_flag_names() + gan_flag_names()),
                   f"cannot resume {path}: the run was made with",
                   "drop those flags to resume it, or start a new run without --resume")
    epochs = flags.get("epochs", old["epochs"])
    check_extension(old["lr_schedule"], old["epochs"], epochs, str(path),
                    "resume without --epochs, or start a new run")
    return ckpt, RunConfig.from_flags({**old, **flags})


def last_epoch(path):
    """The epoch of the checkpoint at `path`, or None when it is damaged (the README's advice for a
    damaged last.pt is to resume from best.pt, which then goes on from its own epoch)."""
    try:
        return load_checkpoint(path)["epoch"]
    except ProjectError:
        return None


def resume_prior(run, ckpt, path, typed):
    """The run with the settings of the prior under way in `path` (--prior_epochs extends it); a prior
    flag typed now that differs from the prior's is refused by name."""
    old = {**{k: v for k, v in ckpt["config"].items() if k in prior_flag_names()},
           **flags_of(PriorConfig.from_dict(ckpt["model_args"]), "prior_")}
    refuse_changes(old, {k: v for k, v in typed.items() if k in old}, ("prior_epochs",),
                   f"cannot resume the prior in {path}: it was made with",
                   f"drop those flags to resume it, or delete {path.parent}/prior_*.pt to train a new prior")
    epochs = typed.get("prior_epochs", old["prior_epochs"])
    check_extension(old.get("prior_lr_schedule"), old["prior_epochs"], epochs, f"the prior in {path}",
                    f"resume without --prior_epochs, or delete {path.parent}/prior_*.pt to train a new prior")
    return RunConfig.from_flags({**run.flags(), **old, "prior_epochs": epochs})


def check_run(run, world_size):
    """What no single setting can check: the settings together, and with the processes."""
    check_image_size(run.model.image_size)
    if run.train.batch_size % world_size:
        raise ProjectError(f"--batch_size {run.train.batch_size} (the global batch) does not split over "
                           f"{world_size} processes; use a multiple of {world_size}")
    m = run.model
    if run.train.compile and m.lookup_dim and not m.ema and m.restart_after:
        # The normalised lookup's backward needs the codebook, which restarts change in place inside the
        # compiled step; eagerly a copy is read, but a compiled graph may recompute from the original.
        raise ProjectError("--compile with --lookup_dim, a gradient codebook and restarts is not supported: "
                           "add --ema, or --restart_after 0, or drop --compile")


# ----------------------------------------------------------------------------- stages

def main(args):
    """Stage 1, the VQ-VAE, then with --gan_epochs the adversarial decoder, then stage 2, the prior over
    the codes (--stage picks one). args holds only the flags typed; every other setting takes its
    default, or on resume the run's own."""
    flags = vars(args)
    ckpt, run = resume_run(flags) if flags.get("resume") else (None, RunConfig.from_flags(flags))
    stage = run.train.stage
    if stage == "all" and run.gan.epochs and not ckpt:
        check_gan(run)  # before stage 1, not after it has run (on resume: against the decoder under way)
    if stage in ("prior", "gan"):
        the, a = {"prior": ("the prior", "a prior"),
                  "gan": ("the adversarial decoder", "an adversarial decoder")}[stage]
        if int(os.environ.get("WORLD_SIZE", 1)) > 1:
            raise ProjectError(f"{the} trains in one process: run --stage {stage} with python, not torchrun")
        if not ckpt:
            raise ProjectError(f"--stage {stage} trains {a} for an existing VQ-VAE run: name the run with "
                               f"--resume runs/NNN")
        (train_prior if stage == "prior" else train_gan)(run, Path(run.train.out_dir), flags)
        return
    rank, world_size = init_distributed(run.train.device)
    try:
        run_dir = train_vqvae(run, ckpt, rank, world_size)
    finally:
        if world_size > 1:
            dist.destroy_process_group()
    if stage == "all" and rank == 0:  # the decoder and the prior are small: rank 0 trains them alone
        if run.gan.epochs:
            train_gan(run, run_dir, flags)
        train_prior(run, run_dir, flags)


def train_vqvae(run, ckpt=None, rank=0, world_size=1):
    """Stage 1: train (or, with the run's checkpoint `ckpt`, resume) the VQ-VAE -> the run folder.
    With world_size > 1 (torchrun) every process trains its share of each global batch and only rank 0
    writes."""
    # ---- setup
    args, cfg = run.train, run.model
    check_run(run, world_size)  # before any data is read or any folder made
    seed_everything(args.seed)  # the same on every rank: the model init and the quantizer's draws agree
    device = pick_device(args.device, int(os.environ["LOCAL_RANK"]) if world_size > 1 else None)
    configure_backends(device, int(os.environ.get("LOCAL_WORLD_SIZE", 1)), args.precision)
    main_rank = rank == 0

    # ---- data (read before the run folder is made, so bad data leaves no empty run behind)
    data_dir = resolve_data_dir(args.data_dir)
    train_set, val_set = (load_split(data_dir, split, cfg.image_size) for split in ("train", "validate"))
    train_images, val_images = place(train_set, device), place(val_set, device)  # (N, 1, H, W) float16 in [0, 1]
    n_train = len(train_images)
    # Under --compile every step has the same shape: a ragged last batch would compile a second graph.
    steps_per_epoch = num_batches(n_train, args.batch_size, world_size, drop_last=args.compile)
    total_steps = args.epochs * steps_per_epoch
    check_warmup(args, total_steps, "--warmup_steps", "the run")
    fixed = val_set.images[:NUM_COMPARISON]  # (6, 1, H, W) in [0, 1]: the same slices every epoch
    out_dir, log = open_run(args.out_dir, ckpt, main_rank, world_size)
    dtype = "bf16" if uses_bf16(device, args.precision) else "fp32"  # what --precision means on this device
    config = {**run.flags(), "data_dir": None if args.data_dir is None else str(data_dir.resolve()),
              "out_dir": str(out_dir), "device": str(device), "resume": None, "world_size": world_size,
              "dtype": dtype}
    if main_rank:
        write_json(out_dir / "config.json", config)
    H, W = cfg.image_size
    log(f"run {out_dir}: {n_train} train / {len(val_images)} validation slices from {data_dir}, {H}x{W}, "
        f"device {device}" + (f" x {world_size} processes" if world_size > 1 else "")
        + f", {dtype}" + (", compiled" if args.compile else ""))

    # ---- model
    model, net = build_model(cfg, device, args.compile, world_size)
    h, w = cfg.latent_shape
    log(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, code map {h}x{w} of "
        f"{cfg.num_embeddings} codes")

    # ---- optimizer
    optimizer = build_optimizer(model, args.lr, device)

    # ---- resume: everything that decides the rest of the run, so it ends as an uninterrupted one
    start_epoch, best_val, rows, batch_losses = 1, float("inf"), [], []
    if ckpt:
        model.load_state_dict(ckpt["model"])  # includes the EMA codebook buffers
        for group in ckpt["optimizer"]["param_groups"]:  # fused on this device, whatever the run began on
            group["fused"] = optimizer.defaults["fused"]
        optimizer.load_state_dict(ckpt["optimizer"])
        match_layouts(optimizer)
        set_rng_state(ckpt["rng"], device)  # the data order is a function of (seed, epoch): nothing to restore
        start_epoch, best_val = ckpt["epoch"] + 1, ckpt["best_val"]
        rows, batch_losses = ckpt["history"]["rows"], ckpt["history"]["batch_losses"]
        log(f"resumed {args.resume} after epoch {ckpt['epoch']} (best validation MSE {best_val:.4f})")

    # ---- loop
    writer = Writer(background=device.type == "cuda")  # inline on the CPU: nothing to overlap with
    step_count = (start_epoch - 1) * steps_per_epoch  # optimizer steps taken so far (for the schedule)
    for epoch in range(start_epoch, args.epochs + 1):
        t0 = time.time()
        model.train()
        batches = epoch_batches(n_train, args.batch_size, args.seed, epoch, train_images.device, rank, world_size,
                                drop_last=args.compile)
        if args.compile and model.vq._needs_init:  # k-means once, eagerly: not a graph compiled for one step
            with torch.no_grad(), autocast_for(device, args.precision):
                model.vq.init_codebook(model.pre_vq_conv(model.encoder(get_batch(train_images, batches[0], device))))
        sums, step_losses = train_epoch(net, optimizer, train_images, batches, device, args, step_count, total_steps,
                                        desc=f"epoch {epoch}/{args.epochs}", show=main_rank, rank=rank,
                                        world_size=world_size)
        step_count += len(batches)
        if world_size > 1:
            dist.all_reduce(sums)  # over the global batches: the numbers a one-process run logs
            dist.all_reduce(step_losses)
            step_losses /= world_size
        epoch_losses = step_losses.tolist()  # the epoch's one host sync
        bad = [i for i, v in enumerate(epoch_losses, 1) if not math.isfinite(v)]
        if bad:
            raise ProjectError(f"training loss is {epoch_losses[bad[0] - 1]} at epoch {epoch}, step {bad[0]}; "
                               f"stopped before it reached a checkpoint (last good: "
                               f"{out_dir / 'last.pt'}); try a lower --lr")
        batch_losses += epoch_losses
        tr = (sums / (sum(len(b) for b in batches) * world_size)).tolist()  # per slice of the epoch

        if world_size > 1:  # collective: before anything that could stop one rank alone
            check_same_codebook(model, epoch)
        val = evaluate(model, val_images, device, args.batch_size, precision=args.precision)
        if not math.isfinite(val["loss"]):
            raise ProjectError(f"validation loss is {val['loss']} after epoch {epoch}; stopped without "
                               f"saving it (last good: {out_dir / 'last.pt'}); try a lower --lr")
        usage, perplexity = codebook_stats(val["counts"])
        rows.append([epoch, *tr[:4], val["loss"], val["recon_loss"], tr[4], val["ssim"].mean().item(),
                     val["psnr"].mean().item(), usage, perplexity, time.time() - t0])
        # ---- save (rank 0, by the writer: beside the next epoch's training on CUDA)
        # Best by validation reconstruction MSE: it measures the images the decoder makes from the
        # quantized codes, while the VQ terms are latent distances whose scale drifts in training.
        # --best_by last: every epoch is the best so far (best_val is then the last epoch's MSE).
        improved = args.best_by == "last" or val["recon_loss"] < best_val
        best_val = val["recon_loss"] if args.best_by == "last" else min(best_val, val["recon_loss"])
        if main_rank:
            res = evaluate(model, fixed, device, NUM_COMPARISON, keep=True, precision=args.precision)
            ckpt = make_checkpoint("vqvae", model, config, optimizer, epoch, best_val,
                                   {"rows": rows, "batch_losses": batch_losses}, device)
            writer.submit(save_epoch, out_dir, epoch, fixed, res, cfg.num_embeddings, list(rows), ckpt, improved,
                          epoch_line(dict(zip(METRICS, rows[-1])), optimizer.param_groups[0]["lr"], improved), log)
        stop_together(writer.failure() if main_rank else None, world_size, device)

    stop_together(writer.close() if main_rank else None, world_size, device)
    if main_rank:
        save_vqvae_curves(out_dir, rows, batch_losses, args.ssim_weight, cfg.num_embeddings, args.recon_loss)
        if world_size > 1:
            log(f"{world_size} processes: the codebook was identical on every rank after every epoch")
        log(f"done: {'last' if args.best_by == 'last' else 'best'} validation reconstruction MSE {best_val:.4f}; "
            f"checkpoint {out_dir / 'best.pt'}")
    return out_dir


def save_epoch(out_dir, epoch, fixed, res, num_embeddings, rows, ckpt, improved, line, log):
    """Rank 0's files of one epoch: the comparison figure, metrics.csv, best.pt (when improved) and
    last.pt, then the epoch's log line."""
    save_comparison(out_dir / f"epoch_{epoch:03d}_comparison.png", fixed.float(), res["indices"], res["recons"],
                    f"epoch {epoch}: validation slices, SSIM {res['ssim'].mean():.4f}",
                    num_embeddings, [f"SSIM {s:.3f}" for s in res["ssim"]])
    write_csv(out_dir / "metrics.csv", METRICS, rows)
    if improved:
        save_checkpoint(out_dir / "best.pt", ckpt)
    save_checkpoint(out_dir / "last.pt", ckpt)  # last: a kill before it leaves the epoch to redo
    log(line)


def stop_together(failure, world_size, device):
    """Raise `failure` (rank 0's ProjectError, or None) on every rank. Under torchrun an error on rank
    0 alone (a full disk) would otherwise leave the other ranks in the next collective until torchrun
    kills them, with the real error buried under NCCL's messages."""
    if world_size > 1:
        flag = torch.tensor(float(failure is not None), device=device)
        dist.broadcast(flag, src=0)
        if flag.item() and failure is None:
            raise ProjectError("rank 0 stopped with an error (its line is above); this process stops with it")
    if failure is not None:
        raise failure


def open_run(out_dir, ckpt, main_rank, world_size):
    """-> (the run folder, log): a new folder (or the resumed run's), made by rank 0 and told to the
    other ranks; log(msg) writes on rank 0 only."""
    if main_rank:
        out_dir = Path(out_dir) if ckpt else new_run_dir(out_dir)
        log = open_log(out_dir / "log.txt")
    else:
        log = lambda msg: None  # noqa: E731
    if world_size > 1:  # every rank learns rank 0's run folder
        box = [str(out_dir)]
        dist.broadcast_object_list(box, src=0)
        out_dir = box[0]
    return Path(out_dir), log


def epoch_line(row, lr, improved):
    """One epoch's log line from its metrics row {METRICS name: value}."""
    return (f"epoch {row['epoch']:3d} | loss {row['train_loss']:.4f} (recon {row['train_recon_loss']:.4f} "
            f"codebook {row['train_codebook_loss']:.4f} commit {row['train_commitment_loss']:.4f}) | "
            f"val loss {row['val_loss']:.4f} recon {row['val_recon_loss']:.4f} SSIM {row['val_ssim']:.4f} "
            f"PSNR {row['val_psnr']:.2f} | codes used {row['codebook_usage']:.1%} perplexity "
            f"{row['perplexity']:.1f} | lr {lr:.2g} | {row['seconds']:.0f}s" + (" | best" if improved else ""))


def save_vqvae_curves(out_dir, rows, batch_losses, ssim_weight, num_embeddings, recon_loss):
    """The run's curves: training loss per batch, SSIM and codebook usage per epoch."""
    column = {name: [r[METRICS.index(name)] for r in rows] for name in METRICS}
    save_curves(out_dir / "loss_per_batch.png", {"train loss": batch_losses}, "batch", "loss",
                f"training loss ({recon_loss.upper()} + VQ terms" + (" + SSIM term" if ssim_weight else "")
                + ") per batch")
    save_curves(out_dir / "ssim_per_epoch.png",
                {"train SSIM": column["train_ssim"], "validation SSIM": column["val_ssim"]},
                "epoch", "SSIM (Gaussian, data range 1)", "SSIM per epoch")
    save_curves(out_dir / "codebook_usage_per_epoch.png",
                {"validation codes used (%)": [100 * u for u in column["codebook_usage"]]}, "epoch",
                "% of the codebook", f"codebook usage over the validation split ({num_embeddings} codes)")


def start_stage(run, run_dir, last_path, kind, resume, patterns, typed, check=None):
    """The start shared by the stages on run_dir's frozen best.pt (the prior, the adversarial decoder):
    their checkpoint under way in last_path is resumed (its flags ruling, through `resume`), or, when it
    learned the codes of an earlier best.pt, its files (`patterns`) are moved aside and a new one starts;
    then `check` (the run's settings together), seeding, the device and the log -> (run, (vq_ckpt,
    vq_path, vq_id: the fingerprint the stage's checkpoints carry, ckpt or None, device, log, the frozen
    VQ-VAE in eval mode))."""
    vq_path = run_dir / "best.pt"
    vq_ckpt = load_checkpoint(vq_path)
    vq_id = fingerprint(vq_ckpt["model"])  # the stage is valid for exactly these weights
    ckpt = load_checkpoint(last_path, kind=kind) if last_path.is_file() else None
    retired = None
    if ckpt and ckpt.get("vqvae") != vq_id:  # the VQ-VAE was extended since: its codes are not the stage's
        retired, ckpt = retire(run_dir, kind.removeprefix("decoder_"), patterns), None
    elif ckpt:
        run = resume(run, ckpt, last_path, typed or {})
    if check:
        check(run)
    seed_everything(run.train.seed)
    device = pick_device(run.train.device)
    configure_backends(device, precision=run.train.precision)
    log = open_log(run_dir / "log.txt")
    if retired:
        log(f"the {STAGE_NAMES[kind]} in {run_dir} learned the codes of an earlier {vq_path.name}: moved its "
            f"files to {retired}, training a new one")
    return run, (vq_ckpt, vq_path, vq_id, ckpt, device, log, load_vqvae(vq_ckpt, vq_path, device))


def train_prior(run, run_dir, typed=None):
    """Stage 2: train (or resume) the prior on the code maps of run_dir's frozen best VQ-VAE. `typed`:
    the flags typed now, checked against a prior already under way."""
    # ---- setup
    last_path = run_dir / "prior_last.pt"
    run, stage = start_stage(run, run_dir, last_path, "prior", resume_prior, ("prior_*",), typed)
    vq_ckpt, vq_path, vq_id, ckpt, device, log, vqvae = stage
    args, cfg, precision = run.prior_train, run.prior, run.train.precision  # the VQ-VAE's precision, for both

    # ---- data: every slice encoded once (and flipped, for --prior_aug_flip), the prior never sees an
    # image; each map's position and previous slice from the file names
    data_dir = recorded_data_dir(vq_ckpt["config"], vq_path)
    sets = {split: load_split(data_dir, split, vqvae.cfg.image_size) for split in ("train", "validate")}
    images = {split: place(s, device) for split, s in sets.items()}
    codes = {split: encode_split(vqvae, x, device, args.batch_size, precision)
             for split, x in images.items()}  # (N, h, w) long each, on the device
    if args.aug_flip:
        codes["flipped"] = encode_split(vqvae, images["train"].flip(2), device, args.batch_size, precision)
    layout = {split: [t.to(device) for t in volume_layout(s.files)] for split, s in sets.items()}
    if args.aug_copies:
        codes["copies"], codes["copies_previous"] = augmented_codes(
            vqvae, images["train"], layout["train"][1], args, run.train.seed, device, precision)
    del images
    n_train = len(codes["train"])
    steps_per_epoch = num_batches(n_train, args.batch_size)
    total_steps = args.epochs * steps_per_epoch
    check_warmup(args, total_steps, "--prior_warmup_steps", "the prior's run")
    if cfg.condition != "none":  # positions seen in training; others (and names without one) go unconditioned
        cfg = replace(cfg, num_positions=int(layout["train"][0].max()) + 1)
    val_cond = conditions(codes["validate"], *layout["validate"], cfg)
    config = {k: v for k, v in run.flags().items() if k in prior_flag_names()}
    config.update(seed=run.train.seed, device=str(device), vqvae_checkpoint=str(vq_path))
    write_json(run_dir / "prior_config.json", config)

    # ---- model
    prior = build_prior(cfg).to(device)
    log(f"prior: {sum(p.numel() for p in prior.parameters()) / 1e6:.2f}M parameters, {cfg.arch} over "
        f"{cfg.latent_h}x{cfg.latent_w} = {cfg.latent_h * cfg.latent_w} codes; {n_train} train / "
        f"{len(codes['validate'])} validation code maps; conditioned on {cfg.condition}"
        + (f" ({cfg.num_positions} slice positions)" if cfg.condition != "none" else ""))

    # ---- optimizer
    optimizer = torch.optim.AdamW(prior.parameters(), lr=args.lr, weight_decay=args.weight_decay)

    # ---- resume
    start_epoch, best_val, rows = 1, float("inf"), []
    if ckpt:
        prior.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        set_rng_state(ckpt["rng"], device)  # the batch order is a function of (seed, epoch)
        start_epoch, best_val, rows = ckpt["epoch"] + 1, ckpt["best_val"], ckpt["history"]["rows"]
        rows = [r if len(r) == len(PRIOR_METRICS) else r[:3] + r[2:] for r in rows]  # before the conditioned NLL
        log(f"resumed the prior in {run_dir} after epoch {ckpt['epoch']} "
            f"(best validation NLL {best_val:.4f} bits per code)")

    # ---- loop
    for epoch in range(start_epoch, args.epochs + 1):
        t0 = time.time()
        prior.train()
        total = torch.zeros((), device=device)  # summed on the device: no host sync per step
        g = torch.Generator(device).manual_seed(run.train.seed * 100_003 + epoch)  # the drops: resumable
        for step, idx in enumerate(tqdm(epoch_batches(n_train, args.batch_size, run.train.seed, epoch, device),
                                        desc=f"prior epoch {epoch}/{args.epochs}", leave=False, dynamic_ncols=True)):
            batch = prior_batch(codes, layout["train"], idx, cfg, args, g)
            with autocast_for(device, precision):
                nll = prior.nll(*batch)  # (B,) nats per code
            loss = nll.mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for group in optimizer.param_groups:
                group["lr"] = lr_at((epoch - 1) * steps_per_epoch + step, args, total_steps)
            optimizer.step()
            total += nll.detach().sum()
        train_bits = total.item() / n_train * BITS_PER_NAT
        if not math.isfinite(train_bits):
            raise ProjectError(f"prior training NLL is {train_bits} at epoch {epoch}; stopped before it "
                               f"reached a checkpoint (last good: {last_path}); try a lower --prior_lr")
        # Chosen by the unconditional NLL: the samples' (and comparable with unconditional priors).
        val_bits = prior_nll_bits(prior, codes["validate"], args.batch_size, device, precision)
        if not math.isfinite(val_bits):
            raise ProjectError(f"prior validation NLL is {val_bits} after epoch {epoch}; stopped without "
                               f"saving it (last good: {last_path}); try a lower --prior_lr")
        cond_bits = (prior_nll_bits(prior, codes["validate"], args.batch_size, device, precision, *val_cond)
                     if cfg.condition != "none" else val_bits)
        rows.append([epoch, train_bits, val_bits, cond_bits, time.time() - t0])

        # The same seed every epoch, so the grids show the prior changing, not the draw.
        g = torch.Generator(device).manual_seed(run.train.seed)
        with autocast_for(device, precision):
            samples = to_unit(vqvae.decode_indices(prior.sample(args.num_samples, generator=g))).cpu()
        save_image_grid(run_dir / f"prior_epoch_{epoch:03d}_samples.png", samples,
                        f"prior epoch {epoch}: {len(samples)} samples (temperature 1), validation NLL "
                        f"{val_bits:.3f} bits per code")

        # ---- save
        improved = val_bits < best_val
        best_val = min(best_val, val_bits)
        ckpt = make_checkpoint("prior", prior, config, optimizer, epoch, best_val, {"rows": rows}, device, vqvae=vq_id)
        write_csv(run_dir / "prior_metrics.csv", PRIOR_METRICS, rows)
        if improved:
            save_checkpoint(run_dir / "prior_best.pt", ckpt)
        save_checkpoint(last_path, ckpt)
        log(f"prior epoch {epoch:3d} | train NLL {train_bits:.4f} | val NLL {val_bits:.4f} bits per code"
            + (f" ({cond_bits:.4f} given {GIVEN[cfg.condition]})" if cfg.condition != "none" else "")
            + f" | {rows[-1][-1]:.0f}s" + (" | best" if improved else ""))

    columns = [("train", "train_nll_bits"), ("validation", "val_nll_bits")]
    if cfg.condition != "none":
        columns.append((f"validation, given {GIVEN[cfg.condition]}", "val_conditioned_nll_bits"))
    curves = {name: [r[PRIOR_METRICS.index(col)] for r in rows] for name, col in columns}
    save_curves(run_dir / "prior_nll_per_epoch.png", curves, "epoch", "NLL (bits per code)",
                f"prior NLL per epoch ({cfg.num_embeddings} codes: {math.log2(cfg.num_embeddings):.0f} bits "
                f"is uniform)")
    log(f"done: best prior validation NLL {best_val:.4f} bits per code; checkpoint {run_dir / 'prior_best.pt'}")


# ----------------------------------------------------------------------------- adversarial decoder

GAN_METRICS = ["epoch", "train_recon_loss", "train_disc_loss", "adaptive_weight", "logits_real", "logits_fake",
               "val_recon_loss", "val_ssim", "val_psnr", "seconds"]


def train_gan(run, run_dir, typed=None):
    """The optional adversarial decoder (VQGAN, Esser et al. 2021) of run_dir's frozen best.pt: a copy of
    its decoder, trained on the code maps of the training split (encoded once) with the run's
    reconstruction loss plus a PatchGAN's, so best.pt, its codes and the prior over them do not change.
    Writes gan_config.json, gan_metrics.csv, gan_epoch_NNN_comparison.png, decoder_gan_last.pt (every
    epoch, to resume) and at the end decoder_gan.pt. `typed`: the flags typed now, checked against a
    decoder already under way; one that learned an earlier best.pt is moved to gan_old_N/."""
    # ---- setup
    last_path = run_dir / "decoder_gan_last.pt"
    run, stage = start_stage(run, run_dir, last_path, "decoder_gan", resume_gan, ("decoder_gan*", "gan_*"), typed,
                             check=check_gan)
    vq_ckpt, vq_path, vq_id, ckpt, device, log, vqvae = stage
    args, precision = run.gan, run.train.precision  # the VQ-VAE's precision, as the prior's

    # ---- data: the frozen encoder's codes (the decoder's input) and the slices they came from.
    # Never augmented: the codes are those of the plain slices, which the discriminator sees as real.
    data_dir = recorded_data_dir(vq_ckpt["config"], vq_path)
    images = {split: place(load_split(data_dir, split, vqvae.cfg.image_size), device)
              for split in ("train", "validate")}  # (N, 1, H, W) float16 in [0, 1] each
    codes = {split: encode_split(vqvae, x, device, args.batch_size, precision)
             for split, x in images.items()}  # (N, h, w) long each, on the device
    n_train = len(codes["train"])
    config = {k: v for k, v in run.flags().items() if k in gan_flag_names()}
    config.update(seed=run.train.seed, device=str(device), recon_loss=run.train.recon_loss,
                  ssim_weight=run.train.ssim_weight, vqvae_checkpoint=str(vq_path))
    write_json(run_dir / "gan_config.json", config)

    # ---- model
    decoder = copy.deepcopy(vqvae.decoder).train()  # starts as best.pt's decoder, which stays as it is
    disc = PatchDiscriminator(vqvae.cfg.in_channels, args.disc_channels, args.disc_layers).to(device)
    log(f"adversarial decoder: {sum(p.numel() for p in decoder.parameters()) / 1e6:.2f}M parameters from "
        f"{vq_path}, discriminator {sum(p.numel() for p in disc.parameters()) / 1e6:.2f}M with "
        f"{'x'.join(map(str, patch_shape(vqvae.cfg.image_size, args.disc_layers)))} patches; {n_train} train / "
        f"{len(codes['validate'])} validation code maps")

    # ---- optimizer: Adam with betas (0.5, 0.9) for both, as taming-transformers (a short memory of
    # gradients that the two players keep changing)
    opt_g = torch.optim.Adam(decoder.parameters(), lr=args.lr, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(disc.parameters(), lr=args.lr, betas=(0.5, 0.9))

    # ---- resume
    start_epoch, rows = 1, []
    if ckpt:
        try:
            decoder.load_state_dict(ckpt["model"])
            opt_g.load_state_dict(ckpt["optimizer"])
            disc.load_state_dict(ckpt["disc"])
            opt_d.load_state_dict(ckpt["disc_optimizer"])
            rows = ckpt["history"]["rows"]
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise ProjectError(f"cannot resume the adversarial decoder from {last_path}: it is damaged "
                               f"({type(e).__name__}); delete {run_dir}/decoder_gan*.pt to train a new one") from None
        set_rng_state(ckpt["rng"], device)  # the batch order is a function of (seed, epoch)
        start_epoch = ckpt["epoch"] + 1
        log(f"resumed the adversarial decoder in {run_dir} after epoch {ckpt['epoch']}")

    # ---- the reference: best.pt's own decoder on the same codes
    evaluate_on = partial(evaluate_decoder, vqvae=vqvae, device=device, batch_size=args.batch_size, precision=precision)
    ref = evaluate_on(vqvae.decoder, codes["validate"], images["validate"])
    fixed = slice(0, NUM_COMPARISON)  # the same validation slices every epoch
    ref_fixed = evaluate_on(vqvae.decoder, codes["validate"][fixed], images["validate"][fixed], keep=True)
    log(f"MSE decoder ({vq_path.name}): val MSE {ref['recon_loss']:.4f} SSIM {ref['ssim'].mean():.4f} "
        f"PSNR {ref['psnr'].mean():.2f}")

    # ---- loop
    steps_per_epoch = num_batches(n_train, args.batch_size)
    for epoch in range(start_epoch, args.epochs + 1):
        t0 = time.time()
        batches = epoch_batches(n_train, args.batch_size, run.train.seed, epoch, images["train"].device)
        step_count = (epoch - 1) * steps_per_epoch
        sums = gan_epoch(decoder, disc, vqvae, opt_g, opt_d, images["train"], codes["train"], batches, step_count,
                         run, device, desc=f"gan epoch {epoch}/{args.epochs}")
        tr = (sums / len(batches)).tolist()  # the epoch's one host sync
        adversarial = min(len(batches), max(0, step_count + len(batches) - args.disc_start))  # steps past the warm-up
        tr[2] *= len(batches) / max(adversarial, 1)  # the adaptive weight's mean over the steps that used it
        if not all(map(math.isfinite, tr)):
            raise ProjectError(f"adversarial decoder training losses are {tr} at epoch {epoch}; stopped before "
                               f"they reached a checkpoint (last good: {last_path}); try a lower --gan_lr")
        val = evaluate_on(decoder, codes["validate"], images["validate"])
        rows.append([epoch, *tr, val["recon_loss"], val["ssim"].mean().item(), val["psnr"].mean().item(),
                     time.time() - t0])
        res = evaluate_on(decoder, codes["validate"][fixed], images["validate"][fixed], keep=True)
        save_gan_comparison(run_dir / f"gan_epoch_{epoch:03d}_comparison.png", epoch,
                            images["validate"][fixed].float().cpu(), ref_fixed, res)

        # ---- save
        ckpt = make_checkpoint("decoder_gan", decoder, config, opt_g, epoch, history={"rows": rows}, device=device,
                               model_args=vqvae.cfg.to_dict(), vqvae=vq_id, disc=disc.state_dict(),
                               disc_optimizer=opt_d.state_dict())
        write_csv(run_dir / "gan_metrics.csv", GAN_METRICS, rows)
        save_checkpoint(last_path, ckpt)
        row = dict(zip(GAN_METRICS, rows[-1]))
        log(f"gan epoch {epoch:3d} | recon {row['train_recon_loss']:.4f} | disc {row['train_disc_loss']:.4f} "
            f"(logits real {row['logits_real']:+.2f} decoded {row['logits_fake']:+.2f}) | adaptive weight "
            f"{row['adaptive_weight']:.3g} | val MSE {row['val_recon_loss']:.4f} SSIM {row['val_ssim']:.4f} PSNR "
            f"{row['val_psnr']:.2f} | {row['seconds']:.0f}s")

    # The last epoch is the decoder: a GAN has no validation criterion to pick one by (validation MSE
    # and SSIM only fall as the adversarial term trades pixel error for realism, and the
    # discriminator's loss measures a moving opponent).
    save_checkpoint(run_dir / "decoder_gan.pt", ckpt)
    log(f"done: adversarial decoder after {ckpt['epoch']} epochs; checkpoint {run_dir / 'decoder_gan.pt'}")


def gan_epoch(decoder, disc, vqvae, opt_g, opt_d, images, codes, batches, step_count, run, device, desc=""):
    """One epoch of the adversarial decoder over `batches` (index tensors into the training split's
    images (N, 1, H, W) in [0, 1] and codes (N, h, w)): per batch a decoder step, then a discriminator
    step. -> (5,) on the device, each summed over the steps: the reconstruction loss, the
    discriminator's loss, the adaptive weight (0 in the warm-up), and the mean logits of real and of
    decoded slices (the generator loss is minus the latter)."""
    args, train = run.gan, run.train
    sums = torch.zeros(5, device=device)
    for step, idx in enumerate(tqdm(batches, desc=desc, leave=False, dynamic_ncols=True)):
        x = get_batch(images, idx, device)  # (B, 1, H, W) in [-1, 1]
        with torch.no_grad():  # the codebook is frozen: no graph into it
            z_q = vqvae.vq.embed(codes[idx])  # (B, D, h, w)
        adversarial = step_count + step >= args.disc_start  # before: the discriminator's warm-up

        # The decoder: L_rec + lambda * disc_weight * L_G (Esser et al. 2021, eq. 5-7), L_G = -E[D(x_fake)]
        # as taming's generator loss, lambda the adaptive weight.
        disc.requires_grad_(False)  # the decoder's step leaves the discriminator's weights alone
        with autocast_for(device, train.precision):
            x_fake = decoder(z_q)  # (B, 1, H, W), fp32 (the decoder's last layer always is)
            rec = reconstruction_loss(x_fake, x, train.recon_loss)
            if train.ssim_weight:  # the run's whole reconstruction objective, as its decoder learned it
                rec = rec + train.ssim_weight * (1 - ssim((x_fake + 1) / 2, (x + 1) / 2)).mean()
            loss, weight = rec, torch.zeros((), device=device)
            if adversarial:  # the real half only shares its batch statistics (PatchDiscriminator)
                gen = -disc(torch.cat([x, x_fake])).float().chunk(2)[1].mean()
                weight = adaptive_weight(rec, gen, decoder.net[-1].weight)
                loss = rec + weight * args.disc_weight * gen
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        opt_g.step()
        disc.requires_grad_(True)

        # The discriminator: hinge loss on the real slices against the decoder's (detached) outputs.
        with autocast_for(device, train.precision):
            # One batch, so both halves are normalised alike -> (B, 1, h', w') logits each
            real, fake = disc(torch.cat([x, x_fake.detach()])).float().chunk(2)
        d_loss = hinge_d_loss(real, fake)
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        sums += torch.stack([rec.detach(), d_loss.detach(), weight, real.detach().mean(), fake.detach().mean()])
    return sums


def adaptive_weight(rec_loss, gan_loss, last_weight):
    """lambda of Esser et al. 2021, eq. 7, as taming-transformers' calculate_adaptive_weight: the norm
    of the reconstruction loss's gradient over that of the adversarial loss's, both with respect to
    the decoder's last layer weight, clamped to [0, 1e4] and detached (a scale, not a path for
    gradients). The two terms then pull on the decoder's output with comparable strength."""
    rec_grad, = torch.autograd.grad(rec_loss, last_weight, retain_graph=True)
    gan_grad, = torch.autograd.grad(gan_loss, last_weight, retain_graph=True)
    return (rec_grad.norm() / (gan_grad.norm() + 1e-4)).clamp(0, 1e4).detach()


def hinge_d_loss(logits_real, logits_fake):
    """The discriminator's hinge loss, as taming's: (E[relu(1 - D(x))] + E[relu(1 + D(x_fake))]) / 2."""
    return 0.5 * (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean())


def save_gan_comparison(path, epoch, real, ref, res):
    """One row per validation slice: the slice | best.pt's MSE decoder | the adversarial decoder, from
    real (N, 1, H, W) in [0, 1] and evaluate_decoder's results (keep=True) of the two decoders."""
    grid = torch.stack([real, ref["recons"], res["recons"]], dim=1).flatten(0, 1)  # (3N, 1, H, W), row by row
    save_image_grid(path, grid, f"adversarial decoder, epoch {epoch}: validation slice | MSE decoder (best.pt, "
                    f"SSIM {ref['ssim'].mean():.3f}) | adversarial decoder (SSIM {res['ssim'].mean():.3f})",
                    ncols=3, row_labels=[f"SSIM {a:.3f} | {b:.3f}" for a, b in zip(ref["ssim"], res["ssim"])])


def check_gan(run):
    """What no single setting of the adversarial decoder can check: epochs to train, and a
    discriminator whose patch map fits the run's slices."""
    args, (H, W) = run.gan, run.model.image_size
    if not args.epochs:
        raise ProjectError("the adversarial decoder stage trains --gan_epochs epochs, and it is 0 (the default, "
                           "no adversarial decoder); give --gan_epochs N")
    if min(patch_shape((H, W), args.disc_layers)) < 1:
        fits = max((n for n in range(1, args.disc_layers) if min(patch_shape((H, W), n)) >= 1), default=1)
        raise ProjectError(f"--gan_disc_layers {args.disc_layers} leaves the discriminator no patch of a {H}x{W} "
                           f"slice; use --gan_disc_layers {fits} or fewer")


def resume_gan(run, ckpt, path, typed):
    """The run with the settings of the adversarial decoder under way in `path` (--gan_epochs extends
    it); a gan flag typed now that differs from its own is refused by name."""
    old = {k: v for k, v in ckpt["config"].items() if k in gan_flag_names()}
    refuse_changes(old, {k: v for k, v in typed.items() if k in old}, ("gan_epochs",),
                   f"cannot resume the adversarial decoder in {path}: it was made with",
                   f"drop those flags to resume it, or delete {path.parent}/decoder_gan*.pt to train a new one")
    return RunConfig.from_flags({**run.flags(), **old, "gan_epochs": typed.get("gan_epochs", old.get("gan_epochs"))})


# ----------------------------------------------------------------------------- pieces

PRIOR_AUG = {"rotate": 5, "scale": 0.05, "shift": 0.03, "gamma": 0.1}  # --prior_aug_copies' ranges: the study's


@torch.no_grad()
def augmented_codes(vqvae, images, previous, args, seed, device, precision):
    """--prior_aug_copies K copies of the training split's code maps -> (maps (K, N, h, w), the maps of
    their previous slices (K, N, h, w)), long on the device. images: (N, 1, H, W) in [0, 1]; previous:
    (N,) each slice's previous slice's index, -1 for none. A slice and its previous slice go through
    dataset.augment as the two channels of one image, so in each copy they share one transform and
    stay neighbours; the draws are seeded by (seed, copy, chunk), so a resumed prior sees the same."""
    maps = []
    chunks = torch.arange(len(images), device=images.device).split(args.batch_size)
    for k in range(args.aug_copies):
        for c, i in enumerate(chunks):
            pair = torch.cat([images[i], images[previous[i].clamp_min(0)]], 1).float() * 2 - 1  # (b, 2, H, W)
            # Negative steps: never a training step's, so these draws are not the VQ-VAE's.
            pair = (augment(pair, seed, -1 - k * len(chunks) - c, **PRIOR_AUG) + 1) / 2
            pair = pair.flatten(0, 1)[:, None]  # (2b, 1, H, W): slice, previous, slice, previous, ...
            maps.append(encode_split(vqvae, pair, device, 2 * args.batch_size, precision).unflatten(0, (-1, 2)))
    maps = torch.cat(maps).unflatten(0, (args.aug_copies, len(images)))  # (K, N, 2, h, w)
    return maps[:, :, 0], maps[:, :, 1]


def prior_batch(codes, layout, idx, cfg, args, generator):
    """A training batch for the prior -> (indices (B, h, w), position (B,) or None, previous (B, h, w)
    or None), as AutoregressivePrior.nll takes them. codes: the train split's maps (N, h, w) under
    "train" (and "flipped", those of the flipped slices); layout: their (position, previous index)
    (dataset.volume_layout). A map and its previous map are swapped for their flipped slices' with
    probability --prior_aug_flip; its position and previous map are left out with probability
    --prior_position_drop and --prior_previous_drop (and where the data has none). With
    --prior_aug_copies K, a map and its previous map come instead, together with probability K / (K + 1),
    from one augmented copy ("copies", "copies_previous": (K, N, h, w), see augmented_codes). Draws
    from `generator` (on the device), so a resumed prior draws the same."""
    def chance(p):
        return torch.rand(len(idx), generator=generator, device=idx.device) < p
    flip = chance(args.aug_flip) if args.aug_flip else None
    copy = None  # (B,) which augmented copy each map comes from, -1: the slice itself
    if args.aug_copies:
        copy = torch.randint(args.aug_copies + 1, (len(idx),), generator=generator, device=idx.device) - 1

    def maps(i):  # the code maps i (B,), those of the flipped slices where flip says so
        m = codes["train"][i]
        return m if flip is None else torch.where(flip[:, None, None], codes["flipped"][i], m)

    def from_copies(m, key):  # m (B, h, w) replaced by the copy's maps where a copy was drawn
        return m if copy is None else torch.where(copy[:, None, None] >= 0, codes[key][copy.clamp_min(0), idx], m)
    x = from_copies(maps(idx), "copies")
    if cfg.condition == "none":
        return x, None, None
    position, previous = (t[idx] for t in layout)
    known = (position >= 0) & ~chance(args.position_drop)
    has = (previous >= 0) & ~chance(args.previous_drop)
    position = torch.where(known, position, cfg.num_positions)
    previous = torch.where(has[:, None, None], from_copies(maps(previous.clamp_min(0)), "copies_previous"),
                           cfg.num_embeddings)
    return x, position, previous if cfg.condition == "position+previous" else None


def check_extension(schedule, old_epochs, epochs, what, fix):
    """Refuse to run `what`, laid out over old_epochs, to another number of epochs on a cosine schedule:
    the schedule has decayed (`fix`: what to do instead)."""
    if schedule == "cosine" and epochs != old_epochs:
        raise ProjectError(f"cannot extend {what} to {epochs} epochs: its cosine schedule was laid out over "
                           f"{old_epochs} epochs and has decayed; {fix}")


def check_warmup(args, total_steps, flag, what):
    """Refuse a cosine schedule (args: lr_schedule, warmup_steps) whose warm-up is not shorter than the
    total_steps of `what`: it would never leave warm-up."""
    if args.lr_schedule == "cosine" and args.warmup_steps >= total_steps:
        raise ProjectError(f"{flag} {args.warmup_steps} is not shorter than {what} ({total_steps} steps), so the "
                           f"cosine schedule would never leave warm-up; lower {flag}")


def lr_at(step, args, total_steps):
    """Learning rate for optimizer step `step` (0-based): constant as in the seed, or linear warm-up
    over --warmup_steps then cosine decay to 0 at the last step of --epochs."""
    if args.lr_schedule == "constant":
        return args.lr
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, total_steps - args.warmup_steps)
    return args.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

def open_log(path):
    """log(msg) prints a line above the progress bars and appends it to the run's log.txt."""
    try:
        log_file = open(path, "a")
    except OSError as e:
        raise ProjectError(f"cannot write {path}: {e.strerror}; pick another --out_dir") from None

    def log(msg):
        tqdm.write(msg)
        print(msg, file=log_file, flush=True)
    return log

def retire(run_dir, stage, patterns):
    """Move the files (glob patterns) of a stage that no longer fits the run's best.pt into
    run_dir/<stage>_old_N/ -> that folder."""
    n = 1
    while (run_dir / f"{stage}_old_{n}").exists():
        n += 1
    dest = run_dir / f"{stage}_old_{n}"
    try:
        dest.mkdir()
        for f in [f for pattern in patterns for f in run_dir.glob(pattern)]:
            if f.is_file():
                f.rename(dest / f.name)
    except OSError as e:
        raise ProjectError(f"cannot move the old {stage} files of {run_dir} to {dest}: {e.strerror}") from None
    return dest


def init_distributed(device_name):
    """Under torchrun (WORLD_SIZE > 1) join the process group -> (rank, world_size); else (0, 1).
    NCCL when the processes train on GPUs, else gloo (CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size == 1:
        return 0, 1
    on_gpu = torch.cuda.is_available() and (device_name is None or torch.device(device_name).type == "cuda")
    dist.init_process_group("nccl" if on_gpu else "gloo")
    return dist.get_rank(), world_size

def build_model(cfg, device, compile=False, world_size=1):
    """-> (model, net): the VQVAE on `device` (channels_last on CUDA, the layout of cuDNN's fastest
    convolutions), and what the training step calls: the model, wrapped in DDP under torchrun and
    compiled with --compile. `model` is the plain module whose state dict is saved."""
    model = VQVAE(cfg).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    net = model
    if world_size > 1:
        # Buffers (the codebook's EMA state and ages) are kept equal by the quantizer's own collectives.
        net = DDP(net, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    if compile:
        net = torch.compile(net)
    return model, net


def match_layouts(optimizer):
    """Each Adam moment in its parameter's memory layout: a run begun on the CPU (NCHW) and resumed on
    CUDA (channels_last parameters) would otherwise give the fused kernel tensors it rejects."""
    for p, state in optimizer.state.items():
        for k, v in state.items():
            if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride():
                state[k] = torch.empty_like(p).copy_(v)  # empty_like keeps p's strides


def build_optimizer(model, lr, device):
    """Adam over the trainable parameters (with the EMA codebook the codes are buffers updated in
    forward, so Adam never sees them); the fused kernel on CUDA."""
    return torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr,
                            fused=device.type == "cuda" or None)


def train_epoch(net, optimizer, images, batches, device, args, step_count, total_steps, desc="", show=True,
                rank=0, world_size=1):
    """Train on `batches` (index tensors into images (N, 1, H, W) in [0, 1]) -> (sums (5,): loss,
    recon, codebook, commitment and SSIM summed over this process's slices; the loss of each step).
    Both stay on the device: no step waits for it; the caller reads them once. The batches are
    augmented here (the --aug_* settings), and only here: validation, test and predict never are.
    The training SSIM and losses are thus those of the augmented batches."""
    aug = augment_settings(args)
    sums = torch.zeros(5, device=device)
    step_losses = torch.zeros(len(batches), device=device)
    for step, idx in enumerate(tqdm(batches, desc=desc, leave=False, dynamic_ncols=True, disable=not show)):
        x = get_batch(images, idx, device)  # (B, 1, H, W) in [-1, 1]; one channel: already channels_last
        if aug:  # skipped when off: not even an identity resampling, so such a run is bit-identical to before
            x = augment(x, args.seed, step_count + step, **aug, rank=rank, world_size=world_size)
        with autocast_for(device, args.precision):
            out = net(x)
            recon_loss = reconstruction_loss(out["x_recon"].float(), x, args.recon_loss)
            loss = recon_loss + out["vq_loss"]
            if args.ssim_weight:  # the project's SSIM as a loss, on [0, 1] images left unclamped for gradients
                loss = loss + args.ssim_weight * (1 - ssim((out["x_recon"] + 1) / 2, (x + 1) / 2)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step_count + step, args, total_steps)
        optimizer.step()
        sums += step_metrics(out, x, loss, recon_loss)
        step_losses[step] = loss.detach()
    return sums, step_losses


def reconstruction_loss(x_recon, x, kind):
    """The reconstruction term, a mean over the batch's pixels: -log p(x|z_q) up to constants of a
    Gaussian decoder (mse, as the paper), of a Laplacian one (l1), or their sum (l1+mse): L1's gradient
    does not fade as an error shrinks, which sharpens edges, while the MSE term keeps the paper's
    Gaussian likelihood (and the validation criterion) in the objective."""
    if kind == "mse":
        return F.mse_loss(x_recon, x)
    if kind == "l1":
        return F.l1_loss(x_recon, x)
    return F.l1_loss(x_recon, x) + F.mse_loss(x_recon, x)


def augment_settings(args):
    """The --aug_* settings as dataset.augment's keywords, or None when all are 0 (no augmentation)."""
    aug = {name: getattr(args, f"aug_{name}") for name in ("flip", "rotate", "scale", "shift", "gamma")}
    return aug if any(aug.values()) else None


@torch.no_grad()
def step_metrics(out, x, loss, recon_loss):
    """One step's (5,) loss, recon, codebook and commitment terms and SSIM, summed over the batch x
    (B, 1, H, W) in [-1, 1]; on the device."""
    train_ssim = ssim(to_unit(out["x_recon"]), to_unit(x)).sum()
    terms = torch.stack([loss, recon_loss, out["codebook_loss"], out["commitment_loss"]]).float()
    return torch.cat([terms * x.shape[0], train_ssim[None]])


def check_same_codebook(model, epoch):
    """Under torchrun: the codebook must be bit-identical on every rank (the quantizer's collectives
    promise it); checked once per epoch, so a broken promise stops the run instead of forking it."""
    mine = model.vq.codebook.weight.detach()
    ref = mine.clone()
    dist.broadcast(ref, src=0)
    differ = torch.tensor(float(not torch.equal(ref, mine)), device=mine.device)
    dist.all_reduce(differ)
    if differ.item():
        raise ProjectError(f"the codebooks of the {dist.get_world_size()} processes differ after epoch {epoch}")


if __name__ == "__main__":
    run_main(main, get_parser().parse_args())
