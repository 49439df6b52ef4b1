"""VQ-VAE modules: Encoder, VectorQuantizer, Decoder and the VQVAE that joins them.

Follows van den Oord et al. 2017, "Neural Discrete Representation Learning" (arXiv:1711.00937).
Pure tensor code: no argparse, no file I/O.
"""
import math
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

CODEBOOK_INITS = ("uniform", "kmeans")
ARCHS = ("seed", "resnet")
KMEANS_ITERS = 10


def _distributed():
    return dist.is_available() and dist.is_initialized()


@torch.no_grad()  # an argmin has no gradient: no graph is kept for the (N, K) distances
def _nearest(z, e):
    """z: (N, D), e: (K, D) -> (N,) index of the nearest row of e by squared L2 distance, in fp32:
    argmin over near-ties is precision-sensitive, so autocast is switched off here."""
    with torch.autocast(z.device.type, enabled=False):
        z, e = z.float(), e.float()
        dist2 = z.pow(2).sum(1, keepdim=True) - 2 * z @ e.t() + e.pow(2).sum(1)  # (N, K)
        return dist2.argmin(1)


def _is_channels_last(x):
    """Whether x (B, C, H, W) is stored channels_last (and not also plain contiguous, as when C or H*W is 1)."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def code_counts(indices, K):
    """How often each of K codes occurs in `indices` (any shape, long) -> (K,) long. torch.bincount
    reads the indices' range back to the host on CUDA; a scatter-add never waits for the device."""
    flat = indices.flatten()
    return torch.zeros(K, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


def _random_index(total, n, device):
    """n random indices below `total` by the global torch RNG: distinct when total >= n."""
    return torch.randperm(total, device=device)[:n] if total >= n else torch.randint(total, (n,), device=device)


def _random_rows(z, n):
    """n random rows of the global batch by the global torch RNG: distinct when it has >= n rows, else
    drawn with replacement. z: (N, D), this process's rows; under torch.distributed every rank holds
    N rows and the global batch is the ranks' rows in rank order, the same rows a one-process run of
    that batch would draw (every rank draws the same indices and the picked rows are summed)."""
    N = z.shape[0]
    world, rank = (dist.get_world_size(), dist.get_rank()) if _distributed() else (1, 0)
    pick = _random_index(N * world, n, z.device)
    if world == 1:
        return z[pick]
    local = pick - rank * N
    mine = (local >= 0) & (local < N)
    rows = torch.where(mine[:, None], z[local.clamp(0, N - 1)], torch.zeros((), dtype=z.dtype, device=z.device))
    return _all_reduce(rows)  # each row comes from exactly one rank


@torch.compiler.disable  # collectives run eagerly: a compiled graph (torch.compile of DDP) never holds one
def _all_reduce(t):
    dist.all_reduce(t)
    return t


def _gather_rows(z):
    """z: (N, D) on each rank -> (world * N, D), every rank's rows in rank order (one process: z)."""
    if not _distributed():
        return z
    out = z.new_empty(dist.get_world_size() * z.shape[0], z.shape[1])
    dist.all_gather_single(out, z.contiguous())
    return out


def kmeans(z, k, iters=KMEANS_ITERS):
    """Lloyd's k-means. z: (N, D) -> (k, D) centres, seeded from k distinct random rows of z
    (drawn with replacement when N < k) by the global torch RNG. A centre that loses all its
    points keeps its seed, so no centre is ever empty or NaN. Under torch.distributed, pass the
    gathered global batch: every rank then computes the same centres."""
    centres = z[_random_index(len(z), k, z.device)].float().clone()
    for _ in range(iters):
        assign = _nearest(z, centres)
        counts = code_counts(assign, k)
        sums = torch.zeros_like(centres).index_add_(0, assign, z.float())
        centres = torch.where((counts > 0)[:, None], sums / counts.clamp_min(1)[:, None], centres)
    return centres


SEED_CODEBOOK = {"codebook_init": "uniform", "restart_after": 0}  # the seed's codebook, without health
# What a checkpoint that lacks these fields was: the seed's network and lookup, and its codebook.
SEED_DEFAULTS = {"arch": "seed", "lookup_dim": 0, **SEED_CODEBOOK}


# ----------------------------------------------------------------------------- settings

def setting(default, help, rule=None, choices=None, metavar=None):
    """A config field that is also a command-line setting: its default, its help text and the values
    it allows (rule: '>= a', '> a' or an interval such as 'in [0, 1)'; choices: the allowed values).
    train.py makes each flag from its field, and every config checks itself (check_settings), so a
    new setting is one field plus its use."""
    return field(default=default, metadata={"help": help, "rule": rule, "choices": choices, "metavar": metavar})


def _obeys(value, rule):
    """Whether a number meets `rule` ('>= a', '> a', 'in [a, b)' and the like); NaN never does."""
    if rule.startswith("in "):
        lo, hi = (float(b) for b in rule[4:-1].split(", "))
        return (value >= lo if rule[3] == "[" else value > lo) and (value <= hi if rule[-1] == "]" else value < hi)
    op, bound = rule.split()
    return value >= float(bound) if op == ">=" else value > float(bound)


KIND_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _is_kind(value, kind):
    """isinstance, except that bool is not an int (nor a float) here and an int is a fine float."""
    if isinstance(value, bool):
        return kind is bool
    return isinstance(value, kind) or kind is float and isinstance(value, int)


def check_settings(cfg):
    """Raise ValueError naming the first field of the dataclass `cfg` whose value has the wrong type
    or breaks its rule or choices (a field whose default is None may also be None)."""
    for f in fields(cfg):
        value, meta = getattr(cfg, f.name), f.metadata
        if value is None and f.default is None:
            continue
        if f.type is tuple:  # image_size: a tuple of integers
            items, ok = value, isinstance(value, tuple) and all(_is_kind(v, int) for v in value)
        else:
            items, ok = [value], _is_kind(value, f.type)
        if not ok:
            raise ValueError(f"{f.name} must be {'integers' if f.type is tuple else KIND_NAMES[f.type]}, got {value!r}")
        if meta.get("choices") and value not in meta["choices"]:
            raise ValueError(f"{f.name} must be one of {', '.join(meta['choices'])}, got {value!r}")
        if meta.get("rule") and not all(_obeys(v, meta["rule"]) for v in items):
            rule = meta["rule"]
            need = f"satisfy {f.name} {rule}" if rule.startswith("in ") else f"be {rule}"
            raise ValueError(f"{f.name} must {need}, got {value!r}")


@dataclass
class VQVAEConfig:
    """Model hyperparameters, each a flag of train.py of the same name; saved in checkpoints as the
    plain dict `model_args`, from which predict.py rebuilds the model. The defaults differ from the
    seed in the codebook's health and the 8-dim l2-normalised lookup (see README, the codebook,
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
    each followed by blocks[i] residual blocks, then GN, SiLU and a 3x3 conv to C channels)."""

    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        L, out_channels = cfg.num_downsampling_layers, cfg.in_channels
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

    def forward(self, z):
        x = self.net[:-1](self.residual_stack(self.conv(z)))  # (B, c, H, W) or (B, c, H / 2, W / 2) (seed)
        # The last layer in fp32 even under bf16 autocast, so the reconstruction that the loss, SSIM
        # and the figures see is not rounded to bf16's 8-bit mantissa (one output channel: cheap).
        with torch.autocast(z.device.type, enabled=False):
            return self.net[-1](x.float())  # (B, C, H, W)


class VectorQuantizer(nn.Module):
    """Nearest-neighbour codebook lookup with the straight-through estimator (paper, section 3.1).

    With `ema=True` the codebook is not trained by gradients but by exponential moving averages of
    the encoder outputs assigned to each code (paper, appendix A.1), updated in train mode only.

    Codebook health, acting in train mode only (VQVAEConfig turns both on; SEED_CODEBOOK is off):
    - codebook_init="kmeans": on the first training batch the codebook is set to k-means centres of
      the encoder outputs, so every code starts where the data is (the seed's +-1/K codes sit in a
      tiny ball that one code wins for every input, which is how the codebook collapses);
    - restart_after=S: a code that no encoder output chose for S training steps is re-seeded with a
      random encoder output of the current batch.
    Under torch.distributed (every rank with a batch of the same size) the code counts and EMA sums
    are all-reduced, k-means runs on the gathered global batch and restarts draw from it, so every
    rank holds the same codebook, the one a single process would hold after the same global batch.
    No step waits on the device (no .item() or data-dependent branch), so a GPU is never stalled. The state of
    both (`initialized`, `code_age`) is in buffers, so it is saved and resumed with the weights.
    """

    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        num_embeddings, embedding_dim, ema, codebook_init = cfg.num_embeddings, cfg.embedding_dim, cfg.ema, cfg.codebook_init
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.commitment_cost = cfg.commitment_cost
        self.ema = ema
        self.decay = cfg.decay
        self.epsilon = cfg.epsilon
        self.codebook_init = codebook_init
        self.restart_after = restart_after = cfg.restart_after
        # With lookup_dim the codes live in a small l2-normalised space (Yu et al. 2022, "Vector-quantized
        # image modeling with improved VQGAN"): the nearest code by cosine distance, which keeps nearly
        # every code in use; proj_in and proj_out map the encoder's embedding_dim to it and back.
        self.lookup_dim = cfg.lookup_dim
        code_dim = cfg.lookup_dim or embedding_dim
        if cfg.lookup_dim:
            self.proj_in = nn.Linear(embedding_dim, code_dim)
            self.proj_out = nn.Linear(code_dim, embedding_dim)
        self.codebook = nn.Embedding(num_embeddings, code_dim)
        self.codebook.weight.data.uniform_(-1 / num_embeddings, 1 / num_embeddings)
        if ema:
            self.codebook.weight.requires_grad_(False)
            # Start as if each code had been assigned once to itself: N_i = 1, m_i = e_i. With N_i = 0
            # the first update would divide an unused code by ~epsilon and fling it out of reach.
            self.register_buffer("ema_cluster_size", torch.ones(num_embeddings))
            self.register_buffer("ema_embed_sum", self.codebook.weight.data.clone())
        if codebook_init == "kmeans":
            self.register_buffer("initialized", torch.tensor(False))
        # A host copy of `not initialized`, so that forward never waits on the device to read it.
        self._needs_init = codebook_init == "kmeans"
        self.register_load_state_dict_post_hook(VectorQuantizer._after_load)
        if restart_after > 0:
            self.register_buffer("code_age", torch.zeros(num_embeddings, dtype=torch.long))  # steps unused

    def lookup_space(self, z_flat):
        """Encoder outputs z_flat (N, D) -> the vectors codes are looked up for: (N, lookup_dim) unit
        vectors with lookup_dim, else z_flat itself."""
        return F.normalize(self.proj_in(z_flat), dim=1) if self.lookup_dim else z_flat

    def codes(self):
        """The codebook (K, lookup_dim or D) as the lookup sees it: l2-normalised with lookup_dim. The
        normalisation reads a copy: its backward must see this step's codes, which the restarts and the
        EMA update then change in place (and a compiled graph may recompute from the original)."""
        return F.normalize(self.codebook.weight.clone(), dim=1) if self.lookup_dim else self.codebook.weight

    def nearest(self, z_flat):
        """z_flat: (N, D) encoder outputs -> indices (N,) of the nearest code (squared L2 distance, which
        between unit vectors is cosine distance)."""
        return _nearest(self.lookup_space(z_flat), self.codes())

    def _decoder_input(self, z, shape, memory_format):
        """Looked-up vectors z (N, lookup_dim or D) -> (B, D, h, w) for the decoder in `memory_format`
        (the lookup's own layout, (B, h, w, D) permuted, is channels_last: then no copy is made)."""
        if self.lookup_dim:
            z = self.proj_out(z)  # (N, D)
        B, h, w = shape
        return z.view(B, h, w, -1).permute(0, 3, 1, 2).contiguous(memory_format=memory_format)

    def embed(self, indices, memory_format=torch.contiguous_format):
        """indices: (B, h, w) long -> the decoder's input z_q: (B, D, h, w) in `memory_format`."""
        return self._decoder_input(F.embedding(indices.flatten(), self.codes()), indices.shape, memory_format)

    @torch.compiler.disable  # once, eagerly: never part of a compiled training step
    @torch.no_grad()
    def init_codebook(self, z_e):
        """The codebook <- k-means centres of the encoder outputs z_e (B, D, h, w) of the first
        training batch (of every rank's batch under torch.distributed)."""
        z = self.lookup_space(z_e.permute(0, 2, 3, 1).reshape(-1, z_e.shape[1]))  # (N, lookup_dim or D)
        centres = kmeans(_gather_rows(z.float()), self.num_embeddings)  # (K, lookup_dim or D)
        if _distributed():  # every rank computed them from the same rows; rank 0's copy rules
            dist.broadcast(centres, src=0)
        self._set_codes(torch.ones(self.num_embeddings, dtype=torch.bool, device=z_e.device), centres)
        self.initialized.fill_(True)
        self._needs_init = False

    def forward(self, z_e):
        """z_e: (B, D, h, w) -> dict with z_q (B, D, h, w, straight-through), indices (B, h, w),
        codebook_loss, commitment_loss and vq_loss (scalars). The loss terms are distances in the
        lookup space (between unit vectors with lookup_dim)."""
        B, D, h, w = z_e.shape
        if self.training and self._needs_init:
            self.init_codebook(z_e)
        z = self.lookup_space(z_e.permute(0, 2, 3, 1).reshape(-1, D))  # (B*h*w, lookup_dim or D)
        codes = self.codes()
        indices = _nearest(z, codes)  # (B*h*w,)
        z_q = F.embedding(indices, codes).to(z.dtype)  # (B*h*w, lookup_dim or D), codes before the update
        if self.training and (self.ema or self.restart_after > 0):
            self._update_codebook(z.detach().float(), indices)

        layout = torch.channels_last if _is_channels_last(z_e) else torch.contiguous_format
        if self.lookup_dim:  # the loss terms and the straight-through estimator in the lookup space
            e, q = z, z_q
        else:  # in the encoder's own (B, D, h, w), summed in the seed's order
            e, q = z_e, self._decoder_input(z_q, (B, h, w), layout)
        # Paper eq. 3: L = log p(x|z_q) + ||sg[z_e] - e||^2 + beta * ||z_e - sg[e]||^2.
        # Codebook term moves the codes towards the encoder outputs; the EMA update replaces it.
        if self.ema:
            codebook_loss = z_e.new_zeros(())
        else:
            codebook_loss = F.mse_loss(q, e.detach())
        # Commitment term keeps the encoder outputs close to their codes; beta weights it alone.
        commitment_loss = F.mse_loss(e, q.detach())
        vq_loss = codebook_loss + self.commitment_cost * commitment_loss
        # Straight-through estimator: forward uses z_q, backward copies the gradient to z (and z_e).
        q = e + (q - e).detach()
        return {"z_q": self._decoder_input(q, (B, h, w), layout) if self.lookup_dim else q,
                "indices": indices.view(B, h, w),
                "codebook_loss": codebook_loss, "commitment_loss": commitment_loss, "vq_loss": vq_loss}

    @torch.no_grad()
    def _update_codebook(self, z_flat, indices):
        """One training step's codebook bookkeeping, in the lookup space (z_flat: (N, lookup_dim or D)):
        the EMA update, then dead-code restart."""
        counts = code_counts(indices, self.num_embeddings).float()  # (K,)
        if _distributed():
            _all_reduce(counts)  # code use over the global batch
        if self.ema:
            # Appendix A.1: N_i <- decay N_i + (1-decay) n_i, m_i <- decay m_i + (1-decay) sum z,
            # e_i = m_i / N_i, with Laplace smoothing of N_i so unused codes never divide by zero.
            embed_sum = torch.zeros_like(self.ema_embed_sum).index_add_(0, indices, z_flat)  # (K, D)
            if _distributed():
                _all_reduce(embed_sum)
            self.ema_cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
            self.ema_embed_sum.mul_(self.decay).add_(embed_sum, alpha=1 - self.decay)
            n = self.ema_cluster_size.sum()
            smoothed = (self.ema_cluster_size + self.epsilon) / (n + self.num_embeddings * self.epsilon) * n
            self.codebook.weight.data.copy_(self.ema_embed_sum / smoothed.unsqueeze(1))
        if self.restart_after > 0:
            # Every step draws a candidate for every code and keeps it where the code is dead, so
            # no step waits on the device to learn how many codes died.
            self.code_age.add_(1).masked_fill_(counts > 0, 0)
            dead = self.code_age >= self.restart_after  # (K,) bool
            self._set_codes(dead, _random_rows(z_flat, self.num_embeddings))  # candidates: the same on every rank
            self.code_age.masked_fill_(dead, 0)

    @staticmethod
    def _after_load(module, incompatible_keys):
        if module.codebook_init == "kmeans":
            module._needs_init = not bool(module.initialized)

    @torch.no_grad()
    def _set_codes(self, mask, vectors):
        """Codes where mask (K,) is true <- those rows of vectors (K, D), with fresh EMA state
        N = 1, m = e; branch-free, so the device is never asked which codes changed."""
        vectors = vectors.float()
        weight = self.codebook.weight.data
        weight.copy_(torch.where(mask[:, None], vectors.to(weight.dtype), weight))
        if self.ema:
            self.ema_cluster_size.masked_fill_(mask, 1.0)
            self.ema_embed_sum.copy_(torch.where(mask[:, None], vectors, self.ema_embed_sum))


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
        """indices: (B, h, w) long -> x_recon (B, C, H, W), roughly in [-1, 1]."""
        return self.decoder(self.vq.embed(indices))


# ----------------------------------------------------------------------------- adversarial decoder

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
    400 discriminator steps; with BatchNorm they parted by 5 within 250, see the README)."""

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


# ----------------------------------------------------------------------------- prior over code maps

PRIOR_ARCHS = ("transformer", "pixelcnn")
PRIOR_CONDITIONS = ("none", "position", "position+previous")


@dataclass
class PriorConfig:
    """Prior hyperparameters: the code map's size and codes come from the VQ-VAE (for_vqvae), the
    rest are flags of train.py named prior_<field>; saved in prior checkpoints as `model_args`."""
    num_embeddings: int = field(metadata={"rule": ">= 1"})  # the VQ-VAE's codes; token K is the start token
    latent_h: int = field(metadata={"rule": ">= 1"})  # code-map rows (image height / 2**num_downsampling_layers)
    latent_w: int = field(metadata={"rule": ">= 1"})  # code-map columns
    arch: str = setting("transformer", "causal transformer (sampling with a key/value cache) or the paper's "
                        "gated PixelCNN", choices=PRIOR_ARCHS)
    num_layers: int = setting(4, "transformer blocks or PixelCNN layers", rule="in [1, 256]")
    num_heads: int = setting(4, "attention heads per block (transformer)", rule=">= 1")
    hidden_dim: int = setting(128, "width of the prior", rule=">= 1")
    dropout: float = setting(0.1, "dropout on embeddings and MLPs", rule="in [0, 1)")
    kernel_size: int = setting(5, "masked convolution width (pixelcnn)", rule=">= 1")
    condition: str = setting("position+previous", "what a code map may be generated given: its slice's position "
                             "in the volume, and the previous slice's code map (for whole volumes); each may be left "
                             "out at sampling time", choices=PRIOR_CONDITIONS)
    # Slice positions 0..num_positions-1 the prior tells apart: read from the training file names by
    # train.py (0: none carry one); not a flag.
    num_positions: int = field(default=0, metadata={"rule": ">= 0"})

    def __post_init__(self):
        check_settings(self)
        if self.arch == "transformer" and self.hidden_dim % self.num_heads:
            raise ValueError(f"hidden_dim {self.hidden_dim} must be a multiple of num_heads {self.num_heads}")
        if self.arch == "pixelcnn" and self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (centred on the current column), got {self.kernel_size}")

    @classmethod
    def from_dict(cls, args):
        """A checkpoint's model_args -> PriorConfig; priors saved before conditioning existed were
        unconditional."""
        return cls(**{"condition": "none", **args})

    @classmethod
    def for_vqvae(cls, vq: VQVAEConfig, **settings):
        """The prior over the code maps of the VQ-VAE `vq`, with the given prior settings."""
        h, w = vq.latent_shape
        return cls(num_embeddings=vq.num_embeddings, latent_h=h, latent_w=w, **settings)

    def to_dict(self):
        return asdict(self)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which position t sees positions <= t only."""

    def __init__(self, hidden_dim, num_heads):
        super().__init__()
        if hidden_dim % num_heads:
            raise ValueError(f"hidden_dim {hidden_dim} must be a multiple of num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_dim, 3 * hidden_dim)
        self.proj = nn.Linear(hidden_dim, hidden_dim)

    def forward(self, x, cache=None, pos=0):
        """x: (B, T, C) -> (B, T, C). With a cache (keys and values (B, heads, L, C/heads) of the
        positions before `pos`), x is the single position `pos`, whose key and value are added to it."""
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.num_heads, C // self.num_heads).transpose(1, 2)  # (B, heads, T, C/heads)
                   for t in self.qkv(x).split(C, dim=2))
        if cache is None:
            # No dropout on the attention weights: it forces the slow unfused kernel on the CPU.
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # sampling: one new position attends to itself and everything before it
            assert T == 1, "the cached path takes one position at a time (no mask among new positions)"
            cache["k"][:, :, pos:pos + T], cache["v"][:, :, pos:pos + T] = k, v
            y = F.scaled_dot_product_attention(q, cache["k"][:, :, :pos + T], cache["v"][:, :, :pos + T])
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    """Pre-norm transformer block: x + attention(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, hidden_dim, num_heads, dropout):
        super().__init__()
        self.ln_1 = nn.LayerNorm(hidden_dim)
        self.attn = CausalSelfAttention(hidden_dim, num_heads)
        self.ln_2 = nn.LayerNorm(hidden_dim)
        self.mlp = nn.Sequential(nn.Linear(hidden_dim, 4 * hidden_dim), nn.GELU(),
                                 nn.Linear(4 * hidden_dim, hidden_dim), nn.Dropout(dropout))

    def forward(self, x, cache=None, pos=0):
        x = x + self.attn(self.ln_1(x), cache, pos)
        return x + self.mlp(self.ln_2(x))


def _draw(logits, temperature, top_k, generator, top_p=1.0):
    """logits (n, K) -> (n, 1) codes drawn from softmax(logits / temperature), restricted to the
    top_k most likely codes when top_k > 0 and to the smallest set of most likely codes whose
    probability reaches top_p when top_p < 1 (nucleus sampling, Holtzman et al. 2020)."""
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[1]:
        kth = logits.topk(top_k, dim=1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        probs, order = F.softmax(logits, dim=1).sort(dim=1, descending=True)
        outside = probs.cumsum(1) - probs >= top_p  # the mass before a code already reaches top_p
        logits = logits.masked_fill(outside.scatter(1, order, outside), float("-inf"))
    # argmax_i p_i / E_i with E_i ~ Exp(1) is a draw from p (the exponential race, a form of the
    # Gumbel-max trick), with no host-side check: torch.multinomial validates p on the host on CUDA,
    # about two syncs per code, 512 per sampled map.
    # E is kept above 0: a draw of exactly 0 (about one in 2**24) would make 0 / 0 = NaN for a code
    # that top_k ruled out, and argmax picks NaN.
    p = F.softmax(logits, dim=1)
    e = torch.empty_like(p).exponential_(generator=generator).clamp_min_(torch.finfo(p.dtype).tiny)
    return (p / e).argmax(1, keepdim=True)


class Condition(nn.Module):
    """What a code map is generated given, as features (B, C, h, w) added to the prior's input at every
    position: an embedding of the slice's position in its volume (as a class embedding), and the
    previous slice's code map embedded and mixed over 3x3 neighbours (a depthwise conv: cheap, and
    neighbouring slices move by a pixel or so). The previous map is known in full before the current
    one is drawn, so every position may see all of it without breaking causality; the features
    aligned with code i sit in the input slot that predicts code i. Position num_positions means "no
    position" and code K "no previous slice": the prior trains with each dropped at random, so one
    prior samples with both, either or neither."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        C = cfg.hidden_dim
        self.position = nn.Embedding(cfg.num_positions + 1, C) if cfg.condition != "none" else None
        if cfg.condition == "position+previous":
            self.previous = nn.Embedding(cfg.num_embeddings + 1, C)
            self.mix = nn.Conv2d(C, C, 3, padding=1, groups=C)
        else:
            self.previous = None

    def forward(self, n, position=None, previous=None):
        """position: (n,) long in [0, num_positions] or None (none); previous: (n, h, w) long codes or
        None (none) -> features (n, C, h, w), or 0 for an unconditional prior."""
        if self.position is None:
            return 0
        device = self.position.weight.device
        if position is None:
            position = torch.full((n,), self.cfg.num_positions, dtype=torch.long, device=device)
        out = self.position(position)[:, :, None, None]  # (n, C, 1, 1)
        if self.previous is not None:
            if previous is None:
                previous = torch.full((n, self.cfg.latent_h, self.cfg.latent_w), self.cfg.num_embeddings,
                                      dtype=torch.long, device=device)
            out = out + self.mix(self.previous(previous).permute(0, 3, 1, 2))  # (n, C, h, w)
        return out


def conditions(codes, position, previous, cfg):
    """A split's conditions as the prior takes them: codes (N, h, w), position (N,) and previous (N,)
    (dataset.volume_layout: -1 where none) -> (position (N,), with num_positions where the slice has
    none the prior knows; previous maps (N, h, w), all code K where there is no previous slice)."""
    known = (position >= 0) & (position < cfg.num_positions)
    position = torch.where(known, position, torch.full_like(position, cfg.num_positions))
    none = torch.full_like(codes, cfg.num_embeddings)
    has = (previous >= 0)[:, None, None]
    return position, torch.where(has, codes[previous.clamp_min(0)], none)


class AutoregressivePrior(nn.Module):
    """p(z | c) = prod_i p(z_i | z_<i, c) over a VQ-VAE's code maps in raster order (row by row, left
    to right), where the condition c (Condition) is the slice's position and the previous slice's
    code map, each optional. Subclasses map indices (B, h, w) to logits (B, h*w, K) in which position
    i sees codes < i (and all of c)."""

    def nll(self, indices, position=None, previous=None):
        """indices: (B, h, w) -> (B,) negative log-likelihood per code map, in nats per code."""
        logits = self(indices, position, previous)
        return F.cross_entropy(logits.transpose(1, 2), indices.flatten(1), reduction="none").mean(1)

    @torch.no_grad()
    def sample(self, n, temperature=1.0, top_k=0, generator=None, top_p=1.0, position=None, previous=None,
               guidance=1.0):
        """n code maps (n, h, w) drawn code by code from p(z_i | z_<i, c) / temperature, keeping only the
        top_k most likely codes (top_k > 0) and the top_p nucleus (top_p < 1) at each step, in eval
        mode. position (n,) and previous (n, h, w) condition the draw (None: left out). guidance != 1
        with a position is classifier-free guidance (Ho and Salimans 2022) on it: the logits
        l_free + guidance * (l_position - l_free), l_free those without the position (the previous
        map, if any, in both). `generator` (on the model's device) seeds the draws."""
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        was_training = self.training
        self.eval()

        def draw(logits):  # (n, K) -> (n, 1)
            return _draw(logits, temperature, top_k, generator, top_p)
        m = n
        if guidance != 1 and position is not None:
            # Both halves in one batch, each drawing the code the guided logits choose.
            m, free = 2 * n, torch.full_like(position, self.cfg.num_positions)
            position = torch.cat([position, free])
            previous = None if previous is None else torch.cat([previous, previous])
            plain = draw

            def draw(logits):
                cond, uncond = logits.float().chunk(2)
                return plain(uncond + guidance * (cond - uncond)).repeat(2, 1)
        codes = self._sample_codes(m, draw, position, previous)[:n]
        self.train(was_training)
        return codes.view(n, self.cfg.latent_h, self.cfg.latent_w)

    def _sample_codes(self, n, draw, position, previous):
        """(n, h*w) codes, each drawn by draw(logits (n, K)) -> (n, 1). This generic version reruns the
        whole map per code (h*w passes); the transformer overrides it with a cache."""
        h, w = self.cfg.latent_h, self.cfg.latent_w
        codes = torch.zeros(n, h * w, dtype=torch.long, device=next(self.parameters()).device)
        for i in range(h * w):
            codes[:, i] = draw(self(codes.view(n, h, w), position, previous)[:, i])[:, 0]
        return codes


class GatedMaskedLayer(nn.Module):
    """One layer of the gated PixelCNN (van den Oord et al. 2016): a vertical stack that sees the rows
    above, a horizontal stack that sees the current row to the left and the vertical stack, each
    gated as tanh(a) * sigmoid(b), with residual connections. Causality comes from padding only on
    the top, left and right (vertical: never the bottom) and on the left (horizontal) of kernels
    that end at the current row or column."""

    def __init__(self, dim, kernel_size):
        super().__init__()
        self.p = kernel_size // 2
        self.v_conv = nn.Conv2d(dim, 2 * dim, (self.p + 1, kernel_size))  # rows r-p..r, cols c-p..c+p
        self.v_to_h = nn.Conv2d(2 * dim, 2 * dim, 1)
        self.h_conv = nn.Conv2d(dim, 2 * dim, (1, self.p + 1))  # cols c-p..c of row r
        self.h_out = nn.Conv2d(dim, dim, 1)

    @staticmethod
    def gate(x):
        a, b = x.chunk(2, dim=1)
        return torch.tanh(a) * torch.sigmoid(b)

    def forward(self, v, h):
        p = self.p
        v_feat = self.v_conv(F.pad(v, (p, p, p, 0)))  # (B, 2C, h, w)
        h_feat = self.h_conv(F.pad(h, (p, 0, 0, 0))) + self.v_to_h(v_feat)
        return v + self.gate(v_feat), h + self.h_out(self.gate(h_feat))


class GatedPixelCNN(AutoregressivePrior):
    """The VQ-VAE paper's prior: a gated PixelCNN over the code map. The inputs are shifted once, the
    vertical stack's down by a row and the horizontal stack's right by a column, so every later layer
    may include its own position and the logits at (r, c) see exactly the codes before it in raster
    order (rows above within the receptive field, and the current row to the left)."""

    def __init__(self, cfg: PriorConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.num_embeddings, cfg.hidden_dim)
        self.layers = nn.ModuleList([GatedMaskedLayer(cfg.hidden_dim, cfg.kernel_size)
                                     for _ in range(cfg.num_layers)])
        self.drop = nn.Dropout(cfg.dropout)
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(cfg.hidden_dim, cfg.hidden_dim, 1), nn.ReLU(),
                                  nn.Conv2d(cfg.hidden_dim, cfg.num_embeddings, 1))
        self.cond = Condition(cfg)

    def forward(self, indices, position=None, previous=None):
        """indices: (B, h, w) -> logits (B, h*w, K); logits[:, i] scores code i given codes < i and the
        condition (position (B,), previous (B, h, w); None: left out)."""
        x = self.embed(indices).permute(0, 3, 1, 2)  # (B, C, h, w)
        c = self.cond(len(indices), position, previous)  # (B, C, h, w): the condition is not shifted
        v = F.pad(x, (0, 0, 1, 0))[:, :, :-1] + c  # row r holds row r-1: the rows above only
        h = F.pad(x, (1, 0, 0, 0))[:, :, :, :-1] + c  # column c holds column c-1: the left only
        for layer in self.layers:
            v, h = layer(v, h)
        logits = self.head(self.drop(h))  # (B, K, h, w)
        return logits.flatten(2).transpose(1, 2)  # (B, h*w, K)


def build_prior(cfg: PriorConfig):
    """The prior that cfg.arch names."""
    return (CodePrior if cfg.arch == "transformer" else GatedPixelCNN)(cfg)


class CodePrior(AutoregressivePrior):
    """A small causal transformer over the raster-ordered codes, as in VQGAN (Esser et al. 2021),
    with a start token so the first code has a distribution too. Sampling keeps a key/value cache,
    so each of the h*w steps costs one position, not the whole sequence."""

    def __init__(self, cfg: PriorConfig):
        super().__init__()
        self.cfg = cfg
        self.seq_len = cfg.latent_h * cfg.latent_w
        self.start_token = cfg.num_embeddings
        self.tok_emb = nn.Embedding(cfg.num_embeddings + 1, cfg.hidden_dim)
        self.pos_emb = nn.Embedding(self.seq_len, cfg.hidden_dim)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([Block(cfg.hidden_dim, cfg.num_heads, cfg.dropout)
                                     for _ in range(cfg.num_layers)])
        self.ln_f = nn.LayerNorm(cfg.hidden_dim)
        self.head = nn.Linear(cfg.hidden_dim, cfg.num_embeddings, bias=False)
        self.cond = Condition(cfg)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def _embed(self, tokens, pos, cond):
        """tokens (B, T) at positions pos..pos+T-1, cond (B, T, C) or 0 -> (B, T, C)."""
        positions = torch.arange(pos, pos + tokens.shape[1], device=tokens.device)
        return self.drop(self.tok_emb(tokens) + self.pos_emb(positions) + cond)

    @staticmethod
    def _as_sequence(cond):
        """Condition features (B, C, h, w) -> (B, h*w, C) in raster order (0 stays 0)."""
        return cond if isinstance(cond, int) else cond.flatten(2).transpose(1, 2)

    def forward(self, indices, position=None, previous=None):
        """indices: (B, h, w) codes -> logits (B, h*w, K); logits[:, i] scores code i given codes < i and
        the condition (position (B,), previous (B, h, w); None: left out)."""
        seq = indices.flatten(1)  # (B, L), raster order
        start = seq.new_full((seq.shape[0], 1), self.start_token)
        cond = self._as_sequence(self.cond(len(seq), position, previous))  # (B, L, C)
        x = self._embed(torch.cat([start, seq[:, :-1]], 1), 0, cond)  # inputs shifted right by one
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))  # (B, L, K)

    def _sample_codes(self, n, draw, position=None, previous=None):
        """One position per step through the key/value cache."""
        device = self.pos_emb.weight.device
        C, heads = self.cfg.hidden_dim, self.cfg.num_heads
        caches = [{"k": torch.empty(n, heads, self.seq_len, C // heads, device=device),
                   "v": torch.empty(n, heads, self.seq_len, C // heads, device=device)} for _ in self.blocks]
        out = torch.empty(n, self.seq_len, dtype=torch.long, device=device)
        token = torch.full((n, 1), self.start_token, dtype=torch.long, device=device)
        cond = self._as_sequence(self.cond(n, position, previous))  # (n, L, C) or 0: the same at every step
        for i in range(self.seq_len):
            x = self._embed(token, i, cond if isinstance(cond, int) else cond[:, i:i + 1])  # (n, 1, C)
            for block, cache in zip(self.blocks, caches):
                x = block(x, cache, i)
            token = draw(self.head(self.ln_f(x[:, -1])))  # (n, 1)
            out[:, i] = token[:, 0]
        return out
