"""train.py and predict.py end to end through their command lines, as a user runs them."""
import csv
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import config
import modules
import stage
from conftest import ROOT, TINY_MODEL


def run(script, *args, cwd):
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def assert_clean_error(proc, *words):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    # Besides the progress bars (tqdm writes them to stderr), exactly one line.
    lines = [l for l in proc.stderr.splitlines() if l.strip() and not re.match(r"((prior|gan) )?epoch \d+/\d+:", l)]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for w in words:
        assert w in lines[0], lines[0]


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    """A 2-epoch tiny run in runs/001 of a fresh working folder, as `python train.py` makes it."""
    cwd = tmp_path_factory.mktemp("work")
    proc = run("train.py", "--data_dir", tiny_data, "--epochs", "2", "--batch_size", "4", *TINY_MODEL, cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    return cwd, cwd / "runs" / "001", proc


def test_train_writes_every_file(trained):
    cwd, run_dir, proc = trained
    for name in ["config.json", "log.txt", "metrics.csv", "best.pt", "last.pt", "loss_per_batch.png",
                 "ssim_per_epoch.png", "codebook_usage_per_epoch.png", "epoch_001_comparison.png",
                 "epoch_002_comparison.png"]:
        assert (run_dir / name).is_file(), name
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    for r in rows:
        assert 0 < float(r["codebook_usage"]) <= 1 and float(r["perplexity"]) >= 1
        assert -1 <= float(r["val_ssim"]) <= 1 and -1 <= float(r["val_body_ssim"]) <= 1 and float(r["val_loss"]) > 0
    epoch_lines = [l for l in (run_dir / "log.txt").read_text().splitlines() if l.startswith("epoch")]
    assert f"SSIM {float(rows[-1]['val_ssim']):.4f} (body {float(rows[-1]['val_body_ssim']):.4f})" in epoch_lines[-1]
    assert len([l for l in (run_dir / "log.txt").read_text().splitlines() if l.startswith("epoch")]) == 2
    # best.pt is the epoch with the lowest validation reconstruction MSE, and only that one.
    best_epoch = min(rows, key=lambda r: float(r["val_recon_loss"]))["epoch"]
    assert str(torch.load(run_dir / "best.pt", weights_only=True)["epoch"]) == best_epoch
    config = json.loads((run_dir / "config.json").read_text())
    assert config["image_size"] == [32, 16] and config["epochs"] == 2


def test_train_then_trains_the_prior(trained):
    cwd, run_dir, proc = trained
    for name in ["prior_best.pt", "prior_last.pt", "prior_metrics.csv", "prior_config.json",
                 "prior_epoch_001_samples.png", "prior_epoch_002_samples.png", "prior_nll_per_epoch.png"]:
        assert (run_dir / name).is_file(), name
    rows = list(csv.DictReader(open(run_dir / "prior_metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    for r in rows:  # 32 codes: a uniform prior scores 5 bits per code; training must start near it
        assert 0 < float(r["val_nll_bits"]) < 6 and 0 < float(r["train_nll_bits"]) < 6
    ckpt = torch.load(run_dir / "prior_best.pt", weights_only=True)
    assert {"model", "optimizer", "epoch", "best_val", "model_args", "config", "vqvae"} <= set(ckpt)
    assert ckpt["kind"] == "prior" and ckpt["model_args"]["latent_h"] == 8 and ckpt["model_args"]["latent_w"] == 4
    assert ckpt["best_val"] == pytest.approx(min(float(r["val_nll_bits"]) for r in rows), rel=1e-5)
    assert len([l for l in (run_dir / "log.txt").read_text().splitlines() if l.startswith("prior epoch")]) == 2


def test_checkpoint_loads_weights_only_and_rebuilds_the_model(trained):
    from modules import VQVAE, VQVAEConfig
    _, run_dir, _ = trained
    ckpt = torch.load(run_dir / "best.pt", weights_only=True)
    assert {"model", "optimizer", "epoch", "best_val", "model_args", "config"} <= set(ckpt)
    assert ckpt["kind"] == "vqvae" and "torch" in ckpt["rng"]
    model = VQVAE(VQVAEConfig(**ckpt["model_args"]))
    model.load_state_dict(ckpt["model"])
    assert model.cfg.num_embeddings == 32 and model.cfg.num_downsampling_layers == 2
    last = torch.load(run_dir / "last.pt", weights_only=True)
    assert last["epoch"] == 2 and last["best_val"] == ckpt["best_val"]


def test_predict_defaults_to_newest_run_and_its_data(trained, tiny_data):
    cwd, run_dir, _ = trained
    proc = run("predict.py", cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    out = run_dir / "predict"
    m = json.loads((out / "metrics.json").read_text())
    for k in ["n", "ssim_mean", "ssim_std", "ssim_min", "ssim_max", "body_ssim_mean", "body_ssim_std", "body_n",
              "psnr_mean", "air", "codebook_usage", "perplexity"]:
        assert k in m
    assert 0 < m["air"]["zero_pixels"] < 1 and 0 <= m["air"]["zeros_kept"] <= 1 and 0 <= m["air"]["bright_lost"] <= 1
    assert 0 < m["codebook_usage"] <= 1 and 1 <= m["perplexity"] <= m["codebook_usage"] * 32 + 1e-6
    sources = sorted((Path(tiny_data) / "keras_slices_test").glob("*.nii.gz"))
    assert m["n"] == len(sources) == 4 and m["checkpoint"].endswith("runs/001/best.pt")
    assert m["ssim_min"] <= m["ssim_mean"] <= m["ssim_max"]
    assert f"test SSIM {m['ssim_mean']:.4f} +- {m['ssim_std']:.4f} (n=4), PSNR" in proc.stdout
    rows = list(csv.DictReader(open(out / "per_slice.csv")))
    assert sorted(r["file"] for r in rows) == sorted(s.name for s in sources)
    assert np.mean([float(r["ssim"]) for r in rows]) == pytest.approx(m["ssim_mean"], abs=1e-5)
    assert np.mean([float(r["body_ssim"]) for r in rows]) == pytest.approx(m["body_ssim_mean"], abs=1e-5)
    assert m["body_n"] == 4 and f"test SSIM in the body {m['body_ssim_mean']:.4f}" in proc.stdout
    assert (out / "best_worst.png").is_file() and (out / "code_histogram.png").is_file()
    assert f"codebook: {m['codebook_usage']:.1%} of 32 codes used" in proc.stdout
    for s in sources:
        rec = nib.load(out / "recon" / s.name.replace(".nii.gz", "_recon.nii.gz"))
        src = nib.load(s)
        assert rec.shape == src.shape and np.allclose(rec.affine, src.affine)
        assert np.isfinite(rec.get_fdata()).all()
    # The run has a prior, so predict also generated 64 slices and measured them.
    gen = m["generation"]
    assert gen["num_samples"] == 64 and gen["prior_checkpoint"].endswith("runs/001/prior_best.pt")
    assert (out / "samples_grid.png").is_file() and (out / "samples_vs_real.png").is_file()
    assert sorted(p.name for p in (out / "samples").iterdir()) == [f"sample_{i:03d}.nii.gz" for i in range(64)]
    for name in ("samples", "samples_at_positions", "reconstructions", "train_subset"):  # the prior knows positions
        assert gen["fid"][name] > 0 and gen["kid"][name]["std"] >= 0
    assert "volume_slices" not in gen["fid"] and "samples at positions" in proc.stdout
    mem = gen["memorisation"]
    assert -1 <= mem["samples_max_ssim_to_train_mean"] <= mem["samples_max_ssim_to_train_max"] <= 1
    assert 0 < gen["diversity"]["samples_codebook_usage"] <= 1 and gen["prior_test_nll_bits"] > 0
    assert "FID" in proc.stdout and "memorisation" in proc.stdout


def test_generated_slices_round_trip_through_nifti(trained):
    """A sample's .nii.gz holds exactly the decoded sample, on the training data's affine."""
    from modules import VQVAE, VQVAEConfig
    from prior import PriorConfig, build_prior
    cwd, run_dir, _ = trained
    out = cwd / "gen"
    proc = run("predict.py", "--num_samples", "3", "--temperature", "0.8", "--top_k", "5", "--seed", "7",
               "--out_dir", out, "--device", "cpu", cwd=cwd)  # the draws depend on the device's generator
    assert proc.returncode == 0, proc.stderr
    vq_ckpt = torch.load(run_dir / "best.pt", weights_only=True)
    vq = VQVAE(VQVAEConfig(**vq_ckpt["model_args"]))
    vq.load_state_dict(vq_ckpt["model"])
    prior_ckpt = torch.load(run_dir / "prior_best.pt", weights_only=True)
    prior = build_prior(PriorConfig(**prior_ckpt["model_args"]))
    prior.load_state_dict(prior_ckpt["model"])
    codes = prior.sample(3, 0.8, 5, torch.Generator().manual_seed(7))
    expected = ((vq.eval().decode_indices(codes) + 1) / 2).clamp(0, 1)
    for i in range(3):
        img = nib.load(out / "samples" / f"sample_{i:03d}.nii.gz")
        assert img.shape == (32, 16) and img.get_data_dtype() == np.float32
        assert np.allclose(img.affine, np.eye(4))  # no training slice is stored at 32x16: identity
        assert np.allclose(img.get_fdata(), expected[i, 0].numpy(), atol=1e-6)
    gen = json.loads((out / "metrics.json").read_text())["generation"]
    assert gen["top_k"] == 5
    # The study's sample_kid draws and scores them as predict.py does.
    import study
    [(kid_mean, kid_sd, fid)] = study.sample_kid(run_dir, seeds=(7,), num_samples=3, temperature=0.8, top_k=5)
    assert kid_mean == pytest.approx(gen["kid"]["samples"]["mean"], abs=1e-6)
    assert fid == pytest.approx(gen["fid"]["samples"], abs=1e-4)


def test_patient_subset_keeps_whole_patients_and_the_same_held_out_splits(trained, tmp_path):
    """study.patient_subset: a copy of the run whose training split is k whole patients of the run's,
    with the same validation and test slices, recorded in its checkpoints, the model unchanged."""
    import study
    from dataset import slice_position
    cwd, run_dir, _ = trained
    out = study.patient_subset(run_dir, 1, tmp_path / "sub")
    data = out / "data"
    src = Path(json.loads((run_dir / "config.json").read_text())["data_dir"])
    train_names = sorted(f.name for f in (data / "keras_slices_train").iterdir())
    assert len({slice_position(f)[0] for f in train_names}) == 1 and len(train_names) == 4  # one whole patient
    assert set(train_names) < set(f.name for f in (src / "keras_slices_train").iterdir())
    for split in ("validate", "test"):
        assert sorted(f.name for f in (data / f"keras_slices_{split}").iterdir()) == \
            sorted(f.name for f in (src / f"keras_slices_{split}").iterdir())
    old, new = (torch.load(d / "best.pt", weights_only=True) for d in (run_dir, out))
    assert new["config"]["data_dir"] == str(data.resolve()) and new["epoch"] == old["epoch"]
    assert all(torch.equal(new["model"][k], old["model"][k]) for k in old["model"])
    assert json.loads((out / "config.json").read_text())["data_dir"] == str(data.resolve())
    with pytest.raises(study.ProjectError, match="1..2"):
        study.patient_subset(run_dir, 3, tmp_path / "sub3")


def test_slices_at_a_position_and_whole_volumes(trained):
    """--slice_position and --num_volumes: the volumes are NIfTI stacks of one slice per position the
    prior learned (the phantom's 4), on the training slices' affine, and the metrics are reported."""
    cwd, run_dir, _ = trained
    out = cwd / "volumes"
    proc = run("predict.py", "--num_samples", "4", "--slice_position", "2", "--num_volumes", "2", "--top_p", "0.9",
               "--out_dir", out, cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    gen = json.loads((out / "metrics.json").read_text())["generation"]
    assert gen["slice_position"] == 2 and gen["top_p"] == 0.9 and gen["prior_condition"] == "position+previous"
    pos, vol = gen["position"], gen["volumes"]
    assert pos["num_positions"] == 4 and 0 <= pos["conditioned_mae"] <= 3 and 0 <= pos["slice_position_mae"] <= 2
    assert vol["slices"] == 4 and vol["real_pairs"] == 3 and -1 <= vol["neighbour_ssim"] <= 1
    # All 8 slices of the volumes are scored; samples asked at one position are not spread over the volume.
    assert gen["kid"]["volume_slices"]["std"] >= 0 and "samples_at_positions" not in gen["fid"]
    assert -1 <= vol["reconstructed_neighbour_ssim"] <= 1 and "between their reconstructions" in proc.stdout
    assert sorted(p.name for p in (out / "volumes").iterdir()) == ["volume_000.nii.gz", "volume_001.nii.gz"]
    img = nib.load(out / "volumes" / "volume_001.nii.gz")
    assert img.shape == (32, 16, 4) and np.allclose(img.affine, np.eye(4)) and img.get_data_dtype() == np.float32
    assert 0 <= img.get_fdata().min() and img.get_fdata().max() <= 1
    assert (out / "volumes_orthogonal.png").is_file() and "neighbouring-slice SSIM" in proc.stdout
    proc = run("predict.py", "--num_samples", "4", "--slice_position", "4", "--out_dir", out, cwd=cwd)
    assert_clean_error(proc, "--slice_position 4", "0 to 3")


def test_masked_prior_trains_samples_and_builds_volumes(tiny_data, tmp_path):
    """--prior_arch masked end to end: its masked NLL is logged and reported as such, predict.py samples
    in --sample_steps passes and builds volumes slice by slice, and more steps than codes is one line."""
    proc = run("train.py", "--data_dir", tiny_data, "--epochs", "1", "--batch_size", "4", *TINY_MODEL,
               "--prior_arch", "masked", "--prior_epochs", "2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "val masked NLL" in proc.stdout and "done: best prior validation masked NLL" in proc.stdout
    out = tmp_path / "pred"
    proc = run("predict.py", "--num_samples", "4", "--num_volumes", "1", "--sample_steps", "3", "--out_dir", out,
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    gen = json.loads((out / "metrics.json").read_text())["generation"]
    assert gen["prior_arch"] == "masked" and "prior: test masked NLL" in proc.stdout
    assert gen["volumes"]["slices"] == 4 and math.isfinite(gen["kid"]["samples"]["mean"])
    proc = run("predict.py", "--num_samples", "4", "--sample_steps", "1000", "--out_dir", out, cwd=tmp_path)
    assert_clean_error(proc, "--sample_steps 1000", "codes")


def test_volumes_round_trip_through_nifti(tmp_path):
    """write_volumes stores each (P, 1, H, W) stack as (H, W, P) float32 on the given affine, exactly."""
    from predict import write_volumes
    volumes = torch.rand(2, 5, 1, 6, 4)
    affine = np.diag([0.5, 0.7, 2.0, 1.0])
    affine[:3, 3] = [1, 2, 3]
    write_volumes(tmp_path, volumes, affine, None)
    for i in range(2):
        img = nib.load(tmp_path / "volumes" / f"volume_{i:03d}.nii.gz")
        assert img.shape == (6, 4, 5) and np.allclose(img.affine, affine)
        assert img.header.get_zooms() == pytest.approx((0.5, 0.7, 2.0))
        assert np.array_equal(img.get_fdata(dtype=np.float32), volumes[i, :, 0].permute(1, 2, 0).numpy())


def test_bad_inputs_get_one_clear_line(trained, tmp_path):
    cwd, run_dir, _ = trained
    assert_clean_error(run("train.py", "--data_dir", tmp_path / "missing", cwd=tmp_path), "missing", "does not exist")
    assert_clean_error(run("train.py", "--data_dir", tmp_path, cwd=tmp_path), "lacks keras_slices_train")
    # A run folder is never overwritten.
    before = (run_dir / "best.pt").read_bytes()
    assert_clean_error(run("train.py", "--out_dir", run_dir, cwd=cwd), "already holds files")
    assert (run_dir / "best.pt").read_bytes() == before
    # Checkpoints: missing, corrupt, and not ours.
    assert_clean_error(run("predict.py", "--checkpoint", tmp_path / "none.pt", cwd=tmp_path), "does not exist")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(before[: len(before) // 3])
    assert_clean_error(run("predict.py", "--checkpoint", bad, cwd=tmp_path), "bad.pt", "corrupt")
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    assert_clean_error(run("predict.py", "--checkpoint", foreign, cwd=tmp_path), "not a checkpoint of this project")
    assert_clean_error(run("predict.py", cwd=tmp_path), "no checkpoint found")


def test_scripts_show_defaults_in_help():
    out = run("train.py", "--help", cwd=ROOT).stdout
    for flag in ["--epochs", "--batch_size", "--lr", "--image_size", "--num_hiddens", "--num_residual_layers",
                 "--num_residual_hiddens", "--num_downsampling_layers", "--embedding_dim", "--num_embeddings",
                 "--commitment_cost", "--ema", "--decay", "--epsilon", "--seed", "--device", "--data_dir",
                 "--out_dir", "--codebook_init", "--restart_after", "--ssim_weight", "--lr_schedule",
                 "--warmup_steps"]:
        assert flag in out
    assert "default: 512" in out and "default: 0.001" in out


def run_config(*argv):
    """The RunConfig of `python train.py ARGV`."""
    import train
    return config.RunConfig.from_flags(vars(train.get_parser().parse_args(list(argv))))


# The seed configuration as the README writes it (section "Codebook health").
SEED_COMMAND = ("--codebook_init uniform --restart_after 0 --lookup_dim 0 --recon_loss mse --lr_schedule constant "
                "--best_by mse --batch_size 32 --no-clamp_output")


def test_seed_configuration_is_one_command_away():
    """Whatever the defaults, the README's seed command trains the seed: its net (3 stride-2 4x4 convs,
    2 residual layers of 32), 512 codes of 128 dims in a plain lookup with its uniform init and no
    restarts, beta 0.25, EMA off (decay 0.99 when on), the decoder's output unclamped in training, Adam 1e-3 at a constant rate, batch 32,
    20 epochs, MSE, no augmentation, best.pt by validation MSE."""
    assert f"python train.py {SEED_COMMAND}" in (ROOT / "README.md").read_text()
    run = run_config(*SEED_COMMAND.split())
    m, t = run.model, run.train
    assert (m.arch, m.num_downsampling_layers, m.num_hiddens, m.num_residual_layers, m.num_residual_hiddens) == \
        ("seed", 3, 128, 2, 32)
    assert (m.num_embeddings, m.embedding_dim, m.lookup_dim, m.codebook_init, m.restart_after) == \
        (512, 128, 0, "uniform", 0)
    assert (m.commitment_cost, m.ema, m.decay, m.clamp_output) == (0.25, False, 0.99, False)
    assert (t.lr, t.lr_schedule, t.batch_size, t.epochs, t.recon_loss, t.ssim_weight, t.best_by) == \
        (1e-3, "constant", 32, 20, "mse", 0.0, "mse")
    assert (t.aug_flip, t.aug_rotate, t.aug_scale, t.aug_shift, t.aug_gamma) == (0, 0, 0, 0, 0)
    assert run_config("--ema", *SEED_COMMAND.split()).model.ema  # the seed's EMA option


def test_learning_rate_schedules():
    args = run_config("--lr_schedule", "constant").train
    assert all(stage.lr_at(k, args, [200]) == 1e-3 for k in (0, 100, 199))  # the seed's constant rate
    args = run_config("--lr_schedule", "cosine", "--warmup_steps", "10").train
    lrs = [stage.lr_at(k, args, [200]) for k in range(200)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)  # linear warm-up
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))  # then only down
    assert lrs[104] == pytest.approx(5e-4, rel=0.02) and lrs[-1] < 1e-6
    # A run extended to 300 steps: as planned to its first end, then the cosine laid over 300 steps,
    # reached from the decayed rate by a warm-up of its own.
    legs = [stage.lr_at(k, args, [200, 300]) for k in range(300)]
    planned = [stage.lr_at(k, args, [300]) for k in range(300)]
    assert legs[:200] == lrs and legs[209:] == planned[209:] and legs[-1] < 1e-6
    assert legs[200] == pytest.approx(planned[200] / 10) and legs[204] == pytest.approx(planned[204] / 2)
    # A run no longer than the warm-up warms up over a tenth of it (at least one step).
    short = [stage.lr_at(k, args, [10]) for k in range(3)]
    assert short == [1e-3, 1e-3, pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi / 9)))]
    assert stage.warmup_steps(10, 100) == 10 and stage.warmup_steps(10, 10) == 1 and stage.warmup_steps(10, 3) == 1


def test_every_study_configuration_is_a_valid_train_command():
    import study
    seen = set()
    for name, (label, flags) in study.CONFIGS.items():
        r = run_config(*flags)
        key = repr((r.model.to_dict(), vars(r.train)))
        assert key not in seen, name  # no two rows train the same thing
        seen.add(key)
        assert "," not in label  # labels go into study.csv unquoted
    seed = run_config(*study.CONFIGS["seed"][1])
    assert (seed.model.ema, seed.model.codebook_init, seed.model.restart_after) == (False, "uniform", 0)
    assert (seed.model.arch, seed.model.lookup_dim, seed.train.recon_loss, seed.train.aug_flip) == ("seed", 0, "mse", 0)


def test_crops_are_split_by_patient(tmp_path):
    """study.cut_crops puts every slice of a patient in one split, and every patient in one."""
    import nibabel as nib
    import numpy as np
    import study
    for i in range(6):
        nib.save(nib.Nifti1Image(np.full((8, 8, 5), i, np.uint8), np.eye(4)), tmp_path / f"case{i:06d}.nii.gz")
    out = study.cut_crops(tmp_path, tmp_path / "cut", split={"train": 4, "validate": 1, "test": 1})
    cases = {}
    for split in ("train", "validate", "test"):
        files = sorted((out / f"keras_slices_{split}").glob("*.nii.gz"))
        cases[split] = {f.name.split("_week")[0] for f in files}
        assert len(files) == 5 * len(cases[split])  # all 5 slices of each patient
        for f in files:  # the slice holds its own patient's volume
            assert np.asarray(nib.load(f).dataobj).max() == int(f.name.split("_")[1])
    assert [len(c) for c in cases.values()] == [4, 1, 1]
    assert not (cases["train"] & cases["test"]) and not (cases["train"] & cases["validate"])


def test_prostate3t_tiles_are_native_and_split_by_patient(tmp_path):
    """study.cut_prostate3t cuts each slice's central 256x256 into four 128x128 tiles without resampling
    (the pixels are the volume's own) and keeps every patient in one split."""
    import nibabel as nib
    import numpy as np
    import study
    rng = np.random.default_rng(0)
    volumes = [rng.integers(0, 1000, (384, 384, 3)).astype(np.int16) for _ in range(5)]
    for i, v in enumerate(volumes):
        nib.save(nib.Nifti1Image(v, np.diag([0.5, 0.5, 3.0, 1.0])), tmp_path / f"Prostate3T-03-000{i + 1}.nii.gz")
    out = study.cut_prostate3t(tmp_path, tmp_path / "cut")
    patients = {}
    for split, n in study.PROSTATE3T_SPLIT.items():
        files = sorted((out / f"keras_slices_{split}").glob("*.nii.gz"))
        patients[split] = {int(f.name.split("_")[1]) for f in files}
        assert len(patients[split]) == n and len(files) == 4 * 3 * n  # 4 tiles of each of 3 slices
        for f in files:
            _, p, tile, _, k = f.name.removesuffix(".nii.gz").split("_")
            t, k = int(tile.removeprefix("tile")), int(k)
            r, c = 64 + t // 2 * 128, 64 + t % 2 * 128
            assert np.array_equal(np.asarray(nib.load(f).dataobj), volumes[int(p)][r:r + 128, c:c + 128, k])
    assert not (patients["train"] & patients["test"]) and not (patients["train"] & patients["validate"])
    with pytest.raises(study.ProjectError, match="--prostate3t"):
        study.cut_prostate3t(tmp_path / "missing", tmp_path / "x")


def test_a_new_setting_is_one_field():
    """A setting added as one field (here a made-up model setting) becomes a flag with its help and
    default, is range-checked when parsed, and travels into model_args and back unchanged."""
    import argparse
    from dataclasses import make_dataclass
    from modules import VQVAEConfig
    from settings import add_settings, flags_of, setting, settings_from
    from utils import ProjectError
    Config = make_dataclass("Config", [("codebook_dim", int, setting(8, "dimensions of the code lookup", rule=">= 1"))],
                            bases=(VQVAEConfig,))
    p = argparse.ArgumentParser()
    add_settings(p, Config)
    assert "dimensions of the code lookup (default: 8)" in " ".join(p.format_help().split())
    cfg = settings_from(Config, vars(p.parse_args(["--codebook_dim", "4", "--num_embeddings", "64"])))
    assert (cfg.codebook_dim, cfg.num_embeddings) == (4, 64) and flags_of(cfg)["codebook_dim"] == 4
    assert Config.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ProjectError, match="--codebook_dim must be >= 1, got 0"):
        settings_from(Config, vars(p.parse_args(["--codebook_dim", "0"])))


def test_recon_loss_l1_is_a_setting_of_the_run(tiny_data, tmp_path):
    """--recon_loss l1 (added as one field of TrainConfig) trains, is kept in the run, and a resume
    that asks for another is refused by name."""
    run_dir = tmp_path / "run"
    assert run("train.py", "--data_dir", tiny_data, "--epochs", "1", "--batch_size", "4", *TINY_MODEL, "--stage",
               "vqvae", "--recon_loss", "l1", "--out_dir", run_dir, cwd=tmp_path).returncode == 0
    assert json.loads((run_dir / "config.json").read_text())["recon_loss"] == "l1"
    assert_clean_error(run("train.py", "--resume", run_dir, "--recon_loss", "mse", cwd=tmp_path),
                       "recon_loss=l1", "recon_loss=mse")


@pytest.mark.parametrize("best_by", ["mse", "last"])
def test_best_checkpoint_is_the_epoch_best_by_asks_for(tiny_data, tmp_path, best_by):
    """best.pt holds the epoch of the lowest validation MSE in metrics.csv, or with --best_by last the
    last epoch's weights."""
    run_dir = tmp_path / "run"
    proc = run("train.py", "--data_dir", tiny_data, "--epochs", "3", "--batch_size", "4", *TINY_MODEL, "--stage",
               "vqvae", "--lr", "1e-2", "--best_by", best_by, "--out_dir", run_dir, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    with open(run_dir / "metrics.csv") as f:
        mse = [float(r["val_recon_loss"]) for r in csv.DictReader(f)]
    best, last = (torch.load(run_dir / name, weights_only=True) for name in ("best.pt", "last.pt"))
    assert best["epoch"] == (mse.index(min(mse)) + 1 if best_by == "mse" else 3)
    if best_by == "last":
        assert all(torch.equal(v, last["model"][k]) for k, v in best["model"].items())


def test_recon_loss_l1_plus_mse_is_the_sum():
    assert run_config("--recon_loss", "l1+mse").train.recon_loss == "l1+mse"
    a, b = torch.rand(2, 1, 8, 4) * 2 - 1, torch.rand(2, 1, 8, 4) * 2 - 1
    l1, mse = (modules.reconstruction_loss(a, b, kind) for kind in ("l1", "mse"))
    assert l1 == (a - b).abs().mean() and mse == ((a - b) ** 2).mean()
    assert modules.reconstruction_loss(a, b, "l1+mse") == l1 + mse


AUG_FLAGS = ["--aug_flip", "0.5", "--aug_rotate", "10", "--aug_scale", "0.1", "--aug_shift", "0.05", "--aug_gamma", "0.2"]


def test_augmentation_only_in_training_and_reproducible_on_resume(tiny_data, tmp_path, monkeypatch):
    """The --aug_* settings augment every training step, drawn from (seed, global step), and never
    a batch that evaluation sees; a run resumed after epoch 1 ends exactly as an uninterrupted one;
    with every setting 0 augment is not even called."""
    import dataset
    import train
    from utils import run_main
    calls, evaluating, evaluations = [], [], []
    real_augment, real_evaluate = dataset.augment, train.evaluate

    def augment_spy(x, seed, step, **settings):
        assert not evaluating, "a batch was augmented during evaluation"
        calls.append((seed, step, x.shape[0]))
        return real_augment(x, seed, step, **settings)

    def evaluate_spy(*args, **kwargs):  # validation and the comparison figure's slices
        evaluating.append(True)
        evaluations.append(True)
        try:
            return real_evaluate(*args, **kwargs)
        finally:
            evaluating.pop()

    for module in (dataset, train):
        monkeypatch.setattr(module, "augment", augment_spy)
    monkeypatch.setattr(train, "evaluate", evaluate_spy)

    def train_run(out, *flags):
        calls.clear()
        run_main(train.main, train.get_parser().parse_args(
            ["--data_dir", str(tiny_data), "--batch_size", "4", *TINY_MODEL, "--stage", "vqvae", "--device", "cpu",
             "--seed", "3", "--out_dir", str(out), *flags]))
        return list(calls)

    # 8 training slices in batches of 4: 2 steps an epoch, each augmented, seeded by the global step.
    assert train_run(tmp_path / "whole", "--epochs", "2", *AUG_FLAGS) == [(3, k, 4) for k in range(4)]
    assert evaluations  # evaluation ran, and never augmented (augment_spy would have failed)
    assert train_run(tmp_path / "part", "--epochs", "1", *AUG_FLAGS) == [(3, 0, 4), (3, 1, 4)]
    resumed = train_run(tmp_path / "part", "--epochs", "2", "--resume", str(tmp_path / "part"))
    assert resumed == [(3, 2, 4), (3, 3, 4)]
    rows = {name: [r[:-1] for r in csv.reader(open(tmp_path / name / "metrics.csv"))] for name in ("whole", "part")}
    assert rows["whole"] == rows["part"]  # on the CPU: bit-identical, the last column (seconds) aside
    assert json.loads((tmp_path / "whole" / "config.json").read_text())["aug_rotate"] == 10
    # Off (the default): never called, so such a run trains exactly as it did before augmentation existed.
    assert train_run(tmp_path / "plain", "--epochs", "1", "--recon_loss", "l1+mse") == []
    assert train.augment_settings(run_config().train) is None


def test_compile_with_the_lookup_and_gradient_restarts_is_refused():
    """The one combination a compiled step cannot run (restarts change in place the codebook that the
    normalised lookup's backward reads) is refused in one line; with the EMA codebook it runs."""
    from utils import ProjectError
    with pytest.raises(ProjectError, match="--compile with --lookup_dim"):
        config.check_run(run_config("--compile", "--lookup_dim", "8"), 1)
    config.check_run(run_config("--compile", "--lookup_dim", "8", "--ema"), 1)
    with pytest.raises(ProjectError, match="--compile with --lookup_dim"):  # the defaults use the lookup
        config.check_run(run_config("--compile"), 1)
    config.check_run(run_config("--compile", "--lookup_dim", "0"), 1)
