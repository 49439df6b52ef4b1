"""Open a trained run for use: its VQ-VAE, prior and adversarial decoder rebuilt from their checkpoints
(model_args and weights alone), with the precision and the data it trained on. predict.py, study.py and
bench.py open runs here; the training stages write them (stage.py)."""
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from dataset import recorded_data_dir
from files import fingerprint, latest_checkpoint, load_checkpoint
from metrics import check_image_size
from modules import VQVAE, Decoder, VQVAEConfig
from prior import PriorConfig, build_prior
from utils import ProjectError, configure_backends, one_line


@dataclass
class Run:
    """A trained run, opened: its VQ-VAE checkpoint (path, ckpt) and model in eval mode, the precision
    it trained, validated and encoded in (fp32 or bf16), and its prior when opened with one."""
    path: Path
    ckpt: dict
    model: VQVAE
    precision: str
    prior: torch.nn.Module = None
    prior_ckpt: dict = None
    prior_path: Path = None

    @property
    def dir(self):
        return self.path.parent

    def data_dir(self):
        """The data folder the run trained on (the built-in phantom when it recorded none)."""
        return recorded_data_dir(self.ckpt["config"], self.path)


def open_run(checkpoint=None, device=torch.device("cpu"), prior=False):
    """-> Run. checkpoint: a VQ-VAE checkpoint, or a run folder for its best.pt; None: the newest
    runs/NNN/best.pt. prior: also open the run's prior_best.pt (a ProjectError when it has none or
    it learned another VQ-VAE's codes). Sets the device's backends for the run's precision."""
    path = Path(checkpoint) if checkpoint else latest_checkpoint()
    path = path / "best.pt" if path.is_dir() else path
    ckpt = load_checkpoint(path)
    # The precision the run trained, validated and encoded in (runs before it was recorded: fp32).
    precision = ckpt["config"].get("dtype", "fp32")
    if precision not in ("fp32", "bf16"):
        raise ProjectError(f"{path} records dtype {precision!r}, which is neither fp32 nor bf16; it is damaged")
    configure_backends(device, precision=precision)
    model = load_vqvae(ckpt, path, device)
    check_image_size(model.cfg.image_size, f"{path}'s model_args")
    run = Run(path, ckpt, model, precision)
    if prior:
        prior_path = path.parent / "prior_best.pt"
        run.prior_ckpt, run.prior_path = open_prior(run, prior_path), prior_path
        run.prior = load_prior(run.prior_ckpt, prior_path, device)
    return run


def open_prior(run, path):
    """The prior checkpoint at `path`, checked to have learned the codes of the run's VQ-VAE."""
    prior_ckpt = load_checkpoint(path, kind="prior")
    if not fits(prior_ckpt, run.ckpt):
        raise ProjectError(f"{path} learned the codes of another VQ-VAE than {run.path}; train one with "
                           f"`python train.py --stage prior --resume {run.dir}`")
    return prior_ckpt


def fits(stage_ckpt, vq_ckpt):
    """Whether a prior's or an adversarial decoder's checkpoint learned the codes of exactly this VQ-VAE."""
    return stage_ckpt.get("vqvae") == fingerprint(vq_ckpt["model"])


def _rebuild(make, config_of, ckpt, path, device):
    """The model of a checkpoint, make(config_of(model_args)), with its weights, in eval mode on `device`.

    model_args are checked by the config's own rules, and the weights' names and shapes against a
    model built on the meta device (no memory, no draws from the RNG), before the real one is built:
    damaged model_args can neither crash the build nor make it allocate what they claim."""
    try:
        cfg = config_of(ckpt["model_args"])
        with torch.device("meta"):
            shapes = {k: tuple(v.shape) for k, v in make(cfg).state_dict().items()}
    except ProjectError as e:  # model_args of a model this version has dropped: the config says which
        raise ProjectError(f"{path}: {e}") from None
    except (TypeError, ValueError, RuntimeError) as e:
        raise ProjectError(f"{path} has model_args this version cannot build ({one_line(e)}); "
                           f"it is not a {ckpt.get('kind', 'vqvae')} checkpoint of this project") from None
    weights = ckpt["model"]
    differ = sorted(k for k in shapes.keys() | weights.keys()
                    if shapes.get(k) != (tuple(weights[k].shape) if k in weights else None))
    if differ:
        detail = "; ".join(f"{k}: {tuple(weights[k].shape) if k in weights else 'missing'} in the file, "
                           f"{shapes.get(k, 'none')} for its model_args" for k in differ[:3])
        raise ProjectError(f"{path}: weights do not fit its model_args ({detail})")
    bad = [k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ProjectError(f"{path} holds NaN or Inf weights ({', '.join(bad[:3])}): the run diverged before it "
                           f"was saved; use an earlier checkpoint of the run or train again with a lower --lr")
    model = make(cfg)
    model.load_state_dict(weights)
    return model.to(device).eval()


def load_vqvae(ckpt, path, device):
    """Rebuild the VQ-VAE of a checkpoint from its model_args alone, in eval mode on `device`
    (channels_last on CUDA, the layout it trained in there)."""
    model = _rebuild(VQVAE, VQVAEConfig.from_dict, ckpt, path, device)
    return model.to(memory_format=torch.channels_last) if device.type == "cuda" else model


def load_prior(ckpt, path, device):
    """Rebuild the code prior of a prior checkpoint from its model_args alone, in eval mode."""
    return _rebuild(build_prior, PriorConfig.from_dict, ckpt, path, device)


def load_gan_decoder(run_dir_or_path, vq_ckpt, device):
    """The adversarial decoder of a run (run_dir/decoder_gan.pt, or that file itself) for the VQ-VAE
    checkpoint vq_ckpt, rebuilt from its model_args, in eval mode on `device` -> a Decoder: (B, D, h, w)
    codebook vectors (model.vq.embed) -> (B, C, H, W), roughly in [-1, 1]. None when the run has none;
    ProjectError when the file is damaged or learned the codes of another VQ-VAE than vq_ckpt's."""
    path = Path(run_dir_or_path)
    path = path / "decoder_gan.pt" if path.is_dir() else path
    if not path.is_file():
        return None
    ckpt = load_checkpoint(path, kind="decoder_gan")
    if not fits(ckpt, vq_ckpt):
        raise ProjectError(f"{path} learned the codes of another VQ-VAE than this run's best.pt (it was extended "
                           f"or replaced since); train a new one: python train.py --stage gan --resume "
                           f"{path.parent} --gan_epochs N")
    decoder = _rebuild(partial(Decoder, noise=bool(ckpt["config"].get("gan_noise", False))), VQVAEConfig.from_dict,
                       ckpt, path, device)
    return decoder.to(memory_format=torch.channels_last) if device.type == "cuda" else decoder
