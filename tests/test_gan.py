"""The optional adversarial decoder: the PatchGAN's shapes, the adaptive weight, and the gan stage of
train.py, which trains a copy of best.pt's decoder on its frozen codes and leaves best.pt (so the codes
the prior learns) as it was."""
import csv
import math
import shutil

import pytest
import torch

import config
from conftest import TINY_MODEL
from files import fingerprint, save_checkpoint
from gan_stage import PatchDiscriminator, adaptive_weight, hinge_d_loss, patch_shape
from modules import Decoder
from runs import load_gan_decoder
from test_scripts import run
from utils import ProjectError, run_main

# A discriminator that fits the tiny model's 32x16 slices (3 layers would leave no patch), switched on
# after the first of the two steps of an epoch (8 training slices in batches of 4).
GAN_FLAGS = ["--gan_batch_size", "4", "--gan_disc_layers", "2", "--gan_disc_channels", "8", "--gan_disc_start", "1"]


def state_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def load(path):
    return torch.load(path, weights_only=True)


def train_main(*argv):
    """`python train.py ARGV` in this process (faster than a new one), on the CPU."""
    import train
    run_main(train.main, train.get_parser().parse_args([*map(str, argv), "--device", "cpu"]))


@pytest.fixture(scope="module")
def vq_run(tiny_data, tmp_path_factory):
    """A 1-epoch tiny VQ-VAE run without a prior or an adversarial decoder."""
    run_dir = tmp_path_factory.mktemp("gan") / "vq"
    train_main("--data_dir", tiny_data, "--epochs", "1", "--batch_size", "4", *TINY_MODEL, "--stage", "vqvae",
               "--out_dir", run_dir)
    return run_dir


@pytest.mark.parametrize("size, n_layers, expected", [((256, 128), 3, (30, 14)), ((64, 64), 3, (6, 6)),
                                                      ((32, 16), 2, (6, 2))])
def test_discriminator_gives_a_map_of_patch_logits(size, n_layers, expected):
    torch.manual_seed(0)
    disc = PatchDiscriminator(1, 64, n_layers)
    out = disc(torch.rand(2, 1, *size) * 2 - 1)
    assert out.shape == (2, 1, *expected) and patch_shape(size, n_layers) == expected
    convs = [m for m in disc.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == n_layers + 2  # n_layers of stride 2, then two of stride 1
    assert [c.stride[0] for c in convs] == [2] * n_layers + [1, 1]
    w = torch.cat([c.weight.detach().flatten() for c in convs])
    assert abs(w.mean().item()) < 2e-3 and w.std().item() == pytest.approx(0.02, rel=0.05)  # taming's N(0, 0.02)
    assert min(patch_shape((32, 16), 3)) < 1  # 3 layers leave no patch of a 32x16 slice


def test_discriminator_learns_to_tell_blurred_slices_from_sharp_ones():
    """What it is for: sharp textures against the same textures blurred (a decoder's typical error), fed
    as one batch as the gan stage does, part by the hinge loss within 60 steps (a discriminator that does
    not learn, or a loss of the wrong sign, stays near 0). Why BatchNorm and not GroupNorm was measured on
    the crops (README), not here: this toy is easy for both."""
    torch.manual_seed(0)
    disc = PatchDiscriminator(1, 16, 2)
    opt = torch.optim.Adam(disc.parameters(), lr=2e-4, betas=(0.5, 0.9))
    blur = torch.tensor([1.0, 4, 6, 4, 1]) / 16
    blur = (blur[:, None] * blur[None, :])[None, None]
    for _ in range(60):
        sharp = (torch.nn.functional.avg_pool2d(torch.rand(16, 1, 32, 32), 2).repeat_interleave(2, 2)
                 .repeat_interleave(2, 3)) * 2 - 1  # (16, 1, 32, 32) blocky texture in [-1, 1]
        soft = torch.nn.functional.conv2d(torch.nn.functional.pad(sharp, (2, 2, 2, 2), mode="reflect"), blur)
        real, fake = disc(torch.cat([sharp, soft])).chunk(2)
        loss = hinge_d_loss(real, fake)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert real.mean() - fake.mean() > 1.0 and loss.item() < 0.6


def test_adaptive_weight_is_the_ratio_of_the_gradient_norms_and_detached():
    w = torch.tensor([3.0, -4.0], requires_grad=True)  # the "last layer"
    c = torch.tensor([1.0, 2.0, 2.0])
    rec = 0.5 * (w ** 2).sum()  # gradient w: norm 5
    gan = (c[:2] * w).sum() + 0 * c[2]  # gradient (1, 2): norm sqrt(5)
    weight = adaptive_weight(rec, gan, w)
    assert weight.item() == pytest.approx(5 / (5 ** 0.5 + 1e-4))
    assert not weight.requires_grad and w.grad is None  # a scale for the step, no gradient of its own
    # An adversarial loss without gradient there would make it 5 / 1e-4: clamped to 1e4.
    assert adaptive_weight(rec, 0 * w.sum(), w).item() == 1e4
    # The discriminator's hinge loss: 0 once real logits are >= 1 and decoded ones <= -1.
    assert hinge_d_loss(torch.full((2, 1, 3, 3), 1.5), torch.full((2, 1, 3, 3), -2.0)).item() == 0
    assert hinge_d_loss(torch.zeros(2, 1, 3, 3), torch.zeros(2, 1, 3, 3)).item() == 1


def test_gan_stage_trains_a_new_decoder_on_the_same_codes(tiny_data, tmp_path):
    """--gan_epochs 1 in a whole run writes decoder_gan.pt: a decoder unlike best.pt's, for exactly the
    best.pt whose codes the prior then learns; --stage gan --resume extends it and leaves best.pt as it
    was; load_gan_decoder rebuilds it."""
    run_dir = tmp_path / "run"
    train_main("--data_dir", tiny_data, "--epochs", "1", "--batch_size", "4", *TINY_MODEL, "--prior_epochs", "1",
               "--gan_epochs", "1", *GAN_FLAGS, "--out_dir", run_dir)
    for name in ("decoder_gan.pt", "decoder_gan_last.pt", "gan_metrics.csv", "gan_config.json",
                 "gan_epoch_001_comparison.png", "prior_best.pt"):
        assert (run_dir / name).is_file(), name
    best, gan = load(run_dir / "best.pt"), load(run_dir / "decoder_gan.pt")
    assert gan["kind"] == "decoder_gan" and gan["epoch"] == 1 and gan["model_args"] == best["model_args"]
    assert gan["vqvae"] == fingerprint(best["model"]) == load(run_dir / "prior_best.pt")["vqvae"]
    mse_decoder = {k[len("decoder."):]: v for k, v in best["model"].items() if k.startswith("decoder.")}
    assert gan["model"].keys() == mse_decoder.keys() and not state_equal(gan["model"], mse_decoder)
    assert {"disc", "disc_optimizer", "optimizer", "rng"} <= set(gan)
    rows = list(csv.DictReader(open(run_dir / "gan_metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1"] and 0 < float(rows[0]["adaptive_weight"]) <= 1e4
    assert -1 <= float(rows[0]["val_ssim"]) <= 1 and float(rows[0]["val_recon_loss"]) > 0
    assert "gan epoch   1 |" in (run_dir / "log.txt").read_text()

    before = (run_dir / "best.pt").read_bytes()
    proc = run("train.py", "--stage", "gan", "--resume", run_dir, "--gan_epochs", "2", cwd=tmp_path)  # as typed
    assert proc.returncode == 0, proc.stderr
    assert (run_dir / "best.pt").read_bytes() == before  # the encoder and codebook, so the codes, unchanged
    assert load(run_dir / "decoder_gan.pt")["epoch"] == 2 and (run_dir / "gan_epoch_002_comparison.png").is_file()
    assert f"resumed the adversarial decoder in {run_dir} after epoch 1" in (run_dir / "log.txt").read_text()
    # Resumed at its last epoch: nothing left to train, and decoder_gan.pt is that epoch's, written again.
    (run_dir / "decoder_gan.pt").unlink()
    train_main("--stage", "gan", "--resume", run_dir)
    assert load(run_dir / "decoder_gan.pt")["epoch"] == 2

    decoder = load_gan_decoder(run_dir, best, torch.device("cpu"))
    assert isinstance(decoder, Decoder) and not decoder.training
    assert state_equal(decoder.state_dict(), load(run_dir / "decoder_gan.pt")["model"])
    assert decoder(torch.randn(3, 8, 8, 4)).shape == (3, 1, 32, 16)
    assert load_gan_decoder(run_dir / "decoder_gan.pt", best, torch.device("cpu")) is not None
    assert load_gan_decoder(tmp_path, best, torch.device("cpu")) is None  # a folder without one


def test_gan_resume_continues_the_same_run(vq_run, tmp_path):
    """An adversarial decoder stopped after epoch 1 and resumed to 2 ends bit-identical (on the CPU) to
    one trained for 2 epochs at once; a gan flag that differs from the one under way is refused."""
    import train
    whole, part = tmp_path / "whole", tmp_path / "part"
    for d in (whole, part):
        shutil.copytree(vq_run, d)
    train_main("--stage", "gan", "--resume", whole, "--gan_epochs", "2", *GAN_FLAGS)
    train_main("--stage", "gan", "--resume", part, "--gan_epochs", "1", *GAN_FLAGS)
    with pytest.raises(ProjectError, match="gan_disc_channels=8 but this command asks gan_disc_channels=16"):
        train.main(train.get_parser().parse_args(["--stage", "gan", "--resume", str(part), "--gan_disc_channels",
                                                  "16", "--gan_epochs", "2"]))
    train_main("--stage", "gan", "--resume", part, "--gan_epochs", "2")  # the other gan flags: its own
    a, b = load(whole / "decoder_gan.pt"), load(part / "decoder_gan.pt")
    assert a["epoch"] == b["epoch"] == 2
    assert state_equal(a["model"], b["model"]) and state_equal(a["disc"], b["disc"])
    for opt in ("optimizer", "disc_optimizer"):
        assert all(state_equal(a[opt]["state"][k], b[opt]["state"][k]) for k in a[opt]["state"])
    rows = {d: [r[:-1] for r in csv.reader(open(d / "gan_metrics.csv"))] for d in (whole, part)}
    assert rows[whole] == rows[part] and len(rows[whole]) == 3  # the last column is wall seconds


def test_gan_decoder_of_another_vqvae_is_refused(vq_run, tmp_path):
    """load_gan_decoder refuses a decoder_gan.pt made for another best.pt, or a damaged one, in one
    line naming the file; the gan stage moves such a decoder aside and trains a new one."""
    run_dir = tmp_path / "run"
    shutil.copytree(vq_run, run_dir)
    train_main("--stage", "gan", "--resume", run_dir, "--gan_epochs", "1", *GAN_FLAGS)
    best = load(run_dir / "best.pt")
    other = {**best, "model": {k: v + 1 if k == "decoder.conv.bias" else v for k, v in best["model"].items()}}
    with pytest.raises(ProjectError, match=r"decoder_gan\.pt learned the codes of another VQ-VAE.*--stage gan"):
        load_gan_decoder(run_dir, other, torch.device("cpu"))
    data = (run_dir / "decoder_gan.pt").read_bytes()
    damaged = tmp_path / "decoder_gan.pt"
    damaged.write_bytes(data[: len(data) // 2])
    with pytest.raises(ProjectError, match=r"decoder_gan\.pt.*corrupt"):
        load_gan_decoder(damaged, best, torch.device("cpu"))
    # The VQ-VAE changed since: the next gan stage retires the old decoder instead of resuming it.
    save_checkpoint(run_dir / "best.pt", other)
    train_main("--stage", "gan", "--resume", run_dir, "--gan_epochs", "1", *GAN_FLAGS)
    assert (run_dir / "gan_old_1" / "decoder_gan_last.pt").is_file()
    assert load(run_dir / "decoder_gan.pt")["vqvae"] == fingerprint(other["model"])
    assert "moved its files to" in (run_dir / "log.txt").read_text()


def test_gan_settings_are_checked_before_anything_runs(vq_run, tmp_path, monkeypatch):
    """The gan stage needs epochs, a run, one process and a discriminator that fits the slices; its
    flags are a section of their own (prior_flag_names still names only the prior's)."""
    import train
    flags = train.get_parser().parse_args
    prior_flags = config.stage_flag_names("prior_")
    assert all(n.startswith("prior_") for n in prior_flags) and "prior_epochs" in prior_flags
    assert set(config.stage_flag_names("gan_")) == {"gan_epochs", "gan_batch_size", "gan_lr", "gan_disc_weight",
                                           "gan_disc_start", "gan_disc_channels", "gan_disc_layers", "gan_noise"}
    assert config.RunConfig.from_flags({}).gan.epochs == 0  # no adversarial decoder unless asked for
    with pytest.raises(ProjectError, match="--gan_epochs N"):
        train.main(flags(["--stage", "gan", "--resume", str(vq_run)]))
    with pytest.raises(ProjectError, match="--stage gan trains an adversarial decoder for an existing"):
        train.main(flags(["--stage", "gan", "--gan_epochs", "1"]))
    # A new run's discriminator is checked before stage 1 makes a run folder.
    with pytest.raises(ProjectError, match="--gan_disc_layers 3 leaves the discriminator no patch of a 32x16 slice; "
                                           "use --gan_disc_layers 2"):
        train.main(flags([*TINY_MODEL, "--gan_epochs", "1", "--out_dir", str(tmp_path / "new")]))
    assert not (tmp_path / "new").exists()
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ProjectError, match="adversarial decoder trains in one process"):
        train.main(flags(["--stage", "gan", "--resume", str(vq_run), "--gan_epochs", "1"]))
    with pytest.raises(ProjectError, match="--gan_epochs must be >= 0, got -1"):
        config.RunConfig.from_flags(vars(flags(["--gan_epochs", "-1"])))


def test_predict_renders_samples_with_the_adversarial_decoder(vq_run, tmp_path):
    """With decoder_gan.pt in the run (here the texture decoder, --gan_noise), predict.py decodes the samples
    with it and reports both decoders: the test reconstructions' SSIM stays best.pt's, the adversarial
    reconstructions are scored beside, their grain fixed by --seed."""
    import json
    run_dir = tmp_path / "run"
    shutil.copytree(vq_run, run_dir)
    train_main("--stage", "prior", "--resume", run_dir)
    train_main("--stage", "gan", "--resume", run_dir, "--gan_epochs", "1", "--gan_noise", *GAN_FLAGS)
    proc = run("predict.py", "--checkpoint", run_dir / "best.pt", "--num_samples", "4", "--out_dir", tmp_path / "p",
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    gen = json.loads((tmp_path / "p" / "metrics.json").read_text())["generation"]
    assert gen["decoder"] == "adversarial"
    assert {"samples", "samples_mse_decoder", "reconstructions", "reconstructions_adversarial"} <= set(gen["fid"])
    assert -1 <= gen["adversarial_reconstructions"]["ssim_mean"] <= 1
    proc = run("predict.py", "--checkpoint", run_dir / "best.pt", "--num_samples", "4", "--decoder", "mse",
               "--out_dir", tmp_path / "q", cwd=tmp_path)
    mse = json.loads((tmp_path / "q" / "metrics.json").read_text())
    assert proc.returncode == 0 and mse["generation"]["decoder"] == "mse" and "samples_mse_decoder" not in \
        mse["generation"]["fid"]
    assert mse["ssim_mean"] == json.loads((tmp_path / "p" / "metrics.json").read_text())["ssim_mean"]


@pytest.mark.parametrize("arch", ["seed", "resnet"])
def test_noise_injection_starts_as_the_decoder_it_copies_and_draws_fresh_grain(arch):
    """Decoder(noise=True) loads a plain decoder's weights (only its noise scales are new, at 0) and then
    computes the same function; with non-zero scales every call draws new noise, one value per pixel shared
    by a layer's channels, reproducible under a fixed seed, and the scales receive gradients."""
    from modules import NoiseInjection, VQVAEConfig
    torch.manual_seed(0)
    cfg = VQVAEConfig(arch=arch, image_size=(32, 16), num_hiddens=16, num_residual_hiddens=8, embedding_dim=8,
                      channels=(8, 8, 16, 16))
    plain, noisy = Decoder(cfg), Decoder(cfg, noise=True)
    missing = noisy.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing and all(k.startswith("noise.") and k.endswith(".scale") for k in missing)
    assert len(noisy.noise) == len(noisy.noise_at) + 1 == (3 if arch == "seed" else 4)  # + the output's
    z = torch.randn(2, 8, 4, 2)
    assert torch.equal(plain(z), noisy(z))
    for m in noisy.noise:
        torch.nn.init.constant_(m.scale, 0.1)
    torch.manual_seed(1)
    a, b = noisy(z), noisy(z)
    torch.manual_seed(1)
    assert not torch.allclose(a, b) and torch.equal(noisy(z), a)
    a.sum().backward()
    assert all(m.scale.grad is not None and m.scale.grad.abs().sum() > 0 for m in noisy.noise)
    inject = NoiseInjection(3)
    torch.nn.init.constant_(inject.scale, 1.0)
    x = torch.zeros(2, 3, 5, 4)
    out = inject(x)
    assert torch.equal(out[:, 0], out[:, 2]) and not torch.equal(out[0], out[1])  # per pixel, shared by channels


def test_gan_noise_trains_and_load_gan_decoder_rebuilds_the_texture_decoder(vq_run, tmp_path):
    """--gan_noise: decoder_gan.pt holds the noise scales and its config says so; load_gan_decoder rebuilds
    the texture decoder (two calls differ). predict.py with it: test_predict_renders_samples_with_..."""
    run_dir = tmp_path / "run"
    shutil.copytree(vq_run, run_dir)
    train_main("--stage", "gan", "--resume", run_dir, "--gan_epochs", "1", "--gan_noise", *GAN_FLAGS)
    gan, best = load(run_dir / "decoder_gan.pt"), load(run_dir / "best.pt")
    assert gan["config"]["gan_noise"] is True and any(k.startswith("noise.") for k in gan["model"])
    decoder = load_gan_decoder(run_dir, best, torch.device("cpu"))
    z = torch.randn(2, 8, 8, 4)
    assert any(m.scale.abs().sum() > 0 for m in decoder.noise) and not torch.equal(decoder(z), decoder(z))
    # study.py --realism scores both decoders' test reconstructions beside the floor and draws them
    import study
    r = study.realism(run_dir)
    assert set(r) == {"floor", "recon_l1", "recon_texture", "test"} and r["recon_texture"]["kid"] > 0
    assert r["floor"]["ssim"] is None and 0 < r["test"]["blur_ssim_1"] <= 1
    assert (run_dir / "realism_test.png").is_file()
    assert f"({r['recon_texture']['kid'] / r['floor']['kid']:.1f}x)" in study.realism_line(run_dir, r)


def test_the_prior_has_its_own_cosine_schedule(vq_run, tmp_path):
    """--prior_lr_schedule cosine warms the prior's rate up and decays it to near 0 at the last step of
    --prior_epochs; more --prior_epochs add a leg (the cosine laid over the longer run); a warm-up
    longer than the prior's run is scaled down; constant keeps --prior_lr."""
    import train
    flags = train.get_parser().parse_args
    run_dir = tmp_path / "run"
    shutil.copytree(vq_run, run_dir)
    train_main("--stage", "prior", "--resume", run_dir, "--prior_epochs", "2", "--prior_lr_schedule", "cosine",
               "--prior_warmup_steps", "1", "--prior_batch_size", "4")  # 8 maps: 2 steps per epoch, 4 in all
    lr = load(run_dir / "prior_last.pt")["optimizer"]["param_groups"][0]["lr"]
    assert lr == pytest.approx(2e-3 * 0.5 * (1 + math.cos(math.pi * 2 / 3)))  # step 3 of 4, after 1 warm-up step
    train_main("--stage", "prior", "--resume", run_dir, "--prior_epochs", "3")  # a new leg of 2 steps
    ckpt = load(run_dir / "prior_last.pt")
    assert ckpt["epoch"] == 3 and ckpt["config"]["lr_legs"] == [2, 3]
    # The 6th step of a 6-step cosine after 1 warm-up step: at 4/5 (the first leg ended at 2/3).
    assert ckpt["optimizer"]["param_groups"][0]["lr"] == pytest.approx(2e-3 * 0.5 * (1 + math.cos(math.pi * 4 / 5)))
    with pytest.raises(ProjectError, match="cannot shorten the prior"):
        train.main(flags(["--stage", "prior", "--resume", str(run_dir), "--prior_epochs", "2"]))
    shutil.rmtree(run_dir), shutil.copytree(vq_run, run_dir)
    train_main("--stage", "prior", "--resume", run_dir, "--prior_epochs", "1", "--prior_lr_schedule", "cosine",
               "--prior_warmup_steps", "2", "--prior_batch_size", "4", "--device", "cpu")  # 2 steps: 1 of warm-up
    assert "--prior_warmup_steps 2 is not shorter than the prior's run (2 steps): warming up over 1 step" in \
        (run_dir / "log.txt").read_text()
    shutil.rmtree(run_dir), shutil.copytree(vq_run, run_dir)
    train_main("--stage", "prior", "--resume", run_dir, "--prior_epochs", "1")
    assert load(run_dir / "prior_last.pt")["optimizer"]["param_groups"][0]["lr"] == 2e-3


def test_study_grain_head_starts_as_its_input_and_grain_realism_scores_noisy_reconstructions(vq_run, tmp_path):
    """study.GrainHead: the free head is the identity at the start (its last conv is zero); the
    sigma-only head adds white noise of sd softplus(-4) (in [-1, 1] units), a fresh draw per call.
    study.grain_realism scores the L1 reconstructions with and without added noise beside the floor,
    and the noise lowers their blur-SSIM (more grain) and their SSIM; grain_figure draws them."""
    import study
    x = torch.rand(2, 1, 32, 16) * 1.6 - 0.8
    assert torch.equal(study.GrainHead()(x), x)
    sigma = study.GrainHead(sigma_only=True)
    a, b = sigma(x), sigma(x)
    assert not torch.equal(a, b)
    assert (a - x).std().item() == pytest.approx(torch.nn.functional.softplus(torch.tensor(-4.0)).item(), rel=0.2)
    r = study.grain_realism(vq_run, "test", sigmas=(0.05,))
    assert set(r) == {"floor", "recon_l1", "noise 0.05"} and r["floor"]["kid_x_floor"] == 1
    assert r["floor"]["ssim"] is None
    assert r["noise 0.05"]["ssim"] < r["recon_l1"]["ssim"] <= 1
    assert r["noise 0.05"]["blur_ssim_1"] < r["recon_l1"]["blur_ssim_1"] and math.isfinite(r["noise 0.05"]["kid"])
    assert study.grain_figure(vq_run, sigma, tmp_path / "grain.png").is_file()
