"""The prior over a VQ-VAE's code maps: its config, the conditioning on the slice's position and the
previous slice, the autoregressive prior (a causal transformer), the masked-token prior (MaskGIT's
bidirectional transformer) and their sampling.

Pure tensor code: no argparse, no file I/O.
"""
import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from modules import VQVAEConfig
from settings import check_settings, setting
from utils import ProjectError

PRIOR_ARCHS = ("transformer", "masked")
PRIOR_CONDITIONS = ("none", "position", "position+previous")


@dataclass
class PriorConfig:
    """Prior hyperparameters: the code map's size and codes come from the VQ-VAE (for_vqvae), the
    rest are flags of train.py named prior_<field>; saved in prior checkpoints as `model_args`."""
    num_embeddings: int = field(metadata={"rule": ">= 1"})  # the VQ-VAE's codes; token K is the start token
    latent_h: int = field(metadata={"rule": ">= 1"})  # code-map rows (image height / 2**num_downsampling_layers)
    latent_w: int = field(metadata={"rule": ">= 1"})  # code-map columns
    arch: str = setting("transformer", "causal transformer (sampling code by code with a key/value cache), or a "
                        "masked-token transformer (MaskGIT: all codes at once, in predict.py --sample_steps "
                        "steps)", choices=PRIOR_ARCHS)
    num_layers: int = setting(4, "transformer blocks", rule="in [1, 256]")
    num_heads: int = setting(4, "attention heads per block (transformer, masked)", rule=">= 1")
    hidden_dim: int = setting(128, "width of the prior", rule=">= 1")
    dropout: float = setting(0.1, "dropout on embeddings and MLPs", rule="in [0, 1)")
    condition: str = setting("position+previous", "what a code map may be generated given: its slice's position "
                             "in the volume, and the previous slice's code map (for whole volumes); each may be left "
                             "out at sampling time", choices=PRIOR_CONDITIONS)
    # Slice positions 0..num_positions-1 the prior tells apart: read from the training file names by
    # train.py (0: none carry one); not a flag.
    num_positions: int = field(default=0, metadata={"rule": ">= 0"})

    def __post_init__(self):
        check_settings(self)
        if self.hidden_dim % self.num_heads:
            raise ValueError(f"hidden_dim {self.hidden_dim} must be a multiple of num_heads {self.num_heads}")

    @classmethod
    def from_dict(cls, args, source="this prior"):
        """A checkpoint's model_args -> PriorConfig; priors saved before conditioning existed were
        unconditional. source: the checkpoint, named in the error for a prior this version lacks."""
        if args.get("arch") == "pixelcnn":
            raise ProjectError(f"{source} is a gated PixelCNN (--prior_arch pixelcnn), which this version no longer "
                               "has (it lost to the transformer on unseen patients: STUDIES.md 18); delete the run's "
                               "prior_*.pt and train a prior again: python train.py --stage prior --resume RUN_DIR")
        # kernel_size was the PixelCNN's setting; every prior saved before the PixelCNN went carries it
        args = {k: v for k, v in args.items() if k != "kernel_size"}
        return cls(**{"condition": "none", **args})

    @classmethod
    def for_vqvae(cls, vq: VQVAEConfig, **settings):
        """The prior over the code maps of the VQ-VAE `vq`, with the given prior settings."""
        h, w = vq.latent_shape
        return cls(num_embeddings=vq.num_embeddings, latent_h=h, latent_w=w, **settings)

    def to_dict(self):
        return asdict(self)


class SelfAttention(nn.Module):
    """Multi-head self-attention; causal: position t sees positions <= t only, else every position."""

    def __init__(self, hidden_dim, num_heads, causal=True):
        super().__init__()
        if hidden_dim % num_heads:
            raise ValueError(f"hidden_dim {hidden_dim} must be a multiple of num_heads {num_heads}")
        self.num_heads, self.causal = num_heads, causal
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
            y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        else:  # sampling: one new position attends to itself and everything before it
            assert T == 1, "the cached path takes one position at a time (no mask among new positions)"
            cache["k"][:, :, pos:pos + T], cache["v"][:, :, pos:pos + T] = k, v
            y = F.scaled_dot_product_attention(q, cache["k"][:, :, :pos + T], cache["v"][:, :, :pos + T])
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    """Pre-norm transformer block: x + attention(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, hidden_dim, num_heads, dropout, causal=True):
        super().__init__()
        self.ln_1 = nn.LayerNorm(hidden_dim)
        self.attn = SelfAttention(hidden_dim, num_heads, causal)
        self.ln_2 = nn.LayerNorm(hidden_dim)
        self.mlp = nn.Sequential(nn.Linear(hidden_dim, 4 * hidden_dim), nn.GELU(),
                                 nn.Linear(4 * hidden_dim, hidden_dim), nn.Dropout(dropout))

    def forward(self, x, cache=None, pos=0):
        x = x + self.attn(self.ln_1(x), cache, pos)
        return x + self.mlp(self.ln_2(x))


def replace_codes(indices, fraction, num_embeddings, generator=None):
    """indices (B, h, w) with each code replaced, with probability `fraction`, by one drawn uniformly
    from the K codes (taming-transformers' pkeep = 1 - fraction): a prior trained on such inputs
    learns to predict from a context that is not always right, as its own samples are not."""
    swap = torch.rand(indices.shape, generator=generator, device=indices.device) < fraction
    noise = torch.randint(num_embeddings, indices.shape, generator=generator, device=indices.device)
    return torch.where(swap, noise, indices)


def check_sampling(temperature, top_p):
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


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
    code map, each optional. A subclass maps indices (B, h, w) to logits (B, h*w, K) in which position
    i sees codes < i (and all of c), and draws maps in _sample_codes(n, draw(logits (n, K)) -> (n, 1),
    position, previous) -> (n, h*w)."""

    def nll(self, indices, position=None, previous=None, generator=None, noise=0.0):
        """indices: (B, h, w) -> (B,) negative log-likelihood per code map, in nats per code; with noise
        > 0 the inputs (not the targets) are replace_codes(indices, noise), drawn from `generator`."""
        inputs = replace_codes(indices, noise, self.cfg.num_embeddings, generator) if noise else indices
        logits = self(inputs, position, previous)
        return F.cross_entropy(logits.transpose(1, 2), indices.flatten(1), reduction="none").mean(1)

    @torch.no_grad()
    def sample(self, n, temperature=1.0, top_k=0, generator=None, top_p=1.0, position=None, previous=None,
               guidance=1.0, steps=None):
        """n code maps (n, h, w) drawn code by code from p(z_i | z_<i, c) / temperature, keeping only the
        top_k most likely codes (top_k > 0) and the top_p nucleus (top_p < 1) at each step, in eval
        mode. position (n,) and previous (n, h, w) condition the draw (None: left out). guidance != 1
        with a position is classifier-free guidance (Ho and Salimans 2022) on it: the logits
        l_free + guidance * (l_position - l_free), l_free those without the position (the previous
        map, if any, in both). `generator` (on the model's device) seeds the draws. `steps` is the
        masked prior's; raster order takes one step per code."""
        check_sampling(temperature, top_p)
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


class CodePrior(AutoregressivePrior):
    """A small causal transformer over the raster-ordered codes, as in VQGAN (Esser et al. 2021),
    with a start token so the first code has a distribution too. Sampling keeps a key/value cache,
    so each of the h*w steps costs one position, not the whole sequence."""

    def __init__(self, cfg: PriorConfig):
        super().__init__()
        self.start_token = cfg.num_embeddings
        self._build(cfg, causal=True)

    def _build(self, cfg, causal):
        """The transformer both CodePrior and MaskedPrior are: token embeddings of the K codes and one
        extra token (start or mask), position embeddings, the blocks, the head and the condition."""
        self.cfg = cfg
        self.seq_len = cfg.latent_h * cfg.latent_w
        self.tok_emb = nn.Embedding(cfg.num_embeddings + 1, cfg.hidden_dim)
        self.pos_emb = nn.Embedding(self.seq_len, cfg.hidden_dim)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([Block(cfg.hidden_dim, cfg.num_heads, cfg.dropout, causal)
                                     for _ in range(cfg.num_layers)])
        self.ln_f = nn.LayerNorm(cfg.hidden_dim)
        self.head = nn.Linear(cfg.hidden_dim, cfg.num_embeddings, bias=False)
        self.cond = Condition(cfg)
        self.apply(CodePrior._init_weights)

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


# The masked prior's decoding: SAMPLE_STEPS steps by default (MaskGIT used 8-12 for 16x16 maps; predict.py
# --sample_steps), and the randomness of the choice of which drawn codes to keep, annealed from
# CHOICE_TEMPERATURE at the first step to 0 at the last (MaskGIT's 4.5).
SAMPLE_STEPS = 12
CHOICE_TEMPERATURE = 4.5
# The masked fractions the masked prior's NLL is averaged over in eval mode (validation and test).
EVAL_RATIOS = (0.25, 0.5, 0.75, 1.0)


def mask_fraction(t):
    """MaskGIT's cosine schedule: the fraction of a code map masked at t in [0, 1] (1 at t = 0, 0 at
    t = 1); training draws t ~ U(0, 1) per map, decoding step s of T leaves cos(pi/2 s/T) masked."""
    return torch.cos(math.pi / 2 * t)


class MaskedPrior(nn.Module):
    """A masked-token prior (MaskGIT, Chang et al. 2022): a bidirectional transformer over the code
    map in which masked positions hold a mask token (code K); it scores the codes of the masked
    positions given the unmasked ones and the condition (Condition). Trained on maps with a
    fraction mask_fraction(t), t ~ U(0, 1), of their positions masked; sampled from a fully masked
    map in a few steps, each filling the positions whose drawn codes it is most confident of."""

    def __init__(self, cfg: PriorConfig):
        super().__init__()
        self.mask_token = cfg.num_embeddings
        CodePrior._build(self, cfg, causal=False)  # the same transformer, without the causal mask

    def forward(self, tokens, position=None, previous=None):
        """tokens: (B, h, w) codes, the mask token K where masked -> logits (B, h*w, K) of every
        position given the unmasked codes and the condition (position (B,), previous (B, h, w); None:
        left out)."""
        seq = tokens.flatten(1)  # (B, L), raster order
        cond = CodePrior._as_sequence(self.cond(len(seq), position, previous))  # (B, L, C) or 0
        x = CodePrior._embed(self, seq, 0, cond)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))  # (B, L, K)

    def mask(self, indices, fraction, generator=None):
        """indices (B, h, w), fraction (B,) -> (tokens (B, h, w) with ceil(fraction * h*w) positions of
        each map (at least one), drawn at random, set to the mask token; masked (B, h*w) bool)."""
        B, L = len(indices), self.seq_len
        count = (fraction * L).ceil().clamp(1, L)  # (B,)
        order = torch.rand(B, L, generator=generator, device=indices.device).argsort(1).argsort(1)
        masked = order < count[:, None]  # (B, L): exactly `count` positions per map
        return torch.where(masked, self.mask_token, indices.flatten(1)).view_as(indices), masked

    def masked_nll(self, indices, fraction, position=None, previous=None, generator=None, noise=0.0):
        """indices (B, h, w), fraction (B,) -> (B,) mean NLL in nats of each map's masked codes; with
        noise > 0 the unmasked codes it sees are replace_codes(indices, noise)."""
        tokens, masked = self.mask(indices, fraction, generator)
        if noise:
            tokens = torch.where(masked.view_as(indices), tokens,
                                 replace_codes(indices, noise, self.cfg.num_embeddings, generator))
        logits = self(tokens, position, previous)
        ce = F.cross_entropy(logits.transpose(1, 2), indices.flatten(1), reduction="none")  # (B, L)
        return (ce * masked).sum(1) / masked.sum(1)

    def nll(self, indices, position=None, previous=None, generator=None, noise=0.0):
        """indices: (B, h, w) -> (B,) NLL in nats per masked code. Training: each map masked at
        mask_fraction(t), t ~ U(0, 1), drawn from `generator`, the rest replace_codes(.., noise). Eval
        mode: the mean over the fractions EVAL_RATIOS with positions drawn from a fixed seed, so validation figures compare across
        epochs (not the likelihood of the whole map, which an autoregressive prior's NLL is)."""
        B, device = len(indices), indices.device
        if self.training:
            return self.masked_nll(indices, mask_fraction(torch.rand(B, generator=generator, device=device)),
                                   position, previous, generator, noise)
        g = torch.Generator(device).manual_seed(0)
        return torch.stack([self.masked_nll(indices, torch.full((B,), r, device=device), position, previous, g)
                            for r in EVAL_RATIOS]).mean(0)

    @torch.no_grad()
    def sample(self, n, temperature=1.0, top_k=0, generator=None, top_p=1.0, position=None, previous=None,
               guidance=1.0, steps=None):
        """n code maps (n, h, w) in `steps` (SAMPLE_STEPS if None) passes, in eval mode. From a fully
        masked map, each pass draws a code at every masked position from softmax(logits / temperature)
        (top_k, top_p as AutoregressivePrior.sample), then keeps those of the most confident positions
        (log p of the drawn code plus Gumbel noise scaled by CHOICE_TEMPERATURE * (1 - s/T)) so that
        floor(h*w * mask_fraction(s/T)) positions stay masked after pass s, and at least one is filled:
        every position is filled after pass T. position, previous, guidance and generator as
        AutoregressivePrior.sample (guidance mixes the logits of every pass)."""
        check_sampling(temperature, top_p)
        steps = SAMPLE_STEPS if steps is None else steps
        L = self.seq_len
        if not 1 <= steps <= L:
            raise ValueError(f"steps must be in [1, {L}] (the code map's positions), got {steps}")
        was_training = self.training
        self.eval()
        device = self.pos_emb.weight.device
        guided = guidance != 1 and position is not None
        if guided:  # both halves in one batch: with the position, and without it
            position = torch.cat([position, torch.full_like(position, self.cfg.num_positions)])
            previous = None if previous is None else torch.cat([previous, previous])
        tokens = torch.full((n, L), self.mask_token, dtype=torch.long, device=device)
        for s in range(1, steps + 1):
            masked = tokens == self.mask_token  # (n, L)
            x = tokens.repeat(2, 1) if guided else tokens
            logits = self(x.view(-1, self.cfg.latent_h, self.cfg.latent_w), position, previous).float()  # (m, L, K)
            if guided:
                cond, free = logits.chunk(2)
                logits = free + guidance * (cond - free)
            drawn = _draw(logits.flatten(0, 1), temperature, top_k, generator, top_p).view(n, L)
            confidence = F.log_softmax(logits, -1).gather(2, drawn[..., None])[..., 0]  # (n, L)
            u = torch.rand(n, L, generator=generator, device=device).clamp(1e-20, 1 - 1e-7)
            confidence = confidence - CHOICE_TEMPERATURE * (1 - s / steps) * torch.log(-torch.log(u))
            confidence = confidence.masked_fill(~masked, float("inf"))  # filled positions stay filled
            left = math.floor(L * mask_fraction(torch.tensor(s / steps)).item())
            left = (masked.sum(1) - 1).clamp(min=0).clamp(max=left)  # (n,): at least one filled per pass
            stay = confidence.argsort(1).argsort(1) < left[:, None]  # the least confident stay masked
            tokens = torch.where(masked & ~stay, drawn, tokens)
        self.train(was_training)
        return tokens.view(n, self.cfg.latent_h, self.cfg.latent_w)


# --prior_arch -> the prior's class (a new prior: its class, its name here and in PRIOR_ARCHS)
PRIORS = {"transformer": CodePrior, "masked": MaskedPrior}
assert tuple(PRIORS) == PRIOR_ARCHS


def nll_name(arch):
    """What the prior's NLL (and so its validation and test figure) measures: the whole map's, or, for
    the masked prior, its masked codes' at the fractions EVAL_RATIOS (MaskedPrior.nll)."""
    return "masked NLL" if arch == "masked" else "NLL"


def build_prior(cfg: PriorConfig):
    """The prior that cfg.arch names."""
    return PRIORS[cfg.arch](cfg)
