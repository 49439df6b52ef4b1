"""Files, written one way: atomic writes (a kill or a full disk leaves the previous file intact), the
background writer of rank 0's per-epoch files, the one checkpoint layout with its writer and reader
(tensors and plain types only), the fingerprint that ties a stage to its VQ-VAE, and run folders."""
import gzip
import hashlib
import json
import os
import pickle
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from utils import ProjectError, rng_state

RUNS_ROOT = Path("runs")


def atomic_write(path, write):
    """The one writer of output files: write(f) fills a binary file object. It goes to a temporary
    file in the same folder, is fsynced, then renamed over `path`, so a kill or a full disk at any
    moment leaves the previous file intact."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError of its own
        tmp.unlink(missing_ok=True)
        why = (e.strerror if isinstance(e, OSError) and e.strerror else
               f"the write broke off ({' '.join(str(e).split())[:120]}), as when the disk is full")
        raise ProjectError(f"could not write {path}: {why}; free space or pick another --out_dir (the "
                           f"previous {path.name}, if any, is intact)") from None
    except BaseException:  # Ctrl-C mid-save: no half-written temporary file left behind
        tmp.unlink(missing_ok=True)
        raise


class Writer:
    """Runs rank 0's per-epoch writing (figures, checkpoints) in one worker thread when `background`
    (on CUDA, so the GPU trains the next epoch meanwhile), else at once. Jobs run in order; their
    tensors are copied to the host first, since training goes on changing the live ones. The first
    error (a ProjectError, e.g. a full disk) is returned by failure() or close(), never lost."""

    def __init__(self, background):
        self.pool = ThreadPoolExecutor(1) if background else None
        self.jobs, self.error = [], None

    def submit(self, fn, *args):
        if self.pool is None:
            try:
                fn(*args)
            except ProjectError as e:
                self.error = self.error or e
        else:
            self.jobs.append(self.pool.submit(fn, *_to_host(args)))

    def failure(self, wait=False):
        """The first error of a finished job (of every job, with wait=True), or None."""
        while self.jobs and (wait or self.jobs[0].done()):
            try:
                self.jobs.pop(0).result()
            except ProjectError as e:
                self.error = self.error or e
        return self.error

    def close(self):
        error = self.failure(wait=True)
        if self.pool is not None:
            self.pool.shutdown()
        return error


def _to_host(obj):
    """A copy of obj with every tensor copied to the CPU (dicts, lists and tuples rebuilt)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_host(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_host(v) for v in obj)
    return obj


def make_checkpoint(kind, model, config, optimizer=None, epoch=0, best_val=float("inf"), history=None, device=None,
                    model_args=None, **extra):
    """The one checkpoint layout, of tensors and plain types only (torch.load(weights_only=True)):
    kind ("vqvae", "prior" or "decoder_gan"); model, the plain module's weights, and model_args, its
    config as a dict (model.cfg's unless given: a decoder_gan's are its VQ-VAE's, whose Decoder it is),
    from which model_args alone rebuilds it; config, the run's flags as config.json holds them;
    optimizer, epoch and best_val (the lowest validation loss so far); rng, the generator states that
    decide the rest of the run; history (the metrics rows so far); and for a prior or a decoder_gan,
    vqvae, the fingerprint of the VQ-VAE whose codes it learned (a decoder_gan also holds its
    discriminator's weights, disc, and optimizer, disc_optimizer). An extra given as None is left out,
    so a stage passes its optional entries (a stop's "partial") as they are."""
    return {"kind": kind, "model": model.state_dict(), "model_args": model_args or model.cfg.to_dict(),
            "config": config, "optimizer": optimizer.state_dict() if optimizer else {}, "epoch": epoch,
            "best_val": best_val, "rng": rng_state(device or torch.device("cpu")), "history": history or {},
            **{k: v for k, v in extra.items() if v is not None}}


def save_checkpoint(path, ckpt):
    """The one checkpoint writer (atomic): `ckpt` holds tensors and plain types only."""
    atomic_write(path, lambda f: torch.save(ckpt, f))


def write_json(path, obj):
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def write_nifti_gz(path, img):
    """A nibabel image -> gzipped NIfTI at `path`, through the one atomic writer."""
    atomic_write(path, lambda f: f.write(gzip.compress(img.to_bytes(), compresslevel=1)))  # level 1 as nibabel writes .nii.gz: 2x faster, a few % larger


def make_dir(path):
    """mkdir -p for an output folder: one that cannot be made (a full disk, no permission) is one line."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ProjectError(f"cannot create {path}: {e.strerror}; free space or pick another --out_dir") from None


def write_csv(path, header, rows):
    """Rewrite a whole CSV atomically: floats with 6 significant digits."""
    lines = [",".join(header)] + [",".join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in r)
                                  for r in rows]
    atomic_write(path, lambda f: f.write(("\n".join(lines) + "\n").encode()))


def load_checkpoint(path, map_location="cpu", kind="vqvae"):
    """Load a checkpoint with weights_only=True, so pickled code in it never runs, and check that
    it is a `kind` checkpoint of this project."""
    path = Path(path)
    if not path.is_file():
        raise ProjectError(f"checkpoint {path} does not exist; check the path (runs/NNN/best.pt or last.pt)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # Only a global the safe unpickler would not import means code; other unpickler errors
        # (an unknown opcode, a short read) are damage.
        if "Unsupported global" in str(e):
            raise ProjectError(f"refused {path}: it holds pickled objects other than tensors and plain "
                               f"types (possibly code), which were not run; use a checkpoint written by "
                               f"this project") from None
        raise ProjectError(f"cannot load checkpoint {path}: it is corrupt or truncated "
                           f"({' '.join(str(e).split())[:200]})") from None
    except Exception as e:  # torch raises several types for truncated or foreign files
        first = " ".join((str(e).strip().splitlines() or [type(e).__name__])[0].split())[:200]
        raise ProjectError(f"cannot load checkpoint {path}: it is corrupt, truncated or not a "
                           f"checkpoint of this project ({first})") from None
    missing = {"model", "model_args", "config"} - set(ckpt if isinstance(ckpt, dict) else ())
    if missing:
        raise ProjectError(f"{path} is not a checkpoint of this project (it lacks {sorted(missing)})")
    weights, epoch = ckpt["model"], ckpt.get("epoch", 0)
    if (not isinstance(ckpt["model_args"], dict) or not isinstance(ckpt["config"], dict)
            or not isinstance(weights, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                        for k, v in weights.items())
            or not isinstance(ckpt.get("kind", "vqvae"), str) or type(epoch) is not int):
        raise ProjectError(f"{path} is not a checkpoint of this project (its model, model_args, config, "
                           f"kind or epoch is not what this project writes)")
    if ckpt.get("kind", "vqvae") != kind:
        wanted = {"vqvae": "the run's best.pt (or the run folder)", "prior": "the run's prior_best.pt",
                  "decoder_gan": "the run's decoder_gan.pt"}[kind]
        raise ProjectError(f"{path} is a {ckpt['kind']} checkpoint, but a {kind} checkpoint is needed "
                           f"here; pass {wanted}")
    if kind == "vqvae" and "image_size" not in ckpt["model_args"]:  # written before the model knew its input size
        ckpt["model_args"] = {"image_size": ckpt["config"].get("image_size"), **ckpt["model_args"]}
    return ckpt


def fingerprint(state_dict):
    """A short hash of a model's weights: ties a prior or an adversarial decoder to the exact VQ-VAE whose
    codes it learned."""
    h = hashlib.sha1()
    for name, t in sorted(state_dict.items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def new_run_dir(out_dir=None):
    """The one run folder: `out_dir` if given (must be new or empty), else the next runs/NNN."""
    if out_dir is None:
        RUNS_ROOT.mkdir(exist_ok=True)
        nums = [int(p.name) for p in RUNS_ROOT.iterdir() if re.fullmatch(r"\d+", p.name)]
        out_dir = RUNS_ROOT / f"{max(nums, default=0) + 1:03d}"
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ProjectError(f"--out_dir {out_dir} is a file, not a folder; pick a new --out_dir")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ProjectError(f"run folder {out_dir} already holds files; pick a new --out_dir "
                           f"(runs are never overwritten)")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ProjectError(f"cannot create run folder {out_dir}: {e.strerror}; pick another --out_dir") from None
    if not os.access(out_dir, os.W_OK):
        raise ProjectError(f"run folder {out_dir} is not writable; pick another --out_dir")
    return out_dir


def latest_checkpoint():
    """runs/NNN/best.pt of the highest-numbered run that has one."""
    runs = sorted((p for p in RUNS_ROOT.glob("*/best.pt") if re.fullmatch(r"\d+", p.parent.name)),
                  key=lambda p: int(p.parent.name))
    if not runs:
        raise ProjectError(f"no checkpoint found under {RUNS_ROOT}/; run `python train.py` first "
                           f"or pass --checkpoint")
    return runs[-1]
