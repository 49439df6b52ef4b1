"""The optional adversarial decoder (VQGAN, Esser et al. 2021) of a run's frozen best.pt: a copy of its
decoder trained on the frozen codes with its reconstruction loss plus a PatchGAN discriminator's, so
best.pt, its codes and the prior over them do not change. Writes gan_config.json, gan_metrics.csv,
gan_epoch_NNN_comparison.png, decoder_gan_last.pt (every epoch, to resume) and at the end
decoder_gan.pt. Holds the discriminator and the stage; started by train.py --gan_epochs N."""
import math
import time
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from config import resume_gan
from dataset import epoch_batches, get_batch
from figures import save_image_grid
from files import make_checkpoint, save_checkpoint
from metrics import evaluate_decoder, ssim
from modules import Decoder, reconstruction_loss
from stage import (Pause, StageFiles, encoded_splits, restore, resume_command, resume_partial, start_frozen_stage,
                   write_stage_config)
from stopping import deferred_signals
from utils import ProjectError, autocast_for

GAN_METRICS = ["epoch", "train_recon_loss", "train_disc_loss", "adaptive_weight", "logits_real", "logits_fake",
               "val_recon_loss", "val_ssim", "val_body_ssim", "val_psnr", "seconds"]
BODY_COLUMN = GAN_METRICS.index("val_body_ssim")  # rows of runs from before it get NaN there on resume
NUM_COMPARISON = 6  # validation slices shown in every epoch's comparison figure (the same each epoch)


# ----------------------------------------------------------------------------- the discriminator

def patch_shape(image_size, n_layers):
    """(H, W) -> (h', w') of PatchDiscriminator's logit map: each of the n_layers stride-2 4x4 convs
    (padding 1) halves a side (rounding down), the two stride-1 4x4 convs take 1 off it each; a side
    below 1 means the image is too small for n_layers."""
    sides = []
    for s in image_size:
        for _ in range(n_layers):
            s = (s + 2 - 4) // 2 + 1
        sides.append(s - 2)
    return tuple(sides)


class PatchDiscriminator(nn.Module):
    """PatchGAN of pix2pix (Isola et al. 2017) as taming-transformers' NLayerDiscriminator (Esser et al.
    2021): x (B, C, H, W) in [-1, 1] -> (B, 1, h', w') logits (patch_shape), one per overlapping patch
    (70x70 pixels with n_layers 3): real (> 0) or made by the decoder (< 0).

    4x4 convs with LeakyReLU 0.2: the first n_layers of stride 2 (channels, 2x, 4x, ... up to 8x), then
    one of stride 1 and the stride-1 conv to one logit map. BatchNorm as taming's, and the caller
    passes the real and the decoded slices as one batch, so both are normalised by the same statistics
    (in separate batches each would be normalised by its own, a difference between batches rather than
    between slices). Not GroupNorm: it normalises every slice's features by their own spread, which
    removes the fine-texture energy that tells a blurred decode from a slice (measured on the prostate
    crops: with GroupNorm the logits of real and decoded slices stayed within 0.01 of each other for
    400 discriminator steps; with BatchNorm they parted by 5 within 250, see STUDIES.md)."""

    def __init__(self, in_channels=1, channels=64, n_layers=3):
        super().__init__()
        # The first conv has no norm (pix2pix); a conv followed by a norm has no bias (the norm's is it).
        layers = [nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        c = channels
        for n in range(1, n_layers + 1):
            c_out = channels * min(2 ** n, 8)
            stride = 2 if n < n_layers else 1  # the last of them keeps the size (and widens the patch)
            layers += [nn.Conv2d(c, c_out, 4, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out),
                       nn.LeakyReLU(0.2)]
            c = c_out
        layers.append(nn.Conv2d(c, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*layers)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        """As taming's weights_init (after DCGAN, Radford et al. 2016): conv weights N(0, 0.02) (their
        biases keep torch's init), norm scales N(1, 0.02) and shifts 0."""
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)

    def forward(self, x):
        B, C, H, W = x.shape
        return self.net(x)  # (B, 1, h', w'), h', w' = patch_shape((H, W), n_layers)


# ----------------------------------------------------------------------------- the stage

def train_gan(run, run_dir, typed=None):
    """Train (or resume) the adversarial decoder of run_dir's frozen best.pt. `typed`: the flags typed
    now, checked against a decoder already under way; one that learned an earlier best.pt is moved to
    gan_old_N/."""
    # ---- setup
    run, frozen = start_frozen_stage(run, run_dir, run_dir / "decoder_gan_last.pt", "decoder_gan", resume_gan,
                                     ("decoder_gan*", "gan_*"), typed, check=check_gan)
    args, precision, device, log, vqvae = run.gan, run.train.precision, frozen.device, frozen.log, frozen.vqvae
    files = StageFiles(run_dir, log, "gan_metrics.csv", GAN_METRICS, "decoder_gan_last.pt", lr_flag="--gan_lr")

    # ---- data: the frozen encoder's codes (the decoder's input) and the slices they came from.
    # Never augmented: the codes are those of the plain slices, which the discriminator sees as real.
    _, images, codes = encoded_splits(frozen, args.batch_size, precision)
    n_train = len(codes["train"])
    config = write_stage_config(run, frozen, "gan_", "gan_config.json", recon_loss=run.train.recon_loss,
                                ssim_weight=run.train.ssim_weight)

    # ---- model
    # best.pt's decoder (which stays as it is) with, under --gan_noise, noise scales at zero: the same function
    decoder = Decoder(vqvae.cfg, noise=args.noise).to(device).train()
    decoder.load_state_dict(vqvae.decoder.state_dict(), strict=not args.noise)
    disc = PatchDiscriminator(vqvae.cfg.in_channels, args.disc_channels, args.disc_layers).to(device)
    log(f"adversarial decoder: {sum(p.numel() for p in decoder.parameters()) / 1e6:.2f}M parameters from "
        f"{frozen.vq_path}, discriminator {sum(p.numel() for p in disc.parameters()) / 1e6:.2f}M with "
        f"{'x'.join(map(str, patch_shape(vqvae.cfg.image_size, args.disc_layers)))} patches; {n_train} train / "
        f"{len(codes['validate'])} validation code maps")

    # ---- optimizer: Adam with betas (0.5, 0.9) for both, as taming-transformers (a short memory of
    # gradients that the two players keep changing)
    opt_g = torch.optim.Adam(decoder.parameters(), lr=args.lr, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(disc.parameters(), lr=args.lr, betas=(0.5, 0.9))

    # ---- resume
    start_epoch, rows = 1, []
    if frozen.ckpt:
        start_epoch, _, history = restore(frozen.ckpt, device, f"the adversarial decoder from {files.last}",
                                          f"delete {run_dir}/decoder_gan*.pt to train a new one", model=decoder,
                                          optimizer=opt_g, disc=disc, disc_optimizer=opt_d)
        rows = [r if len(r) == len(GAN_METRICS) else [*r[:BODY_COLUMN], math.nan, *r[BODY_COLUMN:]]
                for r in history["rows"]]
        inside = frozen.ckpt.get("partial")
        log(f"resumed the adversarial decoder in {run_dir} " + (f"at epoch {inside['epoch']}, step {inside['step']}"
                                                                if inside else f"after epoch {start_epoch - 1}"))

    # ---- the reference: best.pt's own decoder on the same codes
    evaluate_on = partial(evaluate_decoder, vqvae=vqvae, device=device, batch_size=args.batch_size, precision=precision)
    fixed = slice(0, NUM_COMPARISON)  # the same validation slices every epoch
    ref_fixed = log_reference(evaluate_on, vqvae, codes["validate"], images["validate"], fixed, frozen.vq_path, log)

    # ---- loop: a stop signal ends the step under way, which is saved to resume from (stage.Pause)
    def checkpoint(epoch, inside=None):
        return make_checkpoint("decoder_gan", decoder, config, opt_g, epoch, history={"rows": rows}, device=device,
                               model_args=vqvae.cfg.to_dict(), vqvae=frozen.vq_id, disc=disc.state_dict(),
                               disc_optimizer=opt_d.state_dict(), partial=inside)
    pause = Pause(files, checkpoint, run.train.save_every_steps, " the adversarial decoder")
    ckpt = frozen.ckpt  # a decoder resumed at its last epoch is saved as it is
    with deferred_signals(resume_command(run_dir, run.train.stage)):
        for epoch in range(start_epoch, args.epochs + 1):
            t0 = time.time()
            tr = gan_epoch(decoder, disc, vqvae, opt_g, opt_d, images["train"], codes["train"], run, epoch, device,
                           frozen.ckpt, pause)
            files.check_finite(tr, "an adversarial decoder training loss", epoch)
            val = evaluate_on(decoder, codes["validate"], images["validate"])
            rows.append([epoch, *tr, val["recon_loss"], val["ssim"].mean().item(), val["body_ssim"].nanmean().item(),
                         val["psnr"].mean().item(), time.time() - t0])
            res = evaluate_on(decoder, codes["validate"][fixed], images["validate"][fixed], keep=True)
            save_gan_comparison(run_dir / f"gan_epoch_{epoch:03d}_comparison.png", epoch,
                                images["validate"][fixed].float().cpu(), ref_fixed, res)
            # ---- save
            ckpt = checkpoint(epoch)
            files.save(rows, ckpt, False, gan_line(dict(zip(GAN_METRICS, rows[-1]))))

    # The last epoch is the decoder: a GAN has no validation criterion to pick one by (validation MSE
    # and SSIM only fall as the adversarial term trades pixel error for realism, and the
    # discriminator's loss measures a moving opponent).
    save_checkpoint(run_dir / "decoder_gan.pt", ckpt)
    log(f"done: adversarial decoder after {ckpt['epoch']} epochs; checkpoint {run_dir / 'decoder_gan.pt'}")


def log_reference(evaluate_on, vqvae, codes, images, fixed, vq_path, log):
    """Log best.pt's own decoder's validation figures on the frozen codes (N, h, w) of the validation
    images (N, 1, H, W) in [0, 1] -> its results on the comparison slices `fixed` (keep=True)."""
    ref = evaluate_on(vqvae.decoder, codes, images)
    log(f"VQ-VAE's decoder ({vq_path.name}): val MSE {ref['recon_loss']:.4f} SSIM {ref['ssim'].mean():.4f} "
        f"(body {ref['body_ssim'].nanmean():.4f}) PSNR {ref['psnr'].mean():.2f}")
    return evaluate_on(vqvae.decoder, codes[fixed], images[fixed], keep=True)


def gan_line(row):
    """One epoch's log line from its metrics row {GAN_METRICS name: value}."""
    return (f"gan epoch {row['epoch']:3d} | recon {row['train_recon_loss']:.4f} | disc {row['train_disc_loss']:.4f} "
            f"(logits real {row['logits_real']:+.2f} decoded {row['logits_fake']:+.2f}) | adaptive weight "
            f"{row['adaptive_weight']:.3g} | val MSE {row['val_recon_loss']:.4f} SSIM {row['val_ssim']:.4f} (body "
            f"{row['val_body_ssim']:.4f}) PSNR "
            f"{row['val_psnr']:.2f} | {row['seconds']:.0f}s")


def gan_epoch(decoder, disc, vqvae, opt_g, opt_d, images, codes, run, epoch, device, ckpt=None, pause=None):
    """One epoch of the adversarial decoder over the training split's images (N, 1, H, W) in [0, 1] and
    codes (N, h, w): per batch a decoder step, then a discriminator step. -> [5 floats], each the
    epoch's mean per step: the reconstruction loss, the discriminator's loss, the adaptive weight (its
    mean over the steps past the warm-up), and the mean logits of real and of decoded slices (the
    generator loss is minus the latter). From the step the resumed checkpoint `ckpt` stopped at, when it
    stopped inside this epoch; pause: stage.Pause."""
    args, train = run.gan, run.train
    batches = epoch_batches(len(codes), args.batch_size, train.seed, epoch, images.device)
    order = torch.cat(batches)
    inside = resume_partial(ckpt, epoch, order)
    step_count = (epoch - 1) * len(batches)
    sums = torch.zeros(5, device=device) if inside is None else inside["sums"].to(device)
    start = inside["step"] if inside else 0
    for step in tqdm(range(start, len(batches)), desc=f"gan epoch {epoch}/{args.epochs}", leave=False,
                     dynamic_ncols=True, initial=start, total=len(batches)):
        idx = batches[step]
        x = get_batch(images, idx, device)  # (B, 1, H, W) in [-1, 1]
        with torch.no_grad():  # the codebook is frozen: no graph into it
            z_q = vqvae.vq.embed(codes[idx])  # (B, D, h, w)
        adversarial = step_count + step >= args.disc_start  # before: the discriminator's warm-up

        # The decoder: L_rec + lambda * disc_weight * L_G (Esser et al. 2021, eq. 5-7), L_G = -E[D(x_fake)]
        # as taming's generator loss, lambda the adaptive weight.
        disc.requires_grad_(False)  # the decoder's step leaves the discriminator's weights alone
        with autocast_for(device, train.precision):
            x_fake = decoder(z_q)  # (B, 1, H, W), fp32 (the decoder's last layer always is)
            rec = reconstruction_loss(x_fake, x, train.recon_loss)
            if train.ssim_weight:  # the run's whole reconstruction objective, as its decoder learned it
                rec = rec + train.ssim_weight * (1 - ssim((x_fake + 1) / 2, (x + 1) / 2)).mean()
            loss, weight = rec, torch.zeros((), device=device)
            if adversarial:  # the real half only shares its batch statistics (PatchDiscriminator)
                gen = -disc(torch.cat([x, x_fake])).float().chunk(2)[1].mean()
                weight = adaptive_weight(rec, gen, decoder.net[-1].weight)
                loss = rec + weight * args.disc_weight * gen
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        opt_g.step()
        disc.requires_grad_(True)

        # The discriminator: hinge loss on the real slices against the decoder's (detached) outputs.
        with autocast_for(device, train.precision):
            # One batch, so both halves are normalised alike -> (B, 1, h', w') logits each
            real, fake = disc(torch.cat([x, x_fake.detach()])).float().chunk(2)
        d_loss = hinge_d_loss(real, fake)
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        sums += torch.stack([rec.detach(), d_loss.detach(), weight, real.detach().mean(), fake.detach().mean()])
        if pause:
            pause.after_step(epoch, step + 1, len(batches), step_count + step + 1,
                             lambda: {"order": order, "sums": sums.clone()})
    tr = (sums / len(batches)).tolist()  # the epoch's one host sync
    adversarial = min(len(batches), max(0, step_count + len(batches) - args.disc_start))  # steps past the warm-up
    tr[2] *= len(batches) / max(adversarial, 1)  # the adaptive weight's mean over the steps that used it
    return tr


def adaptive_weight(rec_loss, gan_loss, last_weight):
    """lambda of Esser et al. 2021, eq. 7, as taming-transformers' calculate_adaptive_weight: the norm
    of the reconstruction loss's gradient over that of the adversarial loss's, both with respect to
    the decoder's last layer weight, clamped to [0, 1e4] and detached (a scale, not a path for
    gradients). The two terms then pull on the decoder's output with comparable strength."""
    rec_grad, = torch.autograd.grad(rec_loss, last_weight, retain_graph=True)
    gan_grad, = torch.autograd.grad(gan_loss, last_weight, retain_graph=True)
    return (rec_grad.norm() / (gan_grad.norm() + 1e-4)).clamp(0, 1e4).detach()


def hinge_d_loss(logits_real, logits_fake):
    """The discriminator's hinge loss, as taming's: (E[relu(1 - D(x))] + E[relu(1 + D(x_fake))]) / 2."""
    return 0.5 * (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean())


def save_gan_comparison(path, epoch, real, ref, res):
    """One row per validation slice: the slice | best.pt's own decoder | the adversarial decoder, from
    real (N, 1, H, W) in [0, 1] and evaluate_decoder's results (keep=True) of the two decoders."""
    grid = torch.stack([real, ref["recons"], res["recons"]], dim=1).flatten(0, 1)  # (3N, 1, H, W), row by row
    save_image_grid(path, grid, f"adversarial decoder, epoch {epoch}: validation slice | VQ-VAE's decoder (best.pt, "
                    f"SSIM {ref['ssim'].mean():.3f}) | adversarial decoder (SSIM {res['ssim'].mean():.3f})",
                    ncols=3, row_labels=[f"SSIM {a:.3f} | {b:.3f}" for a, b in zip(ref["ssim"], res["ssim"])])


def check_gan(run):
    """What no single setting of the adversarial decoder can check: epochs to train, and a
    discriminator whose patch map fits the run's slices."""
    args, (H, W) = run.gan, run.model.image_size
    if not args.epochs:
        raise ProjectError("the adversarial decoder stage trains --gan_epochs epochs, and it is 0 (the default, "
                           "no adversarial decoder); give --gan_epochs N")
    if min(patch_shape((H, W), args.disc_layers)) < 1:
        fits = max((n for n in range(1, args.disc_layers) if min(patch_shape((H, W), n)) >= 1), default=1)
        raise ProjectError(f"--gan_disc_layers {args.disc_layers} leaves the discriminator no patch of a {H}x{W} "
                           f"slice; use --gan_disc_layers {fits} or fewer")
