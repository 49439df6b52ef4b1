"""Fuzzing the slice loader: a damaged NIfTI file loads as a finite 2D float32 array, or raises one
ProjectError whose message is one printable line naming the file; never another exception, and
nothing else printed, logged or warned.

Damage is drawn by hypothesis, seeded (derandomize=True, no example database), so every run tries
the same files: 400 examples in five families (header fields 150, truncation 60, byte flips 120,
damaged gzip streams 40, a split folder through load_split 30), each written as .nii or .nii.gz,
some under a name that is not UTF-8. Measured: 3 s of test time on one core (5 s with pytest and
torch starting up).
"""
import gzip
import os
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from dataset import SPLITS, load_slice, load_split, shown
from test_data import one_clean_line, quietly, write
from utils import ProjectError


def _bases():
    """Small valid slices as uncompressed bytes, with their header class: several on-disk types, a
    singleton third axis, intensity scaling, and NIfTI-2."""
    rng = np.random.default_rng(0)
    scaled = nib.Nifti1Image(rng.integers(0, 255, (6, 3), dtype=np.uint8), np.eye(4))
    scaled.header.set_slope_inter(0.5, 10)
    images = [nib.Nifti1Image(np.arange(20, dtype=np.int16).reshape(4, 5), np.eye(4)),
              nib.Nifti1Image(rng.uniform(-1, 1, (3, 6, 1)).astype(np.float32), np.eye(4)),
              scaled,
              nib.Nifti1Image(rng.normal(size=(2, 7)), np.eye(4)),
              nib.Nifti2Image(rng.integers(-1000, 1000, (5, 4), dtype=np.int32), np.eye(4))]
    return [(img.to_bytes(), type(img.header)) for img in images]


BASES = _bases()
NAMES = ["slice_1.nii", os.fsdecode(b"caf\xe9_slice_1.nii")]  # + ".gz" half the time
SETTINGS = settings(derandomize=True, database=None, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


# Values that reach the loader's checks more often than uniform bits do: small and absurd sizes,
# every NIfTI type code and some unknown ones, offsets around the header's end, scalings.
SIZES = [1, 2, 3, 4, 5, 6, 7, 0, -1, 32767]
PLAUSIBLE = {
    "dim": lambda rnd: [rnd.randint(-1, 9)] + rnd.choices(SIZES, k=7),
    "datatype": lambda rnd: rnd.choice([2, 4, 8, 16, 64, 256, 512, 768, 1024, 1280, 32, 1792, 128, 2304,
                                        1536, 2048, 0, 1, 255, -1, 3, 1028, 4096]),
    "vox_offset": lambda rnd: rnd.choice([352, 544, 0, 353, 348, 100, -16, 10**9, 10**18]),
    "scl_slope": lambda rnd: rnd.choice([2.0, 0.0, -1.0, 1e-30, 1e30, 1e38, 3e38]),
    "scl_inter": lambda rnd: rnd.choice([0.0, 1e30, -3e38, 3e38]),
}


@st.composite
def header_fields(draw):
    """A base slice with raw header fields set, past nibabel's checks: each field that decides what
    is read a quarter of the time to a plausible value (drawn uniformly: hypothesis alone tries few
    distinct ones in a few hundred examples), and up to two fields of any kind to any value of their
    type (hypothesis favours 0, -1, extremes, NaN and Inf)."""
    raw, header_class = draw(st.sampled_from(BASES))
    raw = bytearray(raw)
    layout = header_class.template_dtype
    header = np.frombuffer(raw, dtype=layout, count=1)  # a view into raw
    rnd = draw(st.randoms(use_true_random=False))
    for name, plausible in PLAUSIBLE.items():
        if rnd.random() < 0.25:
            header[name] = plausible(rnd)
    for name in draw(st.lists(st.sampled_from(layout.names), max_size=2, unique=True)):
        header[name] = draw(hnp.arrays(layout[name].base, layout[name].shape))
    return bytes(raw)


@st.composite
def truncated(draw):
    raw, _ = draw(st.sampled_from(BASES))
    return raw[:draw(st.integers(0, len(raw) - 1))]


@st.composite
def byte_flips(draw):
    """1 to 8 bytes XOR-ed, in the header (where most damage matters) or anywhere."""
    raw, header_class = draw(st.sampled_from(BASES))
    raw = bytearray(raw)
    end = draw(st.sampled_from([header_class.template_dtype.itemsize, len(raw)]))
    flips = st.lists(st.tuples(st.integers(0, end - 1), st.integers(1, 255)), min_size=1, max_size=8)
    for pos, mask in draw(flips):
        raw[pos] ^= mask
    return bytes(raw)


@st.composite
def damaged_gzip(draw):
    """A .nii.gz whose compressed stream is cut short or has bytes flipped (CRC, trailer, deflate data)."""
    raw, _ = draw(st.sampled_from(BASES))
    packed = bytearray(gzip.compress(raw, mtime=0))
    if draw(st.booleans()):
        return bytes(packed[:draw(st.integers(0, len(packed) - 1))])
    for pos, mask in draw(st.lists(st.tuples(st.integers(0, len(packed) - 1), st.integers(1, 255)),
                                   min_size=1, max_size=4)):
        packed[pos] ^= mask
    return bytes(packed)


def save(folder, name, raw, gz):
    """`raw` written as folder/name, or gzipped as folder/name.gz -> its path."""
    path = Path(folder) / (name + ".gz" if gz else name)
    path.write_bytes(gzip.compress(raw, mtime=0) if gz else raw)
    return path


def check_load(path, capfd, caplog):
    """load_slice(path) is a finite 2D float32 array or one clean line naming the file, and quiet."""
    result = quietly(lambda: load_slice(path), capfd, caplog)
    if isinstance(result, ProjectError):
        one_clean_line(result, shown(path.name))
    else:
        assert result.dtype == np.float32 and result.ndim == 2 and result.size > 0 and np.isfinite(result).all()


@settings(SETTINGS, max_examples=150)
@given(raw=header_fields(), name=st.sampled_from(NAMES), gz=st.booleans())
def test_fuzz_header_fields(tmp_path, capfd, caplog, raw, name, gz):
    check_load(save(tmp_path, name, raw, gz), capfd, caplog)


@settings(SETTINGS, max_examples=60)
@given(raw=truncated(), name=st.sampled_from(NAMES), gz=st.booleans())
def test_fuzz_truncation(tmp_path, capfd, caplog, raw, name, gz):
    check_load(save(tmp_path, name, raw, gz), capfd, caplog)


@settings(SETTINGS, max_examples=120)
@given(raw=byte_flips(), name=st.sampled_from(NAMES), gz=st.booleans())
def test_fuzz_byte_flips(tmp_path, capfd, caplog, raw, name, gz):
    check_load(save(tmp_path, name, raw, gz), capfd, caplog)


@settings(SETTINGS, max_examples=40)
@given(packed=damaged_gzip(), name=st.sampled_from(NAMES))
def test_fuzz_damaged_gzip(tmp_path, capfd, caplog, packed, name):
    check_load(save(tmp_path, name + ".gz", packed, gz=False), capfd, caplog)


def resize_notes(out):
    """load_split's one intentional print: the note that slices of other sizes were resized."""
    return all(line.startswith("data: train: ") and "resized to" in line for line in out.splitlines())


@settings(SETTINGS, max_examples=30)
@given(raw=st.one_of(header_fields(), byte_flips(), truncated()), name=st.sampled_from(NAMES), gz=st.booleans())
def test_fuzz_load_split(tmp_path, capfd, caplog, raw, name, gz):
    """A split folder of two good slices and a damaged one: the split loads finite in [0, 1], or the
    error names the damaged file."""
    with tempfile.TemporaryDirectory(dir=tmp_path) as root:
        folder = Path(root) / SPLITS["train"]
        folder.mkdir()
        for i in (2, 3):
            write(folder / f"good_slice_{i}.nii.gz", np.arange(20, dtype=np.int16).reshape(4, 5) * i)
        bad = save(folder, name, raw, gz)
        result = quietly(lambda: load_split(root, "train", (4, 5), cache_dir=None), capfd, caplog, resize_notes)
        if isinstance(result, ProjectError):
            one_clean_line(result, shown(bad.name))
        else:
            x = result.images
            assert x.shape == (3, 1, 4, 5) and x.isfinite().all() and x.min() >= 0 and x.max() <= 1


# ----------------------------------------------------------------------------- checkpoints

CKPT_SETTINGS = settings(SETTINGS, max_examples=150)
ANY_VALUE = st.one_of(st.integers(-5, 10**10), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6),
                      st.booleans(), st.none(), st.lists(st.integers(-8, 5000), max_size=3),
                      st.sampled_from(["uniform", "kmeans", "transformer"]))


def tiny_checkpoint(data_dir):
    """A VQ-VAE checkpoint of the project's layout, made here: a tiny untrained model."""
    import torch
    from modules import VQVAE, VQVAEConfig
    from files import make_checkpoint
    torch.manual_seed(0)
    model = VQVAE(VQVAEConfig(image_size=(32, 16), num_hiddens=16, num_residual_hiddens=8, num_downsampling_layers=2,
                              embedding_dim=8, num_embeddings=32, ema=True))
    return make_checkpoint("vqvae", model, {"data_dir": str(data_dir)})


def check_checkpoint(path, capfd, caplog):
    """The checkpoint at `path` loads and rebuilds a model that predict.py can score, or gives one
    clean line naming the file; never another exception, nothing else printed."""
    import torch
    from metrics import check_image_size
    from runs import load_vqvae
    from files import load_checkpoint

    def load():
        ckpt = load_checkpoint(path)
        model = load_vqvae(ckpt, path, torch.device("cpu"))
        check_image_size(model.cfg.image_size, f"{path}'s model_args")
        return model
    result = quietly(load, capfd, caplog)
    if isinstance(result, ProjectError):
        one_clean_line(result, str(path))
    else:
        x = torch.rand(1, 1, 32, 16) * 2 - 1  # the weights fix the downsampling: 32x16 always fits
        assert result(x)["x_recon"].shape == x.shape


@settings(CKPT_SETTINGS)
@given(changes=st.dictionaries(st.sampled_from(["image_size", "num_hiddens", "num_residual_layers",
                                                "num_residual_hiddens", "num_downsampling_layers", "embedding_dim",
                                                "num_embeddings", "commitment_cost", "ema", "decay", "epsilon",
                                                "codebook_init", "restart_after", "in_channels", "other"]),
                               ANY_VALUE, min_size=1, max_size=3))
def test_fuzz_checkpoint_model_args(tiny_data, tmp_path, capfd, caplog, changes):
    import torch
    ckpt = tiny_checkpoint(tiny_data)
    ckpt["model_args"].update(changes)
    torch.save(ckpt, tmp_path / "best.pt")
    check_checkpoint(tmp_path / "best.pt", capfd, caplog)


@settings(SETTINGS, max_examples=60)
@given(changes=st.dictionaries(st.sampled_from(["model", "model_args", "config", "kind", "epoch", "optimizer"]),
                               st.one_of(ANY_VALUE, st.dictionaries(st.text(max_size=4), ANY_VALUE, max_size=2),
                                         st.just("DELETE")), min_size=1, max_size=2))
def test_fuzz_checkpoint_structure(tiny_data, tmp_path, capfd, caplog, changes):
    import torch
    ckpt = tiny_checkpoint(tiny_data)
    for key, value in changes.items():
        ckpt.pop(key) if value == "DELETE" else ckpt.__setitem__(key, value)
    torch.save(ckpt, tmp_path / "best.pt")
    check_checkpoint(tmp_path / "best.pt", capfd, caplog)


@settings(SETTINGS, max_examples=100)
@given(cut=st.one_of(st.none(), st.floats(0, 1)), flips=st.lists(st.tuples(st.floats(0, 1), st.integers(1, 255)),
                                                                 max_size=6))
def test_fuzz_checkpoint_bytes(tiny_data, tmp_path, capfd, caplog, cut, flips):
    """Truncation and flipped bytes anywhere in the file (torch's zip container, the pickle, the tensors)."""
    import io
    import torch
    buf = io.BytesIO()
    torch.save(tiny_checkpoint(tiny_data), buf)
    raw = bytearray(buf.getvalue())
    for where, mask in flips:
        raw[int(where * (len(raw) - 1))] ^= mask
    if cut is not None:
        raw = raw[:int(cut * len(raw))]
    (tmp_path / "best.pt").write_bytes(bytes(raw))
    check_checkpoint(tmp_path / "best.pt", capfd, caplog)
