"""Runs that survive clusters: a stop signal (SIGTERM, SIGINT, SIGUSR1) saves the step under way in every
stage and stops in one line with 128 + the signal, and --resume goes on to the same run as an
uninterrupted one; --save_every_steps; one process per run folder; short runs and extended cosine runs.
Set VQVAE_SIGNAL_LOOP=20 to stop the pipeline at 20 random moments instead of 2."""
import csv
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, TINY_MODEL
from test_scripts import assert_clean_error, run

INJECT = str(Path(__file__).parent / "inject")
# 8 train slices in batches of 2: 4 steps per epoch. Optimizer steps: the VQ-VAE's 1-8 (2 epochs), the
# adversarial decoder's 9-16 (1 epoch, two optimizers per step), the prior's 17-20 (1 epoch).
PIPELINE = ["--epochs", "2", "--batch_size", "2", *TINY_MODEL, "--prior_epochs", "1", "--prior_batch_size", "2",
            "--gan_epochs", "1", "--gan_batch_size", "2", "--gan_disc_start", "1", "--gan_disc_layers", "2",
            "--gan_disc_channels", "8", "--device", "cpu"]  # bit-identity is a CPU promise
STAGE_FILES = {"vqvae": ["metrics.csv", "best.pt", "last.pt"], "gan": ["gan_metrics.csv", "decoder_gan_last.pt",
               "decoder_gan.pt"], "prior": ["prior_metrics.csv", "prior_best.pt", "prior_last.pt"]}


def start(*args, cwd, inject=None):
    env = {**os.environ, **({"PYTHONPATH": INJECT, "VQVAE_INJECT": inject} if inject else {})}
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def stop_line(stderr):
    """The lines of stderr besides the progress bars (tqdm's, which it clears with carriage returns)."""
    return [l for l in stderr.splitlines() if l.strip() and not re.match(r"((prior|gan) )?epoch \d+/\d+:", l)]


def same_run(a, b, stages=("vqvae", "gan", "prior")):
    """Every csv column but the seconds, and every checkpoint's weights and epoch, are equal."""
    for name in [f for s in stages for f in STAGE_FILES[s]]:
        if name.endswith(".csv"):
            rows = [[r[:-1] for r in csv.reader(open(d / name))] for d in (a, b)]
            assert rows[0] == rows[1], name
        else:
            ca, cb = (torch.load(d / name, weights_only=True) for d in (a, b))
            assert ca["epoch"] == cb["epoch"] and "partial" not in cb, name
            for key in ("model", "disc"):
                assert all(torch.equal(v, cb[key][k]) for k, v in ca.get(key, {}).items()), (name, key)


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory):
    """The tiny pipeline (VQ-VAE, adversarial decoder, prior), uninterrupted."""
    cwd = tmp_path_factory.mktemp("ref")
    proc = run("train.py", "--data_dir", tiny_data, *PIPELINE, "--out_dir", cwd / "run", cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    return cwd / "run"


@pytest.mark.parametrize("at, sig, stage, where", [(3, "TERM", "vqvae", "at epoch 1, step 3 of 4"),
                                                   (11, "INT", "gan", "the adversarial decoder at epoch 1, step 2 of 4"),
                                                   (19, "USR1", "prior", "the prior at epoch 1, step 3 of 4")])
def test_a_signal_saves_the_step_and_resume_is_exact(reference, tiny_data, tmp_path, at, sig, stage, where):
    """Each stage stopped by a signal mid-epoch: one line naming where and how to resume, exit 128 + the
    signal, last.pt holding the step; the resumed run equals the uninterrupted one."""
    run_dir = tmp_path / "run"
    proc = start("--data_dir", tiny_data, *PIPELINE, "--out_dir", run_dir, cwd=tmp_path,
                 inject=f"signal_at_step={at}:{sig}")
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 128 + getattr(signal, f"SIG{sig}"), stderr
    assert "Traceback" not in stderr
    assert stop_line(stderr) == [f"stopped {where} by SIG{sig}; resume with python train.py --resume {run_dir}"]
    last = torch.load(run_dir / {"vqvae": "last.pt", "gan": "decoder_gan_last.pt", "prior": "prior_last.pt"}[stage],
                      weights_only=True)
    assert last["partial"]["step"] == int(where.rsplit("step ", 1)[1].split()[0]) and last["epoch"] == 0
    proc = run("train.py", "--resume", run_dir, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    same_run(reference, run_dir)


@pytest.mark.parametrize("script", ["train.py", "predict.py"])
@pytest.mark.parametrize("module", ["numpy.linalg", "torch.nn"])
def test_a_signal_while_the_libraries_import_is_one_line(tmp_path, script, module):
    """A stop while the script still imports its libraries (numpy.linalg: an exception raised there
    recursed without end in numpy's lazy attributes and printed a RecursionError traceback): the stop's
    one line and 128 + the signal, nothing else."""
    env = {**os.environ, "PYTHONPATH": INJECT, "VQVAE_INJECT": f"signal_at_import={module}:INT"}
    proc = subprocess.run([sys.executable, str(ROOT / script)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 128 + signal.SIGINT, proc.stderr
    assert proc.stderr.splitlines() == ["stopped by SIGINT; nothing was saved to resume from; start again"]
    assert not any(tmp_path.iterdir())


def test_save_every_steps_survives_a_kill(reference, tiny_data, tmp_path):
    """--save_every_steps 3: a SIGKILL at step 4 (no chance to save) leaves last.pt at step 3, from which
    the run ends as the uninterrupted one."""
    run_dir = tmp_path / "run"
    proc = start("--data_dir", tiny_data, *PIPELINE, "--stage", "vqvae", "--save_every_steps", "3", "--out_dir",
                 run_dir, cwd=tmp_path, inject="signal_at_step=4:KILL")
    proc.communicate(timeout=600)
    assert proc.returncode == -signal.SIGKILL
    assert torch.load(run_dir / "last.pt", weights_only=True)["partial"]["step"] == 3
    assert run("train.py", "--resume", run_dir, cwd=tmp_path).returncode == 0
    same_run(reference, run_dir, stages=("vqvae",))


def test_random_stops_always_resume_to_the_same_run(reference, tiny_data, tmp_path):
    """A signal at a random moment of the pipeline: one line and 128 + the signal, or (after the last
    step) a finished run; resumed until done (started again when it stopped before any checkpoint), it
    equals the uninterrupted run."""
    rng = random.Random(os.environ.get("VQVAE_SIGNAL_SEED", 0))
    outcomes = []  # each stop's line (or "finished"), printed for pytest -s
    for k in range(int(os.environ.get("VQVAE_SIGNAL_LOOP", 2))):
        run_dir, sig = tmp_path / f"run{k}", rng.choice(["TERM", "INT", "USR1"])
        proc = start("--data_dir", tiny_data, *PIPELINE, "--out_dir", run_dir, cwd=tmp_path)
        time.sleep(rng.uniform(0, 25))
        proc.send_signal(getattr(signal, f"SIG{sig}"))
        stdout, stderr = proc.communicate(timeout=600)
        assert "Traceback" not in stderr
        if proc.returncode == 0:  # it had finished
            assert "done: best prior validation NLL" in stdout
            outcomes.append(f"SIG{sig}: finished")
        else:
            assert proc.returncode == 128 + getattr(signal, f"SIG{sig}"), stderr
            line, = stop_line(stderr)
            assert line.startswith("stopped") and f"by SIG{sig}; " in line, line
            outcomes.append(f"exit {proc.returncode}: {line}")
            if "start again" in line:  # before the run folder was made: nothing was written
                assert not run_dir.exists()
                assert run("train.py", "--data_dir", tiny_data, *PIPELINE, "--out_dir", run_dir,
                           cwd=tmp_path).returncode == 0
            else:
                assert run("train.py", "--resume", run_dir, cwd=tmp_path).returncode == 0
        same_run(reference, run_dir)
        shutil.rmtree(run_dir)
    print("\n".join(["", *outcomes, f"{len(outcomes)} of {len(outcomes)} resumed to the uninterrupted run"]))


def test_one_process_per_run_folder(tiny_data, tmp_path):
    """A run folder held by a live process refuses a second writer (a resume, or a second run into it)
    in one line naming the holder, without writing; once the holder is dead its lock is taken over."""
    run_dir = tmp_path / "run"
    assert run("train.py", "--data_dir", tiny_data, *PIPELINE, "--stage", "vqvae", "--epochs", "1", "--out_dir",
               run_dir, cwd=tmp_path).returncode == 0
    holder = subprocess.Popen([sys.executable, "-c", f"import stage, time; stage.lock_run({str(run_dir)!r}); "
                               "print('held', flush=True); time.sleep(600)"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    assert_clean_error(run("train.py", "--resume", run_dir, "--epochs", "2", cwd=tmp_path), "is in use by process",
                       str(holder.pid))
    assert_clean_error(run("train.py", "--resume", run_dir, "--stage", "prior", cwd=tmp_path), "is in use")
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before  # nothing written, nothing moved
    holder.kill(), holder.wait()
    assert run("train.py", "--resume", run_dir, "--epochs", "2", cwd=tmp_path).returncode == 0  # taken over


def test_two_runs_started_into_one_folder(reference, tiny_data, tmp_path):
    """Two train.py started at once with one --out_dir: one trains, the other is refused in one line;
    the run is whole: it equals the uninterrupted one. VQVAE_WRITER_LOOP=20 tries 20 times."""
    refusals = []
    for k in range(int(os.environ.get("VQVAE_WRITER_LOOP", 1))):
        run_dir = tmp_path / f"run{k}"
        procs = [start("--data_dir", tiny_data, *PIPELINE, "--stage", "vqvae", "--out_dir", run_dir, cwd=tmp_path)
                 for _ in range(2)]
        outs = [p.communicate(timeout=600) for p in procs]
        assert sorted(p.returncode for p in procs) == [0, 2], outs
        refused, = stop_line(outs[[p.returncode for p in procs].index(2)][1])
        assert re.fullmatch(r"error: run folder .* (is in use by process .*|already holds files; .*)", refused)
        same_run(reference, run_dir, stages=("vqvae",))
        refusals.append(refused.split(";")[0])
    print("\n".join(["", *refusals, f"{len(refusals)} of {len(refusals)} runs whole"]))


def test_a_short_cosine_run_warms_up_briefly_and_extends_by_a_new_leg(tiny_data, tmp_path):
    """--epochs 1 (4 steps) under a 20-step warm-up trains, warming up over a tenth of the run (1 step),
    and says so; --resume --epochs 2 adds a leg: the cosine laid over 2 epochs from where the run stands,
    and says so; fewer epochs than the schedule's are refused."""
    run_dir = tmp_path / "run"
    flags = ["--data_dir", tiny_data, *PIPELINE, "--stage", "vqvae", "--lr_schedule", "cosine", "--warmup_steps", "20"]
    proc = run("train.py", *flags, "--epochs", "1", "--out_dir", run_dir, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "--warmup_steps 20 is not shorter than the run (4 steps): warming up over 1 step instead" in proc.stdout
    proc = run("train.py", "--resume", run_dir, "--epochs", "2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "epochs 2-2 of the run are a new leg of its cosine schedule" in proc.stdout
    ckpt = torch.load(run_dir / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["config"]["lr_legs"] == [1, 2]
    # The last step (the 8th) is where an 8-step run's cosine is after its 1 warm-up step: at 6/7.
    assert ckpt["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 6 / 7)))
    assert_clean_error(run("train.py", "--resume", run_dir, "--epochs", "1", cwd=tmp_path), "cannot shorten",
                       "runs to epoch 2")
