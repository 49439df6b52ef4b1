"""Resume after SIGKILL, atomic checkpoints, NaN stops, refused checkpoints and every bad input the
README lists: one line on stderr, exit code 2, nothing already written lost."""
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import config
import phantom
from conftest import ROOT, TINY_MODEL
from files import save_checkpoint
from test_data import write
from test_scripts import assert_clean_error, run
from utils import ProjectError, run_main

INJECT = str(Path(__file__).parent / "inject")
TINY_RUN = ["--epochs", "2", "--batch_size", "4", *TINY_MODEL]


def metrics_without_time(run_dir):
    rows = list(csv.reader(open(run_dir / "metrics.csv")))
    return [r[:-1] for r in rows]  # the last column is wall seconds


def state_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def resume_data(tmp_path_factory):
    """Enough slices for epochs that last a second or so, so a kill can land inside one."""
    out = tmp_path_factory.mktemp("resume") / "phantom"
    patients = {"keras_slices_train": 4, "keras_slices_validate": 1, "keras_slices_test": 1}
    return phantom.generate(out, patients=patients, slices_per_patient=12)


def test_resume_after_sigkill_equals_uninterrupted_run(resume_data, tmp_path):
    # Every piece of state a run carries: EMA buffers, k-means flag, code ages and the restarts' RNG
    # draws, the schedule's step count.
    flags = ["--data_dir", resume_data, "--epochs", "4", "--batch_size", "2", "--ema", "--codebook_init",
             "kmeans", "--restart_after", "2", "--lr_schedule", "cosine", "--warmup_steps", "5",
             "--ssim_weight", "0.1", "--device", "cpu", *TINY_MODEL]  # bit-identity is a CPU promise
    ref = tmp_path / "ref"
    assert run("train.py", *flags, "--out_dir", ref, cwd=tmp_path).returncode == 0

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *map(str, flags), "--out_dir", killed],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "last.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    # Epoch 1 is checkpointed; kill during epoch 2, half of the reference run's epoch 2 later (not epoch 1's
    # time, which holds the k-means start: on a busy machine half of it outlasted epochs 2-4).
    time.sleep(float(list(csv.reader(open(ref / "metrics.csv")))[2][-1]) / 2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = torch.load(killed / "last.pt", weights_only=True)["epoch"]
    assert 1 <= done < 4 and "done:" not in (killed / "log.txt").read_text()

    resumed = run("train.py", "--resume", killed, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed {killed} after epoch {done}" in (killed / "log.txt").read_text()
    # Bit-identical on the CPU: every metric but wall time, and every tensor of both checkpoints.
    assert metrics_without_time(killed) == metrics_without_time(ref)
    # ... and the prior that followed the resumed VQ-VAE stage is the same prior.
    for name in ("last.pt", "best.pt", "prior_last.pt", "prior_best.pt"):
        a = torch.load(ref / name, weights_only=True)
        b = torch.load(killed / name, weights_only=True)
        assert a["epoch"] == b["epoch"] and a["best_val"] == b["best_val"]
        assert state_equal(a["model"], b["model"])  # includes the EMA codebook buffers
        assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
        for k in a["optimizer"]["state"]:
            assert state_equal(a["optimizer"]["state"][k], b["optimizer"]["state"][k])


def test_resume_refuses_other_flags_and_extends_epochs(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    assert run("train.py", "--data_dir", tiny_data, *TINY_RUN, "--out_dir", run_dir, cwd=tmp_path).returncode == 0
    proc = run("train.py", "--resume", run_dir, "--num_embeddings", "64", "--lr", "0.01", cwd=tmp_path)
    assert_clean_error(proc, "num_embeddings=32", "lr=0.001", "num_embeddings=64", "lr=0.01")
    # --epochs extends a run, also to the value that is the flag's default for new runs; the prior
    # trained on the old VQ-VAE's codes is moved aside and a new one is trained on the new codes.
    proc = run("train.py", "--resume", run_dir, "--epochs", "20", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert [r[0] for r in metrics_without_time(run_dir)] == ["epoch", *map(str, range(1, 21))]
    assert torch.load(run_dir / "last.pt", weights_only=True)["epoch"] == 20
    if torch.load(run_dir / "best.pt", weights_only=True)["epoch"] > 2:  # best.pt changed
        assert (run_dir / "prior_old_1" / "prior_best.pt").is_file()
        assert torch.load(run_dir / "prior_last.pt", weights_only=True)["epoch"] == 2
    # Resuming from an earlier checkpoint than last.pt would silently rewind the run.
    best = torch.load(run_dir / "best.pt", weights_only=True)["epoch"]
    if best < 20:
        assert_clean_error(run("train.py", "--resume", run_dir / "best.pt", cwd=tmp_path), "resume the run folder")


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    # 8 train slices in batches of 4: steps 1-2 are epoch 1; step 3 (epoch 2, step 1) leaves NaN
    # weights, so the loss of epoch 2, step 2 is NaN.
    env = {**os.environ, "PYTHONPATH": INJECT, "VQVAE_INJECT": "nan_from_step=3"}
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--data_dir", str(tiny_data), *TINY_RUN,
                           "--out_dir", str(run_dir)], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert_clean_error(proc, "epoch 2, step 2", "last.pt")
    for name in ("last.pt", "best.pt"):
        ckpt = torch.load(run_dir / name, weights_only=True)
        assert ckpt["epoch"] == 1
        assert all(torch.isfinite(t).all() for t in ckpt["model"].values() if t.is_floating_point())


def test_full_disk_while_saving_keeps_previous_checkpoint(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    # Epoch 1 saves best.pt and last.pt (torch.save calls 1 and 2); call 3 is epoch 2's first save.
    env = {**os.environ, "PYTHONPATH": INJECT, "VQVAE_INJECT": "enospc_from=3"}
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--data_dir", str(tiny_data), *TINY_RUN,
                           "--out_dir", str(run_dir)], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert_clean_error(proc, "could not write", "No space left on device", "intact")
    assert torch.load(run_dir / "last.pt", weights_only=True)["epoch"] == 1
    assert torch.load(run_dir / "best.pt", weights_only=True)["epoch"] == 1
    assert not [p for p in run_dir.iterdir() if ".tmp" in p.name]  # no half-written leftovers


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_checkpoint_with_pickled_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "model_args": {}, "config": {}, "payload": _Exploit(str(marker))}, evil)
    proc = run("predict.py", "--checkpoint", evil, cwd=tmp_path)
    assert_clean_error(proc, "refused", "evil.pt", "were not run")
    assert not marker.exists()
    proc = run("train.py", "--resume", evil, cwd=tmp_path)
    assert_clean_error(proc, "refused")
    assert not marker.exists()


@pytest.mark.parametrize("extra", [[], ["--prior_ema", "0.9", "--prior_aug_copies", "1", "--prior_aug_fresh"]],
                         ids=["plain", "ema+fresh_augmentation"])
def test_prior_resume_continues_the_same_run(extra, resume_data, tmp_path):
    """A prior stopped after 2 epochs and resumed to 3 (by plain --resume of the run) ends
    bit-identical to a 3-epoch prior; its flags come from its checkpoint, and a differing one is
    refused by name. With --prior_ema the average (saved as the model) and the trained weights both
    resume, and with --prior_aug_fresh each epoch's redrawn copies are the same again."""
    flags = ["--data_dir", resume_data, "--epochs", "1", "--batch_size", "4", "--device", "cpu", *TINY_MODEL,
             "--prior_batch_size", "4", "--prior_dropout", "0.2", *extra]
    ref, split = tmp_path / "ref", tmp_path / "split"
    assert run("train.py", *flags, "--prior_epochs", "3", "--out_dir", ref, cwd=tmp_path).returncode == 0
    assert run("train.py", *flags, "--prior_epochs", "2", "--out_dir", split, cwd=tmp_path).returncode == 0
    assert_clean_error(run("train.py", "--stage", "prior", "--resume", split, "--prior_hidden_dim", "32",
                           cwd=tmp_path), "prior_hidden_dim=16", "delete")
    proc = run("train.py", "--resume", split, "--prior_epochs", "3", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"resumed the prior in {split} after epoch 2" in (split / "log.txt").read_text()
    for name in ("prior_last.pt", "prior_best.pt"):
        a, b = (torch.load(d / name, weights_only=True) for d in (ref, split))
        assert a["epoch"] == b["epoch"] and a["best_val"] == b["best_val"]
        assert state_equal(a["model"], b["model"])
        assert all(state_equal(a["optimizer"]["state"][k], b["optimizer"]["state"][k]) for k in a["optimizer"]["state"])
        assert ("trained" in a) == bool(extra)
        if extra:  # the average is not the trained weights, and both came back
            assert state_equal(a["trained"], b["trained"]) and not state_equal(a["model"], a["trained"])
    assert torch.load(split / "prior_last.pt", weights_only=True)["epoch"] == 3
    prior_rows = [r[:-1] for r in csv.reader(open(split / "prior_metrics.csv"))]
    assert prior_rows == [r[:-1] for r in csv.reader(open(ref / "prior_metrics.csv"))] and len(prior_rows) == 4


def test_resume_hears_flags_typed_with_their_default_value(tiny_data, tmp_path):
    """On resume a typed flag is a request even when it equals the default: --lr 0.001 against a run
    made with --lr 0.002 is refused, and --stage all adds the prior to a run made with --stage vqvae."""
    run_dir = tmp_path / "run"
    assert run("train.py", "--data_dir", tiny_data, *TINY_RUN, "--lr", "0.002", "--stage", "vqvae",
               "--out_dir", run_dir, cwd=tmp_path).returncode == 0
    assert not (run_dir / "prior_best.pt").exists()
    assert_clean_error(run("train.py", "--resume", run_dir, "--lr", "0.001", cwd=tmp_path), "lr=0.002", "lr=0.001")
    proc = run("train.py", "--resume", run_dir, "--stage", "all", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (run_dir / "prior_best.pt").is_file()
    assert "given" not in json.loads((run_dir / "config.json").read_text())


def test_prior_of_another_vqvae_is_refused(tiny_data, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert run("train.py", "--data_dir", tiny_data, *TINY_RUN, "--out_dir", a, cwd=tmp_path).returncode == 0
    assert run("train.py", "--data_dir", tiny_data, *TINY_RUN, "--seed", "1", "--stage", "vqvae",
               "--out_dir", b, cwd=tmp_path).returncode == 0
    assert not (b / "prior_best.pt").exists()
    proc = run("predict.py", "--checkpoint", b / "best.pt", "--num_samples", "4", cwd=tmp_path)
    assert proc.returncode == 0 and "no prior in" in proc.stdout and "--stage prior --resume" in proc.stdout
    assert_clean_error(run("predict.py", "--checkpoint", b / "best.pt", "--prior", a / "prior_best.pt",
                           cwd=tmp_path), "another VQ-VAE", "--stage prior")
    # A prior that does not fit the run's VQ-VAE is never resumed: it is moved aside, a new one trained.
    shutil.copy(a / "prior_last.pt", b / "prior_last.pt")
    proc = run("train.py", "--stage", "prior", "--resume", b, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (b / "prior_old_1" / "prior_last.pt").is_file() and "moved its files" in (b / "log.txt").read_text()
    new = torch.load(b / "prior_last.pt", weights_only=True)
    assert new["vqvae"] != torch.load(a / "prior_last.pt", weights_only=True)["vqvae"]
    assert run("predict.py", "--checkpoint", b / "best.pt", "--num_samples", "2", cwd=tmp_path).returncode == 0
    assert_clean_error(run("train.py", "--stage", "prior", cwd=tmp_path), "--resume runs/NNN")
    assert_clean_error(run("predict.py", "--checkpoint", a / "best.pt", "--temperature", "0", cwd=tmp_path),
                       "--temperature")


def test_other_kind_or_configuration_of_checkpoint(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    assert run("train.py", "--data_dir", tiny_data, *TINY_RUN, "--out_dir", run_dir, cwd=tmp_path).returncode == 0
    ckpt = torch.load(run_dir / "best.pt", weights_only=True)
    torch.save({**ckpt, "kind": "prior"}, tmp_path / "prior.pt")
    assert_clean_error(run("predict.py", "--checkpoint", tmp_path / "prior.pt", cwd=tmp_path),
                       "is a prior checkpoint", "vqvae")
    torch.save({**ckpt, "model_args": {**ckpt["model_args"], "num_embeddings": 64}}, tmp_path / "other.pt")
    assert_clean_error(run("predict.py", "--checkpoint", tmp_path / "other.pt", cwd=tmp_path),
                       "weights do not fit its model_args", "codebook")


def copy_data(tiny_data, tmp_path):
    dst = tmp_path / "data"
    shutil.copytree(tiny_data, dst)
    return dst


BAD_FILES = {
    "random_bytes": (lambda p: p.write_bytes(os.urandom(3000)), "cannot read"),
    "renamed_png": (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(300)), "cannot read"),
    "truncated": (lambda p: p.write_bytes(p.with_name("ok.nii.gz").read_bytes()[:4000]), "cannot read"),
    "volume_3d": (lambda p: write(p, np.ones((64, 32, 5), np.float32)), "cut volumes into one 2D slice"),
    "image_4d": (lambda p: write(p, np.ones((64, 32, 1, 2), np.float32)), "not a 2D slice"),
    "nan_slice": (lambda p: write(p, np.where(np.eye(64, 32) > 0, np.nan, 1.0).astype(np.float32)), "NaN"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_slice_file_gets_one_line_naming_it(case, tiny_data, tmp_path):
    data = copy_data(tiny_data, tmp_path)
    train = data / "keras_slices_train"
    write(train / "ok.nii.gz", np.random.default_rng(0).uniform(0, 300, (256, 128)).astype(np.float32))
    make, words = BAD_FILES[case]
    bad = train / f"case_099_week_0_slice_{case}.nii.gz"
    make(bad)
    proc = run("train.py", "--data_dir", data, *TINY_RUN, "--out_dir", tmp_path / "run", cwd=tmp_path)
    assert_clean_error(proc, bad.name, words)
    assert not (tmp_path / "run").exists()  # bad data leaves no run folder behind


def test_empty_split_and_unwritable_out_dir(tiny_data, tmp_path):
    data = copy_data(tiny_data, tmp_path)
    for f in (data / "keras_slices_validate").iterdir():
        f.unlink()
    assert_clean_error(run("train.py", "--data_dir", data, *TINY_RUN, cwd=tmp_path),
                       "keras_slices_validate holds no .nii")
    (tmp_path / "a_file").write_text("x")
    assert_clean_error(run("train.py", "--data_dir", tiny_data, *TINY_RUN, "--out_dir", tmp_path / "a_file" / "run",
                           cwd=tmp_path), "cannot create run folder")
    assert (tmp_path / "a_file").read_text() == "x"


@pytest.mark.parametrize("flags, words", [
    (["--device", "gpu"], "not a device name"),
    (["--image_size", "30", "16"], "positive multiple of 4"),
    (["--image_size", "8", "8", "--num_downsampling_layers", "1"], "at least 11 pixels"),
    (["--restart_after", "-1"], "--restart_after must be >= 0"),
    # Prior flags are checked before the VQ-VAE stage starts, not after it has run.
    (["--prior_num_heads", "3"], "multiple of num_heads"),
    (["--prior_epochs", "0"], "--prior_epochs must be >= 1"),
    (["--prior_num_heads", "0"], "--prior_num_heads must be >= 1"),
    (["--prior_dropout", "1"], "--prior_dropout in [0, 1)"),
    (["--prior_ema", "1"], "--prior_ema in [0, 1)"),
    (["--prior_aug_fresh"], "--prior_aug_copies 1 or more"),
])
def test_bad_flags_leave_no_run_folder(flags, words, tiny_data, tmp_path):
    proc = run("train.py", "--data_dir", tiny_data, *TINY_RUN, *flags, "--out_dir", tmp_path / "run", cwd=tmp_path)
    assert_clean_error(proc, words)
    assert not (tmp_path / "run").exists()


def test_out_dir_that_is_a_file(tiny_data, tmp_path):
    (tmp_path / "a_file").write_text("x")
    proc = run("train.py", "--data_dir", tiny_data, *TINY_RUN, "--out_dir", tmp_path / "a_file", cwd=tmp_path)
    assert_clean_error(proc, "is a file, not a folder")
    assert (tmp_path / "a_file").read_text() == "x"


def test_constant_and_mixed_size_slices_train_without_nan(tiny_data, tmp_path):
    data = copy_data(tiny_data, tmp_path)
    train = data / "keras_slices_train"
    write(train / "case_098_week_0_slice_0.nii.gz", np.zeros((256, 128), np.int16))
    write(train / "case_098_week_0_slice_1.nii.gz", np.random.default_rng(0).uniform(0, 9, (256, 144)))
    write(train / "case_098_week_0_slice_2.nii.gz", np.random.default_rng(1).uniform(0, 9, (200, 100)))
    proc = run("train.py", "--data_dir", data, *TINY_RUN, "--out_dir", tmp_path / "run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "train: 11 slices of sizes 200x100, 256x128, 256x144; 11 resized to 32x16" in proc.stdout
    for row in csv.DictReader(open(tmp_path / "run" / "metrics.csv")):
        assert all(np.isfinite(float(v)) for v in row.values())


def as_7ece636(ckpt):
    """A checkpoint in the layout main wrote up to 7ece636, before the model held its input size:
    `model_args` without image_size; `config`, every flag flat, with image_size as a list."""
    model_args = {k: v for k, v in ckpt["model_args"].items() if k != "image_size"}
    return {**ckpt, "model_args": model_args, "config": {**ckpt["config"], "image_size": ckpt["model_args"]["image_size"]}}


def test_checkpoints_of_the_earlier_layout_load_in_predict_and_resume(tiny_data, tmp_path):
    """A run whose checkpoints have 7ece636's layout (made here from a fresh run, not stored as data)
    predicts with the same SSIM, resumes, and is then written in today's layout."""
    new, old = tmp_path / "new", tmp_path / "old"
    assert run("train.py", "--data_dir", tiny_data, *TINY_RUN, "--stage", "vqvae", "--out_dir", new,
               cwd=tmp_path).returncode == 0
    shutil.copytree(new, old)
    for name in ("best.pt", "last.pt"):
        torch.save(as_7ece636(torch.load(new / name, weights_only=True)), old / name)
    assert "image_size" not in torch.load(old / "best.pt", weights_only=True)["model_args"]
    for d in (new, old):
        proc = run("predict.py", "--checkpoint", d / "best.pt", "--num_samples", "0", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
    assert (json.loads((old / "predict" / "metrics.json").read_text())["ssim_mean"]
            == json.loads((new / "predict" / "metrics.json").read_text())["ssim_mean"])
    # Training flags its config lacks (added since) resume as runs trained then, not at today's defaults.
    import train
    ckpt = torch.load(old / "last.pt", weights_only=True)
    newer = ("recon_loss", "best_by", "lr_schedule", "warmup_steps")
    torch.save({**ckpt, "config": {k: v for k, v in ckpt["config"].items() if k not in newer}}, old / "last.pt")
    args = config.resume_run(vars(train.get_parser().parse_args(["--resume", str(old)])))[1].train
    assert (args.recon_loss, args.best_by, args.lr_schedule, args.warmup_steps) == ("mse", "mse", "constant", 100)
    assert config.RunConfig.from_flags({}).train.recon_loss == "l1"  # which today's defaults would have changed
    proc = run("train.py", "--resume", old, "--epochs", "3", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    resumed = torch.load(old / "last.pt", weights_only=True)
    assert resumed["epoch"] == 3 and resumed["model_args"]["image_size"] == [32, 16]
    assert_clean_error(run("train.py", "--resume", old, "--image_size", "64", "32", cwd=tmp_path),
                       "image_size=[32, 16]", "image_size=[64, 32]")


def cli(module, argv, capsys):
    """`python module.py ARGV` in this process (fast: torch is loaded once) -> a CompletedProcess."""
    capsys.readouterr()
    try:
        run_main(module.main, module.get_parser().parse_args(list(map(str, argv))))
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, out, err)


ABSURD_TRAIN_FLAGS = [["--batch_size", "0"], ["--batch_size", "-1"], ["--lr", "nan"], ["--lr", "-1"],
                      ["--num_embeddings", "0"], ["--num_embeddings", "-1"], ["--num_hiddens", "0"],
                      ["--embedding_dim", "0"], ["--num_downsampling_layers", "0"], ["--num_downsampling_layers", "-1"],
                      ["--seed", "-1"], ["--prior_lr", "nan"], ["--epochs", "0"], ["--epochs", "-1"],
                      ["--commitment_cost", "nan"], ["--ssim_weight", "nan"], ["--ema", "--decay", "2"],
                      ["--ema", "--epsilon", "0"], ["--num_residual_layers", "-1"], ["--prior_dropout", "nan"],
                      ["--aug_flip", "1.5"], ["--aug_rotate", "90"], ["--aug_scale", "-0.1"], ["--aug_shift", "0.6"],
                      ["--aug_gamma", "nan"]]


def test_absurd_flags_are_one_line_before_anything_is_made(tiny_data, tmp_path, monkeypatch, capsys):
    """Every flag is checked by its setting's rule when the arguments are read: one line naming the
    flag, exit code 2, and no run folder (neither --out_dir nor runs/)."""
    import predict
    import train
    monkeypatch.chdir(tmp_path)
    for flags in ABSURD_TRAIN_FLAGS:
        assert_clean_error(cli(train, ["--data_dir", tiny_data, *TINY_RUN, *flags, "--out_dir", tmp_path / "run"],
                               capsys), flags[-2])
        assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()
    for flags in (["--batch_size", "0"], ["--batch_size", "-1"], ["--temperature", "nan"], ["--top_k", "-2"]):
        assert_clean_error(cli(predict, [*flags, "--out_dir", tmp_path / "pred"], capsys), flags[0])
        assert not (tmp_path / "pred").exists()


@pytest.fixture(scope="module")
def one_epoch_run(tiny_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("hostile") / "run"
    assert run("train.py", "--data_dir", tiny_data, *TINY_RUN, "--epochs", "1", "--stage", "vqvae", "--out_dir",
               run_dir, cwd=run_dir.parent).returncode == 0
    return run_dir


def mutate(ckpt, where, key, value):
    """ckpt with ckpt[where][key] = value (ckpt[key] when where is None); value DELETE drops the key."""
    part = dict(ckpt if where is None else ckpt[where])
    part.pop(key) if value is DELETE else part.__setitem__(key, value)
    return part if where is None else {**ckpt, where: part}


DELETE = object()
BAD_CHECKPOINTS = [
    *[("model_args", "num_embeddings", v) for v in (0, -1, 10**9, float("nan"), "16", True)],
    ("model_args", "num_hiddens", -4), ("model_args", "num_hiddens", 2.5), ("model_args", "codebook_init", "bogus"),
    ("model_args", "image_size", [32, 16, 1]), ("model_args", "image_size", [32.0, 16.0]),
    ("model_args", "image_size", [-32, 16]), ("model_args", "image_size", [30, 16]), ("model_args", "image_size", [8, 8]),
    ("model_args", "bogus_setting", 1), ("model_args", "decay", float("inf")),
    (None, "model", None), (None, "model", torch.zeros(3)), (None, "model", {"encoder.x": "not a tensor"}),
    (None, "config", "x"), (None, "config", {}), ("config", "data_dir", 5), ("config", "data_dir", "/nonexistent/data"),
    ("config", "data_dir", DELETE), (None, "epoch", torch.tensor(1)), (None, "epoch", b"x"), (None, "model_args", [1]),
    (None, "kind", 3),
]


@pytest.mark.parametrize("where, key, value", BAD_CHECKPOINTS)
def test_damaged_checkpoint_is_one_line_and_writes_nothing(one_epoch_run, tmp_path, capsys, where, key, value):
    """predict.py on a checkpoint whose content (not its bytes: test_fuzz does those) is damaged: one
    line naming the file, exit code 2, and no predict/ folder left behind."""
    import predict
    path = tmp_path / "best.pt"
    torch.save(mutate(torch.load(one_epoch_run / "best.pt", weights_only=True), where, key, value), path)
    assert_clean_error(cli(predict, ["--checkpoint", path, "--num_samples", "0"], capsys), str(path))
    assert not (tmp_path / "predict").exists()


def test_nan_weights_no_image_size_and_a_moved_data_folder_are_named(one_epoch_run, tmp_path, capsys):
    import predict
    ckpt = torch.load(one_epoch_run / "best.pt", weights_only=True)
    torch.save(mutate(mutate(ckpt, "model_args", "image_size", DELETE), "config", "image_size", DELETE), tmp_path / "nosize.pt")
    assert_clean_error(cli(predict, ["--checkpoint", tmp_path / "nosize.pt"], capsys), "nosize.pt", "image_size")
    ckpt["model"]["decoder.net.0.weight"][0] = float("nan")
    torch.save(ckpt, tmp_path / "nan.pt")
    assert_clean_error(cli(predict, ["--checkpoint", tmp_path / "nan.pt"], capsys), "NaN or Inf weights",
                   "decoder.net.0.weight")
    torch.save(mutate(torch.load(one_epoch_run / "best.pt", weights_only=True), "config", "data_dir", "/moved"),
               tmp_path / "moved.pt")
    assert_clean_error(cli(predict, ["--checkpoint", tmp_path / "moved.pt"], capsys), "was trained on", "/moved",
                   "pass --data_dir")


def test_resume_from_best_when_last_is_damaged(tiny_data, tmp_path):
    """The README's advice for a damaged last.pt, --resume RUN/best.pt, is followed, not refused."""
    run_dir = tmp_path / "run"
    assert run("train.py", "--data_dir", tiny_data, *TINY_RUN, "--stage", "vqvae", "--out_dir", run_dir,
               cwd=tmp_path).returncode == 0
    (run_dir / "last.pt").write_bytes(b"damaged")
    proc = run("train.py", "--resume", run_dir / "best.pt", "--epochs", "3", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert torch.load(run_dir / "last.pt", weights_only=True)["epoch"] == 3


def test_adam_state_follows_the_parameters_layout():
    """A run begun with NCHW parameters and resumed with channels_last ones (CPU -> CUDA) gets Adam
    moments in the parameters' layout, which the fused kernel requires."""
    import train
    from modules import VQVAE, VQVAEConfig
    model = VQVAE(VQVAEConfig(num_hiddens=16, num_residual_hiddens=8, embedding_dim=8, num_embeddings=16))
    opt = torch.optim.Adam(model.parameters())
    model(torch.rand(2, 1, 32, 16))["x_recon"].sum().backward()
    opt.step()
    saved = opt.state_dict()
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters())
    opt.load_state_dict(saved)
    conv = model.encoder.net[0].weight
    assert opt.state[conv]["exp_avg"].stride() != conv.stride()  # the mismatch that the fused kernel rejects
    train.match_layouts(opt)
    assert all(s["exp_avg"].stride() == p.stride() and s["exp_avg_sq"].stride() == p.stride()
               for p, s in opt.state.items())
    assert torch.equal(opt.state[conv]["exp_avg"], saved["state"][0]["exp_avg"])  # the values are kept


@pytest.fixture
def small_disk(tmp_path):
    """A real 160 KiB file system (tmpfs), where the machine lets this process mount one (root on Linux)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if sys.platform != "linux" or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(mount)],
                                                 capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root on Linux)")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_really_full_disk_is_one_line_and_keeps_what_was_written(tiny_data, small_disk, tmp_path):
    """On a real full file system torch.save fails with its own RuntimeError ("unexpected pos"), not
    the OSError an injected ENOSPC gives: both are one line, and the files already written stay."""
    proc = run("train.py", "--data_dir", tiny_data, *TINY_RUN, "--stage", "vqvae", "--out_dir", small_disk / "run",
               cwd=tmp_path)
    assert_clean_error(proc, "could not write", "intact")
    assert (small_disk / "run" / "metrics.csv").is_file() and not list((small_disk / "run").glob(".*tmp*"))
    shutil.rmtree(small_disk / "run")
    with pytest.raises(ProjectError, match="could not write .*the write broke off"):
        save_checkpoint(small_disk / "big.pt", {"a": torch.zeros(200_000)})  # torch's RuntimeError path
    assert not list(small_disk.iterdir())  # no temporary file left
