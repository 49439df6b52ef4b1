"""Train the VQ-VAE on HipMRI 2D slices (or the built-in phantom), then the prior over its codes.

Usage: python train.py [--data_dir /path/to/keras_slices_data] [--epochs 20] [--ema] ...
       python train.py --stage prior --resume runs/NNN   (a prior for an existing VQ-VAE run)

Stage 1 (VQ-VAE) writes to a new run folder (runs/NNN unless --out_dir): config.json, log.txt,
metrics.csv, best.pt (lowest validation reconstruction MSE), last.pt, epoch_NNN_comparison.png,
loss_per_batch.png, ssim_per_epoch.png and codebook_usage_per_epoch.png.
Stage 2 (prior) encodes the training and validation splits once with the frozen best.pt and trains the
autoregressive prior on those code maps, in the same folder: prior_config.json, prior_metrics.csv,
prior_best.pt (lowest validation NLL), prior_last.pt, prior_epoch_NNN_samples.png and
prior_nll_per_epoch.png. A prior that no longer fits the run's best.pt (the VQ-VAE was extended since)
is moved to prior_old_N/ and a new one is trained.
"""
import argparse
import math
import os
import sys
import time
from dataclasses import fields
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from dataset import epoch_batches, get_batch, load_split, num_batches, place, resolve_data_dir
from modules import (CODEBOOK_INITS, PRIOR_ARCHS, SEED_CODEBOOK, VQVAE, PriorConfig, VQVAEConfig, build_prior,
                     latent_shape)
from utils import (BITS_PER_NAT, SSIM_MIN_SIZE, ProjectError, autocast_for, codebook_stats, configure_backends,
                   encode_split, evaluate, fingerprint, load_checkpoint, load_vqvae, new_run_dir, pick_device,
                   prior_nll_bits, run_main, save_checkpoint, save_comparison, save_curves, save_image_grid,
                   seed_everything, ssim, to_unit, uses_bf16, write_csv, write_json)

METRICS = ["epoch", "train_loss", "train_recon_loss", "train_codebook_loss", "train_commitment_loss",
           "val_loss", "val_recon_loss", "train_ssim", "val_ssim", "val_psnr", "codebook_usage",
           "perplexity", "seconds"]
PRIOR_METRICS = ["epoch", "train_nll_bits", "val_nll_bits", "seconds"]
NUM_COMPARISON = 6  # validation slices shown in every epoch's comparison figure (the same each epoch)
DEFAULT_EPOCHS = 20
DEFAULT_PRIOR_EPOCHS = 18


def model_config(args):
    """The model's hyperparameters from the flags of the same names."""
    return VQVAEConfig(**{f.name: getattr(args, f.name) for f in fields(VQVAEConfig) if f.name != "in_channels"})


def given_flags(argv):
    """The flags typed on a command line, as parameter names: a flag typed with its default value
    is still a request (on resume, --lr 0.001 is not the same as no --lr)."""
    p = get_parser()
    for action in p._actions:  # argparse has no public way to drop every default
        action.default = argparse.SUPPRESS
    return sorted(vars(p.parse_args(argv)))


def was_given(args, name, defaults):
    """Whether flag `name` was asked for: typed (when main's caller recorded args.given), else set
    to a value other than its default (for callers that build args themselves, as the tests do)."""
    given = getattr(args, "given", None)
    return name in given if given is not None else getattr(args, name) != defaults[name]


def resume_args(args):
    """--resume RUN_DIR or CHECKPOINT -> (checkpoint, args of the original run).

    A resumed run is the same run: its flags come from the checkpoint. A flag given now that
    differs from the run's (other than --epochs, to extend it, --device and --out_dir) is refused by
    name (--precision and --compile may change too: they set how, not what). --stage and the prior's flags are taken from this command where given (see below).
    """
    path = Path(args.resume)
    path = path / "last.pt" if path.is_dir() else path
    ckpt = load_checkpoint(path)
    last = path.with_name("last.pt")
    if path.name != "last.pt" and last.is_file() and load_checkpoint(last)["epoch"] > ckpt["epoch"]:
        raise ProjectError(f"{path} is from epoch {ckpt['epoch']} but the run went on (see {last}); "
                           f"resume the run folder {path.parent}, which continues from its last epoch")
    defaults = vars(get_parser().parse_args([]))
    old = {**defaults, **SEED_CODEBOOK, **ckpt["config"]}  # flags added since that run default to off
    # The stage and the prior's flags do not touch the VQ-VAE: taken from this command when given,
    # else from the run; a prior already under way checks them against its own checkpoint.
    later = {k for k in defaults if k == "stage" or k.startswith("prior_")}
    free = {"resume", "epochs", "device", "out_dir", "precision", "compile"} | later
    def same(k, a, b):  # data folders compare as resolved paths
        return (a and str(Path(a).resolve())) == (b and str(Path(b).resolve())) if k == "data_dir" else a == b
    free |= {"given"}
    asked = {k: v for k, v in vars(args).items() if k not in free and was_given(args, k, defaults)}
    differ = {k: (old.get(k), v) for k, v in asked.items() if not same(k, old.get(k), v)}
    if differ:
        was = ", ".join(f"{k}={a}" for k, (a, _) in differ.items())
        now = ", ".join(f"{k}={b}" for k, (_, b) in differ.items())
        raise ProjectError(f"cannot resume {path}: the run was made with {was} but this command asks "
                           f"{now}; drop those flags to resume it, or start a new run without --resume")
    if old["lr_schedule"] == "cosine" and args.epochs and args.epochs != old["epochs"]:
        raise ProjectError(f"cannot extend {path} to {args.epochs} epochs: its cosine schedule was laid out "
                           f"over {old['epochs']} epochs and has decayed; resume without --epochs, or start "
                           f"a new run")
    now = {k: v for k, v in vars(args).items() if k in later and was_given(args, k, defaults)}
    now.update({k: getattr(args, k) for k in ("precision", "compile") if was_given(args, k, defaults)})
    merged = argparse.Namespace(**{**old, **now, "resume": args.resume, "device": args.device,
                                   "given": getattr(args, "given", None),
                                   "out_dir": str(path.parent), "epochs": args.epochs or old["epochs"]})
    return ckpt, merged


def prior_resume_args(args, ckpt, path):
    """Continue the prior in `path` with its own flags; a prior flag given now that differs (other
    than --prior_epochs, to extend it) is refused by name."""
    defaults = vars(get_parser().parse_args([]))
    keys = [k for k in defaults if k.startswith("prior_") and k != "prior_epochs"]
    differ = [k for k in keys if was_given(args, k, defaults) and getattr(args, k) != ckpt["config"][k]]
    if differ:
        was = ", ".join(f"{k}={ckpt['config'][k]}" for k in differ)
        raise ProjectError(f"cannot resume the prior in {path}: it was made with {was}; drop those flags "
                           f"to resume it, or delete {path.parent}/prior_*.pt to train a new prior")
    merged = {**vars(args), **{k: ckpt["config"][k] for k in keys}}
    merged["prior_epochs"] = args.prior_epochs if was_given(args, "prior_epochs", defaults) \
        else ckpt["config"]["prior_epochs"]
    return argparse.Namespace(**merged)


def lr_at(step, args, total_steps):
    """Learning rate for optimizer step `step` (0-based): constant as in the seed, or linear warm-up
    over --warmup_steps then cosine decay to 0 at the last step of --epochs."""
    if args.lr_schedule == "constant":
        return args.lr
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, total_steps - args.warmup_steps)
    return args.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def rng_state():
    """Generator states that decide what happens next: the global torch RNG and that of the current
    CUDA device (the one this process trains on; under torchrun every rank's is the same)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]  # checkpoints before torchrun support held a list, one per device
        torch.cuda.set_rng_state(cuda[torch.cuda.current_device()] if isinstance(cuda, list) else cuda)


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


def prior_config(args, num_embeddings=512, latent_h=32, latent_w=16):
    return PriorConfig(num_embeddings=num_embeddings, latent_h=latent_h, latent_w=latent_w, arch=args.prior_arch,
                       num_layers=args.prior_num_layers, num_heads=args.prior_num_heads,
                       hidden_dim=args.prior_hidden_dim, dropout=args.prior_dropout,
                       kernel_size=args.prior_kernel_size)


def check_prior_flags(args):
    """Refuse bad prior flags up front, not after the VQ-VAE stage has run."""
    for flag in ("prior_epochs", "prior_batch_size", "prior_num_samples", "prior_num_layers", "prior_hidden_dim",
                 "prior_num_heads", "prior_kernel_size"):
        if getattr(args, flag) < 1:
            raise ProjectError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.prior_lr <= 0 or args.prior_weight_decay < 0 or not 0 <= args.prior_dropout < 1:
        raise ProjectError(f"--prior_lr must be > 0, --prior_weight_decay >= 0 and --prior_dropout in [0, 1), "
                           f"got {args.prior_lr}, {args.prior_weight_decay} and {args.prior_dropout}")
    try:
        build_prior(prior_config(args))
    except ValueError as e:
        raise ProjectError(f"prior: {e}; change --prior_hidden_dim, --prior_num_heads or "
                           f"--prior_kernel_size") from None


def retire_prior(run_dir):
    """Move the files of a prior that no longer fits the run's VQ-VAE into run_dir/prior_old_N/."""
    n = 1
    while (run_dir / f"prior_old_{n}").exists():
        n += 1
    dest = run_dir / f"prior_old_{n}"
    try:
        dest.mkdir()
        for f in run_dir.glob("prior_*"):
            if f.is_file():
                f.rename(dest / f.name)
    except OSError as e:
        raise ProjectError(f"cannot move the old prior of {run_dir} to {dest}: {e.strerror}") from None
    return dest


def main(args):
    """Stage 1, the VQ-VAE, then stage 2, the prior over its codes (--stage picks one)."""
    if args.stage != "vqvae":
        check_prior_flags(args)
    if args.stage == "prior":
        if int(os.environ.get("WORLD_SIZE", 1)) > 1:
            raise ProjectError("the prior trains in one process: run --stage prior with python, not torchrun")
        if not args.resume:
            raise ProjectError("--stage prior trains a prior for an existing VQ-VAE run: name the run "
                               "with --resume runs/NNN")
        run_dir = Path(args.resume)
        run_dir = run_dir if run_dir.is_dir() else run_dir.parent
        # The run's seed and prior flags, unless given now (a prior under way checks its own).
        defaults = vars(get_parser().parse_args([]))
        old = load_checkpoint(run_dir / "best.pt")["config"]
        keep = {k: old[k] for k in old if (k == "seed" or k.startswith("prior_")) and k in defaults
                and not was_given(args, k, defaults)}
        train_prior(argparse.Namespace(**{**vars(args), **keep}), run_dir)
        return
    rank, world_size = init_distributed(args.device)
    try:
        run_dir, args = train_vqvae(args, rank, world_size)
    finally:
        if world_size > 1:
            dist.destroy_process_group()
    if args.stage == "all" and rank == 0:  # the prior is small: rank 0 trains it alone
        train_prior(args, run_dir)


def init_distributed(device_name):
    """Under torchrun (WORLD_SIZE > 1) join the process group -> (rank, world_size); else (0, 1).
    NCCL when the processes train on GPUs, else gloo (CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size == 1:
        return 0, 1
    on_gpu = torch.cuda.is_available() and (device_name is None or torch.device(device_name).type == "cuda")
    dist.init_process_group("nccl" if on_gpu else "gloo")
    return dist.get_rank(), world_size


def train_vqvae(args, rank=0, world_size=1):
    """Stage 1: train (or resume) the VQ-VAE -> (run folder, the run's args). With world_size > 1
    (torchrun) every process trains its share of each global batch and only rank 0 writes."""
    # ---- setup
    ckpt = None
    if args.resume:
        ckpt, args = resume_args(args)
    args.epochs = args.epochs or DEFAULT_EPOCHS
    seed_everything(args.seed)  # the same on every rank: the model init and the quantizer's draws agree
    device = pick_device(args.device, int(os.environ["LOCAL_RANK"]) if world_size > 1 else None)
    configure_backends(device, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    main_rank = rank == 0
    image_size = tuple(args.image_size)
    try:  # checked before any data is read or any folder made
        h, w = latent_shape(image_size, args.num_downsampling_layers)
    except ValueError as e:
        raise ProjectError(f"--image_size: {e}") from None
    for flag in ("restart_after", "warmup_steps", "ssim_weight"):
        if getattr(args, flag) < 0:
            raise ProjectError(f"--{flag} must be >= 0, got {getattr(args, flag)}")
    if min(image_size) < SSIM_MIN_SIZE:
        raise ProjectError(f"--image_size must be at least {SSIM_MIN_SIZE} pixels each way (the SSIM window)")
    if args.batch_size % world_size:
        raise ProjectError(f"--batch_size {args.batch_size} (the global batch) does not split over "
                           f"{world_size} processes; use a multiple of {world_size}")

    # ---- data (read before the run folder is made, so bad data leaves no empty run behind)
    data_dir = resolve_data_dir(args.data_dir)
    train_set = load_split(data_dir, "train", image_size)
    val_set = load_split(data_dir, "validate", image_size)
    train_images, val_images = place(train_set, device), place(val_set, device)  # (N, 1, H, W) float16 in [0, 1]
    n_train = len(train_images)
    steps_per_epoch = num_batches(n_train, args.batch_size, world_size)
    total_steps = args.epochs * steps_per_epoch
    if args.lr_schedule == "cosine" and args.warmup_steps >= total_steps:
        raise ProjectError(f"--warmup_steps {args.warmup_steps} is not shorter than the run ({total_steps} "
                           f"steps), so the cosine schedule would never leave warm-up; lower --warmup_steps")
    fixed = val_set.images[:NUM_COMPARISON]  # (6, 1, H, W) in [0, 1]: the same slices every epoch

    if main_rank:
        out_dir = Path(args.out_dir) if ckpt else new_run_dir(args.out_dir)
        log = open_log(out_dir / "log.txt")
    else:
        out_dir, log = None, lambda msg: None
    if world_size > 1:  # every rank learns rank 0's run folder
        box = [str(out_dir)]
        dist.broadcast_object_list(box, src=0)
        out_dir = Path(box[0])

    config = {**{k: v for k, v in vars(args).items() if k != "given"}, "image_size": list(image_size),
              "data_dir": None if args.data_dir is None else str(data_dir.resolve()),
              "out_dir": str(out_dir), "device": str(device), "resume": None, "world_size": world_size}
    if main_rank:
        write_json(out_dir / "config.json", config)
    log(f"run {out_dir}: {n_train} train / {len(val_images)} validation slices from {data_dir}, "
        f"{image_size[0]}x{image_size[1]}, device {device}" + (f" x {world_size} processes" if world_size > 1 else "")
        + f", {'bf16' if uses_bf16(device, args.precision) else 'fp32'}" + (", compiled" if args.compile else ""))

    # ---- model
    cfg = model_config(args)
    model, net = build_model(cfg, device, args.compile, world_size)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params / 1e6:.2f}M parameters, code map {h}x{w} of {cfg.num_embeddings} codes")

    # ---- optimizer
    optimizer = build_optimizer(model, args.lr, device)

    # ---- resume: everything that decides the rest of the run, so it ends as an uninterrupted one
    start_epoch, best_val, rows, batch_losses = 1, float("inf"), [], []
    if ckpt:
        model.load_state_dict(ckpt["model"])  # includes the EMA codebook buffers
        for group in ckpt["optimizer"]["param_groups"]:  # fused on this device, whatever the run began on
            group["fused"] = optimizer.defaults["fused"]
        optimizer.load_state_dict(ckpt["optimizer"])
        set_rng_state(ckpt["rng"])  # the data order is a function of (seed, epoch): nothing to restore
        start_epoch, best_val = ckpt["epoch"] + 1, ckpt["best_val"]
        rows, batch_losses = ckpt["history"]["rows"], ckpt["history"]["batch_losses"]
        log(f"resumed {args.resume} after epoch {ckpt['epoch']} (best validation MSE {best_val:.4f})")

    # ---- loop
    step_count = (start_epoch - 1) * steps_per_epoch  # optimizer steps taken so far (for the schedule)
    for epoch in range(start_epoch, args.epochs + 1):
        t0 = time.time()
        model.train()
        batches = epoch_batches(n_train, args.batch_size, args.seed, epoch, train_images.device, rank, world_size)
        sums, step_losses = train_epoch(net, optimizer, train_images, batches, device, args, step_count, total_steps,
                                        desc=f"epoch {epoch}/{args.epochs}", show=main_rank)
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
        row = dict(zip(METRICS, rows[-1]))
        if not main_rank:
            continue

        res = evaluate(model, fixed, device, NUM_COMPARISON, keep=True, precision=args.precision)
        xs = fixed.float()
        save_comparison(out_dir / f"epoch_{epoch:03d}_comparison.png", xs, res["indices"], res["recons"],
                        f"epoch {epoch}: validation slices, SSIM {res['ssim'].mean():.4f}",
                        cfg.num_embeddings, [f"SSIM {s:.3f}" for s in res["ssim"]])

        # ---- save
        # Best by validation reconstruction MSE: it measures the images the decoder makes from the
        # quantized codes, while the VQ terms are latent distances whose scale drifts in training.
        improved = val["recon_loss"] < best_val
        best_val = min(best_val, val["recon_loss"])
        ckpt = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                "best_val": best_val, "model_args": cfg.to_dict(), "config": config, "kind": "vqvae",
                "rng": rng_state(), "history": {"rows": rows, "batch_losses": batch_losses}}
        write_csv(out_dir / "metrics.csv", METRICS, rows)
        if improved:
            save_checkpoint(out_dir / "best.pt", ckpt)
        save_checkpoint(out_dir / "last.pt", ckpt)  # last: a kill before it leaves the epoch to redo
        log(f"epoch {epoch:3d} | loss {tr[0]:.4f} (recon {tr[1]:.4f} codebook {tr[2]:.4f} "
            f"commit {tr[3]:.4f}) | val loss {val['loss']:.4f} recon {val['recon_loss']:.4f} "
            f"SSIM {row['val_ssim']:.4f} PSNR {row['val_psnr']:.2f} | "
            f"codes used {usage:.1%} perplexity {perplexity:.1f} | lr {optimizer.param_groups[0]['lr']:.2g} | "
            f"{row['seconds']:.0f}s"
            + (" | best" if improved else ""))

    if not main_rank:
        return out_dir, args
    save_curves(out_dir / "loss_per_batch.png", {"train loss": batch_losses}, "batch", "loss",
                "training loss (MSE + VQ terms" + (" + SSIM term" if args.ssim_weight else "") + ") per batch")
    ssims = {name: [r[METRICS.index(col)] for r in rows]
             for name, col in (("train SSIM", "train_ssim"), ("validation SSIM", "val_ssim"))}
    save_curves(out_dir / "ssim_per_epoch.png", ssims, "epoch", "SSIM (Gaussian, data range 1)",
                "SSIM per epoch")
    usage_curve = {"validation codes used (%)": [100 * r[METRICS.index("codebook_usage")] for r in rows]}
    save_curves(out_dir / "codebook_usage_per_epoch.png", usage_curve, "epoch", "% of the codebook",
                f"codebook usage over the validation split ({cfg.num_embeddings} codes)")
    if world_size > 1:
        log(f"{world_size} processes: the codebook was identical on every rank after every epoch")
    log(f"done: best validation reconstruction MSE {best_val:.4f}; checkpoint {out_dir / 'best.pt'}")
    return out_dir, args


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


def build_optimizer(model, lr, device):
    """Adam over the trainable parameters (with the EMA codebook the codes are buffers updated in
    forward, so Adam never sees them); the fused kernel on CUDA."""
    return torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr,
                            fused=device.type == "cuda" or None)


def train_epoch(net, optimizer, images, batches, device, args, step_count, total_steps, desc="", show=True):
    """Train on `batches` (index tensors into images (N, 1, H, W) in [0, 1]) -> (sums (5,): loss,
    recon, codebook, commitment and SSIM summed over this process's slices; the loss of each step).
    Both stay on the device: no step waits for it; the caller reads them once."""
    sums = torch.zeros(5, device=device)
    step_losses = torch.zeros(len(batches), device=device)
    for step, idx in enumerate(tqdm(batches, desc=desc, leave=False, dynamic_ncols=True, disable=not show)):
        x = get_batch(images, idx, device)  # (B, 1, H, W) in [-1, 1]; one channel: already channels_last
        with autocast_for(device, args.precision):
            out = net(x)
            recon_loss = F.mse_loss(out["x_recon"].float(), x)  # -log p(x|z_q) up to constants
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


def train_prior(args, run_dir):
    """Stage 2: train (or resume) the prior on the code maps of run_dir's frozen best VQ-VAE."""
    # ---- setup
    vq_path, last_path = run_dir / "best.pt", run_dir / "prior_last.pt"
    vq_ckpt = load_checkpoint(vq_path)
    vq_id = fingerprint(vq_ckpt["model"])  # the prior is valid for exactly these weights
    ckpt = load_checkpoint(last_path, kind="prior") if last_path.is_file() else None
    retired = None
    if ckpt and ckpt["vqvae"] != vq_id:  # the VQ-VAE was extended since: its codes are not the prior's
        retired, ckpt = retire_prior(run_dir), None
    elif ckpt:
        args = prior_resume_args(args, ckpt, last_path)
    check_prior_flags(args)
    seed_everything(args.seed)
    device = pick_device(args.device)
    log = open_log(run_dir / "log.txt")
    if retired:
        log(f"the prior in {run_dir} learned the codes of an earlier {vq_path.name}: moved its files to "
            f"{retired}, training a new prior")
    vqvae = load_vqvae(vq_ckpt, vq_path, device)  # frozen: eval mode, no optimizer

    # ---- data: every slice encoded once, the prior never sees an image
    vq_config = vq_ckpt["config"]
    data_dir = resolve_data_dir(vq_config["data_dir"])
    codes = {split: encode_split(vqvae, place(load_split(data_dir, split, tuple(vq_config["image_size"])), device),
                                 device, args.prior_batch_size)
             for split in ("train", "validate")}  # (N, h, w) long each, on the device
    n_train = len(codes["train"])
    config = {k: v for k, v in vars(args).items() if k.startswith("prior_") or k in ("seed", "device")}
    config.update(device=str(device), vqvae_checkpoint=str(vq_path))
    write_json(run_dir / "prior_config.json", config)

    # ---- model
    h, w = codes["train"].shape[1:]
    cfg = prior_config(args, vqvae.cfg.num_embeddings, h, w)
    prior = build_prior(cfg).to(device)
    log(f"prior: {sum(p.numel() for p in prior.parameters()) / 1e6:.2f}M parameters, {cfg.arch} over "
        f"{h}x{w} = {h * w} codes; {n_train} train / {len(codes['validate'])} validation code maps")

    # ---- optimizer
    optimizer = torch.optim.AdamW(prior.parameters(), lr=args.prior_lr, weight_decay=args.prior_weight_decay)

    # ---- resume
    start_epoch, best_val, rows = 1, float("inf"), []
    if ckpt:
        prior.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        set_rng_state(ckpt["rng"])  # the batch order is a function of (seed, epoch)
        start_epoch, best_val, rows = ckpt["epoch"] + 1, ckpt["best_val"], ckpt["history"]["rows"]
        log(f"resumed the prior in {run_dir} after epoch {ckpt['epoch']} "
            f"(best validation NLL {best_val:.4f} bits per code)")

    # ---- loop
    for epoch in range(start_epoch, args.prior_epochs + 1):
        t0 = time.time()
        prior.train()
        total = torch.zeros((), device=device)  # summed on the device: no host sync per step
        for idx in tqdm(epoch_batches(n_train, args.prior_batch_size, args.seed, epoch, device),
                        desc=f"prior epoch {epoch}/{args.prior_epochs}", leave=False, dynamic_ncols=True):
            nll = prior.nll(codes["train"][idx])  # (B,) nats per code
            loss = nll.mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += nll.detach().sum()
        train_bits = total.item() / n_train * BITS_PER_NAT
        if not math.isfinite(train_bits):
            raise ProjectError(f"prior training NLL is {train_bits} at epoch {epoch}; stopped before it "
                               f"reached a checkpoint (last good: {last_path}); try a lower --prior_lr")
        val_bits = prior_nll_bits(prior, codes["validate"], args.prior_batch_size, device)
        if not math.isfinite(val_bits):
            raise ProjectError(f"prior validation NLL is {val_bits} after epoch {epoch}; stopped without "
                               f"saving it (last good: {last_path}); try a lower --prior_lr")
        rows.append([epoch, train_bits, val_bits, time.time() - t0])

        # The same seed every epoch, so the grids show the prior changing, not the draw.
        g = torch.Generator(device).manual_seed(args.seed)
        samples = to_unit(vqvae.decode_indices(prior.sample(args.prior_num_samples, generator=g))).cpu()
        save_image_grid(run_dir / f"prior_epoch_{epoch:03d}_samples.png", samples,
                        f"prior epoch {epoch}: {len(samples)} samples (temperature 1), validation NLL "
                        f"{val_bits:.3f} bits per code")

        # ---- save
        improved = val_bits < best_val
        best_val = min(best_val, val_bits)
        ckpt = {"model": prior.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                "best_val": best_val, "model_args": cfg.to_dict(), "config": config, "kind": "prior",
                "vqvae": vq_id, "rng": rng_state(),
                "history": {"rows": rows}}
        write_csv(run_dir / "prior_metrics.csv", PRIOR_METRICS, rows)
        if improved:
            save_checkpoint(run_dir / "prior_best.pt", ckpt)
        save_checkpoint(last_path, ckpt)
        log(f"prior epoch {epoch:3d} | train NLL {train_bits:.4f} | val NLL {val_bits:.4f} bits per code | "
            f"{rows[-1][-1]:.0f}s" + (" | best" if improved else ""))

    curves = {name: [r[PRIOR_METRICS.index(col)] for r in rows]
              for name, col in (("train", "train_nll_bits"), ("validation", "val_nll_bits"))}
    save_curves(run_dir / "prior_nll_per_epoch.png", curves, "epoch", "NLL (bits per code)",
                f"prior NLL per epoch ({cfg.num_embeddings} codes: {math.log2(cfg.num_embeddings):.0f} bits "
                f"is uniform)")
    log(f"done: best prior validation NLL {best_val:.4f} bits per code; checkpoint {run_dir / 'prior_best.pt'}")


def get_parser():
    p = argparse.ArgumentParser(description="Train the VQ-VAE on HipMRI 2D slices.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = VQVAEConfig()
    p.add_argument("--data_dir", default=None,
                   help="folder with keras_slices_train/validate/test; None: the built-in phantom")
    p.add_argument("--out_dir", default=None, help="run folder; None: the next runs/NNN")
    p.add_argument("--image_size", type=int, nargs=2, default=[256, 128], metavar=("H", "W"),
                   help="slices are resized to H x W; 256 256 reproduces the seed's stretched grid")
    p.add_argument("--epochs", type=int, default=None,
                   help="passes over the training split; None: 20, or with --resume the run's own")
    p.add_argument("--batch_size", type=int, default=32, help="slices per Adam step")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--num_hiddens", type=int, default=d.num_hiddens,
                   help="channels of the encoder and decoder")
    p.add_argument("--num_residual_layers", type=int, default=d.num_residual_layers,
                   help="residual blocks in the encoder and in the decoder")
    p.add_argument("--num_residual_hiddens", type=int, default=d.num_residual_hiddens,
                   help="channels inside a residual block")
    p.add_argument("--num_downsampling_layers", type=int, default=d.num_downsampling_layers,
                   help="stride-2 convs; the code map is the image size / 2**this")
    p.add_argument("--embedding_dim", type=int, default=d.embedding_dim, help="length of a code vector")
    p.add_argument("--num_embeddings", type=int, default=d.num_embeddings, help="codebook size K")
    p.add_argument("--commitment_cost", type=float, default=d.commitment_cost,
                   help="beta, weighting the commitment term only")
    p.add_argument("--ema", action="store_true", help="EMA codebook updates instead of the codebook loss")
    p.add_argument("--decay", type=float, default=d.decay, help="EMA decay (with --ema)")
    p.add_argument("--epsilon", type=float, default=d.epsilon, help="EMA Laplace smoothing (with --ema)")
    p.add_argument("--codebook_init", default=d.codebook_init, choices=CODEBOOK_INITS,
                   help="uniform: the seed's +-1/K codes; kmeans: k-means of the first batch's encoder outputs")
    p.add_argument("--restart_after", type=int, default=d.restart_after,
                   help="re-seed a code unused for this many steps with a random encoder output; 0: never")
    p.add_argument("--ssim_weight", type=float, default=0.0,
                   help="adds ssim_weight * (1 - SSIM) to the MSE reconstruction loss; 0: MSE only")
    p.add_argument("--lr_schedule", default="constant", choices=["constant", "cosine"],
                   help="constant as in the seed, or linear warm-up then cosine decay to 0")
    p.add_argument("--warmup_steps", type=int, default=100, help="warm-up steps (with --lr_schedule cosine)")
    p.add_argument("--seed", type=int, default=0, help="seeds the model init and the data order")
    p.add_argument("--device", default=None, help="cuda, mps or cpu; None picks cuda, then mps, then cpu")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="of the VQ-VAE's forward pass; auto: bf16 autocast on CUDA, fp32 elsewhere (the "
                        "quantizer's distances and EMA updates and SSIM are always fp32)")
    p.add_argument("--compile", action="store_true", help="torch.compile the VQ-VAE's training step")
    p.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue the run in RUN_DIR (or from a checkpoint file) where it stopped")
    p.add_argument("--stage", default="all", choices=["all", "vqvae", "prior"],
                   help="all: the VQ-VAE, then the prior; prior: only the prior, for the run named by --resume")
    pd = PriorConfig()
    p.add_argument("--prior_epochs", type=int, default=DEFAULT_PRIOR_EPOCHS, help="passes over the training codes")
    p.add_argument("--prior_batch_size", type=int, default=32, help="code maps per AdamW step")
    p.add_argument("--prior_lr", type=float, default=2e-3, help="AdamW learning rate of the prior")
    p.add_argument("--prior_weight_decay", type=float, default=0.01, help="AdamW weight decay of the prior")
    p.add_argument("--prior_arch", default=pd.arch, choices=PRIOR_ARCHS,
                   help="causal transformer (sampling with a key/value cache) or the paper's gated PixelCNN")
    p.add_argument("--prior_num_layers", type=int, default=pd.num_layers, help="transformer blocks or PixelCNN layers")
    p.add_argument("--prior_num_heads", type=int, default=pd.num_heads, help="attention heads per block (transformer)")
    p.add_argument("--prior_hidden_dim", type=int, default=pd.hidden_dim, help="width of the prior")
    p.add_argument("--prior_kernel_size", type=int, default=pd.kernel_size,
                   help="masked convolution width (pixelcnn)")
    p.add_argument("--prior_dropout", type=float, default=pd.dropout, help="dropout on embeddings and MLPs")
    p.add_argument("--prior_num_samples", type=int, default=16, help="samples in each epoch's grid")
    return p


if __name__ == "__main__":
    args = get_parser().parse_args()
    args.given = given_flags(sys.argv[1:])
    run_main(main, args)
