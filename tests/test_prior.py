"""Invariants of the prior over code maps: causality, the sampling cache, validity, capacity."""
import math

import pytest
import torch

from modules import PRIOR_ARCHS, VQVAE, CodePrior, PriorConfig, VQVAEConfig, build_prior

TINY_PRIOR = dict(num_embeddings=16, latent_h=4, latent_w=3, num_layers=2, num_heads=2, hidden_dim=16,
                  dropout=0.0, kernel_size=3)


def tiny_prior(**kw):
    torch.manual_seed(0)
    return build_prior(PriorConfig(**{**TINY_PRIOR, **kw})).eval()


@pytest.mark.parametrize("arch", PRIOR_ARCHS)
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


@pytest.mark.parametrize("arch", PRIOR_ARCHS)
def test_sampling_matches_the_full_forward(arch):
    """Greedy sampling (top_k=1), through the transformer's key/value cache or the PixelCNN's
    reruns, picks at every position the argmax of one full forward pass over the finished map."""
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
    top3 = prior.sample(4, top_k=3, generator=torch.Generator().manual_seed(1))
    ranks = prior(top3).argsort(-1, descending=True).argsort(-1)  # rank of each code at each position
    assert ranks.gather(2, top3.flatten(1)[..., None]).max() < 3


@pytest.mark.parametrize("arch", PRIOR_ARCHS)
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
    with pytest.raises(ValueError, match="odd"):
        build_prior(PriorConfig(**{**TINY_PRIOR, "arch": "pixelcnn", "kernel_size": 4}))
    with pytest.raises(ValueError, match="temperature"):
        tiny_prior().sample(1, temperature=0)
