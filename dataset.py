"""HipMRI 2D slices: NIfTI files -> one tensor per split (cached on disk, placed on the device) -> batches.

A data folder holds `keras_slices_train`, `keras_slices_validate` and `keras_slices_test` (label
folders `keras_slices_seg_*` beside them are ignored). Each split is used as given: patients never
move between splits. Without a data folder the synthetic phantom (phantom.py) is used.
"""
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

import phantom
from utils import ProjectError, save_checkpoint, to_model

SPLITS = {"train": "keras_slices_train", "validate": "keras_slices_validate", "test": "keras_slices_test"}
PHANTOM_DIR = Path(__file__).resolve().parent / "data" / "hipmri_phantom"
# Decoded splits (git-ignored); the environment variable moves it, e.g. off a small home disk.
CACHE_DIR = Path(os.environ.get("VQVAE_CACHE_DIR", Path(__file__).resolve().parent / "cache"))
CACHE_VERSION = 1  # bump when the pre-processing changes, so old caches are never read


def resolve_data_dir(data_dir):
    """`data_dir` checked for the three split folders; None -> the phantom, generated on first use."""
    if data_dir is None:
        print(f"data: using the synthetic pelvic MR phantom in {PHANTOM_DIR} "
              f"(pass --data_dir /path/to/keras_slices_data for the real HipMRI slices)")
        return phantom.generate(PHANTOM_DIR)
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise ProjectError(f"--data_dir {data_dir} does not exist; point it at the folder that holds "
                           f"{', '.join(SPLITS.values())}")
    missing = [d for d in SPLITS.values() if not (data_dir / d).is_dir()]
    if missing:
        found = sorted(p.name for p in data_dir.iterdir())[:8]
        raise ProjectError(f"--data_dir {data_dir} lacks {', '.join(missing)} (found: "
                           f"{', '.join(found) or 'nothing'}); it must hold {', '.join(SPLITS.values())}")
    return data_dir


def load_slice(path):
    """One 2D slice from a .nii/.nii.gz file -> float32 (H, W). Raises ProjectError on bad input."""
    try:
        data = np.asanyarray(nib.load(path).dataobj)
    except Exception as e:  # nibabel and gzip raise many types for foreign or truncated files
        raise ProjectError(f"cannot read {path} as NIfTI ({type(e).__name__}: {e}); "
                           f"remove or replace the file") from None
    if data.ndim == 3 and 1 in data.shape:
        data = data.squeeze(axis=data.shape.index(1))
    if data.ndim != 2:
        raise ProjectError(f"{path} has shape {data.shape}, not a 2D slice; cut volumes into one 2D "
                           f"slice per file (e.g. nibabel: vol.dataobj[:, :, k] for each k)")
    data = data.astype(np.float32)
    if not np.isfinite(data).all():
        raise ProjectError(f"{path} contains NaN or Inf values; fix or remove the file")
    return data


def stem(path):
    """File name without .nii or .nii.gz."""
    return Path(path).name.removesuffix(".gz").removesuffix(".nii")


def scale_unit(a):
    """Min-max scale to [0, 1]; a constant slice maps to zeros (no division by zero)."""
    lo, hi = float(a.min()), float(a.max())
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


@dataclass
class SliceSet:
    """A decoded split: images (N, 1, H, W) float16 in [0, 1], and per slice its file, original
    shape and intensity range (to map reconstructions back onto the source grid)."""
    images: torch.Tensor
    files: list
    shapes: list
    ranges: list


def split_key(folder, files, image_size):
    """What a decoded split depends on: the folder, every file's name, size and modification time,
    the target size and the pre-processing version. Any change gives another key."""
    h = hashlib.sha1(f"v{CACHE_VERSION}|{Path(folder).resolve()}|{image_size[0]}x{image_size[1]}".encode())
    for f in files:
        st = f.stat()
        h.update(f"|{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def load_split(data_dir, split, image_size, cache_dir=CACHE_DIR):
    """Every slice of one split, scaled to [0, 1] and resized to `image_size` (H, W), decoded once:
    later runs read the decoded tensor from `cache_dir` (None: no cache) while the files are
    unchanged. A cache that is stale, corrupt or unreadable is rebuilt, never trusted."""
    folder = Path(data_dir) / SPLITS[split]
    files = sorted((p for p in folder.iterdir() if p.name.endswith((".nii", ".nii.gz"))),
                   key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)])
    if not files:
        raise ProjectError(f"split folder {folder} holds no .nii or .nii.gz files")
    key = split_key(folder, files, image_size)
    path = cache_dir and Path(cache_dir) / f"{split}_{image_size[0]}x{image_size[1]}_{key[:20]}.pt"
    cached = _read_cache(path, key, len(files), image_size)
    if cached:
        slices = SliceSet(cached["images"], files, cached["shapes"], cached["ranges"])
    else:
        slices = _decode_split(files, image_size)
    resized = sum(s != list(image_size) for s in slices.shapes)
    if resized:
        sizes = sorted({f"{h}x{w}" for h, w in slices.shapes})
        print(f"data: {split}: {len(files)} slices of sizes {', '.join(sizes)}; {resized} resized to "
              f"{image_size[0]}x{image_size[1]}")
    if path and not cached:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_checkpoint(path, {"key": key, "images": slices.images, "shapes": slices.shapes,
                                   "ranges": slices.ranges})
        except (OSError, ProjectError) as e:  # a cache that cannot be written costs speed, not the run
            print(f"data: could not cache {split} in {path.parent} ({e}); it will be decoded again next time")
    return slices


def _read_cache(path, key, n, image_size):
    """The cached split at `path` if it is whole and matches `key`, else None."""
    if not path or not path.is_file():
        return None
    try:
        c = torch.load(path, map_location="cpu", weights_only=True)
        if (c["key"] == key and c["images"].shape == (n, 1, *image_size) and c["images"].dtype == torch.float16
                and len(c["shapes"]) == len(c["ranges"]) == n):
            return c
    except Exception:  # truncated or foreign file: rebuilt below
        pass
    print(f"data: cache {path} is stale or damaged; decoding the split again")
    return None


def _decode_split(files, image_size):
    """Read and pre-process every file of a split -> SliceSet."""
    H, W = image_size
    images = torch.empty(len(files), 1, H, W, dtype=torch.float16)
    shapes, ranges = [], []
    for i, f in enumerate(files):
        a = load_slice(f)
        shapes.append(list(a.shape))
        ranges.append([float(a.min()), float(a.max())])
        x = torch.from_numpy(scale_unit(a))[None, None]  # (1, 1, h, w)
        if x.shape[-2:] != (H, W):
            x = F.interpolate(x, size=(H, W), mode="bilinear", antialias=True, align_corners=False)
        images[i] = x[0].clamp(0, 1)
    return SliceSet(images, files, shapes, ranges)


class SliceDataset(Dataset):
    """Items are slices (1, H, W) float32 in [-1, 1], the model's range (for a DataLoader of one's
    own; the scripts index the split's tensor directly, see epoch_batches)."""

    def __init__(self, slices: SliceSet):
        self.images = slices.images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return to_model(self.images[i])


def place(slices, device):
    """The split's images (N, 1, H, W) float16 in [0, 1], moved to `device` once. On CUDA a split
    that would take more than a quarter of the free memory stays in pinned host memory instead,
    and its batches are copied over as they are drawn."""
    x = slices.images
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return x.to(device) if x.numel() * x.element_size() < free // 4 else x.pin_memory()
    return x.to(device)


def num_batches(n, batch_size, world_size=1):
    """Batches per epoch of epoch_batches: a last batch that does not split over the processes is dropped."""
    full, rest = divmod(n, batch_size)
    return full + (rest > 0 and rest % world_size == 0)


def epoch_batches(n, batch_size, seed, epoch, device, rank=0, world_size=1):
    """One epoch's batches for this process: index tensors on `device` (where the split lives).

    The order is a permutation of range(n) drawn from (seed, epoch) alone, so a resumed run, a run
    on another device or on more GPUs sees the same batches. It is cut into global batches of `batch_size`; with
    world_size processes each takes its contiguous share of every global batch (a last batch that
    does not split evenly over the processes is dropped, so every rank steps the same times).
    """
    # Drawn on the CPU (identical on every device and every rank), moved once per epoch.
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    batches = torch.randperm(n, generator=g).to(device).split(batch_size)[:num_batches(n, batch_size, world_size)]
    return [b.view(world_size, -1)[rank] for b in batches] if world_size > 1 else batches


def get_batch(images, idx, device):
    """images (N, 1, H, W) float16 in [0, 1] (on the device or pinned on the host), idx (B,) on the
    same device -> (B, 1, H, W) float32 in [-1, 1] on `device`, without waiting on the device."""
    x = images[idx]
    if x.device.type == "cpu" and device.type == "cuda":
        x = x.pin_memory()  # the gathered batch is new memory: pinned, so the copy runs asynchronously
    return to_model(x.to(device, non_blocking=True))
