"""Invariants of the priors over code maps: causality (autoregressive) or masking (masked), the sampling
cache and steps, validity, capacity, conditioning."""
import math

import pytest
import torch

from modules import VQVAE, VQVAEConfig
from prior import PRIOR_ARCHS, CodePrior, MaskedPrior, PriorConfig, build_prior
from utils import ProjectError

AR_ARCHS = [a for a in PRIOR_ARCHS if a != "masked"]  # raster order: causality, one code per step

TINY_PRIOR = dict(num_embeddings=16, latent_h=4, latent_w=3, num_layers=2, num_heads=2, hidden_dim=16,
                  dropout=0.0)


def tiny_prior(**kw):
    torch.manual_seed(0)
    return build_prior(PriorConfig(**{**TINY_PRIOR, **kw})).eval()


@pytest.mark.parametrize("arch", AR_ARCHS)
@pytest.mark.parametrize("i", [0, 2, 5, 11])
def test_prior_is_causal(arch, i):
    """Changing the code at raster position i changes no logit at positions <= i, and some after it."""
    prior = tiny_prior(arch=arch)
    codes = torch.randint(16, (2, 4, 3))
    changed = codes.clone().flatten(1)
    changed[:, i] = (changed[:, i] + 1) % 16
    a, b = prior(codes), prior(changed.view(2, 4, 3))  # (B, 12, K)
    assert torch.equal(a[:, :i + 1], b[:, :i + 1])
    if i < 11:
        assert not torch.allclose(a[:, i + 1:], b[:, i + 1:])


@pytest.mark.parametrize("arch", AR_ARCHS)
def test_sampling_matches_the_full_forward(arch):
    """Greedy sampling (top_k=1), through the transformer's key/value cache, picks at every position
    the argmax of one full forward pass over the finished map."""
    prior = tiny_prior(arch=arch)
    codes = prior.sample(5, top_k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(prior(codes).argmax(-1), codes.flatten(1))


@pytest.mark.parametrize("arch", PRIOR_ARCHS)
def test_samples_are_valid_codes_that_decode_to_images(arch):
    prior = tiny_prior(arch=arch, num_embeddings=32, latent_h=8, latent_w=4)
    g = torch.Generator().manual_seed(0)
    prior.train()  # sampling runs in eval mode (no dropout) and gives the mode back
    codes = prior.sample(6, temperature=1.3, generator=g)
    assert codes.shape == (6, 8, 4) and codes.dtype == torch.long
    assert codes.min() >= 0 and codes.max() < 32
    assert prior.training is True
    torch.manual_seed(0)
    vq = VQVAE(VQVAEConfig(num_hiddens=16, num_residual_hiddens=8, num_downsampling_layers=2,
                           embedding_dim=8, num_embeddings=32)).eval()
    x = vq.decode_indices(codes)
    assert x.shape == (6, 1, 32, 16) and torch.isfinite(x).all()
    assert vq.encode(x).shape == codes.shape
    # Same generator seed, same samples; top_k=3 keeps each step among the 3 most likely codes.
    assert torch.equal(prior.sample(6, 1.3, generator=torch.Generator().manual_seed(0)), codes)
    if arch == "masked":  # its codes are drawn from the logits of the pass that filled them, not of the whole map
        return
    top3 = prior.sample(4, top_k=3, generator=torch.Generator().manual_seed(1))
    ranks = prior(top3).argsort(-1, descending=True).argsort(-1)  # rank of each code at each position
    assert ranks.gather(2, top3.flatten(1)[..., None]).max() < 3


@pytest.mark.parametrize("arch", AR_ARCHS)
def test_prior_overfits_a_tiny_code_set(arch):
    """Four fixed code maps are learnt: every code after the first is predicted with certainty, and
    the first, which nothing precedes, gets the four maps' first codes at 1/4 each."""
    prior = tiny_prior(arch=arch, hidden_dim=32)
    prior.train()
    codes = torch.randint(16, (4, 4, 3), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(prior.parameters(), lr=3e-3)
    first = prior.nll(codes).mean().item()
    for _ in range(300):
        loss = prior.nll(codes).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    nll = torch.nn.functional.cross_entropy(prior.eval()(codes).transpose(1, 2), codes.flatten(1),
                                            reduction="none").mean(0)  # (12,) nats per position
    assert first > 2.5
    assert nll[1:].max() < 0.02 and nll[0].item() == pytest.approx(math.log(4), abs=0.05)
    # Greedy sampling then reproduces one of the training maps exactly.
    sample = prior.sample(1, top_k=1, generator=torch.Generator().manual_seed(0))
    assert any(torch.equal(sample[0], c) for c in codes)


def test_prior_rejects_bad_shapes():
    with pytest.raises(ValueError, match="multiple of num_heads"):
        CodePrior(PriorConfig(**{**TINY_PRIOR, "hidden_dim": 10, "num_heads": 4}))
    with pytest.raises(ProjectError, match="gated PixelCNN.*--stage prior"):  # removed: an old run's prior
        PriorConfig.from_dict({**TINY_PRIOR, "arch": "pixelcnn", "kernel_size": 5})
    # a transformer prior saved while the PixelCNN existed carries its kernel_size and still loads
    saved = {**TINY_PRIOR, "condition": "position"}
    assert PriorConfig.from_dict({**saved, "kernel_size": 5}) == PriorConfig(**saved)
    with pytest.raises(ValueError, match="temperature"):
        tiny_prior().sample(1, temperature=0)


# ----------------------------------------------------------------------------- conditioning

COND = dict(condition="position+previous", num_positions=5)


@pytest.mark.parametrize("arch", PRIOR_ARCHS)
def test_a_changed_position_or_previous_map_changes_the_logits(arch):
    prior = tiny_prior(arch=arch, **COND)
    codes = torch.randint(16, (2, 4, 3))
    previous = torch.randint(16, (2, 4, 3))
    base = prior(codes, torch.tensor([1, 3]), previous)
    assert not torch.allclose(base, prior(codes, torch.tensor([2, 0]), previous))
    assert not torch.allclose(base, prior(codes, torch.tensor([1, 3]), (previous + 1) % 16))
    # Left out (None) is the "none" entry of each table, not the same as some position or map.
    assert torch.equal(prior(codes), prior(codes, torch.tensor([5, 5]), torch.full_like(codes, 16)))
    assert not torch.allclose(prior(codes), base)


@pytest.mark.parametrize("arch", AR_ARCHS)
@pytest.mark.parametrize("i", [0, 4, 11])
def test_prior_is_causal_given_the_position_and_previous_map(arch, i):
    """With the condition fixed, a change of the code at position i changes no logit at positions
    <= i; the previous map is known in full, so a change anywhere in it may reach the first logit."""
    prior = tiny_prior(arch=arch, **COND)
    codes, previous, position = torch.randint(16, (2, 4, 3)), torch.randint(16, (2, 4, 3)), torch.tensor([0, 4])
    changed = codes.clone().flatten(1)
    changed[:, i] = (changed[:, i] + 1) % 16
    a, b = prior(codes, position, previous), prior(changed.view(2, 4, 3), position, previous)
    assert torch.equal(a[:, :i + 1], b[:, :i + 1])
    if i < 11:
        assert not torch.allclose(a[:, i + 1:], b[:, i + 1:])
    later = previous.clone()
    later[:, 1, 1] = (later[:, 1, 1] + 1) % 16  # raster position 4, beside position 0's neighbours
    assert not torch.allclose(prior(codes, position, later)[:, 4], a[:, 4])


@pytest.mark.parametrize("arch", AR_ARCHS)
def test_conditioned_greedy_sampling_matches_the_full_forward(arch):
    prior = tiny_prior(arch=arch, **COND)
    position, previous = torch.tensor([0, 2, 4]), torch.randint(16, (3, 4, 3))
    codes = prior.sample(3, top_k=1, generator=torch.Generator().manual_seed(0), position=position, previous=previous)
    assert torch.equal(prior(codes, position, previous).argmax(-1), codes.flatten(1))


def test_top_p_keeps_the_nucleus():
    """top_p draws only among the most likely codes whose mass reaches top_p: a tiny top_p is greedy,
    top_p = 1 leaves the distribution whole."""
    from prior import _draw
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(4000, 1)
    g = torch.Generator().manual_seed(0)
    assert (_draw(logits, 1.0, 0, g, top_p=0.01) == 0).all()
    drawn = _draw(logits, 1.0, 0, g, top_p=0.75)[:, 0]  # 0.5 + 0.3 reaches 0.75: codes 0 and 1 only
    assert set(drawn.tolist()) == {0, 1}
    assert (drawn == 0).float().mean().item() == pytest.approx(0.5 / 0.8, abs=0.03)
    assert set(_draw(logits, 1.0, 0, g, top_p=1.0)[:, 0].tolist()) == {0, 1, 2, 3}


def test_conditions_leave_out_what_the_data_lacks():
    from prior import conditions
    cfg = PriorConfig(**{**TINY_PRIOR, **COND})
    codes = torch.randint(16, (4, 4, 3))
    position, previous = conditions(codes, torch.tensor([0, 1, -1, 7]), torch.tensor([-1, 0, 1, -1]), cfg)
    assert position.tolist() == [0, 1, 5, 5]  # no position, or one beyond training's: "none"
    assert (previous[0] == 16).all() and torch.equal(previous[1], codes[0]) and torch.equal(previous[2], codes[1])


def test_prior_batch_drops_and_flips_at_its_rates():
    from config import PriorTrainConfig
    from prior_stage import prior_batch
    cfg = PriorConfig(**{**TINY_PRIOR, **COND})
    n = 4000
    codes = {"train": torch.zeros(n, 4, 3, dtype=torch.long), "flipped": torch.ones(n, 4, 3, dtype=torch.long)}
    layout = (torch.arange(n) % 5, torch.arange(n) - 1)  # every map has a position and (but the first) a previous
    args = PriorTrainConfig(position_drop=0.1, previous_drop=0.5, aug_flip=0.3)
    x, position, previous = prior_batch(codes, layout, torch.arange(n), cfg, args, torch.Generator().manual_seed(0))
    assert (x[:, 0, 0] == 1).float().mean().item() == pytest.approx(0.3, abs=0.03)
    assert (position == 5).float().mean().item() == pytest.approx(0.1, abs=0.02)
    assert (previous[:, 0, 0] == 16).float().mean().item() == pytest.approx(0.5, abs=0.03)
    kept = previous[:, 0, 0] != 16
    # A map and its previous map are flipped together.
    assert torch.equal(previous[kept][:, 0, 0], x[kept][:, 0, 0])


def test_prior_batch_takes_a_map_and_its_previous_map_from_one_copy():
    from config import PriorTrainConfig
    from prior_stage import prior_batch
    cfg = PriorConfig(**{**TINY_PRIOR, **COND})
    n, k = 3000, 2
    codes = {"train": torch.zeros(n, 4, 3, dtype=torch.long),
             "copies": torch.arange(1, k + 1).view(k, 1, 1, 1).expand(k, n, 4, 3),  # copy j holds j + 1
             "copies_previous": torch.arange(1, k + 1).view(k, 1, 1, 1).expand(k, n, 4, 3) + 5}
    layout = (torch.arange(n) % 5, torch.arange(n) - 1)
    args = PriorTrainConfig(previous_drop=0.0, aug_flip=0.0, aug_copies=k)
    x, _, previous = prior_batch(codes, layout, torch.arange(n), cfg, args, torch.Generator().manual_seed(0))
    assert (x[:, 0, 0] > 0).float().mean().item() == pytest.approx(k / (k + 1), abs=0.03)
    has = torch.arange(n) > 0
    # Where a copy was drawn its previous map is that copy's; the slice's own otherwise.
    assert torch.equal(previous[has][:, 0, 0], torch.where(x[has][:, 0, 0] > 0, x[has][:, 0, 0] + 5, 0))


def test_augmented_copies_transform_a_slice_and_its_previous_slice_alike():
    """In augmented_codes a slice and its previous slice share one transform: identical neighbours
    stay identical; the copies differ from the plain codes and are reproducible by seed."""
    from metrics import encode_split
    from config import PriorTrainConfig
    from prior_stage import augmented_codes
    torch.manual_seed(0)
    vqvae = VQVAE(VQVAEConfig(image_size=(32, 16), num_hiddens=16, num_residual_hiddens=8,
                              num_downsampling_layers=2, embedding_dim=8, num_embeddings=32, lookup_dim=0)).eval()
    images = torch.rand(6, 1, 32, 16).repeat_interleave(2, 0)  # slices 2i and 2i + 1 alike
    previous = torch.tensor([[-1, 2 * i] for i in range(6)]).flatten()  # 2i + 1 follows 2i
    args = PriorTrainConfig(batch_size=4, aug_copies=3)
    maps, prev = augmented_codes(vqvae, images, previous, args, 0, torch.device("cpu"), "fp32")
    assert maps.shape == prev.shape == (3, 12, 8, 4)
    assert torch.equal(maps[:, 1::2], prev[:, 1::2])
    plain = encode_split(vqvae, images, torch.device("cpu"), 4)
    assert not torch.equal(maps[0], plain) and not torch.equal(maps[0], maps[1])
    again = augmented_codes(vqvae, images, previous, args, 0, torch.device("cpu"), "fp32")
    assert torch.equal(again[0], maps) and torch.equal(again[1], prev)
    # --prior_aug_fresh: epoch e draws copies e*K .. e*K + K - 1, so copy k of `first` is copy first + k.
    later, _ = augmented_codes(vqvae, images, previous, args, 0, torch.device("cpu"), "fp32", first=1)
    assert torch.equal(later[:2], maps[1:]) and not torch.equal(later[2], maps[2])


@pytest.mark.parametrize("arch", AR_ARCHS)
def test_guided_greedy_sampling_takes_the_guided_argmax(arch):
    """Classifier-free guidance: each code is the argmax of l_free + w (l_position - l_free), both
    logits of the map drawn so far (the previous map in both)."""
    prior = tiny_prior(arch=arch, **COND)
    position, previous = torch.tensor([1, 3]), torch.randint(16, (2, 4, 3))
    codes = prior.sample(2, top_k=1, generator=torch.Generator().manual_seed(0), position=position,
                         previous=previous, guidance=3.0)
    cond, free = prior(codes, position, previous), prior(codes, None, previous)
    assert torch.equal((free + 3.0 * (cond - free)).argmax(-1), codes.flatten(1))
    plain = prior.sample(2, top_k=1, generator=torch.Generator().manual_seed(0), position=position, previous=previous)
    assert torch.equal(plain, prior.sample(2, top_k=1, generator=torch.Generator().manual_seed(0), position=position,
                                           previous=previous, guidance=1.0))


# ----------------------------------------------------------------------------- the masked prior

def test_a_masked_positions_logits_do_not_depend_on_its_hidden_code():
    """Two maps that differ only where the mask falls give the same input and the same logits; the
    masked NLL scores only the masked positions, so a change elsewhere leaves it alone."""
    prior = tiny_prior(arch="masked", **COND)
    codes = torch.randint(16, (3, 4, 3))
    fraction = torch.tensor([0.25, 0.5, 1.0])
    tokens, masked = prior.mask(codes, fraction, torch.Generator().manual_seed(0))
    assert masked.sum(1).tolist() == [3, 6, 12]  # ceil(fraction * 12) positions of each map
    assert (tokens.flatten(1)[masked] == 16).all()
    assert torch.equal(tokens.flatten(1)[~masked], codes.flatten(1)[~masked])
    other = codes.flatten(1).clone()
    other[masked] = (other[masked] + 1) % 16  # another hidden code at every masked position
    tokens_other, _ = prior.mask(other.view_as(codes), fraction, torch.Generator().manual_seed(0))
    assert torch.equal(tokens, tokens_other)
    position, previous = torch.tensor([0, 2, 4]), torch.randint(16, (3, 4, 3))
    assert torch.equal(prior(tokens, position, previous), prior(tokens_other, position, previous))
    # Unmasked codes do reach every logit (the attention is bidirectional).
    changed = tokens.flatten(1).clone()
    changed[0, (~masked[0]).nonzero()[0, 0]] += 1
    before, after = prior(tokens, position, previous)[0], prior(changed.view_as(codes), position, previous)[0]
    assert not torch.allclose(before, after)
    g = torch.Generator().manual_seed(0)
    nll = prior.masked_nll(codes, fraction, position, previous, g)
    elsewhere = codes.flatten(1).clone()
    elsewhere[~masked] = (elsewhere[~masked] + 1) % 16
    g = torch.Generator().manual_seed(0)
    unmasked_changed = prior.masked_nll(elsewhere.view_as(codes), fraction, position, previous, g)
    assert torch.equal(nll[2], unmasked_changed[2])  # the fully masked map: nothing else to change


@pytest.mark.parametrize("steps", [1, 5, 12])
def test_masked_sampling_fills_every_position_in_exactly_t_steps(steps):
    """T passes, each with fewer masked positions than the one before, and none left after the last."""
    prior = tiny_prior(arch="masked")
    seen = []
    hook = prior.register_forward_pre_hook(lambda m, args: seen.append((args[0] == 16).sum().item()))
    codes = prior.sample(2, generator=torch.Generator().manual_seed(0), steps=steps)
    hook.remove()
    assert len(seen) == steps and seen[0] == 2 * 12
    assert all(b < a for a, b in zip(seen, seen[1:]))
    assert codes.shape == (2, 4, 3) and codes.min() >= 0 and codes.max() < 16
    with pytest.raises(ValueError, match="steps"):
        prior.sample(1, steps=13)


def test_masked_sampling_is_seeded_and_conditioned():
    prior = tiny_prior(arch="masked", **COND)
    position, previous = torch.tensor([0, 4]), torch.randint(16, (2, 4, 3))

    def draw(seed, **kw):
        return prior.sample(2, generator=torch.Generator().manual_seed(seed), steps=4, **kw)
    assert torch.equal(draw(0), draw(0)) and not torch.equal(draw(0), draw(1))
    assert torch.equal(draw(3, position=position, previous=previous), draw(3, position=position, previous=previous))
    guided = draw(3, position=position, previous=previous, guidance=3.0)
    assert torch.equal(guided, draw(3, position=position, previous=previous, guidance=3.0))
    # (that the condition changes the logits: test_a_changed_position_or_previous_map_changes_the_logits)


def test_masked_prior_learns_a_tiny_code_set():
    """Four fixed maps: with a quarter of a map masked the rest tells which map it is, so the masked
    codes are predicted with confidence; greedy decoding one position per pass rebuilds training maps."""
    prior = tiny_prior(arch="masked", hidden_dim=32)
    prior.train()
    codes = torch.randint(16, (4, 4, 3), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(prior.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(800):
        loss = prior.nll(codes, generator=g).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    prior.eval()
    quarter = prior.masked_nll(codes, torch.full((4,), 0.25), generator=torch.Generator().manual_seed(1))
    assert quarter.max() < 0.3  # of log 16 = 2.77 nats for a uniform guess
    samples = prior.sample(8, top_k=1, generator=torch.Generator().manual_seed(0), steps=12)
    assert sum(any(torch.equal(s, c) for c in codes) for s in samples) >= 6


def test_masked_nll_in_eval_mode_is_deterministic():
    """Validation draws its masks from a fixed seed: the same maps score the same, epoch after epoch."""
    prior = tiny_prior(arch="masked")
    codes = torch.randint(16, (5, 4, 3))
    assert isinstance(prior, MaskedPrior)
    assert torch.equal(prior.nll(codes), prior.nll(codes))
    prior.train()
    a = prior.nll(codes, generator=torch.Generator().manual_seed(0))
    b = prior.nll(codes, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(a, b)


@pytest.mark.parametrize("arch", PRIOR_ARCHS)
def test_token_noise_replaces_inputs_never_targets(arch):
    """--prior_token_noise: about that fraction of the codes a prior sees are swapped for random ones
    (a few draw their own code back), the NLL is scored against the true codes, and 0 changes nothing."""
    from prior import replace_codes
    codes = torch.randint(16, (200, 4, 3), generator=torch.Generator().manual_seed(0))
    noisy = replace_codes(codes, 0.3, 16, torch.Generator().manual_seed(1))
    assert (noisy != codes).float().mean().item() == pytest.approx(0.3 * 15 / 16, abs=0.02)
    assert torch.equal(replace_codes(codes, 0.0, 16), codes)
    prior = tiny_prior(arch=arch)
    prior.train()  # dropout is 0: training mode differs only in what it draws
    small = codes[:4]
    if arch == "masked":
        a = prior.masked_nll(small, torch.full((4,), 0.5), generator=torch.Generator().manual_seed(2), noise=0.3)
        g = torch.Generator().manual_seed(2)
        tokens, masked = prior.mask(small, torch.full((4,), 0.5), g)
        tokens = torch.where(masked.view_as(small), tokens, replace_codes(small, 0.3, 16, g))
        ce = torch.nn.functional.cross_entropy(prior(tokens).transpose(1, 2), small.flatten(1), reduction="none")
        assert torch.allclose(a, (ce * masked).sum(1) / masked.sum(1))
    else:
        a = prior.nll(small, generator=torch.Generator().manual_seed(2), noise=0.3)
        inputs = replace_codes(small, 0.3, 16, torch.Generator().manual_seed(2))
        ce = torch.nn.functional.cross_entropy(prior(inputs).transpose(1, 2), small.flatten(1), reduction="none")
        assert torch.allclose(a, ce.mean(1)) and not torch.allclose(a, prior.nll(small))


@pytest.mark.parametrize("arch", PRIOR_ARCHS)
def test_the_weight_average_moves_every_weight_by_its_decay(arch):
    """update_ema (--prior_ema): each shadow weight becomes decay * its own + (1 - decay) * the model's;
    the priors hold no buffers, which it would have to copy."""
    from prior_stage import update_ema
    shadow, model = tiny_prior(arch=arch), build_prior(PriorConfig(**{**TINY_PRIOR, "arch": arch}))  # other weights
    assert not list(shadow.buffers())
    before = [p.clone() for p in shadow.parameters()]
    update_ema(shadow, model, 0.9)
    for b, s, m in zip(before, shadow.parameters(), model.parameters()):
        torch.testing.assert_close(s, 0.9 * b + 0.1 * m)
