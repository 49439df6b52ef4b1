"""The loader: scaling, resizing, one tensor per split, the phantom, and clear bad-input errors."""
import gzip
import os
import tracemalloc
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import phantom
from dataset import (SPLITS, SliceDataset, augment, epoch_batches, get_batch, load_slice, load_split, resolve_data_dir,
                     scale_unit)
from utils import ProjectError

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "hipmri_3d" / "Case_018_Week7_LFOV.nii.gz"


def write(path, array):
    nib.save(nib.Nifti1Image(np.asarray(array), np.eye(4)), path)
    return path


def with_header(src, dst, **fields):
    """A copy of the uncompressed NIfTI-1 file `src` at `dst` (gzipped if it ends in .gz) with raw header
    fields set as given, past nibabel's checks, as a damaged file or a careless writer leaves them."""
    raw = bytearray(Path(src).read_bytes())
    header = np.frombuffer(raw, dtype=nib.Nifti1Header.template_dtype, count=1)  # a view into raw
    for name, value in fields.items():
        header[name] = value
    Path(dst).write_bytes(gzip.compress(bytes(raw)) if str(dst).endswith(".gz") else raw)
    return dst


def quietly(call, capfd, caplog, printed=lambda out: out == ""):
    """call() -> its result, or the ProjectError it raised; asserts that nothing was printed (to the
    file descriptors, so nibabel's own log handler counts) but what `printed` accepts on stdout,
    and nothing logged or warned on the way."""
    capfd.readouterr()
    caplog.clear()
    caplog.set_level(1)  # every record, even those below the default WARNING
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        try:
            result = call()
        except ProjectError as e:
            result = e
    out, err = capfd.readouterr()
    assert printed(out) and err == "" and not caplog.records and not warned, (out, err, caplog.records, warned)
    return result


def one_clean_line(e, name):
    """The message of ProjectError `e`, asserted to be one printable line that names the file `name`."""
    assert isinstance(e, ProjectError), f"expected a ProjectError, got {e!r}"
    msg = str(e)
    assert "\n" not in msg and msg.isprintable() and name in msg, msg
    msg.encode("utf-8")  # prints on any UTF-8 terminal: no lone surrogates from undecodable names
    return msg


def refused(call, name, capfd, caplog):
    """The message of the ProjectError that call() raises, printing nothing else: one printable line
    that names the file."""
    return one_clean_line(quietly(call, capfd, caplog), name)


def make_data_dir(root, arrays_per_split):
    for split, arrays in arrays_per_split.items():
        (root / SPLITS[split]).mkdir(parents=True)
        for i, a in enumerate(arrays):
            write(root / SPLITS[split] / f"case_001_week_0_slice_{i}.nii.gz", a)
    return root


def test_scale_unit_range_and_constant_slice():
    a = np.array([[3.0, 5.0], [7.0, 11.0]], dtype=np.float32)
    s = scale_unit(a)
    assert s.min() == 0 and s.max() == 1 and s[0, 1] == pytest.approx(0.25)
    z = scale_unit(np.full((4, 4), 7.0, dtype=np.float32))
    assert np.all(z == 0) and np.isfinite(z).all()


def test_load_slice_accepts_2d_and_singleton_3d(tmp_path):
    a = np.arange(12, dtype=np.int16).reshape(3, 4)
    assert np.array_equal(load_slice(write(tmp_path / "a.nii.gz", a)), a)
    assert np.array_equal(load_slice(write(tmp_path / "b.nii", a[:, :, None])), a)
    assert np.array_equal(load_slice(write(tmp_path / "c.nii.gz", a[:, None, :])), a)


@pytest.mark.parametrize("shape, words", [((8, 8, 3), "cut volumes"), ((8, 8, 1, 2), "not a 2D slice")])
def test_load_slice_rejects_volumes(tmp_path, shape, words):
    f = write(tmp_path / "vol.nii.gz", np.zeros(shape, dtype=np.float32))
    with pytest.raises(ProjectError, match=words) as e:
        load_slice(f)
    assert "vol.nii.gz" in str(e.value)


def test_load_slice_rejects_files_that_are_not_nifti(tmp_path):
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(np.random.default_rng(0).bytes(2000))
    png = tmp_path / "image.nii"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(500))
    good = write(tmp_path / "good.nii.gz", np.random.default_rng(1).uniform(size=(64, 64)))
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    for f in (junk, png, truncated):
        with pytest.raises(ProjectError, match="cannot read .* as NIfTI") as e:
            load_slice(f)
        assert f.name in str(e.value)


def test_load_slice_rejects_nan(tmp_path):
    a = np.ones((4, 4), dtype=np.float32)
    a[1, 2] = np.nan
    with pytest.raises(ProjectError, match="NaN"):
        load_slice(write(tmp_path / "nan.nii.gz", a))


def test_split_is_one_scaled_resized_tensor(tmp_path):
    rng = np.random.default_rng(0)
    arrays = [rng.uniform(10, 300, (256, 128)), rng.uniform(10, 300, (256, 144)), np.zeros((256, 128))]
    root = make_data_dir(tmp_path, {"train": arrays, "validate": arrays[:1], "test": arrays[:1]})
    s = load_split(root, "train", (256, 128))
    assert s.images.shape == (3, 1, 256, 128)
    assert s.images.min() >= 0 and s.images.max() <= 1 and s.images[0].max() == 1
    assert s.shapes == [[256, 128], [256, 144], [256, 128]]
    assert (s.images[2] == 0).all()  # the constant slice
    x = get_batch(s.images, torch.tensor([0, 1]), torch.device("cpu"))
    assert torch.equal(x, torch.stack([SliceDataset(s)[0], SliceDataset(s)[1]]))
    assert x.dtype.is_floating_point and x.min() >= -1 and x.max() <= 1 and x.shape == (2, 1, 256, 128)
    # The seed's stretched grid.
    assert load_split(root, "train", (256, 256)).images.shape == (3, 1, 256, 256)


def test_epoch_batches_are_seeded_and_sharded():
    cpu = torch.device("cpu")
    def order(seed, epoch):
        return torch.cat(epoch_batches(10, 4, seed, epoch, cpu)).tolist()
    assert sorted(order(3, 1)) == list(range(10))  # every slice once, the last batch short
    assert [len(b) for b in epoch_batches(10, 4, 3, 1, cpu)] == [4, 4, 2]
    assert order(3, 1) == order(3, 1) and order(3, 1) != order(4, 1) and order(3, 1) != order(3, 2)
    # Two processes: each takes its half of every global batch; together they are the one-process order.
    ranks = [epoch_batches(10, 4, 3, 1, cpu, rank, 2) for rank in (0, 1)]
    one = epoch_batches(10, 4, 3, 1, cpu)
    assert all(torch.equal(torch.cat([a, b]), g) for a, b, g in zip(*ranks, one))
    assert len(ranks[0]) == 3 and len(epoch_batches(9, 4, 3, 1, cpu, 0, 2)) == 2  # a last batch of 1 is dropped


ALL_AUG = dict(flip=0.5, rotate=20.0, scale=0.2, shift=0.1, gamma=0.3)


def phantom_batch(n=8, H=64, W=32):
    """(n, 1, H, W) in [-1, 1]: a bright disk of radius 10 pixels and a graded bar on air (-1)."""
    yy, xx = torch.meshgrid(torch.arange(H) - (H - 1) / 2, torch.arange(W) - (W - 1) / 2, indexing="ij")
    unit = ((yy ** 2 + xx ** 2) <= 100).float() + ((yy - 20).abs() <= 3) * (xx + W / 2) / W * 0.8
    return (unit.clamp(0, 1) * 2 - 1).expand(n, 1, H, W).contiguous()


def test_augment_is_reproducible_by_seed_and_step():
    x = phantom_batch()
    before = x.clone()
    a = augment(x, 0, 7, **ALL_AUG)
    assert torch.equal(a, augment(x, 0, 7, **ALL_AUG))  # same (seed, step): the same batch, bit for bit
    assert not torch.allclose(a, augment(x, 0, 8, **ALL_AUG))  # the next step draws anew
    assert not torch.allclose(a, augment(x, 1, 7, **ALL_AUG))  # so does another seed
    assert torch.equal(x, before)  # the stored batch is not changed in place
    assert all(not torch.allclose(a[0], a[i]) for i in range(1, len(a)))  # each slice its own draw
    # Under torchrun each rank augments its share of the global batch as one process would.
    whole = augment(torch.cat([x, x.flip(0)]), 0, 7, **ALL_AUG)
    assert torch.equal(augment(x.flip(0), 0, 7, **ALL_AUG, rank=1, world_size=2), whole[len(x):])


def test_augment_off_is_the_identity():
    x = phantom_batch()
    assert augment(x, 0, 3) is x  # every setting 0: untouched, not resampled
    assert torch.equal(augment(x, 0, 3, **dict.fromkeys(ALL_AUG, 0.0)), x)


@pytest.mark.parametrize("name", sorted(ALL_AUG))
def test_augment_keeps_shape_and_range(name):
    x = phantom_batch()
    big = {"flip": 1.0, "rotate": 45.0, "scale": 0.5, "shift": 0.5, "gamma": 1.0}[name]
    y = augment(x, 0, 1, **{name: big})
    assert y.shape == x.shape and y.dtype == x.dtype and torch.isfinite(y).all()
    assert y.min() >= -1 and y.max() <= 1 and not torch.allclose(y, x)


def test_each_augmentation_does_what_it_says():
    x = phantom_batch()
    # A flip with probability 1 mirrors the first image axis (H, left-right in the release's slices).
    assert torch.allclose(augment(x, 0, 1, flip=1.0), x.flip(-2), atol=1e-5)
    # Gamma changes intensities, not geometry: air stays air and full brightness stays full, pixel
    # for pixel; the grey bar in between changes.
    y = augment(x, 0, 1, gamma=0.5)
    assert torch.equal(y == -1, x == -1) and torch.equal(y == 1, x == 1)
    grey = (x > -1) & (x < 1)
    assert (y[grey] - x[grey]).abs().max() > 0.05
    # What geometry moves in from outside the slice is air (-1), not mid-grey (0 in the model's range).
    bright = torch.ones(4, 1, 64, 32)
    for setting in ({"rotate": 30.0}, {"shift": 0.2}):
        y = augment(bright, 0, 1, **setting)
        assert y.min() == -1 and (y[..., 24:40, 8:24] > 1 - 1e-5).all()  # the middle stays
    # A rotation turns the slice in pixels: the disk stays a disk on the non-square grid (turned in
    # the normalised coordinates instead it would be sheared into an ellipse, about 5x the error).
    disk = phantom_batch()
    disk[..., 40:, :] = -1  # without the bar
    assert (augment(disk, 0, 1, rotate=45.0) - disk).abs().mean() < 0.04


def test_data_dir_errors(tmp_path):
    with pytest.raises(ProjectError, match="does not exist"):
        resolve_data_dir(tmp_path / "nowhere")
    (tmp_path / "keras_slices_train").mkdir()
    (tmp_path / "keras_slices_seg_train").mkdir()
    with pytest.raises(ProjectError, match="lacks keras_slices_validate, keras_slices_test") as e:
        resolve_data_dir(tmp_path)
    assert "found: keras_slices_seg_train, keras_slices_train" in str(e.value)
    for d in SPLITS.values():
        (tmp_path / d).mkdir(exist_ok=True)
    assert resolve_data_dir(tmp_path) == tmp_path
    with pytest.raises(ProjectError, match="holds no .nii"):
        load_split(tmp_path, "test", (32, 16))


def test_phantom_is_deterministic_and_in_release_layout(tmp_path):
    patients = {"keras_slices_train": 1, "keras_slices_validate": 1, "keras_slices_test": 1}
    a = phantom.generate(tmp_path / "a", patients=patients, slices_per_patient=3)
    b = phantom.generate(tmp_path / "b", patients=patients, slices_per_patient=3)
    files = sorted(p.relative_to(a) for p in a.rglob("*.nii.gz"))
    assert len(files) == 9 and files == sorted(p.relative_to(b) for p in b.rglob("*.nii.gz"))
    assert str(files[0]).startswith("keras_slices_test/case_003_week_")
    for f in files:
        assert np.array_equal(load_slice(a / f), load_slice(b / f))
    # Different patients differ; slices of one patient vary with position.
    train = sorted((a / "keras_slices_train").iterdir())
    assert not np.array_equal(load_slice(train[0]), load_slice(train[1]))
    assert not np.array_equal(load_slice(train[0]), load_slice(a / files[0]))


def test_phantom_air_is_exactly_zero_and_noise_lives_in_the_body(tmp_path):
    """As in the background-masked HipMRI volumes: no Rician noise in the air outside the body."""
    patients = {"keras_slices_train": 1, "keras_slices_validate": 1, "keras_slices_test": 1}
    out = phantom.generate(tmp_path / "p", patients=patients, slices_per_patient=4)
    for f in sorted(out.rglob("*.nii.gz")):
        a = np.asarray(nib.load(f).dataobj)
        # The widest body reaches 0.8 * 128 px either side of the centre row, so the first and last 10 rows
        # of the 256 are always air.
        assert not a[:10].any() and not a[-10:].any(), f.name
        assert 0.2 < (a == 0).mean() < 0.6, f.name  # real coronal slices: 21-35% zeros
        body = a[100:156, 40:-20]  # central block, above the gap between the thighs
        assert (body > 0).all() and np.unique(body).size > 100, f.name  # inside: tissue with grain and noise


def _generate(out):
    return phantom.generate(out, patients={"keras_slices_train": 2, "keras_slices_validate": 1,
                                           "keras_slices_test": 1}, slices_per_patient=6)


def test_phantom_is_generated_once_by_processes_started_together(tmp_path):
    """torchrun's processes without --data_dir all ask for the phantom at once: one writes it, the
    others wait and read it (before, a later process replaced the folder an earlier one was reading)."""
    import multiprocessing as mp
    out = tmp_path / "phantom"
    with mp.get_context("spawn").Pool(3) as pool:
        folders = pool.map(_generate, [out] * 3)
    assert folders == [out] * 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [".phantom.lock", "phantom"]  # no temporary folders left
    assert len(list((out / "keras_slices_train").iterdir())) == 12


@pytest.mark.skipif(not REAL.exists(), reason="real HipMRI volume not present in ../shared/data")
def test_phantom_blur_ssim_curve_matches_the_real_volume():
    """The phantom's SSIMs respond to blur as real MR's do: its blur-SSIM curve (sigma 0.5, 1, 2 px) is
    within 0.02 of the real volume's coronal slices' (a subset of both, for speed: the validate and test
    patients, every other real slice; `python phantom.py --compare_real` measures them all)."""
    real = phantom.mixed_blur_ssim_curve(phantom.real_slices(REAL, range(86, 186, 2)))
    first, last = phantom.PATIENTS["keras_slices_train"] + 1, sum(phantom.PATIENTS.values())
    synthetic = phantom.mixed_blur_ssim_curve(phantom.phantom_slices(cases=range(first, last + 1)))
    assert np.allclose(synthetic, real, atol=0.02), (real, synthetic)


def test_compare_real_refuses_a_missing_volume_in_one_line(tmp_path):
    with pytest.raises(ProjectError, match="is not a file") as e:
        phantom.real_slices(tmp_path / "missing.nii.gz")
    assert "\n" not in str(e.value)


@pytest.mark.skipif(not REAL.exists(), reason="real HipMRI volume not present in ../shared/data")
def test_real_volume_is_refused_and_its_slices_load(tmp_path):
    with pytest.raises(ProjectError, match="cut volumes into one 2D slice per file"):
        load_slice(REAL)
    vol = nib.load(REAL)
    arrays = [np.asarray(vol.dataobj[:, k]) for k in (110, 128)]  # 256x128 coronal slices
    root = make_data_dir(tmp_path, {"train": arrays, "validate": arrays, "test": arrays})
    s = load_split(root, "train", (256, 128))
    assert s.images.shape == (2, 1, 256, 128) and s.images.max() == 1


def test_decoded_splits_are_cached_and_never_trusted_stale(tiny_data, tmp_path, monkeypatch, capsys):
    """The second load reads the decoded split from the cache without decoding a file; a touched
    file, a damaged cache or another size decodes again."""
    import dataset
    cache = tmp_path / "cache"
    first = load_split(tiny_data, "train", (32, 16), cache_dir=cache)
    assert len(list(cache.glob("train_32x16_*.pt"))) == 1
    decoded = []
    real_load_slice = dataset.load_slice
    monkeypatch.setattr(dataset, "load_slice", lambda p: decoded.append(p) or real_load_slice(p))

    def same(s):
        return (torch.equal(s.images, first.images) and s.shapes == first.shapes and s.ranges == first.ranges
                and s.files == first.files)
    assert same(load_split(tiny_data, "train", (32, 16), cache_dir=cache)) and decoded == []
    # A file modified since: its mtime is part of the key, so the split is decoded again.
    f = first.files[0]
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    assert same(load_split(tiny_data, "train", (32, 16), cache_dir=cache)) and len(decoded) == len(first.files)
    # A damaged cache file is reported and rebuilt, not read.
    for p in cache.glob("train_32x16_*.pt"):
        p.write_bytes(b"not a cache")
    decoded.clear()
    capsys.readouterr()
    assert same(load_split(tiny_data, "train", (32, 16), cache_dir=cache)) and len(decoded) == len(first.files)
    assert "stale or damaged" in capsys.readouterr().out
    # Another size is another cache; no cache_dir, no file.
    assert load_split(tiny_data, "train", (64, 32), cache_dir=cache).images.shape[-2:] == (64, 32)
    assert load_split(tiny_data, "validate", (32, 16), cache_dir=None).images.shape[-2:] == (32, 16)
    assert not list(cache.glob("validate_*"))


# Damaged and odd files: each gives one clean line naming the file (or loads correctly), and
# nothing else reaches the terminal.

def test_colour_and_complex_slices_are_refused(tmp_path, capfd, caplog):
    rgb = np.zeros((4, 5), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgba = np.zeros((4, 5), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1"), ("A", "u1")])
    for f, a in [("rgb.nii.gz", rgb), ("rgba.nii", rgba)]:
        msg = refused(lambda: load_slice(write(tmp_path / f, a)), f, capfd, caplog)
        assert "is a colour image" in msg and "save a greyscale slice" in msg
    # Before: loaded with only a ComplexWarning, the imaginary part dropped.
    for f, dtype in [("c64.nii.gz", np.complex64), ("c128.nii", np.complex128)]:
        msg = refused(lambda: load_slice(write(tmp_path / f, np.full((4, 5), 1 + 2j, dtype))), f, capfd, caplog)
        assert "holds complex values" in msg and "np.abs" in msg


def test_broken_symbolic_links_are_refused(tmp_path, capfd, caplog):
    folder = tmp_path / SPLITS["train"]
    folder.mkdir()
    write(folder / "a_slice_1.nii.gz", np.ones((4, 5)))
    os.symlink(tmp_path / "gone.nii.gz", folder / "dangling.nii.gz")
    os.symlink(folder / "loop.nii.gz", folder / "loop.nii.gz")
    for f in ("dangling.nii.gz", "loop.nii.gz"):
        msg = refused(lambda: load_slice(folder / f), f, capfd, caplog)
        assert "is a symbolic link" in msg and "remove the link or restore its target" in msg
    # load_split stats every file for its cache key before anything is read.
    refused(lambda: load_split(tmp_path, "train", (4, 5), cache_dir=None), "dangling.nii.gz", capfd, caplog)


def test_folders_and_pipes_named_like_slices_are_refused(tmp_path, capfd, caplog):
    (tmp_path / "folder.nii.gz").mkdir()
    os.mkfifo(tmp_path / "pipe.nii")  # nibabel would wait on it forever
    for f in ("folder.nii.gz", "pipe.nii"):
        assert "not a regular file" in refused(lambda: load_slice(tmp_path / f), f, capfd, caplog)


def test_file_names_that_are_not_utf8_load_and_print(tmp_path, capfd, caplog):
    """Names are bytes on Linux; Python shows undecodable ones as lone surrogates, which neither
    .encode() nor print() take. Such files load, cache, and are named as caf\\xe9... in messages."""
    folder = tmp_path / SPLITS["train"]
    folder.mkdir()
    a = np.arange(20, dtype=np.int16).reshape(4, 5)
    odd = folder / os.fsdecode(b"caf\xe9_slice_1.nii.gz")
    write(odd, a)
    write(folder / "b_slice_2.nii.gz", a + 1)
    assert np.array_equal(quietly(lambda: load_slice(odd), capfd, caplog), a)
    first = quietly(lambda: load_split(tmp_path, "train", (4, 5), cache_dir=tmp_path / "cache"), capfd, caplog)
    again = quietly(lambda: load_split(tmp_path, "train", (4, 5), cache_dir=tmp_path / "cache"), capfd, caplog)
    assert first.images.shape == (2, 1, 4, 5) and torch.equal(first.images, again.images)
    assert first.ranges == [[1.0, 20.0], [0.0, 19.0]]  # natural order: b_slice_2 before caf...
    (folder / os.fsdecode(b"caf\xe9_slice_3.nii.gz")).write_bytes(b"not a slice")
    refused(lambda: load_split(tmp_path, "train", (4, 5), cache_dir=None), "caf\\xe9_slice_3.nii.gz",
            capfd, caplog)
    # A newline in a name is shown escaped, so the message stays one line.
    refused(lambda: load_slice(write(tmp_path / "two\nlines.nii", np.full((2, 2), 1j))), "two\\nlines.nii",
            capfd, caplog)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_empty_slices_are_refused(tmp_path, suffix, capfd, caplog):
    src = write(tmp_path / "src.nii", np.ones((3, 128), dtype=np.float32))
    # Before: loaded as shape (0, 128), then a ValueError at a.min() while scaling.
    f = with_header(src, tmp_path / f"empty{suffix}", dim=(2, 0, 128, 1, 1, 1, 1, 1))
    assert "is empty (shape (0, 128))" in refused(lambda: load_slice(f), f.name, capfd, caplog)
    f = with_header(src, tmp_path / f"nodims{suffix}", dim=(0, 3, 128, 1, 1, 1, 1, 1))
    assert "is empty" in refused(lambda: load_slice(f), f.name, capfd, caplog)


def test_extreme_values_scale_in_float64_without_nan(tmp_path, capfd, caplog):
    # Finite float32 near +-3e38: hi - lo overflowed in float32 and the slice became NaN (blamed on --lr).
    a = np.array([[3e38, -3e38, 0.0], [1.0, 2.0, 3.0]], dtype=np.float32)
    folder = tmp_path / SPLITS["train"]
    folder.mkdir()
    write(folder / "huge.nii", a)
    assert np.array_equal(quietly(lambda: load_slice(folder / "huge.nii"), capfd, caplog), a)
    s = scale_unit(a)
    assert s.dtype == np.float32 and np.isfinite(s).all() and s.min() == 0 and s.max() == 1
    images = quietly(lambda: load_split(tmp_path, "train", (2, 3), cache_dir=None), capfd, caplog).images
    assert torch.isfinite(images).all() and images.min() == 0 and images.max() == 1
    # Values no float32 can hold are refused, not turned into Inf.
    msg = refused(lambda: load_slice(write(tmp_path / "f64.nii.gz", np.array([[1e300, 0.0]]))), "f64.nii.gz",
                  capfd, caplog)
    assert "beyond float32" in msg


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_headers_claiming_more_than_the_file_holds_are_refused_before_reading(tmp_path, suffix, capfd, caplog):
    """A 2D header claiming 32767 x 32767 pixels in a small file made nibabel allocate the claim
    (8.6 GB of float64, 17 GB of complex128) before noticing that the file is short."""
    src = write(tmp_path / "src.nii", np.ones((48, 48), dtype=np.float64))
    claim = dict(dim=(2, 32767, 32767, 1, 1, 1, 1, 1))
    tracemalloc.start()
    try:
        f = with_header(src, tmp_path / f"claim{suffix}", **claim)
        msg = refused(lambda: load_slice(f), f.name, capfd, caplog)
        assert "promises 32767x32767 float64 pixels" in msg and "truncated or its header is damaged" in msg
        c = write(tmp_path / "c.nii", np.ones((48, 48), np.complex128))
        f = with_header(c, tmp_path / f"c{suffix}", **claim)
        assert "complex" in refused(lambda: load_slice(f), f.name, capfd, caplog)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 50e6
    # A plainly truncated file: the pixels cut short.
    cut = tmp_path / f"cut{suffix}"
    raw = src.read_bytes()[:-100]
    cut.write_bytes(gzip.compress(raw) if suffix == ".nii.gz" else raw)
    assert "truncated" in refused(lambda: load_slice(cut), cut.name, capfd, caplog)


@pytest.mark.parametrize("fields, words", [
    (dict(datatype=1028), "data code 1028 not recognized"),  # nibabel also logged it, on its own line
    (dict(datatype=0), "data code 0 not supported"),
    (dict(dim=(2, -3, 4, 1, 1, 1, 1, 1)), "negative dimensions"),
    (dict(dim=(2, 32767, 32767, 1, 1, 1, 1, 1)), "promises 32767x32767 float32 pixels"),
    (dict(dim=(7, 3, 4, 32767, 32767, 32767, 32767, 32767)), "not a 2D slice"),
    (dict(dim=(9, 3, 4, 1, 1, 1, 1, 1)), "cannot read"),  # nibabel guesses the other byte order
    (dict(dim=(-3, 3, 4, 1, 1, 1, 1, 1)), "cannot read"),
    (dict(vox_offset=0), "inside the 352-byte header"),  # nibabel would read the header as pixels
    (dict(vox_offset=100), "vox offset 100 too low"),
    (dict(vox_offset=np.nan), "cannot read"),
    (dict(vox_offset=1e30), "promises 3x4 float32 pixels"),
    (dict(scl_slope=1e38), "beyond float32"),  # the scaled pixels overflow: numpy warned
    (dict(scl_slope=2.0, scl_inter=-np.inf), "invalid intercept"),
    (dict(magic=b"xyz"), "cannot read"),
])
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_damaged_headers_give_one_line(tmp_path, fields, words, suffix, capfd, caplog):
    src = write(tmp_path / "src.nii", np.arange(12, dtype=np.float32).reshape(3, 4))
    f = with_header(src, tmp_path / f"damaged{suffix}", **fields)
    assert words in refused(lambda: load_slice(f), f.name, capfd, caplog)


def test_header_oddities_nibabel_fixes_load_silently(tmp_path, capfd, caplog):
    """nibabel logs these (some over several lines) and carries on; the slice is right, so the
    loader says nothing either."""
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    src = write(tmp_path / "src.nii", a)
    odd = {"sizeof_hdr": 12, "bitpix": 7, "qform_code": 999, "sform_code": -5, "pixdim": [np.nan] * 8,
           "scl_slope": np.nan}
    f = with_header(src, tmp_path / "odd.nii.gz", **odd)
    assert np.array_equal(quietly(lambda: load_slice(f), capfd, caplog), a)
    # Pixels at byte 353: "vox offset (=353) not divisible by 16, not SPM compatible", twice.
    raw = bytearray(src.read_bytes())
    raw[352:352] = b"\0"
    (tmp_path / "shifted.nii").write_bytes(raw)
    f = with_header(tmp_path / "shifted.nii", tmp_path / "shifted.nii", vox_offset=353)
    assert np.array_equal(quietly(lambda: load_slice(f), capfd, caplog), a)


def test_multi_line_errors_are_folded_into_one(tmp_path, monkeypatch, capfd, caplog):
    def load(*args, **kwargs):
        raise OSError("Expected 4294705156 bytes, got 64 bytes from x\n - could the file be damaged?\n"
                      + "x" * 500)
    monkeypatch.setattr(nib, "load", load)
    f = write(tmp_path / "any.nii.gz", np.ones((2, 2)))
    msg = refused(lambda: load_slice(f), "any.nii.gz", capfd, caplog)
    assert "got 64 bytes from x - could the file be damaged?" in msg and len(msg) < 400
