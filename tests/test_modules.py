"""Invariants of the VQ-VAE: index round trip, straight-through gradients, loss terms, EMA."""
import time

import pytest
import torch
import torch.nn.functional as F

from modules import SEED_DEFAULTS, VQVAE, VQVAEConfig
from quantizer import VectorQuantizer

TINY = dict(num_hiddens=16, num_residual_hiddens=8, num_downsampling_layers=2, embedding_dim=8,
            num_embeddings=32)


def quantizer(num_embeddings, embedding_dim, **kw):
    """A VectorQuantizer with the seed's codebook and lookup (uniform codes, no restarts, plain L2) unless kw
    asks otherwise."""
    return VectorQuantizer(VQVAEConfig(num_embeddings=num_embeddings, embedding_dim=embedding_dim,
                                       **{**SEED_DEFAULTS, **kw}))


def tiny_model(**kw):
    torch.manual_seed(0)
    return VQVAE(VQVAEConfig(**{**TINY, **kw}))


def test_shapes_follow_config():
    model = VQVAE(VQVAEConfig())  # the default configuration
    x = torch.rand(2, 1, 256, 128) * 2 - 1
    out = model(x)
    assert out["x_recon"].shape == x.shape
    assert out["indices"].shape == (2, 32, 16) == (2, *model.latent_shape((256, 128)))
    with pytest.raises(ValueError, match="positive multiple of 8"):
        model.latent_shape((250, 128))


@pytest.mark.parametrize("ema,lookup_dim", [(False, 0), (True, 0), (False, 8), (True, 8)])
def test_encode_decode_indices_agree_with_forward_in_eval(ema, lookup_dim):
    model = tiny_model(ema=ema, lookup_dim=lookup_dim).eval()
    x = torch.rand(3, 1, 32, 16) * 2 - 1
    out = model(x)
    idx = model.encode(x)
    assert idx.dtype == torch.long and idx.shape == (3, 8, 4)
    assert torch.equal(idx, out["indices"])
    assert torch.allclose(model.decode_indices(idx), out["x_recon"], atol=1e-6)
    if lookup_dim:
        return
    # Decoding the codes of a code map and re-quantizing the codebook vectors gives the same codes.
    z_q = model.vq.embed(idx)
    assert torch.equal(model.vq.nearest(z_q.permute(0, 2, 3, 1).reshape(-1, 8)).view_as(idx), idx)


def test_nearest_is_squared_l2_argmin():
    vq = quantizer(16, 4)
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
    vq = quantizer(8, 4, commitment_cost=0.25)
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
    vq = quantizer(2, 2, ema=True, decay=0.9)
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


def test_clamped_output_keeps_air_exactly_black_and_the_body_alive():
    """With clamp_output the decoder's output is in [-1, 1]: air the net pushed below -1 reads exactly 0 in
    [0, 1] and gets no gradient from its exactly black target, so training leaves it there, while body
    pixels below -1 keep the gradient that pulls them back up (a plain clamp would stop it: a net whose
    whole output fell below -1 would never recover). The seed's output is unclamped, as are the checkpoints
    from before the setting."""
    from modules import clamp_into_range, reconstruction_loss
    from utils import to_unit
    x = -torch.ones(2, 1, 32, 16)  # all air
    x[:, :, 8:24, 4:12] = 0.5  # and a body
    air = x == -1
    for clamp in (True, False):
        model = tiny_model(clamp_output=clamp)
        with torch.no_grad():
            model.decoder.net[-1].bias.fill_(-4.0)  # everything far below -1
        out = model(x)["x_recon"]
        assert (to_unit(out) == 0).all()
        assert (out == -1).all() if clamp else (out < -1.5).all()
        grad_out = torch.autograd.grad(reconstruction_loss(out, x, "l1"), out)[0]
        bias_grad = torch.autograd.grad(reconstruction_loss(model(x)["x_recon"], x, "l1"), model.decoder.net[-1].bias)[0]
        assert bias_grad.item() < 0  # descent raises the output: the body pulls it back either way
        if clamp:
            assert (grad_out[air] == 0).all() and (grad_out[~air] < 0).all()
    # the clamp's own gradient: blocked only where it would push a value further out of [-1, 1]
    v = torch.tensor([-3.0, -3.0, 0.5, 0.5, 3.0, 3.0], requires_grad=True)
    g = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0])
    clamp_into_range(v).backward(g)
    assert v.grad.tolist() == [0.0, -1.0, 1.0, -1.0, 1.0, 0.0]
    assert clamp_into_range(v).tolist() == [-1, -1, 0.5, 0.5, 1, 1]
    assert VQVAEConfig().clamp_output
    old = {k: v for k, v in VQVAEConfig().to_dict().items() if k != "clamp_output"}
    assert not VQVAEConfig.from_dict(old).clamp_output  # trained unclamped


def test_air_floor_renders_the_dim_floor_black_in_evaluation_only():
    """air_floor f: with the clamp, in eval mode, output below f of the [0, 1] range reads exactly 0 (the
    masked noise floor renders as black air) and output above it is left as it was; in training mode and
    without the clamp the floor does nothing; checkpoints from before the setting had no floor."""
    from utils import to_unit
    for clamp, training, floor_acts in ((True, False, True), (True, True, False), (False, False, False)):
        for bias, under in ((-0.95, True), (-0.85, False)):  # about 0.025 and 0.075 in [0, 1]: floor 0.05
            model, plain = (tiny_model(clamp_output=clamp, air_floor=f).train(training)
                            for f in (0.05, 0.0))
            plain.load_state_dict(model.state_dict())
            for m in (model, plain):
                with torch.no_grad():
                    m.decoder.net[-1].bias.fill_(bias)
                    m.decoder.net[-1].weight.mul_(1e-3)
            z = torch.zeros(1, model.cfg.embedding_dim, 4, 2)
            y, y_plain = (to_unit(m.decoder(z)) for m in (model, plain))
            assert ((y_plain > 0.01) & (y_plain < 0.09)).all()
            assert torch.equal(y, torch.zeros_like(y) if floor_acts and under else y_plain)
    old = {k: v for k, v in VQVAEConfig(air_floor=0.02).to_dict().items() if k != "air_floor"}
    assert VQVAEConfig.from_dict(old).air_floor == 0


def test_checkpoint_round_trip_with_weights_only(tmp_path):
    from files import load_checkpoint, save_checkpoint
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


# ----------------------------------------------------------------------------- codebook health

def far_data(n=256, d=8, seed=0):
    """Encoder outputs far from the seed's +-1/K codes: the case built to collapse, since one code
    is nearest to all of them and the others are never chosen. (1, d, n, 1) and (n, d)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g) + 5
    return z.t().reshape(1, d, n, 1), z


def used(vq, z_e):
    return vq.nearest(z_e.permute(0, 2, 3, 1).reshape(-1, z_e.shape[1])).unique().numel()


@pytest.mark.parametrize("ema", [False, True])
def test_kmeans_init_on_first_training_batch_only(ema):
    z_e, z = far_data()
    torch.manual_seed(0)
    vq = quantizer(32, 8, ema=ema, codebook_init="kmeans")
    seed_codes = vq.codebook.weight.clone()
    vq.eval()
    vq(z_e)  # evaluation never initialises
    assert not vq.initialized and torch.equal(vq.codebook.weight, seed_codes)
    assert used(vq, z_e) == 1  # the collapse the initialisation is there to prevent
    vq.train()
    vq(z_e)
    assert vq.initialized
    assert used(vq, z_e) >= 28
    # Each code is the mean of the vectors nearest to it (a k-means fixed point, up to its last step).
    idx = vq.nearest(z)
    means = torch.stack([z[idx == k].mean(0) for k in idx.unique()])
    assert torch.allclose(vq.codebook.weight[idx.unique()], means, atol=0.3)
    after = vq.codebook.weight.clone()
    if not ema:  # later batches do not re-initialise (EMA codes move by their update, by design)
        vq(far_data(seed=1)[0])
        assert torch.equal(vq.codebook.weight, after)
    if ema:
        assert torch.allclose(vq.ema_embed_sum / vq.ema_cluster_size[:, None], vq.codebook.weight, atol=1.0)


def test_unused_code_is_reseeded_from_encoder_outputs():
    z_e, z = far_data(n=64)
    torch.manual_seed(0)
    vq = quantizer(4, 8, codebook_init="kmeans", restart_after=2)
    vq(z_e)
    vq.codebook.weight.data[3] = 1e3  # code 3 is now out of reach of every encoder output
    vq(z_e)
    assert vq.code_age[3] == 1 and torch.equal(vq.codebook.weight[3], torch.full((8,), 1e3))
    vq.eval()
    vq(z_e)  # no bookkeeping in eval mode
    assert vq.code_age[3] == 1
    vq.train()
    vq(z_e)  # second step unused: re-seeded with one of this batch's encoder outputs
    assert vq.code_age[3] == 0
    assert (vq.codebook.weight[3] == z).all(1).any()
    assert used(vq, z_e) == 4


@pytest.mark.parametrize("ema", [False, True])
def test_restart_lifts_usage_on_a_collapsing_case(ema):
    z_e, _ = far_data()
    torch.manual_seed(0)
    collapsed = quantizer(32, 8, ema=ema)
    healthy = quantizer(32, 8, ema=ema, restart_after=1)
    for _ in range(5):
        collapsed(z_e)
        healthy(z_e)
    assert used(collapsed, z_e) == 1
    assert used(healthy, z_e) >= 24


def test_model_args_from_before_codebook_health_mean_the_seed_codebook():
    old = {k: v for k, v in VQVAEConfig().to_dict().items() if k not in ("codebook_init", "restart_after")}
    cfg = VQVAEConfig.from_dict(old)
    assert cfg.codebook_init == "uniform" and cfg.restart_after == 0
    assert VQVAEConfig.from_dict(VQVAEConfig().to_dict()) == VQVAEConfig()


def test_codebook_state_is_in_the_checkpoint():
    vq = quantizer(8, 4, ema=True, codebook_init="kmeans", restart_after=3)
    assert {"initialized", "code_age", "ema_cluster_size", "ema_embed_sum"} <= set(vq.state_dict())
    with pytest.raises(ValueError, match="codebook_init"):
        quantizer(8, 4, codebook_init="random")


def same_start(vq):
    """The same seed codes wherever this runs, as DDP ensures by broadcasting rank 0's weights."""
    vq.codebook.weight.data = torch.linspace(-1 / 32, 1 / 32, 32 * 8).view(32, 8)
    if vq.ema:
        vq.ema_embed_sum.copy_(vq.codebook.weight)
    return vq


def _ddp_worker(rank, world, init_file, results, kw):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(rank)  # different RNG streams per rank: restart picks must still agree
    vq = same_start(quantizer(32, 8, **kw))
    for step in range(6):
        vq(far_data(n=64, seed=10 * step + rank)[0])  # each rank its own shard
    results[rank] = vq.codebook.weight.detach().clone()
    dist.destroy_process_group()


@pytest.mark.parametrize("kw", [dict(ema=True), dict(ema=True, codebook_init="kmeans", restart_after=1),
                                dict(codebook_init="kmeans", restart_after=1)])
def test_codebook_agrees_across_distributed_ranks(kw, tmp_path):
    import torch.multiprocessing as mp
    with mp.Manager() as manager:
        results = manager.dict()
        ctx = mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), results, kw), nprocs=2, join=False)
        deadline = time.time() + 120  # a collective that only one rank calls would hang, not fail
        while not ctx.join(timeout=5):
            if time.time() > deadline:
                for proc in ctx.processes:
                    proc.kill()
                pytest.fail("distributed ranks did not finish: a collective is called on one rank only")
        a, b = results[0], results[1]
    assert torch.equal(a, b)
    if kw == dict(ema=True):  # all-reduced EMA statistics equal one process on the global batch
        vq = same_start(quantizer(32, 8, ema=True))
        for step in range(6):
            vq(torch.cat([far_data(n=64, seed=10 * step + r)[0] for r in range(2)], 2))
        assert torch.allclose(vq.codebook.weight, a, atol=1e-5)


# ----------------------------------------------------------------------------- the resnet layout and the lookup

@pytest.mark.parametrize("size,levels,attention", [((32, 16), 2, False), ((64, 64), 3, True), ((32, 32), 1, True)])
def test_resnet_layout_shapes(size, levels, attention):
    channels, blocks = (8, 16, 16, 32)[-levels - 1:], (0, 1, 2, 1)[-levels - 1:]
    torch.manual_seed(0)
    model = VQVAE(VQVAEConfig(arch="resnet", image_size=size, num_downsampling_layers=levels, channels=channels,
                              blocks=blocks, attention=attention, embedding_dim=8, num_embeddings=32))
    x = torch.rand(3, 1, *size) * 2 - 1
    out = model(x)
    h, w = size[0] >> levels, size[1] >> levels
    assert out["x_recon"].shape == x.shape and out["indices"].shape == (3, h, w)
    assert model.encoder(x).shape == (3, channels[-1], h, w)
    # blocks per level are what the config asks: the encoder's and the decoder's residual blocks
    n = sum(isinstance(m, torch.nn.Module) and type(m).__name__ == "ResBlock" for m in model.encoder.modules())
    assert n == sum(blocks) == sum(type(m).__name__ == "ResBlock" for m in model.decoder.modules())
    assert sum(type(m).__name__ == "AttnBlock" for m in model.modules()) == 2 * attention


def test_resnet_settings_must_fit_the_levels():
    with pytest.raises(ValueError, match="channels must be 4 numbers"):
        VQVAEConfig(arch="resnet", channels=(16, 32, 64))
    VQVAEConfig(arch="seed", channels=(16, 32, 64))  # ignored by the seed's net


def test_seed_net_is_the_seeds():
    """The seed configuration (flags of the seed README) builds exactly the seed's layers, and a checkpoint
    written before arch and lookup_dim existed is read as the seed's net and lookup."""
    cfg = VQVAEConfig(arch="seed", lookup_dim=0)
    shapes = {k: tuple(v.shape) for k, v in VQVAE(cfg).state_dict().items() if not k.startswith("vq.") or "codebook" in k}
    assert shapes == {
        "encoder.net.0.weight": (64, 1, 4, 4), "encoder.net.0.bias": (64,),  # 3 stride-2 4x4 convs
        "encoder.net.2.weight": (64, 64, 4, 4), "encoder.net.2.bias": (64,),
        "encoder.net.4.weight": (128, 64, 4, 4), "encoder.net.4.bias": (128,),
        "encoder.net.6.weight": (128, 128, 3, 3), "encoder.net.6.bias": (128,),
        **{f"{part}.residual_stack.layers.{i}.{j}.{p}": s for part in ("encoder", "decoder") for i in range(2)
           for j, w in ((1, (32, 128, 3, 3)), (3, (128, 32, 1, 1))) for p, s in (("weight", w), ("bias", (w[0],)))},
        "pre_vq_conv.weight": (128, 128, 1, 1), "pre_vq_conv.bias": (128,),
        "vq.codebook.weight": (512, 128),  # 512 codes of dim 128
        "decoder.conv.weight": (128, 128, 3, 3), "decoder.conv.bias": (128,),
        "decoder.net.0.weight": (128, 64, 4, 4), "decoder.net.0.bias": (64,),
        "decoder.net.2.weight": (64, 64, 4, 4), "decoder.net.2.bias": (64,),
        "decoder.net.4.weight": (64, 1, 4, 4), "decoder.net.4.bias": (1,),
    }
    old = {k: v for k, v in cfg.to_dict().items() if k not in ("arch", "lookup_dim", "channels", "blocks", "attention")}
    fresh = VQVAEConfig.from_dict({**old, "codebook_init": "kmeans", "restart_after": 2})
    assert fresh.arch == "seed" and fresh.lookup_dim == 0
    assert VQVAEConfig.from_dict(VQVAEConfig(arch="resnet", lookup_dim=8).to_dict()).arch == "resnet"


def test_lookup_straight_through_gradients():
    """With the l2-normalised lookup the decoder's gradient reaches z_e as if the lookup were the identity
    (proj_out of the normalised projection): the straight-through estimator, in the lookup space."""
    torch.manual_seed(0)
    vq = quantizer(16, 8, lookup_dim=4)
    assert vq.codebook.weight.shape == (16, 4)
    z_e = torch.randn(2, 8, 3, 5, requires_grad=True)
    out = vq(z_e)
    g = torch.randn_like(out["z_q"])
    (out["z_q"] * g).sum().backward()
    z_ref = z_e.detach().clone().requires_grad_()
    flat = vq.lookup_space(z_ref.permute(0, 2, 3, 1).reshape(-1, 8))
    assert torch.allclose(flat.norm(dim=1), torch.ones(30))
    (vq._decoder_input(flat, (2, 3, 5), torch.contiguous_format) * g).sum().backward()
    assert z_e.grad.abs().sum() > 0 and torch.allclose(z_e.grad, z_ref.grad, atol=1e-6)
    # The decoder's input is proj_out of the chosen unit-length codes.
    codes = F.normalize(vq.codebook.weight, dim=1)[out["indices"].flatten()]
    assert torch.allclose(out["z_q"].permute(0, 2, 3, 1).reshape(-1, 8), vq.proj_out(codes), atol=1e-6)
    # The codebook term moves the codes, the commitment term the encoder (and proj_in) only.
    vq.zero_grad()
    out = vq(z_e)
    assert torch.autograd.grad(out["commitment_loss"], [vq.codebook.weight], allow_unused=True)[0] is None
    assert torch.autograd.grad(out["codebook_loss"], [vq.codebook.weight])[0].abs().sum() > 0
    assert torch.autograd.grad(out["codebook_loss"], [vq.proj_in.weight], allow_unused=True)[0] is None


@pytest.mark.parametrize("ema", [False, True])
def test_lookup_keeps_codes_in_use_where_the_seed_collapses(ema):
    """On encoder outputs built to collapse (far from the seed's +-1/K codes, all in one direction) the
    seed's lookup uses one code; the normalised lookup with k-means init and restarts uses >= 90%, and
    stays there over training steps (k-means and restarts run in the lookup space)."""
    z_e, _ = far_data(n=512)
    torch.manual_seed(0)
    assert used(quantizer(32, 8, ema=ema), z_e) == 1
    vq = quantizer(32, 8, ema=ema, lookup_dim=4, codebook_init="kmeans", restart_after=2)
    opt = torch.optim.Adam([p for p in vq.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(20):
        out = vq(z_e)
        opt.zero_grad()
        out["vq_loss"].backward()
        opt.step()
    assert vq.initialized and vq.codebook.weight.shape == (32, 4)
    assert out["indices"].unique().numel() >= 29 and used(vq, z_e) >= 29
    vq.codebook.weight.data[5] = -vq.codebook.weight.data[5].sign() * 1e3  # out of reach: restarted in 2 steps
    vq(z_e), vq(z_e)
    assert used(vq, z_e) >= 29 and vq.codebook.weight[5].abs().max() < 1e3
