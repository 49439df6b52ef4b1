"""The CUDA path, on a machine with a GPU: `python -m pytest -q tests -k gpu` (a few minutes). Every
test here skips, with the reason, where CUDA is absent (as in CI)."""
import json

import pytest
import torch

import config
import train
from conftest import TINY_MODEL
from test_scripts import run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here)")
TINY_RUN = ["--epochs", "2", "--batch_size", "4", *TINY_MODEL]


def last(run_dir):
    return torch.load(run_dir / "last.pt", weights_only=True)


def test_gpu_bf16_and_fp32_training_resume_and_predict(tiny_data, tmp_path):
    """Both precisions train on the GPU and record what they computed in; a bf16 run resumes there,
    and predict.py samples and scores (FID) in the run's precision with a channels_last model."""
    for precision in ("fp32", "bf16"):
        proc = run("train.py", "--data_dir", tiny_data, *TINY_RUN, "--device", "cuda", "--precision", precision,
                   "--out_dir", tmp_path / precision, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        ckpt = last(tmp_path / precision)
        assert ckpt["config"]["dtype"] == precision and "cuda" in ckpt["rng"]
    ssims = [last(tmp_path / p)["history"]["rows"][-1][train.METRICS.index("val_ssim")] for p in ("fp32", "bf16")]
    assert all(0 < s < 1 for s in ssims), ssims
    proc = run("train.py", "--resume", tmp_path / "bf16", "--epochs", "3", "--stage", "vqvae", cwd=tmp_path)
    assert proc.returncode == 0 and last(tmp_path / "bf16")["epoch"] == 3, proc.stderr[-3000:]
    proc = run("predict.py", "--checkpoint", tmp_path / "fp32" / "best.pt", "--num_samples", "8", "--device", "cuda",
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    gen = json.loads((tmp_path / "fp32" / "predict" / "metrics.json").read_text())["generation"]
    assert gen["fid"]["samples"] > 0 and gen["device"].startswith("cuda")


def test_gpu_resume_of_a_cpu_run(tiny_data, tmp_path):
    """A run begun on the CPU (NCHW Adam moments) resumes on CUDA (channels_last, fused Adam)."""
    assert run("train.py", "--data_dir", tiny_data, *TINY_RUN, "--device", "cpu", "--stage", "vqvae",
               "--out_dir", tmp_path / "run", cwd=tmp_path).returncode == 0
    proc = run("train.py", "--resume", tmp_path / "run", "--epochs", "3", "--device", "cuda", cwd=tmp_path)
    assert proc.returncode == 0 and last(tmp_path / "run")["epoch"] == 3, proc.stderr[-3000:]


def test_gpu_compile_ragged_split_one_graph(tiny_data, tmp_path):
    """--compile with inductor on the GPU: a ragged split (8 slices, batch 3) and k-means compile the
    step once."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    flags = ["--data_dir", str(tiny_data), "--out_dir", str(tmp_path / "run"), "--stage", "vqvae", "--device", "cuda",
             *TINY_MODEL, "--epochs", "2", "--batch_size", "3", "--compile"]
    train.train_vqvae(config.RunConfig.from_flags(vars(train.get_parser().parse_args(flags))))
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def test_gpu_sampling_never_waits_for_the_host():
    """The prior's sampling loop makes no host sync (torch.multinomial made about two per code)."""
    from prior import PriorConfig, build_prior
    prior = build_prior(PriorConfig(num_embeddings=32, latent_h=4, latent_w=4, hidden_dim=32, num_heads=2)).cuda()
    g = torch.Generator("cuda").manual_seed(0)
    prior.sample(2, generator=g)  # warm-up: allocations and kernels
    torch.cuda.set_sync_debug_mode("error")
    try:
        codes = prior.sample(4, top_k=5, generator=g)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert codes.shape == (4, 4, 4) and codes.max().item() < 32


def test_gpu_predict_model_is_channels_last(tiny_data, tmp_path):
    from modules import VQVAE, VQVAEConfig
    from runs import load_vqvae
    from files import make_checkpoint
    model = VQVAE(VQVAEConfig(image_size=(32, 16), num_hiddens=16, num_residual_hiddens=8, num_downsampling_layers=2,
                              embedding_dim=8, num_embeddings=32))
    loaded = load_vqvae(make_checkpoint("vqvae", model, {"data_dir": None}), "x.pt", torch.device("cuda"))
    assert loaded.encoder.net[0].weight.is_contiguous(memory_format=torch.channels_last)


def _nccl_worker(rank, init_file, compile, results):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    from modules import VQVAE, VQVAEConfig
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=0, world_size=1)
    torch.manual_seed(0)
    model = VQVAE(VQVAEConfig(num_hiddens=16, num_residual_hiddens=8, num_downsampling_layers=2, embedding_dim=8,
                              num_embeddings=32, ema=True)).cuda().to(memory_format=torch.channels_last)
    net = DDP(model, device_ids=[0], broadcast_buffers=False)
    net = torch.compile(net) if compile else net
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], fused=True)
    for step in range(4):
        x = torch.rand(4, 1, 32, 16, device="cuda", generator=torch.Generator("cuda").manual_seed(step)) * 2 - 1
        out = net(x)
        loss = torch.nn.functional.mse_loss(out["x_recon"].float(), x) + out["vq_loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    results["codebook"] = model.vq.codebook.weight.detach().cpu()
    dist.destroy_process_group()


@pytest.mark.parametrize("compile", [False, True])
def test_gpu_nccl_one_rank_ddp_with_the_quantizers_collectives(tmp_path, compile):
    """A real NCCL process group (one rank: torchrun --nproc_per_node 1 makes none) through DDP, the
    quantizer's k-means, EMA and restart collectives, and with torch.compile around DDP."""
    import torch.multiprocessing as mp
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_nccl_worker, args=(str(tmp_path / "init"), compile, results), nprocs=1, join=True)
        codebook = results["codebook"]
    assert torch.isfinite(codebook).all() and codebook.std() > 0


def test_gpu_bench_quick(tiny_data, tmp_path, monkeypatch, capsys):
    """bench.py on the GPU end to end on a shrunken split: every row has a number."""
    import bench
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bench, "REAL_SIZES", {"train": 40, "validate": 8, "test": 6})
    monkeypatch.setattr(bench, "MODEL_FLAGS", TINY_MODEL[3:])
    bench.main(bench.get_parser().parse_args(["--device", "cuda", "--steps", "2", "--image_size", "32", "16",
                                              "--num_samples", "4", "--data_dir", str(tiny_data),
                                              "--bench_dir", str(tmp_path / "bench")]))
    out = capsys.readouterr().out
    assert "training (2 steps" in out and "prior sampling (4 slices)" in out, out
