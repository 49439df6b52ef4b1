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

This file is the entry point and stage 1; the other stages have files of their own (gan_stage.py,
prior_stage.py) on the harness they share (stage.py). Every setting is a field of one of the configs
of config.py (the model's in modules.py and prior.py) with its default, help text and allowed range; the
flags are made from them, and a run's checkpoint holds them (config, model_args), from which a resumed
run is rebuilt.
"""
import argparse
import math
import os
import time
from pathlib import Path

import stopping

if __name__ == "__main__":  # before torch loads (seconds), so that a stop then is one line too
    stopping.catch_signals(importing=True)

import torch  # noqa: E402
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from config import RunConfig, add_run_flags, check_run, resume_run
from dataset import augment, epoch_batches, get_batch, num_batches, resolve_data_dir
from figures import save_comparison, save_curves
from files import Writer, make_checkpoint, write_json
from gan_stage import check_gan, train_gan
from metrics import codebook_stats, evaluate, ssim
from modules import VQVAE, reconstruction_loss
from prior_stage import train_prior
from stage import (Pause, StageFiles, load_splits, open_run_dir, restore, resume_command, resume_partial,
                   schedule_lines, set_lr, unlock_runs)
from stopping import defer_signals, deferred_signals, resumable
from utils import (ProjectError, autocast_for, configure_backends, pick_device, run_main, seed_everything, to_unit,
                   uses_bf16)

METRICS = ["epoch", "train_loss", "train_recon_loss", "train_codebook_loss", "train_commitment_loss",
           "val_loss", "val_recon_loss", "train_ssim", "val_ssim", "val_body_ssim", "val_psnr", "codebook_usage",
           "perplexity", "seconds"]
BODY_COLUMN = METRICS.index("val_body_ssim")  # rows of runs from before it get NaN there on resume
STOP_GROUP = {}  # under torchrun on GPUs: the CPU (gloo) process group the ranks agree on a stop signal in
NUM_COMPARISON = 6  # validation slices shown in every epoch's comparison figure (the same each epoch)
# The stages on a run's frozen best.pt, in the order --stage all runs them (the adversarial decoder
# only with --gan_epochs): --stage NAME -> (what it trains, its function).
STAGES = {"gan": ("an adversarial decoder", train_gan), "prior": ("a prior", train_prior)}


def get_parser():
    p = argparse.ArgumentParser(description="Train the VQ-VAE on HipMRI 2D slices, then the prior over its codes.")
    add_run_flags(p)
    return p


def main(args):
    """Stage 1, the VQ-VAE, then with --gan_epochs the adversarial decoder, then stage 2, the prior over
    the codes (--stage picks one). args holds only the flags typed; every other setting takes its
    default, or on resume the run's own."""
    try:
        train_stages(vars(args))
    finally:
        unlock_runs()


def train_stages(flags):
    """main's stages for the flags typed {name: value}."""
    ckpt, run = resume_run(flags) if flags.get("resume") else (None, RunConfig.from_flags(flags))
    stage = run.train.stage
    if ckpt:  # a stop from here on leaves the run as it was: resumable as before
        resumable(resume_command(run.train.out_dir, stage))
    if stage == "all" and run.gan.epochs and not ckpt:
        check_gan(run)  # before stage 1, not after it has run (on resume: against the decoder under way)
    if stage in STAGES:
        trains, train_stage = STAGES[stage]
        if int(os.environ.get("WORLD_SIZE", 1)) > 1:
            raise ProjectError(f"the {trains.split(' ', 1)[1]} trains in one process: run --stage {stage} with "
                               f"python, not torchrun")
        if not ckpt:
            raise ProjectError(f"--stage {stage} trains {trains} for an existing VQ-VAE run: name the run with "
                               f"--resume runs/NNN")
        train_stage(run, Path(run.train.out_dir), flags)
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
    sets, images = load_splits(data_dir, cfg.image_size, device)  # (N, 1, H, W) float16 in [0, 1] each
    # Under --compile every step has the same shape: a ragged last batch would compile a second graph.
    steps_per_epoch = num_batches(len(images["train"]), args.batch_size, world_size, drop_last=args.compile)
    fixed = sets["validate"].images[:NUM_COMPARISON]  # (6, 1, H, W) in [0, 1]: the same slices every epoch
    defer_signals()  # from the run folder on, a stop waits for the first step's end and saves it (Pause)
    files, config = start_run(run, data_dir, images, ckpt, device, rank, world_size)
    log = files.log

    # ---- model
    model, net = build_model(cfg, device, args.compile, world_size)
    log(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, code map "
        f"{cfg.latent_shape[0]}x{cfg.latent_shape[1]} of {cfg.num_embeddings} codes")

    # ---- optimizer
    optimizer = build_optimizer(model, args.lr, device)

    # ---- resume: everything that decides the rest of the run, so it ends as an uninterrupted one
    start_epoch, best_val, history = 1, float("inf"), {"rows": [], "batch_losses": []}
    if ckpt:
        start_epoch, best_val, history = resume_vqvae(model, optimizer, ckpt, device, args.resume)
        inside = ckpt.get("partial")
        log(f"resumed {args.resume} " + (f"at epoch {inside['epoch']}, step {inside['step']}" if inside else
                                         f"after epoch {start_epoch - 1}") + f" (best validation MSE {best_val:.4f})")
    legs, lines = schedule_lines(args, run.legs_of("train"), steps_per_epoch, start_epoch, "--warmup_steps", "the run")
    for line in lines:
        log(line)

    # ---- loop: a stop signal ends the step under way, which is saved to resume from (Pause)
    rows = [r if len(r) == len(METRICS) else [*r[:BODY_COLUMN], math.nan, *r[BODY_COLUMN:]] for r in history["rows"]]
    batch_losses = history["batch_losses"]
    writer = Writer(background=device.type == "cuda")  # inline on the CPU: nothing to overlap with

    def checkpoint(epoch, partial):  # last.pt inside an epoch: after the epoch files still being written
        failure = writer.failure(wait=True)
        if failure:
            raise failure
        return make_checkpoint("vqvae", model, config, optimizer, epoch, best_val,
                               {"rows": rows, "batch_losses": batch_losses}, device, partial=partial)
    pause = Pause(files, checkpoint, args.save_every_steps, "", main_rank, world_size, STOP_GROUP.get("group"))
    with deferred_signals(resume_command(files.run_dir, args.stage, world_size)):
        for epoch in range(start_epoch, args.epochs + 1):
            t0 = time.time()
            tr, epoch_losses = run_epoch(model, net, optimizer, images["train"], run, epoch, legs, device, rank,
                                         world_size, ckpt, pause)
            files.check_finite(epoch_losses, "training loss", epoch, per_step=True)
            batch_losses += epoch_losses
            if world_size > 1:  # collective: before anything that could stop one rank alone
                check_same_codebook(model, epoch)
            val = evaluate(model, images["validate"], device, args.batch_size, precision=args.precision)
            files.check_finite([val["loss"]], "validation loss", epoch, validation=True)
            rows.append([epoch, *tr[:4], val["loss"], val["recon_loss"], tr[4], val["ssim"].mean().item(),
                         val["body_ssim"].nanmean().item(), val["psnr"].mean().item(), *codebook_stats(val["counts"]),
                         time.time() - t0])
            # ---- save (rank 0, by the writer: beside the next epoch's training on CUDA)
            # Best by validation reconstruction MSE: it measures the images the decoder makes from the
            # quantized codes, while the VQ terms are latent distances whose scale drifts in training.
            # --best_by last: every epoch is the best so far (best_val is then the last epoch's MSE).
            improved = args.best_by == "last" or val["recon_loss"] < best_val
            best_val = val["recon_loss"] if args.best_by == "last" else min(best_val, val["recon_loss"])
            if main_rank:
                res = evaluate(model, fixed, device, NUM_COMPARISON, keep=True, precision=args.precision)
                epoch_ckpt = make_checkpoint("vqvae", model, config, optimizer, epoch, best_val,
                                             {"rows": rows, "batch_losses": batch_losses}, device)
                writer.submit(save_epoch, files, fixed, res, cfg.num_embeddings, list(rows), epoch_ckpt, improved,
                              epoch_line(dict(zip(METRICS, rows[-1])), optimizer.param_groups[0]["lr"], improved))
            stop_together(writer.failure() if main_rank else None, world_size, device)
        stop_together(writer.close() if main_rank else None, world_size, device)

    # ---- the run's curves
    if main_rank:
        save_vqvae_curves(files, rows, batch_losses, args, cfg.num_embeddings, world_size, best_val)
    return files.run_dir


def start_run(run, data_dir, images, resumed, device, rank, world_size):
    """The run folder (new, or the resumed run's), config.json (the run's flags as it ran, its data and
    run folders resolved, with its device, processes and what --precision means there: dtype) and the
    run's first log line -> (stage 1's StageFiles, that config)."""
    args, (H, W) = run.train, run.model.image_size
    out_dir, log = open_run_dir(args.out_dir, resumed, rank == 0, world_size)
    dtype = "bf16" if uses_bf16(device, args.precision) else "fp32"
    config = {**run.flags(), "data_dir": None if args.data_dir is None else str(data_dir.resolve()),
              "out_dir": str(out_dir), "device": str(device), "resume": None, "world_size": world_size,
              "dtype": dtype, "lr_legs": run.legs_of("train")}
    if rank == 0:
        write_json(out_dir / "config.json", config)
    log(f"run {out_dir}: {len(images['train'])} train / {len(images['validate'])} validation slices from {data_dir}, "
        f"{H}x{W}, device {device}" + (f" x {world_size} processes" if world_size > 1 else "") + f", {dtype}"
        + (", compiled" if args.compile else ""))
    return StageFiles(out_dir, log, "metrics.csv", METRICS, "last.pt", "best.pt"), config


def resume_vqvae(model, optimizer, ckpt, device, resume):
    """Load the run's checkpoint into the model (its EMA codebook buffers included) and the optimizer
    -> (next epoch, best_val, history)."""
    for group in ckpt["optimizer"].get("param_groups", []):  # fused on this device, whatever the run began on
        group["fused"] = optimizer.defaults["fused"]
    out = restore(ckpt, device, f"the run from {resume}", "resume from the run's best.pt, or start a new run",
                  model=model, optimizer=optimizer)
    match_layouts(optimizer)
    return out


def run_epoch(model, net, optimizer, train_images, run, epoch, legs, device, rank, world_size, ckpt=None, pause=None):
    """One epoch of stage 1 on this process's share of each global batch (from the step the resumed
    checkpoint `ckpt` stopped at, when it stopped inside this epoch) -> (the epoch's five means per slice
    (train_epoch's sums), the loss of each step), those of the global batches under torchrun."""
    args = run.train
    batches = epoch_batches(len(train_images), args.batch_size, args.seed, epoch, train_images.device, rank,
                            world_size, drop_last=args.compile)
    # The epoch's global batch order (every rank's shares), which a stop inside the epoch saves.
    order = torch.cat(epoch_batches(len(train_images), args.batch_size, args.seed, epoch, "cpu",
                                    drop_last=args.compile)[:len(batches)])
    partial = resume_partial(ckpt, epoch, order)
    sums = torch.zeros(5, device=device)
    step_losses = torch.zeros(len(batches), device=device)
    if partial and rank == 0:  # the global sums so far; the other ranks' shares add on from zero
        sums.copy_(partial["sums"])
        step_losses[:partial["step"]] = partial["step_losses"].to(device) * world_size
    if args.compile and model.vq._needs_init:  # k-means once, eagerly: not a graph compiled for one step
        with torch.no_grad(), autocast_for(device, args.precision):
            model.vq.init_codebook(model.pre_vq_conv(model.encoder(get_batch(train_images, batches[0], device))))

    def state(done):  # what a one-process run holds after `done` steps (a collective under torchrun)
        s, losses = sums.clone(), step_losses[:done].clone()
        if world_size > 1:
            dist.all_reduce(s)
            dist.all_reduce(losses)
            losses /= world_size
        return {"order": order, "sums": s, "step_losses": losses}
    sums, step_losses = train_epoch(net, optimizer, train_images, batches, device, args,
                                    (epoch - 1) * len(batches), legs, desc=f"epoch {epoch}/{args.epochs}",
                                    show=rank == 0, rank=rank, world_size=world_size, sums=sums,
                                    step_losses=step_losses, start=partial["step"] if partial else 0,
                                    pause=pause and (lambda done, step_count: pause.after_step(
                                        epoch, done, len(batches), step_count, lambda: state(done))))
    if world_size > 1:
        dist.all_reduce(sums)  # over the global batches: the numbers a one-process run logs
        dist.all_reduce(step_losses)
        step_losses /= world_size
    tr = (sums / (sum(len(b) for b in batches) * world_size)).tolist()  # per slice of the epoch
    return tr, step_losses.tolist()  # the epoch's host syncs


def save_epoch(files, fixed, res, num_embeddings, rows, ckpt, improved, line):
    """Rank 0's files of one epoch: the comparison figure, then metrics.csv, best.pt (when improved),
    last.pt and the epoch's log line."""
    epoch = rows[-1][0]
    save_comparison(files.run_dir / f"epoch_{epoch:03d}_comparison.png", fixed.float(), res["indices"],
                    res["recons"], f"epoch {epoch}: validation slices, SSIM {res['ssim'].mean():.4f} "
                    f"(body {res['body_ssim'].nanmean():.4f})",
                    num_embeddings, [f"SSIM {s:.3f}" for s in res["ssim"]])
    files.save(rows, ckpt, improved, line)


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


def epoch_line(row, lr, improved):
    """One epoch's log line from its metrics row {METRICS name: value}."""
    return (f"epoch {row['epoch']:3d} | loss {row['train_loss']:.4f} (recon {row['train_recon_loss']:.4f} "
            f"codebook {row['train_codebook_loss']:.4f} commit {row['train_commitment_loss']:.4f}) | "
            f"val loss {row['val_loss']:.4f} recon {row['val_recon_loss']:.4f} SSIM {row['val_ssim']:.4f} "
            f"(body {row['val_body_ssim']:.4f}) PSNR {row['val_psnr']:.2f} | codes used {row['codebook_usage']:.1%} perplexity "
            f"{row['perplexity']:.1f} | lr {lr:.2g} | {row['seconds']:.0f}s" + (" | best" if improved else ""))


def save_vqvae_curves(files, rows, batch_losses, args, num_embeddings, world_size, best_val):
    """The run's curves (training loss per batch, SSIM and codebook usage per epoch) and its last lines."""
    save_curves(files.run_dir / "loss_per_batch.png", {"train loss": batch_losses}, "batch", "loss",
                f"training loss ({args.recon_loss.upper()} + VQ terms" + (" + SSIM term" if args.ssim_weight else "")
                + ") per batch")
    save_curves(files.run_dir / "ssim_per_epoch.png",
                {"train SSIM": files.column(rows, "train_ssim"), "validation SSIM": files.column(rows, "val_ssim"),
                 "validation SSIM in the body": files.column(rows, "val_body_ssim")},
                "epoch", "SSIM (Gaussian, data range 1)", "SSIM per epoch")
    save_curves(files.run_dir / "codebook_usage_per_epoch.png",
                {"validation codes used (%)": [100 * u for u in files.column(rows, "codebook_usage")]}, "epoch",
                "% of the codebook", f"codebook usage over the validation split ({num_embeddings} codes)")
    if world_size > 1:
        files.log(f"{world_size} processes: the codebook was identical on every rank after every epoch")
    files.log(f"done: {'last' if args.best_by == 'last' else 'best'} validation reconstruction MSE {best_val:.4f}; "
              f"checkpoint {files.best}")


# ----------------------------------------------------------------------------- pieces

def init_distributed(device_name):
    """Under torchrun (WORLD_SIZE > 1) join the process group -> (rank, world_size); else (0, 1).
    NCCL when the processes train on GPUs, else gloo (CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size == 1:
        return 0, 1
    on_gpu = torch.cuda.is_available() and (device_name is None or torch.device(device_name).type == "cuda")
    dist.init_process_group("nccl" if on_gpu else "gloo")
    if on_gpu:  # the ranks agree on a stop signal at every step on the CPU: no GPU sync for it
        STOP_GROUP["group"] = dist.new_group(backend="gloo")
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


def train_epoch(net, optimizer, images, batches, device, args, step_count, legs, desc="", show=True,
                rank=0, world_size=1, sums=None, step_losses=None, start=0, pause=None):
    """Train on `batches` (index tensors into images (N, 1, H, W) in [0, 1]) from batch `start` on ->
    (sums (5,): loss, recon, codebook and commitment and SSIM summed over this process's slices; the
    loss of each step), added to `sums` and `step_losses` when given (a resumed epoch's). Both stay on
    the device: no step waits for it; the caller reads them once. step_count: the run's steps before
    these batches; legs: the schedule (stage.lr_at); pause(done, steps of the run), if given, after each
    step (stage.Pause). The batches are augmented here (the --aug_* settings), and only here:
    validation, test and predict never are. The training SSIM and losses are thus those of the
    augmented batches."""
    aug = augment_settings(args)
    sums = torch.zeros(5, device=device) if sums is None else sums
    step_losses = torch.zeros(len(batches), device=device) if step_losses is None else step_losses
    for step in tqdm(range(start, len(batches)), desc=desc, leave=False, dynamic_ncols=True, disable=not show,
                     initial=start, total=len(batches)):
        x = get_batch(images, batches[step], device)  # (B, 1, H, W) in [-1, 1]; one channel: already channels_last
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
        set_lr(optimizer, step_count + step, args, legs)
        optimizer.step()
        sums += step_metrics(out, x, loss, recon_loss)
        step_losses[step] = loss.detach()
        if pause:
            pause(step + 1, step_count + step + 1)
    return sums, step_losses


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
