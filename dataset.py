"""HipMRI 2D slices: NIfTI files -> one tensor per split (cached on disk, placed on the device) -> batches.

A data folder holds `keras_slices_train`, `keras_slices_validate` and `keras_slices_test` (label
folders `keras_slices_seg_*` beside them are ignored). Each split is used as given: patients never
move between splits. Without a data folder the synthetic phantom (phantom.py) is used.
"""
import hashlib
import logging
import math
import os
import re
import stat
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

import phantom
from files import save_checkpoint
from utils import ProjectError, one_line, printable, to_model

SPLITS = {"train": "keras_slices_train", "validate": "keras_slices_validate", "test": "keras_slices_test"}
PHANTOM_DIR = Path(__file__).resolve().parent / "data" / "hipmri_phantom"
# Decoded splits (git-ignored); the environment variable moves it, e.g. off a small home disk.
CACHE_DIR = Path(os.environ.get("VQVAE_CACHE_DIR", Path(__file__).resolve().parent / "cache"))
CACHE_VERSION = 2  # bump when the pre-processing changes, so old caches are never read (2: scaling in float64)


def resolve_data_dir(data_dir, trained_by=None):
    """`data_dir` checked for the three split folders; None -> the phantom, generated on first use.
    trained_by: the checkpoint that recorded `data_dir` (the user typed none), named when it is gone."""
    if trained_by and not (data_dir is None or isinstance(data_dir, str) and (Path(data_dir).is_dir())):
        raise ProjectError(f"{shown(trained_by)} was trained on the data in {data_dir!r}, which is not a folder "
                           f"here (moved, or another machine?); pass --data_dir with the folder that holds "
                           f"{', '.join(SPLITS.values())}")
    if data_dir is None:
        print(f"data: using the synthetic pelvic MR phantom in {PHANTOM_DIR} "
              f"(pass --data_dir /path/to/keras_slices_data for the real HipMRI slices)")
        return phantom.generate(PHANTOM_DIR)
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise ProjectError(f"--data_dir {shown(data_dir)} does not exist; point it at the folder that holds "
                           f"{', '.join(SPLITS.values())}")
    missing = [d for d in SPLITS.values() if not (data_dir / d).is_dir()]
    if missing:
        found = sorted(shown(p.name) for p in data_dir.iterdir())[:8]
        raise ProjectError(f"--data_dir {shown(data_dir)} lacks {', '.join(missing)} (found: "
                           f"{', '.join(found) or 'nothing'}); it must hold {', '.join(SPLITS.values())}")
    return data_dir


def recorded_data_dir(config, checkpoint):
    """The data folder that a checkpoint's `config` says its run was trained on, checked as
    resolve_data_dir does (None: the phantom)."""
    if "data_dir" not in config:
        raise ProjectError(f"{shown(checkpoint)} does not record the data it was trained on; pass --data_dir "
                           f"with the folder that holds {', '.join(SPLITS.values())}")
    return resolve_data_dir(config["data_dir"], trained_by=checkpoint)


def load_slice(path):
    """One 2D slice from a .nii/.nii.gz file -> float32 (H, W), every value finite.

    Anything else raises ProjectError, one line that names the file and the fix: a broken link, a
    file that is not NIfTI or is truncated, a header that promises more data than the file holds, a
    volume, an empty, colour or complex slice, NaN/Inf or values beyond float32. The header is
    checked before any data is read, so a damaged one cannot make nibabel allocate what it claims
    (17 GB for a 36 KB file). Nothing else reaches the terminal: nibabel's log lines about header
    fixes and numpy's warnings are silenced for the load, the checks here say what matters.
    """
    name = shown(path)
    _stat(path)
    with quiet():
        try:
            img = nib.load(path)  # the header only; the data is read below
        except Exception as e:  # nibabel and gzip raise many types for foreign or truncated files
            raise _unreadable(name, e) from None
        if not isinstance(img, nib.Nifti1Image):  # NIfTI-2 and CIFTI-2 derive from it
            raise ProjectError(f"cannot read {name} as NIfTI (nibabel sees a {type(img).__name__}); "
                               f"save the slice as .nii.gz")
        proxy = img.dataobj  # what nibabel will read: shape, on-disk dtype, offset, scaling
        shape, dtype = tuple(int(n) for n in proxy.shape), proxy.dtype
        single = img.header.is_single  # one .nii(.gz) file: the pixels follow the header
        hw = _slice_shape(name, shape, dtype, proxy.offset, img.header.single_vox_offset if single else 0)
        need = proxy.offset + math.prod(shape) * dtype.itemsize
        try:
            raw = _read_at_most(path, need)
        except Exception as e:  # gzip: a damaged stream; OSError: the disk
            raise _unreadable(name, e) from None
        if len(raw) < need:
            unpacked = " once decompressed" if name.lower().endswith(".gz") else ""
            raise ProjectError(f"cannot read {name} as NIfTI: its header promises {'x'.join(map(str, shape))} "
                               f"{dtype.name} pixels ending at byte {need:,} but the file holds {len(raw):,} "
                               f"bytes{unpacked}; it is truncated or its header is damaged; remove or "
                               f"replace the file")
        try:  # nibabel decodes the bytes just checked (order, byte order, scaling), not the file again
            data = np.asanyarray(type(img).from_bytes(raw).dataobj)
        except Exception as e:
            raise _unreadable(name, e) from None
        # float64 holds every NIfTI type but float128 exactly, and nibabel's scaling may give float64.
        data = data.reshape(hw).astype(np.float64)
    if not np.isfinite(data).all():
        raise ProjectError(f"{name} contains NaN or Inf values; fix or remove the file")
    peak = float(np.abs(data).max())
    if peak > float(np.finfo(np.float32).max):
        raise ProjectError(f"{name} has values up to {peak:.3g}, beyond float32 (3.4e38); rescale the slice "
                           f"(e.g. divide by its maximum) or remove the file")
    return data.astype(np.float32)


def _unreadable(name, e):
    """The ProjectError for a file that nibabel or gzip failed on with exception `e`."""
    return ProjectError(f"cannot read {name} as NIfTI ({one_line(e)}); remove or replace the file")


def _slice_shape(name, shape, dtype, offset, min_offset):
    """The slice's (H, W) from the header's shape (a singleton third axis is dropped), or
    ProjectError for what no 2D intensity slice can be; nothing is read."""
    if dtype.fields is not None:  # RGB24 / RGBA32: a record of uint8 channels per pixel
        raise ProjectError(f"{name} is a colour image ({''.join(dtype.names)}); save a greyscale slice "
                           f"(one intensity per pixel, e.g. the mean of R, G and B)")
    if dtype.kind == "c":  # astype(float) would silently drop the imaginary part
        raise ProjectError(f"{name} holds complex values ({dtype.name}); save the magnitude (np.abs) "
                           f"as a real-valued slice")
    if dtype.kind not in "biuf":
        raise ProjectError(f"{name} holds {dtype} values, not intensities; save a numeric slice")
    if min(shape, default=0) < 0:
        raise ProjectError(f"cannot read {name} as NIfTI: its header gives negative dimensions {shape}, "
                           f"so it is damaged; remove or replace the file")
    if 0 in shape or not shape:
        raise ProjectError(f"{name} is empty (shape {shape}); remove the file")
    if len(shape) == 3 and 1 in shape:
        shape = shape[:shape.index(1)] + shape[shape.index(1) + 1:]
    if len(shape) != 2:
        raise ProjectError(f"{name} has shape {shape}, not a 2D slice; cut volumes into one 2D "
                           f"slice per file (e.g. nibabel: vol.dataobj[:, :, k] for each k)")
    # nibabel reads a single-file NIfTI with vox_offset 0 from byte 0: header bytes as pixels.
    if offset < min_offset:
        raise ProjectError(f"cannot read {name} as NIfTI: its header puts the pixels at byte {offset}, "
                           f"inside the {min_offset}-byte header, so it is damaged; remove or replace the file")
    return shape


def _read_at_most(path, limit):
    """The file's first `limit` bytes once decompressed (gzip by the .gz extension, as nibabel decides).

    Read in 1 MiB steps, so memory follows what the file holds, never what its header claims. This
    is the bound on a header's claim: for .nii the file size would do, but for .nii.gz the size is
    only known by decompressing (the gzip trailer's ISIZE is modulo 4 GiB and covers the last member
    only; deflate's 1032:1 ratio would still let a 1 MB file claim 1 GB).
    """
    buf = bytearray()
    with nib.openers.Opener(path) as f:
        while len(buf) < limit and (chunk := f.read(min(limit - len(buf), 1 << 20))):
            buf += chunk
    return buf


@contextmanager
def quiet():
    """Silence, for one load, what nibabel and numpy would print: nibabel's log lines about header
    problems it fixes or gives up on ("data code 1028 not recognized; not attempting fix", several
    per file, some over two lines) and numpy's overflow and cast warnings. The loader checks the
    result itself and reports in one line."""
    loggers = [logging.getLogger("nibabel"), nib.imageglobals.logger]  # the latter has its own handler
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL + 1)
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _stat(path):
    """os.stat of a slice file, or ProjectError for a symbolic link that leads nowhere (or in a loop),
    an entry that cannot be opened, or a folder, pipe or device named like a slice (a pipe would
    block the read forever)."""
    try:
        st = os.stat(path)
    except OSError as e:
        if os.path.islink(path):
            raise ProjectError(f"{shown(path)} is a symbolic link to a file that cannot be opened "
                               f"({e.strerror or e}); remove the link or restore its target") from None
        raise ProjectError(f"cannot open {shown(path)} ({e.strerror or e}); fix its permissions or "
                           f"remove it") from None
    if not stat.S_ISREG(st.st_mode):
        raise ProjectError(f"{shown(path)} is not a regular file (a folder, pipe or device); move it out "
                           f"of the split folder")
    return st


def shown(path):
    """`path` as one printable line: bytes that are not UTF-8 as \\xNN (caf\\xe9_slice_1.nii.gz) and
    control characters escaped, so a message naming any file stays one line and encodes as UTF-8."""
    return printable(os.fsencode(path).decode("utf-8", "backslashreplace"))


def stem(path):
    """File name without .nii or .nii.gz."""
    return Path(path).name.removesuffix(".gz").removesuffix(".nii")


SLICE_NAME = re.compile(r"(?P<volume>.+)_slice_(?P<position>\d+)")


def slice_position(path):
    """The slice's volume and position in it, from a release file name: case_004_week_0_slice_17.nii.gz ->
    ("case_004_week_0", 17); None when the name carries no position."""
    m = SLICE_NAME.fullmatch(stem(path))
    return (m["volume"], int(m["position"])) if m else None


def volume_layout(files):
    """-> (position (N,) long: each slice's position in its volume, -1 where the name has none;
    previous (N,) long: the index in `files` of the same volume's slice at position - 1, -1 where
    there is none: the first slice of a volume, or a gap)."""
    keys = [slice_position(f) for f in files]
    where = {k: i for i, k in enumerate(keys) if k}
    position = [k[1] if k else -1 for k in keys]
    previous = [where.get((k[0], k[1] - 1), -1) if k else -1 for k in keys]
    return torch.tensor(position, dtype=torch.long), torch.tensor(previous, dtype=torch.long)


def volumes_of(files):
    """{volume: [indices into files in position order]} of the files whose names carry a position."""
    vols = {}
    for i, k in enumerate(map(slice_position, files)):
        if k:
            vols.setdefault(k[0], []).append((k[1], i))
    return {v: [i for _, i in sorted(items)] for v, items in vols.items()}


def scale_unit(a):
    """(H, W) finite values -> float32 (H, W) min-max scaled to [0, 1]; a constant slice maps to zeros
    (no division by zero). Computed in float64: in float32, hi - lo overflows to Inf for values near
    ±3e38 and the slice would become NaN."""
    a = np.asarray(a, dtype=np.float64)
    lo, hi = a.min(), a.max()
    return ((a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)).astype(np.float32)


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
    the target size and the pre-processing version. Any change gives another key. Names are hashed as
    the file system's bytes (os.fsencode), so names that are not UTF-8 work too."""
    h = hashlib.sha1(f"v{CACHE_VERSION}|".encode() + os.fsencode(Path(folder).resolve())
                     + f"|{image_size[0]}x{image_size[1]}".encode())
    for f in files:
        st = _stat(f)
        h.update(b"|" + os.fsencode(f.name) + f":{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def load_split(data_dir, split, image_size, cache_dir=CACHE_DIR):
    """Every slice of one split, scaled to [0, 1] and resized to `image_size` (H, W), decoded once:
    later runs read the decoded tensor from `cache_dir` (None: no cache) while the files are
    unchanged. A cache that is stale, corrupt or unreadable is rebuilt, never trusted."""
    folder = Path(data_dir) / SPLITS[split]
    files = sorted((p for p in folder.iterdir() if p.name.endswith((".nii", ".nii.gz"))),
                   key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)])
    if not files:
        raise ProjectError(f"split folder {shown(folder)} holds no .nii or .nii.gz files")
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
    print(f"data: cache {shown(path)} is stale or damaged; decoding the split again")
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
        u = scale_unit(a)
        # Cannot happen for load_slice's finite float32 (scaled in float64), but a NaN let through
        # here would surface as a diverging loss, blamed on --lr.
        if not np.isfinite(u).all():
            raise ProjectError(f"scaling {shown(f)} to [0, 1] gave NaN or Inf (values {ranges[-1][0]:g} to "
                               f"{ranges[-1][1]:g}); remove the file")
        x = torch.from_numpy(u)[None, None]  # (1, 1, h, w)
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


def num_batches(n, batch_size, world_size=1, drop_last=False):
    """Batches per epoch of epoch_batches: a last batch that does not split over the processes is
    dropped, and with drop_last any last batch smaller than batch_size."""
    full, rest = divmod(n, batch_size)
    return full + (rest > 0 and rest % world_size == 0 and not drop_last)


def epoch_batches(n, batch_size, seed, epoch, device, rank=0, world_size=1, drop_last=False):
    """One epoch's batches for this process: index tensors on `device` (where the split lives).

    The order is a permutation of range(n) drawn from (seed, epoch) alone, so a resumed run, a run
    on another device or on more GPUs sees the same batches. It is cut into global batches of `batch_size`; with
    world_size processes each takes its contiguous share of every global batch (a last batch that
    does not split evenly over the processes is dropped, so every rank steps the same times).
    drop_last drops any smaller last batch, so that every step has the same shape (--compile).
    """
    # Drawn on the CPU (identical on every device and every rank), moved once per epoch.
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    batches = torch.randperm(n, generator=g).to(device).split(batch_size)[:num_batches(n, batch_size, world_size,
                                                                                       drop_last)]
    return [b.view(world_size, -1)[rank] for b in batches] if world_size > 1 else batches


def get_batch(images, idx, device):
    """images (N, 1, H, W) float16 in [0, 1] (on the device or pinned on the host), idx (B,) on the
    same device -> (B, 1, H, W) float32 in [-1, 1] on `device`, without waiting on the device."""
    x = images[idx]
    if x.device.type == "cpu" and device.type == "cuda":
        x = x.pin_memory()  # the gathered batch is new memory: pinned, so the copy runs asynchronously
    return to_model(x.to(device, non_blocking=True))


def augment(x, seed, step, flip=0.0, rotate=0.0, scale=0.0, shift=0.0, gamma=0.0, rank=0, world_size=1):
    """A training batch x (B, 1, H, W) float32 in [-1, 1] on its device -> the same batch randomly
    augmented, (B, 1, H, W) in [-1, 1], in one batched call on x's device with no host sync.

    Per slice: a left-right flip with probability `flip` (left-right is the first image axis, H: the
    release's coronal slices have rows running left-right), a rotation uniform in [-rotate, rotate]
    degrees, a zoom uniform in [1 - scale, 1 + scale], a shift uniform in [-shift, shift] of the size
    on each axis, and an intensity gamma exp(uniform(-gamma, gamma)) on the [0, 1] image. The draws
    come from a generator on x's device seeded by (seed, step) alone, so a rerun or a resumed run
    (same device) sees the same augmentations. Under torchrun x is this process's contiguous share of
    the global batch: the draws are made for the whole global batch and this rank takes its rows, so
    the processes do not repeat each other's draws. All settings 0: x itself, untouched.
    """
    if not (flip or rotate or scale or shift or gamma):
        return x
    B, _, H, W = x.shape
    g = torch.Generator(device=x.device)
    # A hash of (seed, step), not seed * k + step: two runs' steps never line up on one stream, nor
    # with the data order's generator (seeded by seed and epoch).
    g.manual_seed(int.from_bytes(hashlib.sha256(f"augment|{seed}|{step}".encode()).digest()[:8], "little"))
    # One column per setting, always all drawn: turning one setting on does not change another's draws.
    u = torch.rand(world_size * B, 6, device=x.device, generator=g)[rank * B:(rank + 1) * B]
    unit = (x + 1) / 2  # [0, 1]: grid_sample's zero padding is then air, the image's minimum
    if rotate or scale or shift or flip:
        angle = torch.deg2rad((2 * u[:, 1] - 1) * rotate)
        zoom = 1 + (2 * u[:, 2] - 1) * scale
        sign = torch.where(u[:, 0] < flip, -1.0, 1.0)  # -1 mirrors the H axis (affine_grid's y)
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        # affine_grid maps output to input positions in coordinates normalised to [-1, 1] per axis
        # (x: W, y: H); the rotation is made in pixels (H/W, W/H factors) so a non-square slice is
        # turned, not sheared. Shifting by a fraction f of the size is 2f in those coordinates.
        theta = torch.stack([
            torch.stack([cos, -sin * (H / W) * sign, 2 * shift * (2 * u[:, 3] - 1)], 1),
            torch.stack([sin * (W / H), cos * sign, 2 * shift * (2 * u[:, 4] - 1)], 1)], 1)  # (B, 2, 3)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        # Bilinear weights summing to 1 within rounding: clamped, so the batch stays in range.
        unit = F.grid_sample(unit, grid, mode="bilinear", padding_mode="zeros", align_corners=False).clamp(0, 1)
    if gamma:
        # 0 and 1 are fixed points of any gamma: air stays air, the brightest tissue stays brightest.
        unit = unit.clamp(0, 1).pow(torch.exp((2 * u[:, 5] - 1) * gamma)[:, None, None, None])
    return unit * 2 - 1
