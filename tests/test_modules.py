"""Invariants of the VQ-VAE: index round trip, straight-through gradients, loss terms, EMA."""
import pytest
import torch
import torch.nn.functional as F

from modules import VQVAE, VectorQuantizer, VQVAEConfig

TINY = dict(num_hiddens=16, num_residual_hiddens=8, num_downsampling_layers=2, embedding_dim=8,
            num_embeddings=32)


def tiny_model(**kw):
    torch.manual_seed(0)
    return VQVAE(VQVAEConfig(**{**TINY, **kw}))


def test_shapes_follow_config():
    model = VQVAE(VQVAEConfig())  # the seed configuration
    x = torch.rand(2, 1, 256, 128) * 2 - 1
    out = model(x)
    assert out["x_recon"].shape == x.shape
    assert out["indices"].shape == (2, 32, 16) == (2, *model.latent_shape((256, 128)))
    with pytest.raises(ValueError, match="positive multiple of 8"):
        model.latent_shape((250, 128))


@pytest.mark.parametrize("ema", [False, True])
def test_encode_decode_indices_agree_with_forward_in_eval(ema):
    model = tiny_model(ema=ema).eval()
    x = torch.rand(3, 1, 32, 16) * 2 - 1
    out = model(x)
    idx = model.encode(x)
    assert idx.dtype == torch.long and idx.shape == (3, 8, 4)
    assert torch.equal(idx, out["indices"])
    assert torch.allclose(model.decode_indices(idx), out["x_recon"], atol=1e-6)
    # Decoding the codes of a code map and re-quantizing the codebook vectors gives the same codes.
    z_q = model.vq.embed(idx)
    assert torch.equal(model.vq.nearest(z_q.permute(0, 2, 3, 1).reshape(-1, 8)).view_as(idx), idx)


def test_nearest_is_squared_l2_argmin():
    vq = VectorQuantizer(16, 4)
    z = torch.randn(50, 4)
    brute = torch.cdist(z, vq.codebook.weight).argmin(1)
    assert torch.equal(vq.nearest(z), brute)


def test_straight_through_gradient_reaches_encoder():
    model = tiny_model()
    x = torch.rand(2, 1, 32, 16) * 2 - 1
    F.mse_loss(model(x)["x_recon"], x).backward()  # reconstruction loss only
    g = model.encoder.net[0].weight.grad
    assert g is not None and g.abs().sum() > 0


def test_loss_terms_route_gradients_as_in_the_paper():
    vq = VectorQuantizer(8, 4, commitment_cost=0.25)
    z_e = torch.randn(2, 4, 3, 3, requires_grad=True)
    out = vq(z_e)
    # Codebook term moves the codes only; commitment term moves the encoder output only.
    g_codes_cb = torch.autograd.grad(out["codebook_loss"], [vq.codebook.weight], retain_graph=True)[0]
    assert g_codes_cb.abs().sum() > 0
    assert torch.autograd.grad(out["codebook_loss"], [z_e], retain_graph=True, allow_unused=True)[0] is None
    g_z = torch.autograd.grad(out["commitment_loss"], [z_e], retain_graph=True)[0]
    assert g_z.abs().sum() > 0
    assert torch.autograd.grad(out["commitment_loss"], [vq.codebook.weight], retain_graph=True,
                               allow_unused=True)[0] is None
    # Both terms have the same value (||z_e - e||^2) and beta weights the commitment term once.
    assert torch.allclose(out["codebook_loss"], out["commitment_loss"])
    assert torch.allclose(out["vq_loss"], out["codebook_loss"] + 0.25 * out["commitment_loss"])


def test_ema_updates_only_in_train_mode():
    model = tiny_model(ema=True)
    x = torch.rand(4, 1, 32, 16) * 2 - 1
    assert not model.vq.codebook.weight.requires_grad
    before = model.vq.codebook.weight.clone()
    sizes = model.vq.ema_cluster_size.clone()
    model.eval()
    model(x)
    assert torch.equal(model.vq.codebook.weight, before)
    assert torch.equal(model.vq.ema_cluster_size, sizes)
    model.train()
    out = model(x)
    assert not torch.equal(model.vq.codebook.weight, before)
    assert out["codebook_loss"] == 0  # the EMA update replaces the codebook term
    assert torch.allclose(out["vq_loss"], 0.25 * out["commitment_loss"])


def test_ema_moves_codes_to_the_mean_of_their_vectors():
    vq = VectorQuantizer(2, 2, ema=True, decay=0.9)
    vq.codebook.weight.data = torch.tensor([[0.0, 0.0], [10.0, 10.0]])
    vq.ema_embed_sum.copy_(vq.codebook.weight)
    z = torch.tensor([[1.0, 1.0], [1.2, 0.8], [9.0, 9.0]]).view(1, 3, 1, 2).permute(0, 3, 1, 2)
    for _ in range(300):
        vq(z)
    assert torch.allclose(vq.codebook.weight, torch.tensor([[1.1, 0.9], [9.0, 9.0]]), atol=1e-3)


@pytest.mark.parametrize("ema", [False, True])
def test_tiny_model_overfits_one_batch(ema, tiny_data):
    from dataset import load_split
    x = load_split(tiny_data, "train", (32, 16)).images[:4].float() * 2 - 1
    model = tiny_model(ema=ema)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    first = None
    for _ in range(300):
        out = model(x)
        loss = F.mse_loss(out["x_recon"], x)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        (loss + out["vq_loss"]).backward()
        opt.step()
    model.eval()
    final = F.mse_loss(model(x)["x_recon"], x).item()
    assert final < 0.2 * first, (first, final)


def test_checkpoint_round_trip_with_weights_only(tmp_path):
    from utils import load_checkpoint, save_checkpoint
    model = tiny_model(ema=True).eval()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad])
    ckpt = {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 3, "best_val": 0.5,
            "model_args": model.cfg.to_dict(), "config": {"image_size": [32, 16]}}
    save_checkpoint(tmp_path / "c.pt", ckpt)
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left behind
    loaded = load_checkpoint(tmp_path / "c.pt")
    rebuilt = VQVAE(VQVAEConfig(**loaded["model_args"])).eval()
    rebuilt.load_state_dict(loaded["model"])
    x = torch.rand(2, 1, 32, 16) * 2 - 1
    assert torch.equal(rebuilt(x)["x_recon"], model(x)["x_recon"])
    assert torch.equal(rebuilt.vq.ema_cluster_size, model.vq.ema_cluster_size)
