"""A really full disk at each write site of train.py (its three stages), predict.py and the phantom: the
run folder is on a small tmpfs that a hook (full_disk/) fills with a ballast file right before the chosen
write, so that write meets the file system's own ENOSPC, not an injected exception. Each site must give one
`error:` line naming what could not be written and exit code 2, never a traceback; leave every file written
before it byte-identical and no temporary file behind; and once the ballast is gone, the run resumes to its
end (train.py --resume RUN), or the same command runs again (predict.py, and train.py where the disk filled
before the first checkpoint, which leaves nothing to resume)."""
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import ROOT, TINY_MODEL
from test_scripts import assert_clean_error, run
from utils import ProjectError, run_main

HOOK = str(Path(__file__).parent / "full_disk")
sys.path.insert(0, HOOK)
import full_disk  # noqa: E402

TINY_RUN = ["--epochs", "2", "--batch_size", "4", *TINY_MODEL]
GAN_RUN = ["--gan_epochs", "1", "--gan_batch_size", "4", "--gan_disc_layers", "2", "--gan_disc_channels", "8",
           "--gan_disc_start", "1"]
FULL = "No space left on device"


@pytest.fixture
def disk(tmp_path):
    """A real 8 MiB file system with 256 inodes (tmpfs), where this process may mount one (root on
    Linux): room for a tiny run, and few enough inodes that filling them all is quick."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if sys.platform != "linux" or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,nr_inodes=256", "tmpfs",
                                                  str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root on Linux)")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def hook_env(disk, tmp_path, target):
    """The environment of a script whose write `target` meets the filled disk (full_disk.install)."""
    return {**os.environ, "PYTHONPATH": HOOK, "VQVAE_FULL_DISK": target, "VQVAE_BALLAST": str(disk / "ballast"),
            "VQVAE_HASHES": str(tmp_path / "before.json")}


def check_and_free(disk, tmp_path, proc, *words, removed=None):
    """The failed script's one line (with `words`), every file of the disk from before the full disk
    unchanged (but those under `removed`, a temporary folder the script removes), no temporary file left;
    then the ballast removed."""
    assert (disk / "ballast").is_file(), f"the hook never fired: {proc.stderr[-2000:]}"
    # assert_clean_error knows the progress bars of stage 1 and the prior; the adversarial decoder's too
    bars = re.compile(r"gan epoch \d+/\d+:")
    assert_clean_error(SimpleNamespace(returncode=proc.returncode, stderr="\n".join(
        l for l in proc.stderr.splitlines() if not bars.match(l))), *words)
    before = json.loads((tmp_path / "before.json").read_text())
    changed = [rel for rel, digest in before.items() if not (removed and rel.startswith(removed))
               if not (disk / rel).is_file() or hashlib.sha256((disk / rel).read_bytes()).hexdigest() != digest]
    assert not changed, f"changed by the full disk: {changed}"
    assert not [p for p in disk.rglob("*") if ".tmp" in p.name], "a temporary file was left behind"
    (disk / "ballast").unlink()
    shutil.rmtree(disk / "ballast_inodes", ignore_errors=True)


def train(disk, tmp_path, target, *args):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *map(str, args)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env=hook_env(disk, tmp_path, target))


def epoch_of(path):
    return torch.load(path, weights_only=True)["epoch"]


# ----------------------------------------------------------------------------- stage 1, a new run

# Before the first checkpoint: the run folder itself (only a file system out of inodes refuses a folder), its
# .lock, log.txt's first line (an empty file needs a page; a later line may still fit the page log.txt has, as
# on any file system) and config.json.
BEFORE_CHECKPOINT = [("dir:run", "cannot create run folder"), (".lock", ".lock"), ("log.txt", "log.txt"),
                     ("config.json", "config.json")]
# After it: each kind of file of the second epoch, and a curve at the end of the stage.
AFTER_CHECKPOINT = ["epoch_002_comparison.png", "metrics.csv#2", "last.pt#2", "ssim_per_epoch.png"]


# Every site runs with VQVAE_ALL_SITES=1 (27 cases, 9 minutes on 2 cores); by default one of each writer
# (a folder, the lock, a log line, json, png, csv, checkpoint, NIfTI) in each script, to keep the suite short.
ALL_SITES = os.environ.get("VQVAE_ALL_SITES") == "1"


def sites(cases, default):
    return cases if ALL_SITES else [c for c in cases if (c[-1] if isinstance(c, tuple) and c[0] in ("gan", "prior")
                                                          else c[0] if isinstance(c, tuple) else c) in default]


BEFORE_CHECKPOINT = sites(BEFORE_CHECKPOINT, {"dir:run", ".lock", "log.txt"})
AFTER_CHECKPOINT = sites(AFTER_CHECKPOINT, {"epoch_002_comparison.png", "last.pt#2"})


@pytest.mark.parametrize("target,words", BEFORE_CHECKPOINT, ids=[t for t, _ in BEFORE_CHECKPOINT])
def test_full_disk_before_the_first_checkpoint(tiny_data, disk, tmp_path, target, words):
    """Stage 1 on a disk that fills before the run has a checkpoint: one line naming what could not be
    written, what was written stays, and the same command into a new folder runs once space is freed."""
    flags = ["--data_dir", tiny_data, *TINY_RUN, "--stage", "vqvae"]
    proc = train(disk, tmp_path, target, *flags, "--out_dir", disk / "run")
    check_and_free(disk, tmp_path, proc, words, FULL)
    assert run("train.py", *flags, "--out_dir", disk / "again", cwd=tmp_path).returncode == 0


@pytest.mark.parametrize("target", AFTER_CHECKPOINT)
def test_full_disk_in_stage_1_then_resume(tiny_data, disk, tmp_path, target):
    """Stage 1 on a disk that fills at `target`: one line naming it, what was written stays, and
    --resume RUN finishes the run once space is freed."""
    proc = train(disk, tmp_path, target, "--data_dir", tiny_data, *TINY_RUN, "--stage", "vqvae",
                 "--out_dir", disk / "run")
    check_and_free(disk, tmp_path, proc, target.split("#")[0], FULL)
    proc = run("train.py", "--resume", disk / "run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert epoch_of(disk / "run" / "last.pt") == 2 and (disk / "run" / "codebook_usage_per_epoch.png").is_file()


# ----------------------------------------------------------------------------- the adversarial decoder and the prior

@pytest.fixture(scope="module")
def vqvae_run(tiny_data, tmp_path_factory):
    """A finished tiny stage 1, copied onto the disk by each test of a later stage."""
    run_dir = tmp_path_factory.mktemp("base") / "run"
    proc = run("train.py", "--data_dir", tiny_data, *TINY_RUN, "--stage", "vqvae", "--out_dir", run_dir,
               cwd=run_dir.parent)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return run_dir


# Each kind once (the stages write their csv and curves as stage 1 does): a stage config, a figure, a checkpoint.
STAGE_SITES = [("gan", "gan_config.json"), ("gan", "gan_epoch_001_comparison.png"), ("gan", "decoder_gan.pt"),
               ("prior", "prior_epoch_001_samples.png"), ("prior", "prior_last.pt#2")]


STAGE_SITES = sites(STAGE_SITES, {"gan_config.json", "prior_epoch_001_samples.png"})


@pytest.mark.parametrize("stage,target", STAGE_SITES, ids=[t for _, t in STAGE_SITES])
def test_full_disk_in_a_later_stage_then_resume(vqvae_run, disk, tmp_path, stage, target):
    """--stage gan / prior on a disk that fills at `target`: one line naming it, what was written
    stays, and the same command resumes the stage to its end once space is freed."""
    shutil.copytree(vqvae_run, disk / "run")
    cmd = ["--stage", stage, "--resume", disk / "run", *(GAN_RUN if stage == "gan" else [])]
    check_and_free(disk, tmp_path, train(disk, tmp_path, target, *cmd), target.split("#")[0], FULL)
    proc = run("train.py", *cmd, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = "decoder_gan.pt" if stage == "gan" else "prior_last.pt"
    assert epoch_of(disk / "run" / last) == (1 if stage == "gan" else 2)


# ----------------------------------------------------------------------------- predict.py

@pytest.fixture(scope="module")
def prior_run(vqvae_run, tmp_path_factory):
    """The tiny stage 1 with its prior (conditioned on position and previous slice: --num_volumes works)."""
    run_dir = tmp_path_factory.mktemp("prior") / "run"
    shutil.copytree(vqvae_run, run_dir)
    proc = run("train.py", "--stage", "prior", "--resume", run_dir, cwd=run_dir.parent)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return run_dir


# In the order predict.py writes them: its folders, the samples, the volumes, then the reconstructions' files.
PREDICT_SITES = [("dir:predict", "cannot create"), ("dir:samples", "cannot create"),
                 ("sample_001.nii.gz", "sample_001.nii.gz"), ("samples_grid.png", "samples_grid.png"),
                 ("samples_vs_real.png", "samples_vs_real.png"), ("dir:volumes", "cannot create"),
                 ("volume_000.nii.gz", "volume_000.nii.gz"), ("volumes_orthogonal.png", "volumes_orthogonal.png"),
                 ("metrics.json", "metrics.json"), ("per_slice.csv", "per_slice.csv"),
                 ("*_recon.nii.gz#2", "_recon.nii.gz"), ("best_worst.png", "best_worst.png"),
                 ("code_histogram.png", "code_histogram.png")]


def predict(run_dir, capsys, monkeypatch, samples):
    """predict.py in this process -> (exit code, stderr). The FID Inception network is swapped for an 8x8
    average pool: on 2 CPU cores it takes a minute a run, and the sites, not the metric, are under test."""
    import metrics
    import predict as script
    monkeypatch.setitem(metrics._inception, "cpu", lambda x: torch.nn.functional.adaptive_avg_pool2d(x, 8).flatten(1))
    args = script.get_parser().parse_args(["--checkpoint", str(run_dir / "best.pt"), *(
        ["--num_samples", "4", "--num_volumes", "1"] if samples else ["--num_samples", "0"])])
    capsys.readouterr()
    try:
        run_main(script.main, args)
        code = 0
    except SystemExit as e:
        code = e.code
    return SimpleNamespace(returncode=code, stderr=capsys.readouterr().err)


PREDICT_SITES = sites(PREDICT_SITES, {"dir:samples", "sample_001.nii.gz", "metrics.json", "per_slice.csv"})


@pytest.mark.parametrize("target,words", PREDICT_SITES, ids=[t for t, _ in PREDICT_SITES])
def test_full_disk_in_predict_then_rerun(prior_run, disk, tmp_path, monkeypatch, capsys, target, words):
    """predict.py on a disk that fills at `target`: one line naming it, what was written stays (the run
    and predict's earlier outputs), and predict.py runs again once space is freed."""
    shutil.copytree(prior_run, disk / "run")
    samples = "sample" in target or "volume" in target  # the later sites: those of a run without a prior too
    with monkeypatch.context() as m:
        full_disk.install(target, disk / "ballast", tmp_path / "before.json", setattr=m.setattr)
        proc = predict(disk / "run", capsys, monkeypatch, samples)
    check_and_free(disk, tmp_path, proc, words, FULL)
    proc = predict(disk / "run", capsys, monkeypatch, samples)
    assert proc.returncode == 0, proc.stderr
    assert len(list((disk / "run" / "predict" / "recon").iterdir())) == 4


# ----------------------------------------------------------------------------- the phantom

def test_full_disk_while_writing_the_phantom(disk, tmp_path, monkeypatch):
    """The phantom that train.py writes when no --data_dir is given, on a disk that fills at its third
    slice: one line naming it, no half-written set left (its temporary folder is removed), and written
    whole once space is freed."""
    import phantom
    patients = {"keras_slices_train": 1, "keras_slices_validate": 1, "keras_slices_test": 1}
    with monkeypatch.context() as m:
        full_disk.install("case_*.nii.gz#3", disk / "ballast", tmp_path / "before.json", setattr=m.setattr)
        with pytest.raises(ProjectError) as e:
            phantom.generate(disk / "phantom", patients=patients, slices_per_patient=2)
    proc = SimpleNamespace(returncode=2, stderr=f"error: {e.value}\n")
    check_and_free(disk, tmp_path, proc, "phantom", FULL, removed="phantom.tmp")
    assert not [p for p in disk.iterdir() if p.name.startswith("phantom")]
    out = phantom.generate(disk / "phantom", patients=patients, slices_per_patient=2)
    assert len(list(out.rglob("*.nii.gz"))) == 6
