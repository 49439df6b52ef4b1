"""The harness every training stage shares: its run folder and log, its start (a new run, or a stage on
the run's frozen best.pt that resumes, or retires when best.pt changed since), the splits it trains on,
its resume, the learning-rate schedule, and the end of each epoch (the NaN check, metrics csv, best and
last checkpoints, the log line; the csv's columns for the stage's curves). train.py (the VQ-VAE), prior_stage.py
and gan_stage.py each add only what is their own."""
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from config import stage_flag_names
from dataset import load_split, place, recorded_data_dir
from files import fingerprint, load_checkpoint, new_run_dir, save_checkpoint, write_csv, write_json
from metrics import encode_split
from runs import load_vqvae
from utils import ProjectError, configure_backends, pick_device, seed_everything, set_rng_state

STAGE_NAMES = {"prior": "prior", "decoder_gan": "adversarial decoder"}  # by checkpoint kind


# ----------------------------------------------------------------------------- the run folder

def open_log(path):
    """log(msg) prints a line above the progress bars and appends it to the run's log.txt."""
    try:
        log_file = open(path, "a")
    except OSError as e:
        raise ProjectError(f"cannot write {path}: {e.strerror}; pick another --out_dir") from None

    def log(msg):
        tqdm.write(msg)
        try:
            print(msg, file=log_file, flush=True)
        except OSError as e:  # a full disk: the lines already in log.txt stay, and the run says so in one line
            raise ProjectError(f"could not write {path}: {e.strerror}; free space and resume the run, or pick "
                               f"another --out_dir") from None
    return log


def open_run_dir(out_dir, resumed, main_rank, world_size):
    """-> (the run folder, log): a new folder (or, `resumed`, the run's own), made by rank 0 and told to
    the other ranks; log(msg) writes on rank 0 only."""
    if main_rank:
        out_dir = Path(out_dir) if resumed else new_run_dir(out_dir)
        log = open_log(out_dir / "log.txt")
    else:
        log = lambda msg: None  # noqa: E731
    if world_size > 1:  # every rank learns rank 0's run folder
        box = [str(out_dir)]
        dist.broadcast_object_list(box, src=0)
        out_dir = box[0]
    return Path(out_dir), log


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


# ----------------------------------------------------------------------------- start and data

@dataclass
class Frozen:
    """What a stage on run_dir's frozen best.pt starts from: best.pt (vq_ckpt at vq_path, vq_id the
    fingerprint the stage's checkpoints carry, vqvae the model in eval mode), the stage's own
    checkpoint under way (ckpt, or None), the device and the run's log."""
    vq_ckpt: dict
    vq_path: Path
    vq_id: str
    vqvae: torch.nn.Module
    ckpt: dict
    device: torch.device
    log: object


def start_frozen_stage(run, run_dir, last_path, kind, resume, patterns, typed, check=None):
    """The start of a stage on run_dir's frozen best.pt (the prior, the adversarial decoder): its
    checkpoint under way in last_path is resumed (its flags ruling, through `resume`), or, when it
    learned the codes of an earlier best.pt, its files (`patterns`) are moved aside and a new one starts;
    then `check` (the run's settings together), seeding, the device and the log -> (run, Frozen)."""
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
    return run, Frozen(vq_ckpt, vq_path, vq_id, load_vqvae(vq_ckpt, vq_path, device), ckpt, device, log)


def write_stage_config(run, frozen, prefix, name, **extra):
    """A stage's config file `name` in the run folder: its flags (those starting with `prefix`), the
    run's seed, the device and the best.pt it learned, and `extra` -> that config (its checkpoints hold it)."""
    config = {k: v for k, v in run.flags().items() if k in stage_flag_names(prefix)}
    config.update(seed=run.train.seed, device=str(frozen.device), **extra, vqvae_checkpoint=str(frozen.vq_path))
    write_json(frozen.vq_path.parent / name, config)
    return config


def load_splits(data_dir, image_size, device):
    """The training and validation splits -> ({split: SliceSet}, {split: images (N, 1, H, W) float16 in
    [0, 1] on the device})."""
    sets = {split: load_split(data_dir, split, image_size) for split in ("train", "validate")}
    return sets, {split: place(s, device) for split, s in sets.items()}


def encoded_splits(frozen, batch_size, precision):
    """The splits of the data best.pt trained on, and their code maps by the frozen VQ-VAE, each slice
    encoded once -> (sets, images as load_splits, {split: codes (N, h, w) long on the device})."""
    data_dir = recorded_data_dir(frozen.vq_ckpt["config"], frozen.vq_path)
    sets, images = load_splits(data_dir, frozen.vqvae.cfg.image_size, frozen.device)
    codes = {split: encode_split(frozen.vqvae, x, frozen.device, batch_size, precision) for split, x in images.items()}
    return sets, images, codes


def restore(ckpt, device, what, fix, **parts):
    """Resume a stage from its checkpoint: each of `parts` (a module or an optimizer, by its key in
    ckpt) loads its state, and the RNG its own -> (next epoch, best_val, history). A checkpoint whose
    parts do not load is one line: `what` is damaged; `fix`."""
    try:
        for key, part in parts.items():
            part.load_state_dict(ckpt[key])
        history = ckpt["history"]
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ProjectError(f"cannot resume {what}: it is damaged ({type(e).__name__}); {fix}") from None
    set_rng_state(ckpt["rng"], device)  # the batch order is a function of (seed, epoch): nothing else to restore
    return ckpt["epoch"] + 1, ckpt["best_val"], history


# ----------------------------------------------------------------------------- schedule

def lr_at(step, args, total_steps):
    """Learning rate for optimizer step `step` (0-based): constant as in the seed, or linear warm-up
    over --warmup_steps then cosine decay to 0 at the last step of --epochs."""
    if args.lr_schedule == "constant":
        return args.lr
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, total_steps - args.warmup_steps)
    return args.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def set_lr(optimizer, step, args, total_steps):
    """Every parameter group at lr_at(step) (args: lr, lr_schedule, warmup_steps)."""
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, args, total_steps)


# ----------------------------------------------------------------------------- each epoch's files

class StageFiles:
    """A stage's files in its run folder: its metrics csv (header: the column names), its last
    checkpoint (to resume) and best one (None: none), and the run's log; lr_flag names the flag a
    diverged stage should lower."""

    def __init__(self, run_dir, log, csv, header, last, best=None, lr_flag="--lr"):
        self.run_dir, self.log, self.header, self.lr_flag = Path(run_dir), log, header, lr_flag
        self.csv, self.last = self.run_dir / csv, self.run_dir / last
        self.best = best and self.run_dir / best

    def check_finite(self, values, what, epoch, per_step=False, validation=False):
        """Stop the stage in one line at the first NaN or Inf of `values` (numbers; each step's with
        per_step), before anything of this epoch is saved: the last checkpoint stays the last good one."""
        bad = next((i for i, v in enumerate(values) if not math.isfinite(v)), None)
        if bad is None:
            return
        if validation:
            where, then = f"after epoch {epoch}", "stopped without saving it"
        else:
            where = f"at epoch {epoch}" + (f", step {bad + 1}" if per_step else "")
            then = "stopped before it reached a checkpoint"
        raise ProjectError(f"{what} is {values[bad]} {where}; {then} (last good: {self.last}); try a lower "
                           f"{self.lr_flag}")

    def save(self, rows, ckpt, improved, line):
        """The end of an epoch: the csv of every row so far, the best checkpoint when `improved`, the last
        one (a kill before it leaves the epoch to redo), then the epoch's log line."""
        write_csv(self.csv, self.header, rows)
        if improved and self.best:
            save_checkpoint(self.best, ckpt)
        save_checkpoint(self.last, ckpt)
        self.log(line)

    def column(self, rows, name):
        """One csv column of `rows` (for the stage's curves)."""
        return [r[self.header.index(name)] for r in rows]
