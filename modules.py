"""The VQ-VAE: its config (VQVAEConfig), the encoder and decoder (the seed's and a ResNet variant) and
the VQVAE that joins them through the VectorQuantizer (quantizer.py).

Follows van den Oord et al. 2017, "Neural Discrete Representation Learning" (arXiv:1711.00937).
Pure tensor code: no argparse, no file I/O.
"""
import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from quantizer import VectorQuantizer
from settings import check_settings, setting

CODEBOOK_INITS = ("uniform", "kmeans")
ARCHS = ("seed", "resnet")
SEED_CODEBOOK = {"codebook_init": "uniform", "restart_after": 0}  # the seed's codebook, without health
# What a checkpoint that lacks these fields was: the seed's network and lookup, and its codebook.
SEED_DEFAULTS = {"arch": "seed", "lookup_dim": 0, "clamp_output": False, "air_floor": 0.0, **SEED_CODEBOOK}


@dataclass
class VQVAEConfig:
    """Model hyperparameters, each a flag of train.py of the same name; saved in checkpoints as the
    plain dict `model_args`, from which predict.py rebuilds the model. The defaults differ from the
    seed in the codebook's health and the 8-dim l2-normalised lookup (see STUDIES.md, the codebook,
    quality and batch studies)."""
    arch: str = setting("seed", "seed: the seed's network (stride-2 convs, ReLU residual blocks at the code map only: "
                        "num_hiddens, num_residual_*); resnet: GroupNorm+SiLU residual blocks at every resolution "
                        "(channels, blocks, attention)", choices=ARCHS)
    image_size: tuple = setting((256, 128), "slices are resized to H x W; 256 256 reproduces the seed's "
                                "stretched grid", rule="in [1, 4096]", metavar=("H", "W"))
    in_channels: int = field(default=1, metadata={"rule": ">= 1"})  # one MR channel; not a flag
    num_hiddens: int = setting(128, "channels of the encoder and decoder", rule=">= 2")
    num_residual_layers: int = setting(2, "residual blocks in the encoder and in the decoder", rule="in [0, 64]")
    num_residual_hiddens: int = setting(32, "channels inside a residual block", rule=">= 1")
    num_downsampling_layers: int = setting(3, "stride-2 convs; the code map is the image size / 2**this",
                                           rule="in [1, 12]")
    channels: tuple = setting((16, 32, 64, 128), "resnet: channels at each resolution, from the full size to the "
                              "code map's (num_downsampling_layers + 1 numbers)", rule="in [1, 4096]", metavar="C")
    blocks: tuple = setting((0, 1, 1, 2), "resnet: residual blocks at each resolution of the encoder, from the full "
                            "size to the code map's; the decoder mirrors them", rule="in [0, 64]", metavar="N")
    attention: bool = setting(False, "resnet: one self-attention block at the code map's resolution in the encoder "
                              "and in the decoder")
    embedding_dim: int = setting(128, "length of the vector the decoder receives per code", rule=">= 1")
    lookup_dim: int = setting(8, "look codes up in this many dimensions, l2-normalised (cosine distance), with "
                              "linear projections from and back to embedding_dim (Yu et al. 2022); 0: plain "
                              "L2 lookup in embedding_dim, as the seed", rule="in [0, 4096]")
    num_embeddings: int = setting(512, "codebook size K", rule=">= 1")
    commitment_cost: float = setting(0.25, "beta, weighting the commitment term only", rule=">= 0")
    ema: bool = setting(False, "EMA codebook updates instead of the codebook loss")
    decay: float = setting(0.99, "EMA decay (with --ema)", rule="in [0, 1)")
    epsilon: float = setting(1e-5, "EMA Laplace smoothing (with --ema)", rule="> 0")
    codebook_init: str = setting("kmeans", "uniform: the seed's +-1/K codes; kmeans: k-means of the first "
                                 "batch's encoder outputs", choices=CODEBOOK_INITS)
    restart_after: int = setting(2, "re-seed a code unused for this many steps with a random encoder "
                                 "output; 0: never", rule=">= 0")
    clamp_output: bool = setting(True, "clamp the decoder's output to [-1, 1] in training as in every figure and "
                                 "metric, so air that settles below -1 reads exactly 0 (only gradients that pull a "
                                 "value back into range pass the clamp); --no-clamp_output: the seed's unclamped "
                                 "output")
    air_floor: float = setting(0.0, "with clamp_output, in evaluation (validation, test, samples): output below "
                               "this fraction of the [0, 1] range reads exactly 0, so the dim noise floor around a "
                               "masked HipMRI slice's body renders as black air (0.02 for HipMRI at 8x "
                               "compression); 0: only output below -1 does", rule="in [0, 0.5)")

    def __post_init__(self):
        for name in ("image_size", "channels", "blocks"):  # lists, as checkpoints and JSON hold them
            if isinstance(getattr(self, name), list):
                setattr(self, name, tuple(getattr(self, name)))
        check_settings(self)
        if len(self.image_size) != 2:
            raise ValueError(f"image_size must be two numbers, H and W, got {self.image_size!r}")
        levels = self.num_downsampling_layers + 1
        for name in ("channels", "blocks"):
            if self.arch == "resnet" and len(getattr(self, name)) != levels:
                raise ValueError(f"{name} must be {levels} numbers, one per resolution (num_downsampling_layers "
                                 f"is {self.num_downsampling_layers}), got {getattr(self, name)!r}")
        self.latent_shape  # the image size must divide into the code map

    @property
    def latent_shape(self):
        """(h, w) of the code map: image_size / 2**num_downsampling_layers."""
        return latent_shape(self.image_size, self.num_downsampling_layers)

    def to_dict(self):
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, model_args):
        """Rebuild from a checkpoint's model_args; fields it lacks were written before they existed,
        when the network and the codebook were the seed's."""
        return cls(**{**SEED_DEFAULTS, **model_args})


def latent_shape(image_size, num_downsampling_layers):
    """(H, W) -> (h, w) of the code map; H and W must be positive multiples of 2**num_downsampling_layers."""
    f = 2 ** num_downsampling_layers
    H, W = image_size
    if H <= 0 or W <= 0 or H % f or W % f:
        raise ValueError(f"image_size {H}x{W} must be a positive multiple of {f}, as num_downsampling_layers "
                         f"is {num_downsampling_layers}")
    return H // f, W // f


class ResidualStack(nn.Module):
    """`num_residual_layers` blocks of ReLU-3x3conv-ReLU-1x1conv with identity skips, then ReLU."""

    def __init__(self, num_hiddens, num_residual_layers, num_residual_hiddens):
        super().__init__()
        self.layers = nn.ModuleList([
            nn.Sequential(
                nn.ReLU(),
                nn.Conv2d(num_hiddens, num_residual_hiddens, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(num_residual_hiddens, num_hiddens, 1),
            )
            for _ in range(num_residual_layers)
        ])

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return F.relu(x)


def _norm(c):
    """GroupNorm of c channels in up to 32 groups (as many as divide c)."""
    return nn.GroupNorm(math.gcd(32, c), c)


class ResBlock(nn.Module):
    """x + conv3x3(SiLU(GN(conv3x3(SiLU(GN(x)))))): the pre-activation residual block of the VQGAN and
    latent-diffusion autoencoders (Esser et al. 2021). x: (B, c, H, W) -> (B, c, H, W)."""

    def __init__(self, c):
        super().__init__()
        self.block = nn.Sequential(_norm(c), nn.SiLU(), nn.Conv2d(c, c, 3, padding=1),
                                   _norm(c), nn.SiLU(), nn.Conv2d(c, c, 3, padding=1))

    def forward(self, x):
        return x + self.block(x)


class AttnBlock(nn.Module):
    """x + one-head self-attention over the h*w positions of x (B, c, h, w) -> (B, c, h, w): at the code
    map's resolution every code sees the whole slice (Esser et al. 2021)."""

    def __init__(self, c):
        super().__init__()
        self.norm = _norm(c)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.proj = nn.Conv2d(c, c, 1)

    def forward(self, x):
        B, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).flatten(2).transpose(1, 2).chunk(3, dim=-1)  # 3 x (B, h*w, c)
        a = F.scaled_dot_product_attention(q, k, v)  # (B, h*w, c)
        return x + self.proj(a.transpose(1, 2).reshape(B, c, h, w))


def _down(c_in, c_out):
    """GN, SiLU, then a stride-2 4x4 conv (the seed's downsampling): (B, c_in, H, W) -> (B, c_out, H/2, W/2)."""
    return nn.Sequential(_norm(c_in), nn.SiLU(), nn.Conv2d(c_in, c_out, 4, stride=2, padding=1))


def _up(c_in, c_out):
    """GN, SiLU, then a stride-2 4x4 transposed conv (the seed's upsampling; 16 multiply-adds per input
    pixel and channel pair, where nearest upsampling + 3x3 conv costs 36): (B, c_in, h, w) -> (B, c_out, 2h, 2w)."""
    return nn.Sequential(_norm(c_in), nn.SiLU(), nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1))


def _mid(cfg):
    """The blocks at the code map's resolution: blocks[-1] residual blocks, attention after the first."""
    c, n = cfg.channels[-1], cfg.blocks[-1]
    layers = [ResBlock(c) for _ in range(n)]
    if cfg.attention:
        layers.insert(min(1, n), AttnBlock(c))
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    """x: (B, C, H, W) -> (B, out_channels, H / 2**L, W / 2**L), L = num_downsampling_layers.

    arch "seed": L stride-2 4x4 convs with ReLU, a 3x3 conv and a ReLU residual stack (out_channels =
    num_hiddens). arch "resnet": a 3x3 conv, then at each resolution blocks[i] residual blocks of
    channels[i] followed by a stride-2 conv, the blocks (and attention) of the code map's resolution,
    GN and SiLU (out_channels = channels[-1])."""

    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        L = cfg.num_downsampling_layers
        if cfg.arch == "resnet":
            ch, layers = cfg.channels, [nn.Conv2d(cfg.in_channels, cfg.channels[0], 3, padding=1)]
            for i in range(L):
                layers += [ResBlock(ch[i]) for _ in range(cfg.blocks[i])]  # (B, ch[i], H / 2**i, W / 2**i)
                layers.append(_down(ch[i], ch[i + 1]))
            layers += [*_mid(cfg), _norm(ch[-1]), nn.SiLU()]
            self.net, self.residual_stack, self.out_channels = nn.Sequential(*layers), nn.Identity(), ch[-1]
            return
        in_channels, num_hiddens = cfg.in_channels, cfg.num_hiddens
        layers = []
        for i in range(L):
            c_in = in_channels if i == 0 else num_hiddens // 2
            c_out = num_hiddens if i == L - 1 else num_hiddens // 2
            layers += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), nn.ReLU()]
        layers.append(nn.Conv2d(num_hiddens, num_hiddens, 3, padding=1))
        self.net = nn.Sequential(*layers)
        self.residual_stack = ResidualStack(num_hiddens, cfg.num_residual_layers, cfg.num_residual_hiddens)
        self.out_channels = num_hiddens

    def forward(self, x):
        return self.residual_stack(self.net(x))  # (B, out_channels, h, w)


class Decoder(nn.Module):
    """z: (B, embedding_dim, h, w) -> (B, C, h * 2**L, w * 2**L), mirroring the Encoder of the same arch:
    a 3x3 conv, the code map's blocks (`residual_stack`), then `net`: L stride-2 transposed convs (resnet:
    each followed by blocks[i] residual blocks, then GN, SiLU and a 3x3 conv to C channels).

    noise: the texture decoder's noise injection (StyleGAN, Karras et al. 2019): fresh per-pixel noise
    with a learned scale per channel (NoiseInjection, zero at the start) added to the inputs of the last
    two upsampling layers (resnet: and of the output head) and to the output, so the decoder can render
    MR's grain, which no deterministic function of the codes can (a fresh draw at every call)."""

    def __init__(self, cfg: VQVAEConfig, noise=False):
        super().__init__()
        L, out_channels = cfg.num_downsampling_layers, cfg.in_channels
        self.clamp, self.floor = cfg.clamp_output, cfg.air_floor
        self.noise_at, self.noise = {}, nn.ModuleList()  # net index whose input gets noise -> its module's index
        if cfg.arch == "resnet":
            ch = cfg.channels
            self.conv = nn.Conv2d(cfg.embedding_dim, ch[-1], 3, padding=1)
            self.residual_stack = _mid(cfg)
            layers = []
            for i in reversed(range(L)):
                layers.append(_up(ch[i + 1], ch[i]))  # (B, ch[i], H / 2**i, W / 2**i)
                layers += [ResBlock(ch[i]) for _ in range(cfg.blocks[i])]
            layers += [_norm(ch[0]), nn.SiLU(), nn.Conv2d(ch[0], out_channels, 3, padding=1)]
            self.net = nn.Sequential(*layers)
            if noise:
                ups = [i for i, m in enumerate(layers) if isinstance(m, nn.Sequential)]  # the _up blocks
                self._add_noise([*ups[-2:], len(layers) - 3], [*(layers[i][-1].in_channels for i in ups[-2:]), ch[0]],
                                out_channels)
            return
        num_hiddens = cfg.num_hiddens
        self.conv = nn.Conv2d(cfg.embedding_dim, num_hiddens, 3, padding=1)
        self.residual_stack = ResidualStack(num_hiddens, cfg.num_residual_layers, cfg.num_residual_hiddens)
        layers = []
        for i in range(L):
            last = i == L - 1
            c_in = num_hiddens if i == 0 else num_hiddens // 2
            c_out = out_channels if last else num_hiddens // 2
            layers.append(nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1))
            if not last:
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)
        if noise:
            ups = [i for i, m in enumerate(layers) if isinstance(m, nn.ConvTranspose2d)]
            self._add_noise(ups[-2:], [layers[i].in_channels for i in ups[-2:]], out_channels)

    def _add_noise(self, at, channels, out_channels):
        """Noise on the inputs of net[i] for i in `at` (of `channels` channels each) and on the output."""
        self.noise_at = {i: k for k, i in enumerate(at)}
        self.noise = nn.ModuleList([NoiseInjection(c) for c in [*channels, out_channels]])

    def forward(self, z):
        x = self.residual_stack(self.conv(z))  # (B, c, h, w)
        for i, layer in enumerate(self.net[:-1]):
            if i in self.noise_at:
                x = self.noise[self.noise_at[i]](x)
            x = layer(x)  # ends (B, c, H, W) or (B, c, H / 2, W / 2) (seed)
        # The last layer in fp32 even under bf16 autocast, so the reconstruction that the loss, SSIM
        # and the figures see is not rounded to bf16's 8-bit mantissa (one output channel: cheap).
        with torch.autocast(z.device.type, enabled=False):
            x = x.float()
            if len(self.net) - 1 in self.noise_at:
                x = self.noise[self.noise_at[len(self.net) - 1]](x)
            x = self.net[-1](x)  # (B, C, H, W)
            if self.noise_at:
                x = self.noise[-1](x)
        if not self.clamp:
            return x
        x = clamp_into_range(x)
        # The floor (air_floor) only in evaluation: a masked slice's air is a dim noise floor whose zeros no
        # code can place, so the decoder renders its mean, a little above 0; below the floor that reads as
        # black air. Trained with it, air whose target is the floor's mean flips between 0 and the floor
        # from step to step, as unclamped air did (STUDIES.md, sections 11 and 14).
        return x.masked_fill(x < -1 + 2 * self.floor, -1) if self.floor and not self.training else x


class NoiseInjection(nn.Module):
    """x + scale * n: n ~ N(0, 1), one fresh value per pixel shared by the channels, scale one learned
    number per channel, zero at the start (StyleGAN's noise inputs). x: (B, c, H, W) -> (B, c, H, W)."""

    def __init__(self, c):
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(c))

    def forward(self, x):
        B, _, H, W = x.shape
        return x + self.scale.view(1, -1, 1, 1).to(x.dtype) * torch.randn(B, 1, H, W, device=x.device, dtype=x.dtype)


class ClampIntoRange(torch.autograd.Function):
    """x.clamp(-1, 1) whose gradient still pulls a value outside [-1, 1] back in, never further out.

    Masked slices hold exact zeros (-1 here) around the body. Unclamped, the loss pulls air to -1 from both
    sides and it lands on either, so about half of it reads a little above 0 and SSIM, whose luminance term
    collapses in a flat black area, swings with that sign from step to step. Clamped, air below -1 meets
    its target exactly: no gradient, and it stays exactly 0. A plain clamp also stops the gradient of body
    pixels below -1, and one early step that put the whole output below -1 left the net dead for good
    (STUDIES.md, section 11); here their gradient passes, as it pushes them up."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp(-1, 1)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        # descent moves x by -grad: below -1 only a negative gradient moves it back up, above 1 a positive one
        return grad.masked_fill(((x < -1) & (grad > 0)) | ((x > 1) & (grad < 0)), 0)


clamp_into_range = ClampIntoRange.apply



class VQVAE(nn.Module):
    """Encoder -> 1x1 pre-quantization conv -> VectorQuantizer -> Decoder."""

    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.pre_vq_conv = nn.Conv2d(self.encoder.out_channels, cfg.embedding_dim, 1)
        self.vq = VectorQuantizer(cfg)
        self.decoder = Decoder(cfg)

    def latent_shape(self, image_size=None):
        """(h, w) of the code map of images of `image_size` (H, W); None: the model's own input size."""
        return self.cfg.latent_shape if image_size is None else latent_shape(image_size, self.cfg.num_downsampling_layers)

    def forward(self, x):
        """x: (B, C, H, W) in [-1, 1] -> dict with x_recon (B, C, H, W), indices (B, h, w) and the
        VQ loss terms of VectorQuantizer.forward."""
        z_e = self.pre_vq_conv(self.encoder(x))  # (B, D, h, w)
        out = self.vq(z_e)
        out["x_recon"] = self.decoder(out.pop("z_q"))  # (B, C, H, W)
        return out

    @torch.no_grad()
    def encode(self, x):
        """x: (B, C, H, W) in [-1, 1] -> indices (B, h, w) into the codebook."""
        z_e = self.pre_vq_conv(self.encoder(x))  # (B, D, h, w)
        B, D, h, w = z_e.shape
        return self.vq.nearest(z_e.permute(0, 2, 3, 1).reshape(-1, D)).view(B, h, w)

    @torch.no_grad()
    def decode_indices(self, indices):
        """indices: (B, h, w) long -> x_recon (B, C, H, W) in [-1, 1] (roughly, without clamp_output)."""
        return self.decoder(self.vq.embed(indices))


def reconstruction_loss(x_recon, x, kind):
    """The reconstruction term, a mean over the batch's pixels: -log p(x|z_q) up to constants of a
    Gaussian decoder (mse, as the paper), of a Laplacian one (l1), or their sum (l1+mse): L1's gradient
    does not fade as an error shrinks, which sharpens edges, while the MSE term keeps the paper's
    Gaussian likelihood (and the validation criterion) in the objective."""
    if kind == "mse":
        return F.mse_loss(x_recon, x)
    if kind == "l1":
        return F.l1_loss(x_recon, x)
    return F.l1_loss(x_recon, x) + F.mse_loss(x_recon, x)
