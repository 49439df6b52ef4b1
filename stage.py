"""The harness every training stage shares: its run folder and log, its start (a new run, or a stage on
the run's frozen best.pt that resumes, or retires when best.pt changed since), the splits it trains on,
its resume, the learning-rate schedule, and the end of each epoch (the NaN check, metrics csv, best and
last checkpoints, the log line; the csv's columns for the stage's curves). train.py (the VQ-VAE), prior_stage.py
and gan_stage.py each add only what is their own."""
import math
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

try:
    import fcntl
except ImportError:  # Windows: runs go unlocked
    fcntl = None

from config import stage_flag_names
from dataset import load_split, place, recorded_data_dir
from files import fingerprint, load_checkpoint, new_run_dir, save_checkpoint, write_csv, write_json
from metrics import encode_split
from runs import load_vqvae
from stopping import Stopped, finished, stop_message, stop_signal
from utils import ProjectError, configure_backends, pick_device, seed_everything, set_rng_state

STAGE_NAMES = {"prior": "prior", "decoder_gan": "adversarial decoder"}  # by checkpoint kind


# ----------------------------------------------------------------------------- the run folder

def open_log(path):
    """log(msg) prints a line above the progress bars and appends it to the run's log.txt."""
    try:
        log_file = open(path, "a")
    except OSError as e:
        raise ProjectError(f"cannot write {path}: {e.strerror}; pick another --out_dir") from None

    def log(msg, echo=True):
        if echo:
            tqdm.write(msg)
        try:
            print(msg, file=log_file, flush=True)
        except OSError as e:  # a full disk: the lines already in log.txt stay, and the run says so in one line
            then = ("free space and resume the run" if (Path(path).parent / "last.pt").is_file() else
                    "free space and start again with another --out_dir")
            raise ProjectError(f"could not write {path}: {e.strerror}; {then}") from None
    return log


def open_run_dir(out_dir, resumed, main_rank, world_size):
    """-> (the run folder, log): a new folder (or, `resumed`, the run's own), made and locked by rank 0
    and told to the other ranks; log(msg) writes on rank 0 only."""
    if main_rank:
        out_dir = Path(out_dir) if resumed else new_run_dir(out_dir)
        lock_run(out_dir)
        log = open_log(out_dir / "log.txt")
    else:
        log = lambda msg, echo=True: None  # noqa: E731
    if world_size > 1:  # every rank learns rank 0's run folder
        box = [str(out_dir)]
        dist.broadcast_object_list(box, src=0)
        out_dir = box[0]
    return Path(out_dir), log


_held = {}  # run folder (resolved) -> the open lock file this process holds on it


def lock_run(run_dir):
    """Hold run_dir/.lock for the rest of this process, so that no second process (a second train.py
    into the same --out_dir, a --resume of a run still training) writes into the folder: it is refused
    in one line naming the holder. The lock is an flock, which the OS lets go of when its process ends
    however it ends, so the lock of a dead process is taken over; a file system without flock runs
    unlocked."""
    run_dir = Path(run_dir)
    key = str(run_dir.resolve())
    if key in _held or fcntl is None:  # --stage all: the later stages of the same process
        return
    path = run_dir / ".lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise ProjectError(f"cannot write {path}: {e.strerror}; pick another --out_dir") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        for _ in range(100):  # the holder names itself right after it locks: wait up to a second for that
            holder = os.pread(fd, 1000, 0).decode(errors="replace").strip()
            if holder:
                break
            time.sleep(0.01)
        os.close(fd)
        holder = holder or "another process"
        raise ProjectError(f"run folder {run_dir} is in use by {holder}; wait for it to end, or stop it (it saves "
                           f"and stops on SIGTERM or Ctrl-C) and resume it, or pick another --out_dir") from None
    except OSError:  # no flock on this file system (some network ones): the run goes on unlocked
        pass
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()} ({' '.join(sys.argv)[:300]})\n".encode(), 0)
    except OSError as e:
        raise ProjectError(f"cannot write {path}: {e.strerror}; free space or pick another --out_dir") from None
    _held[key] = fd


def unlock_runs():
    """Let go of every run folder this process holds (at the end of train.main, for a caller that goes
    on in the same process)."""
    for fd in _held.values():
        os.close(fd)  # closing the file lets go of its flock
    _held.clear()


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
    lock_run(run_dir)  # before anything in the folder is moved or written
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

def lr_at(step, args, legs):
    """Learning rate for optimizer step `step` (0-based): constant as in the seed, or a linear warm-up
    over --warmup_steps (a tenth of the run when that is not shorter) then cosine decay to 0 at the
    end of the run. legs: the step at which each leg of the schedule ends: one leg, unless the run was
    extended on resume; a later leg follows the cosine laid over the run up to its own end (the rate a
    run planned that long would have had), reached by a warm-up of its own from the decayed rate."""
    if args.lr_schedule == "constant":
        return args.lr
    end = next((e for e in legs if e > step), legs[-1])
    start = max([0] + [e for e in legs if e <= step and e < end])  # the leg's first step
    warmup = warmup_steps(args.warmup_steps, legs[0])  # the run's own: where its cosine starts
    if step < warmup:
        return args.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, end - warmup)
    rate = args.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    if start:  # an extension: Adam has been taking tiny steps, so the rate rises to the cosine's again
        rate *= min(1.0, (step - start + 1) / warmup_steps(args.warmup_steps, end - start))
    return rate


def warmup_steps(flag, leg_steps):
    """The warm-up of a leg of leg_steps steps: --warmup_steps, or a tenth of the leg (at least a step)
    when the flag's is not shorter than it (a short run would otherwise never leave warm-up)."""
    return flag if flag < leg_steps else max(1, leg_steps // 10)


def set_lr(optimizer, step, args, legs):
    """Every parameter group at lr_at(step) (args: lr, lr_schedule, warmup_steps)."""
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, args, legs)


def schedule_lines(args, legs, steps_per_epoch, start_epoch, flag, what):
    """The schedule of `what` in steps (legs in epochs -> the step at which each ends), and the log
    lines a user should read about it: a warm-up scaled down to fit, a new leg starting now."""
    steps = [e * steps_per_epoch for e in legs]
    lines = []
    if args.lr_schedule == "cosine":
        first = legs[-2] + 1 if len(legs) > 1 else 1
        leg_steps = steps[-1] - (steps[-2] if len(legs) > 1 else 0)
        warmup = warmup_steps(args.warmup_steps, leg_steps)
        if len(legs) > 1 and start_epoch == first:
            peak = lr_at(steps[-2] + warmup - 1, args, steps)
            lines.append(f"epochs {first}-{legs[-1]} of {what} are a new leg of its cosine schedule, which had "
                         f"decayed: the rate rises over {warmup} step{'' if warmup == 1 else 's'} to {peak:.2g} (a "
                         f"{legs[-1]}-epoch run's at epoch {first}), then decays to 0 at epoch {legs[-1]}")
        if warmup != args.warmup_steps and start_epoch <= legs[-1]:
            lines.append(f"{flag} {args.warmup_steps} is not shorter than {what}"
                         + ("'s new leg" if len(legs) > 1 else "") + f" ({leg_steps} steps): warming up over "
                         f"{warmup} step{'' if warmup == 1 else 's'} instead")
    return steps, lines


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


# ----------------------------------------------------------------------------- inside an epoch

class Pause:
    """The moments between two training steps at which a stage saves where it is inside an epoch: every
    --save_every_steps steps (`every`; 0: never) and, once a stop signal came (stopping.deferred_signals),
    at the end of the step under way, after which the stage stops (Stopped: one line, 128 + the
    signal). What is saved is the stage's last checkpoint, made by checkpoint(epoch - 1, partial): its
    "epoch" stays the last finished one, and its "partial" entry is partial = {"epoch", "step": steps
    done in it, the epoch's batch "order", and what the stage adds: its sums so far, its generators}.
    Under torchrun the ranks agree on the signal at every step (over `group`), so all stop at the same
    one; rank 0 saves.
    `what`: the stage as the stop's line names it (" the prior"; stage 1: "")."""

    def __init__(self, files, checkpoint, every, what="", main_rank=True, world_size=1, group=None):
        self.files, self.checkpoint, self.every, self.what = files, checkpoint, every, what
        self.main_rank, self.world_size, self.group = main_rank, world_size, group

    def after_step(self, epoch, done, n_steps, global_step, state):
        """`done` of the epoch's n_steps steps are done (global_step of the run's); state() -> what the
        stage adds to the partial entry (a collective under torchrun: every rank calls it)."""
        signum = stop_signal()
        if self.world_size > 1:  # one tiny CPU collective (gloo) per step: no GPU sync
            flag = torch.tensor([signum or 0])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
            signum = int(flag) or None
        due = self.every and global_step % self.every == 0 and done < n_steps  # the epoch's end saves anyway
        if not (signum or due):
            return
        partial = {"epoch": epoch, "step": done, **state()}
        if self.main_rank:
            save_checkpoint(self.files.last, self.checkpoint(epoch - 1, partial))
        if signum:
            if self.world_size > 1:  # no rank ends before rank 0 has saved: torchrun stops the rest at the first exit
                dist.barrier(group=self.group)
            finished()  # the stop is saved: torchrun's own SIGTERM to the ranks changes nothing now
            message = stop_message(signum, f"{self.what} at epoch {epoch}, step {done} of {n_steps}")
            self.files.log(message, echo=False)  # the terminal gets it once, from run_main
            raise Stopped(message if self.main_rank else "", signum)


def resume_command(run_dir, stage="all", world_size=1):
    """The command that goes on with the run in run_dir where a stop leaves it: --stage only when one
    stage was asked for, torchrun as the run was started."""
    start = f"torchrun --nproc_per_node {world_size} train.py" if world_size > 1 else "python train.py"
    return start + (f" --stage {stage}" if stage != "all" else "") + f" --resume {run_dir}"


def resume_partial(ckpt, epoch, order):
    """The partial entry of a resumed checkpoint when it is inside `epoch` (else None), checked against
    the epoch's batch order now (order: the epoch's index tensors, concatenated)."""
    partial = ckpt.get("partial") if ckpt else None
    if not partial or partial["epoch"] != epoch:
        return None
    if not torch.equal(partial["order"].cpu(), order.cpu()):
        raise ProjectError(f"cannot resume inside epoch {epoch}: its batches are not those the run was stopped in "
                           f"(the training split changed since); restore the data, or resume from best.pt")
    return partial
