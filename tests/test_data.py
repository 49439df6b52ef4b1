"""The loader: scaling, resizing, one tensor per split, the phantom, and clear bad-input errors."""
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import phantom
from dataset import SPLITS, SliceDataset, epoch_batches, get_batch, load_slice, load_split, resolve_data_dir, scale_unit
from utils import ProjectError

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "hipmri_3d" / "Case_018_Week7_LFOV.nii.gz"


def write(path, array):
    nib.save(nib.Nifti1Image(np.asarray(array), np.eye(4)), path)
    return path


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
