"""Stage 2: the prior over the code maps of a run's frozen best.pt, trained on each slice's codes
(encoded once; flipped and augmented copies with --prior_aug_*, the copies redrawn every epoch with
--prior_aug_fresh) with its position and previous slice, optionally as an EMA of its weights, in the
run folder: prior_config.json, prior_metrics.csv, prior_best.pt (lowest validation NLL),
prior_last.pt, prior_epoch_NNN_samples.png and prior_nll_per_epoch.png. Started by train.py."""
import copy
import math
import time
from dataclasses import replace

import torch
from tqdm import tqdm

from config import resume_prior
from dataset import augment, epoch_batches, num_batches, volume_layout
from figures import save_curves, save_image_grid
from files import make_checkpoint
from metrics import BITS_PER_NAT, encode_split, prior_nll_bits
from prior import build_prior, conditions, nll_name
from stage import (Pause, StageFiles, encoded_splits, restore, resume_command, resume_partial, schedule_lines, set_lr,
                   start_frozen_stage, write_stage_config)
from stopping import deferred_signals
from utils import autocast_for, to_unit

PRIOR_METRICS = ["epoch", "train_nll_bits", "val_nll_bits", "val_conditioned_nll_bits", "seconds"]
GIVEN = {"position": "the position", "position+previous": "the position and previous slice"}


def train_prior(run, run_dir, typed=None):
    """Stage 2: train (or resume) the prior on the code maps of run_dir's frozen best VQ-VAE. `typed`:
    the flags typed now, checked against a prior already under way."""
    # ---- setup
    run, frozen = start_frozen_stage(run, run_dir, run_dir / "prior_last.pt", "prior", resume_prior, ("prior_*",),
                                     typed)
    args, device, log = run.prior_train, frozen.device, frozen.log
    files = StageFiles(run_dir, log, "prior_metrics.csv", PRIOR_METRICS, "prior_last.pt", "prior_best.pt",
                       "--prior_lr")

    # ---- data: every slice encoded once, the prior never sees an image
    codes, layout, cfg, redraw_copies = prior_data(run, frozen)
    n_train = len(codes["train"])
    val_cond = conditions(codes["validate"], *layout["validate"], cfg)
    config = write_stage_config(run, frozen, "prior_", "prior_config.json", lr_legs=run.legs_of("prior_train"))

    # ---- model: with --prior_ema, `shadow` (the average) is validated, sampled and saved as the prior
    prior = build_prior(cfg).to(device)
    shadow = copy.deepcopy(prior).requires_grad_(False) if args.ema else prior
    log(f"prior: {sum(p.numel() for p in prior.parameters()) / 1e6:.2f}M parameters, {cfg.arch} over "
        f"{cfg.latent_h}x{cfg.latent_w} = {cfg.latent_h * cfg.latent_w} codes; {n_train} train / "
        f"{len(codes['validate'])} validation code maps; conditioned on {cfg.condition}"
        + (f" ({cfg.num_positions} slice positions)" if cfg.condition != "none" else ""))

    # ---- optimizer
    optimizer = torch.optim.AdamW(prior.parameters(), lr=args.lr, weight_decay=args.weight_decay)

    # ---- resume
    start_epoch, best_val, rows = 1, float("inf"), []
    if frozen.ckpt:
        start_epoch, best_val, history = restore(frozen.ckpt, device, f"the prior from {files.last}",
                                                 f"delete {run_dir}/prior_*.pt to train a new one", model=shadow,
                                                 optimizer=optimizer, **({"trained": prior} if args.ema else {}))
        # rows written before the conditioned NLL existed repeat the NLL in its column
        rows = [r if len(r) == len(PRIOR_METRICS) else r[:3] + r[2:] for r in history["rows"]]
        inside = frozen.ckpt.get("partial")
        log(f"resumed the prior in {run_dir} " + (f"at epoch {inside['epoch']}, step {inside['step']}" if inside else
                                                  f"after epoch {start_epoch - 1}")
            + f" (best validation NLL {best_val:.4f} bits per code)")
    legs, lines = schedule_lines(args, run.legs_of("prior_train"), num_batches(n_train, args.batch_size), start_epoch,
                                 "--prior_warmup_steps", "the prior's run")
    for line in lines:
        log(line)

    # ---- loop: a stop signal ends the step under way, which is saved to resume from (stage.Pause)
    def checkpoint(epoch, partial=None):  # the average as "model" (what predict.py loads), the trained weights apart
        return make_checkpoint("prior", shadow, config, optimizer, epoch, best_val, {"rows": rows}, device,
                               vqvae=frozen.vq_id, trained=prior.state_dict() if args.ema else None, partial=partial)
    pause = Pause(files, checkpoint, run.train.save_every_steps, " the prior")
    with deferred_signals(resume_command(run_dir, run.train.stage)):
        for epoch in range(start_epoch, args.epochs + 1):
            t0 = time.time()
            if args.aug_fresh:
                codes["copies"], codes["copies_previous"] = redraw_copies(epoch)
            train_bits = prior_epoch(prior, optimizer, codes, layout["train"], cfg, run, epoch, legs, device,
                                     frozen.ckpt, pause, shadow if args.ema else None)
            files.check_finite([train_bits], "prior training NLL", epoch)
            # Chosen by the unconditional NLL: the samples' (and comparable with unconditional priors).
            val_bits = prior_nll_bits(shadow, codes["validate"], args.batch_size, device, run.train.precision)
            files.check_finite([val_bits], "prior validation NLL", epoch, validation=True)
            cond_bits = (prior_nll_bits(shadow, codes["validate"], args.batch_size, device, run.train.precision,
                                        *val_cond) if cfg.condition != "none" else val_bits)
            rows.append([epoch, train_bits, val_bits, cond_bits, time.time() - t0])
            save_prior_samples(run_dir, shadow, frozen.vqvae, epoch, val_bits, run, device)

            # ---- save
            improved = val_bits < best_val
            best_val = min(best_val, val_bits)
            ckpt = checkpoint(epoch)
            nll = nll_name(cfg.arch)
            files.save(rows, ckpt, improved, f"prior epoch {epoch:3d} | train {nll} {train_bits:.4f} | val {nll} "
                       f"{val_bits:.4f} bits per code"
                       + (f" ({cond_bits:.4f} given {GIVEN[cfg.condition]})" if cfg.condition != "none" else "")
                       + f" | {rows[-1][-1]:.0f}s" + (" | best" if improved else ""))

    columns = {"train": "train_nll_bits", "validation": "val_nll_bits"}
    if cfg.condition != "none":
        columns[f"validation, given {GIVEN[cfg.condition]}"] = "val_conditioned_nll_bits"
    save_curves(run_dir / "prior_nll_per_epoch.png", {k: files.column(rows, c) for k, c in columns.items()}, "epoch",
                f"{nll_name(cfg.arch)} (bits per code)", f"prior {nll_name(cfg.arch)} per epoch ({cfg.num_embeddings} "
                f"codes: {math.log2(cfg.num_embeddings):.0f} bits is uniform)")
    log(f"done: best prior validation {nll_name(cfg.arch)} {best_val:.4f} bits per code; checkpoint {files.best}")


def prior_data(run, frozen):
    """The code maps the prior trains and validates on -> (codes {"train", "validate": (N, h, w); with
    --prior_aug_flip "flipped", those of the flipped training slices; with --prior_aug_copies "copies"
    and "copies_previous"} long on the device, {split: (position (N,), previous (N,))} from the file
    names (dataset.volume_layout), the PriorConfig with the positions seen in training, and
    redraw_copies(epoch) -> that epoch's copies (augmented_codes) for --prior_aug_fresh)."""
    args, cfg, precision, device = run.prior_train, run.prior, run.train.precision, frozen.device
    sets, images, codes = encoded_splits(frozen, args.batch_size, precision)
    if args.aug_flip:
        codes["flipped"] = encode_split(frozen.vqvae, images["train"].flip(2), device, args.batch_size, precision)
    layout = {split: [t.to(device) for t in volume_layout(s.files)] for split, s in sets.items()}
    def redraw_copies(epoch):  # epoch 0: the copies drawn once (without --prior_aug_fresh)
        return augmented_codes(frozen.vqvae, images["train"], layout["train"][1], args, run.train.seed, device,
                               precision, first=epoch * args.aug_copies)
    if args.aug_copies and not args.aug_fresh:
        codes["copies"], codes["copies_previous"] = redraw_copies(0)
    if cfg.condition != "none":  # positions seen in training; others (and names without one) go unconditioned
        cfg = replace(cfg, num_positions=int(layout["train"][0].max()) + 1)
    return codes, layout, cfg, redraw_copies


def prior_epoch(prior, optimizer, codes, layout, cfg, run, epoch, legs, device, ckpt=None, pause=None, shadow=None):
    """One epoch of the prior over the training maps (prior_batch draws each batch), from the step the
    resumed checkpoint `ckpt` stopped at when it stopped inside this epoch -> the training NLL in bits
    per code, averaged over the epoch's maps. legs: the schedule (stage.lr_at); pause: stage.Pause;
    shadow: with --prior_ema, the average of prior's weights, moved towards them after every step."""
    args = run.prior_train
    n_train = len(codes["train"])
    batches = epoch_batches(n_train, args.batch_size, run.train.seed, epoch, device)
    order = torch.cat(batches)
    partial = resume_partial(ckpt, epoch, order)
    prior.train()
    total = torch.zeros((), device=device)  # summed on the device: no host sync per step
    g = torch.Generator(device).manual_seed(run.train.seed * 100_003 + epoch)  # the drops: resumable
    if partial:
        total.copy_(partial["total"])
        g.set_state(partial["generator"])
    start = partial["step"] if partial else 0
    for step in tqdm(range(start, len(batches)), desc=f"prior epoch {epoch}/{args.epochs}", leave=False,
                     dynamic_ncols=True, initial=start, total=len(batches)):
        batch = prior_batch(codes, layout, batches[step], cfg, args, g)
        with autocast_for(device, run.train.precision):
            nll = prior.nll(*batch, generator=g, noise=args.token_noise)  # (B,) nats per code; masks, noise from g
        loss = nll.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        set_lr(optimizer, (epoch - 1) * len(batches) + step, args, legs)
        optimizer.step()
        if shadow is not None:
            t = (epoch - 1) * len(batches) + step  # the decay warms up (as timm's ModelEmaV2), so the
            update_ema(shadow, prior, min(args.ema, (1 + t) / (10 + t)))  # random start fades fast
        total += nll.detach().sum()
        if pause:
            pause.after_step(epoch, step + 1, len(batches), (epoch - 1) * len(batches) + step + 1,
                             lambda: {"order": order, "total": total.clone(), "generator": g.get_state()})
    return total.item() / n_train * BITS_PER_NAT


def save_prior_samples(run_dir, prior, vqvae, epoch, val_bits, run, device):
    """The epoch's grid of samples, drawn with the same seed every epoch, so the grids show the prior
    changing, not the draw."""
    args = run.prior_train
    g = torch.Generator(device).manual_seed(run.train.seed)
    with autocast_for(device, run.train.precision):
        samples = to_unit(vqvae.decode_indices(prior.sample(args.num_samples, generator=g))).cpu()
    save_image_grid(run_dir / f"prior_epoch_{epoch:03d}_samples.png", samples,
                    f"prior epoch {epoch}: {len(samples)} samples (temperature 1), validation "
                    f"{nll_name(prior.cfg.arch)} "
                    f"{val_bits:.3f} bits per code")


@torch.no_grad()
def update_ema(shadow, model, decay):
    """shadow's weights <- decay * shadow's + (1 - decay) * model's (Polyak averaging; the priors have
    no buffers)."""
    torch._foreach_lerp_(list(shadow.parameters()), list(model.parameters()), 1 - decay)


# ----------------------------------------------------------------------------- the training batches

PRIOR_AUG = {"rotate": 5, "scale": 0.05, "shift": 0.03, "gamma": 0.1}  # --prior_aug_copies' ranges: the study's


@torch.no_grad()
def augmented_codes(vqvae, images, previous, args, seed, device, precision, first=0):
    """--prior_aug_copies K copies of the training split's code maps -> (maps (K, N, h, w), the maps of
    their previous slices (K, N, h, w)), long on the device. images: (N, 1, H, W) in [0, 1]; previous:
    (N,) each slice's previous slice's index, -1 for none. A slice and its previous slice go through
    dataset.augment as the two channels of one image, so in each copy they share one transform and
    stay neighbours; the draws are seeded by (seed, copy first + k, chunk), so a resumed prior sees the
    same, and other values of `first` draw other copies."""
    maps = []
    chunks = torch.arange(len(images), device=images.device).split(args.batch_size)
    for k in range(args.aug_copies):
        for c, i in enumerate(chunks):
            pair = torch.cat([images[i], images[previous[i].clamp_min(0)]], 1).float() * 2 - 1  # (b, 2, H, W)
            # Negative steps: never a training step's, so these draws are not the VQ-VAE's.
            pair = (augment(pair, seed, -1 - (first + k) * len(chunks) - c, **PRIOR_AUG) + 1) / 2
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
