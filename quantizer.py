"""The vector quantizer of the VQ-VAE: nearest-code lookup with the straight-through estimator, the
codebook's training (gradient or EMA) and its health (k-means init, restarts of dead codes), identical
on every rank under torch.distributed.

Follows van den Oord et al. 2017, "Neural Discrete Representation Learning" (arXiv:1711.00937).
Pure tensor code: no argparse, no file I/O.
"""
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

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

    def __init__(self, cfg):
        """cfg: the VQVAEConfig whose codebook settings (num_embeddings .. restart_after) this quantizer has."""
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
