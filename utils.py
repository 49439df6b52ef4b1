"""The runtime every script shares: the project error, its one-line message and exit (and a stop's,
stopping.py), the one device picker with its backends and precision, seeding and the generator states a
resumed run restores, and the model's value range. Files are in files.py, metrics in metrics.py, figures
in figures.py."""
import os
import random
import sys

import numpy as np
import torch

from stopping import Stopped, catch_signals, finished


class ProjectError(Exception):
    """Bad input or environment: a script prints the message as one line and exits with code 2."""


def printable(text):
    """`text` with unprintable characters (newlines, lone surrogates) as Python escapes."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def one_line(e, limit=200):
    """An exception as short one-line text for a ProjectError: type and message, whitespace folded to
    single spaces (nibabel's messages hold newlines), unprintable characters escaped, cut at `limit`."""
    text = printable(" ".join(f"{type(e).__name__}: {e}".split()))
    return text if len(text) <= limit else text[:limit - 3] + "..."


def run_main(main, args):
    """Call main(args) with the stop signals caught (catch_signals); a ProjectError becomes one line on
    stderr and exit code 2, a stop one line and 128 + the signal's number."""
    catch_signals()
    try:
        main(args)
        finished()
    except ProjectError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Stopped as e:
        if str(e):
            print(e, file=sys.stderr)
        sys.exit(e.code)


def pick_device(name=None, local_rank=None):
    """The one device picker: `name` if given, else cuda, then mps, then cpu. Under torchrun
    (local_rank set) a CUDA process takes the GPU of its local rank."""
    if name:
        try:
            device = torch.device(name)
        except RuntimeError:
            raise ProjectError(f"--device {name} is not a device name; use cuda, cuda:N, mps or cpu") from None
        available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
        if not available.get(device.type, True):
            raise ProjectError(f"--device {name} was asked for but is not available here; use --device cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    elif torch.backends.mps.is_available():
        device = torch.device("mps")
    else:
        device = torch.device("cpu")
    if device.type == "cuda" and local_rank is not None:
        device = torch.device("cuda", local_rank)
    return device


def configure_backends(device, processes_per_node=1, precision="auto"):
    """Speed and precision settings for `device`: cuDNN autotuning on CUDA (the input size never
    changes), and TF32 convolutions only when the run computes in bf16 anyway (torch's default is
    TF32 for every cuDNN convolution, so --precision fp32 would not be fp32; matmuls are full fp32
    by torch's default); on the CPU, torch's default threads (one per physical core) for one
    process, and under torchrun each process's share of the cores it may run on, so that the
    processes do not oversubscribe them."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.allow_tf32 = uses_bf16(device, precision)
        if device.index is not None:  # a torchrun process: its own GPU by default
            torch.cuda.set_device(device)
    elif device.type == "cpu" and processes_per_node > 1:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        torch.set_num_threads(max(1, min(torch.get_num_threads(), cores) // processes_per_node))


def uses_bf16(device, precision):
    """--precision on `device`: auto is bf16 on CUDA GPUs that compute in it natively (Ampere and
    later; older ones only emulate it, slowly), fp32 elsewhere."""
    if precision != "auto":
        return precision == "bf16"
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8


def autocast_for(device, precision):
    """The forward pass's autocast context (bf16 or off, see uses_bf16). The quantizer's distances,
    its EMA updates and SSIM switch it off themselves, so they are fp32 always."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=uses_bf16(device, precision))


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state(device):
    """Generator states that decide what happens next: the global torch RNG and, on CUDA, that of
    `device` (the GPU this process trains on; under torchrun every rank's is the same). A CPU run
    never touches CUDA (reading a GPU's generator would start a CUDA context)."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        cuda = state["cuda"]  # checkpoints before torchrun support held a list, one per device
        torch.cuda.set_rng_state(cuda[device.index or 0] if isinstance(cuda, list) else cuda, device)


def to_model(x):
    """Stored images in [0, 1] (any float dtype) -> a new float32 tensor in [-1, 1], the model's range
    (one copy, then in place: a batch's worth of fresh memory per step instead of three)."""
    return x.to(torch.float32, copy=True).mul_(2).sub_(1)


def to_unit(x):
    """Model range [-1, 1] -> [0, 1], clamped: metrics and figures work on [0, 1]."""
    return ((x.float() + 1) / 2).clamp(0, 1)
