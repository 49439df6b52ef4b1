"""Train the VQ-VAE on HipMRI 2D slices (or the built-in phantom) and keep the best checkpoint.

Usage: python train.py [--data_dir /path/to/keras_slices_data] [--epochs 20] [--ema] ...

Writes to a new run folder (runs/NNN unless --out_dir): config.json, log.txt, metrics.csv,
best.pt (lowest validation reconstruction MSE), last.pt, epoch_NNN_comparison.png, loss_per_batch.png and
ssim_per_epoch.png.
"""
import argparse
import csv
import json
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from dataset import load_split, make_loader, resolve_data_dir
from modules import VQVAE, VQVAEConfig
from utils import (ProjectError, codebook_stats, evaluate, new_run_dir, pick_device, run_main, save_checkpoint,
                   save_comparison, save_curves, seed_everything, ssim, to_unit, write_json)

METRICS = ["epoch", "train_loss", "train_recon_loss", "train_codebook_loss", "train_commitment_loss",
           "val_loss", "val_recon_loss", "train_ssim", "val_ssim", "val_psnr", "codebook_usage", "perplexity", "seconds"]
NUM_COMPARISON = 6  # validation slices shown in every epoch's comparison figure


def model_config(args):
    return VQVAEConfig(num_hiddens=args.num_hiddens, num_residual_layers=args.num_residual_layers,
                       num_residual_hiddens=args.num_residual_hiddens,
                       num_downsampling_layers=args.num_downsampling_layers,
                       embedding_dim=args.embedding_dim, num_embeddings=args.num_embeddings,
                       commitment_cost=args.commitment_cost, ema=args.ema, decay=args.decay,
                       epsilon=args.epsilon)


def main(args):
    # ---- setup
    seed_everything(args.seed)
    device = pick_device(args.device)
    out_dir = new_run_dir(args.out_dir)
    log_file = open(out_dir / "log.txt", "a")

    def log(msg):
        tqdm.write(msg)
        print(msg, file=log_file, flush=True)

    image_size = tuple(args.image_size)

    # ---- data
    data_dir = resolve_data_dir(args.data_dir)
    train_set = load_split(data_dir, "train", image_size)
    val_set = load_split(data_dir, "validate", image_size)
    train_loader = make_loader(train_set, args.batch_size, shuffle=True, seed=args.seed)
    val_loader = make_loader(val_set, args.batch_size)
    fixed = val_set.images[:NUM_COMPARISON].float() * 2 - 1  # same slices every epoch
    config = {**vars(args), "image_size": list(image_size),
              "data_dir": None if args.data_dir is None else str(data_dir.resolve()),
              "out_dir": str(out_dir), "device": str(device)}
    write_json(out_dir / "config.json", config)
    log(f"run {out_dir}: {len(train_set.files)} train / {len(val_set.files)} validation slices "
        f"from {data_dir}, {image_size[0]}x{image_size[1]}, device {device}")

    # ---- model
    cfg = model_config(args)
    model = VQVAE(cfg).to(device)
    h, w = model.latent_shape(image_size)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params / 1e6:.2f}M parameters, code map {h}x{w} of {cfg.num_embeddings} codes")

    # ---- optimizer
    # With the EMA codebook the codes are buffers updated in forward, so Adam never sees them.
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.lr)

    # ---- loop
    best_val = float("inf")
    batch_losses, history = [], {"train SSIM": [], "validation SSIM": []}
    with open(out_dir / "metrics.csv", "w", newline="") as f:
        csv.writer(f).writerow(METRICS)
    for epoch in range(1, args.epochs + 1):
        t0 = time.time()
        model.train()
        sums = torch.zeros(5)  # loss, recon, codebook, commitment, ssim (summed over slices)
        for x in tqdm(train_loader, desc=f"epoch {epoch}/{args.epochs}", leave=False,
                      dynamic_ncols=True):
            x = x.to(device)
            out = model(x)
            recon_loss = F.mse_loss(out["x_recon"], x)  # -log p(x|z_q) up to constants
            loss = recon_loss + out["vq_loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                train_ssim = ssim(to_unit(out["x_recon"]), to_unit(x)).sum()
                terms = torch.stack([loss, recon_loss, out["codebook_loss"], out["commitment_loss"]])
                sums += torch.cat([terms * x.shape[0], train_ssim[None]]).detach().cpu()
            batch_losses.append(loss.item())
        if not torch.isfinite(sums).all():
            raise ProjectError(f"training loss became NaN or Inf in epoch {epoch}; lower --lr "
                               f"(the last good checkpoint in {out_dir} is kept)")
        tr = (sums / len(train_set.files)).tolist()

        val = evaluate(model, val_loader, device)
        usage, perplexity = codebook_stats(val["counts"])
        row = [epoch, *tr[:4], val["loss"], val["recon_loss"], tr[4], val["ssim"].mean().item(), val["psnr"].mean().item(),
               usage, perplexity, time.time() - t0]
        with open(out_dir / "metrics.csv", "a", newline="") as f:
            csv.writer(f).writerow([f"{v:.6g}" if isinstance(v, float) else v for v in row])
        history["train SSIM"].append(tr[4])
        history["validation SSIM"].append(row[8])

        model.eval()
        with torch.no_grad():
            out = model(fixed.to(device))
        r, xs = to_unit(out["x_recon"]).cpu(), to_unit(fixed)
        fixed_ssim = ssim(r, xs)
        save_comparison(out_dir / f"epoch_{epoch:03d}_comparison.png", xs, out["indices"].cpu(), r,
                        f"epoch {epoch}: validation slices, SSIM {fixed_ssim.mean():.4f}",
                        cfg.num_embeddings, [f"SSIM {s:.3f}" for s in fixed_ssim])

        # ---- save
        # Best by validation reconstruction MSE: it measures the images the decoder makes from the
        # quantized codes, while the VQ terms are latent distances whose scale drifts in training.
        improved = val["recon_loss"] < best_val
        best_val = min(best_val, val["recon_loss"])
        ckpt = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                "best_val": best_val, "model_args": cfg.to_dict(), "config": config}
        save_checkpoint(out_dir / "last.pt", ckpt)
        if improved:
            save_checkpoint(out_dir / "best.pt", ckpt)
        log(f"epoch {epoch:3d} | loss {tr[0]:.4f} (recon {tr[1]:.4f} codebook {tr[2]:.4f} "
            f"commit {tr[3]:.4f}) | val loss {val['loss']:.4f} recon {val['recon_loss']:.4f} "
            f"SSIM {row[8]:.4f} PSNR {row[9]:.2f} | "
            f"codes used {usage:.1%} perplexity {perplexity:.1f} | {row[-1]:.0f}s"
            + (" | best" if improved else ""))

    save_curves(out_dir / "loss_per_batch.png", {"train loss": batch_losses}, "batch", "loss",
                "training loss (MSE + VQ terms) per batch")
    save_curves(out_dir / "ssim_per_epoch.png", history, "epoch", "SSIM (Gaussian, data range 1)",
                "SSIM per epoch")
    log(f"done: best validation reconstruction MSE {best_val:.4f}; checkpoint {out_dir / 'best.pt'}")
    log_file.close()


def get_parser():
    p = argparse.ArgumentParser(description="Train the VQ-VAE on HipMRI 2D slices.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = VQVAEConfig()
    p.add_argument("--data_dir", default=None,
                   help="folder with keras_slices_train/validate/test; None: the built-in phantom")
    p.add_argument("--out_dir", default=None, help="run folder; None: the next runs/NNN")
    p.add_argument("--image_size", type=int, nargs=2, default=[256, 128], metavar=("H", "W"),
                   help="slices are resized to H x W; 256 256 reproduces the seed's stretched grid")
    p.add_argument("--epochs", type=int, default=20, help="passes over the training split")
    p.add_argument("--batch_size", type=int, default=32, help="slices per Adam step")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--num_hiddens", type=int, default=d.num_hiddens,
                   help="channels of the encoder and decoder")
    p.add_argument("--num_residual_layers", type=int, default=d.num_residual_layers,
                   help="residual blocks in the encoder and in the decoder")
    p.add_argument("--num_residual_hiddens", type=int, default=d.num_residual_hiddens,
                   help="channels inside a residual block")
    p.add_argument("--num_downsampling_layers", type=int, default=d.num_downsampling_layers,
                   help="stride-2 convs; the code map is the image size / 2**this")
    p.add_argument("--embedding_dim", type=int, default=d.embedding_dim, help="length of a code vector")
    p.add_argument("--num_embeddings", type=int, default=d.num_embeddings, help="codebook size K")
    p.add_argument("--commitment_cost", type=float, default=d.commitment_cost,
                   help="beta, weighting the commitment term only")
    p.add_argument("--ema", action="store_true", help="EMA codebook updates instead of the codebook loss")
    p.add_argument("--decay", type=float, default=d.decay, help="EMA decay (with --ema)")
    p.add_argument("--epsilon", type=float, default=d.epsilon, help="EMA Laplace smoothing (with --ema)")
    p.add_argument("--seed", type=int, default=0, help="seeds the model init and the data order")
    p.add_argument("--device", default=None, help="cuda, mps or cpu; None picks cuda, then mps, then cpu")
    return p


if __name__ == "__main__":
    run_main(main, get_parser().parse_args())
