"""A run's settings and the rules for resuming one: how the VQ-VAE, the adversarial decoder and the prior
train (TrainConfig, GanTrainConfig, PriorTrainConfig) beside what the models are (VQVAEConfig,
PriorConfig), gathered in RunConfig, from which train.py's flags are made and which a run's checkpoint
holds; a resumed run is rebuilt from it, and a typed flag that would change what the run is, refused.
No argparse parsing, no file I/O beyond reading the checkpoint that is resumed."""
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from files import load_checkpoint
from metrics import check_image_size
from modules import VQVAEConfig
from prior import PriorConfig
from settings import add_settings, check_settings, flags_of, setting, setting_names, settings_from
from utils import ProjectError


@dataclass
class TrainConfig:
    """How the VQ-VAE is trained, and where and on what (each field is a flag of the same name)."""
    data_dir: str = setting(None, "folder with keras_slices_train/validate/test; None: the built-in phantom")
    out_dir: str = setting(None, "run folder; None: the next runs/NNN")
    epochs: int = setting(20, "passes over the training split (with --resume: the run's own unless given; "
                          "more extends it)", rule=">= 1")
    batch_size: int = setting(8, "slices per Adam step (the global batch under torchrun); the seed's 32 takes four "
                              "times fewer steps per epoch (STUDIES.md: the batch study)", rule=">= 1")
    lr: float = setting(1e-3, "Adam learning rate", rule="> 0")
    recon_loss: str = setting("l1", "the reconstruction term: mse (-log p(x|z_q) of a Gaussian decoder, as the "
                              "paper and the seed), l1 (of a Laplacian one) or l1+mse (their sum)",
                              choices=("mse", "l1", "l1+mse"))
    ssim_weight: float = setting(0.0, "adds ssim_weight * (1 - SSIM) to the reconstruction loss; 0: none",
                                 rule=">= 0")
    # Augmentation of the training batches (dataset.augment), on the device, drawn from (seed, step);
    # every one 0 (off) by default, so the seed configuration trains exactly as before.
    aug_flip: float = setting(0.0, "probability of a left-right flip (of the first image axis, H) of each "
                              "training slice", rule="in [0, 1]")
    aug_rotate: float = setting(0.0, "largest rotation of a training slice, in degrees (each drawn uniform in "
                                "[-aug_rotate, aug_rotate])", rule="in [0, 45]")
    aug_scale: float = setting(0.0, "largest relative zoom of a training slice (0.1: uniform in [0.9, 1.1])",
                               rule="in [0, 0.5]")
    aug_shift: float = setting(0.0, "largest shift of a training slice on each axis, as a fraction of its size",
                               rule="in [0, 0.5]")
    aug_gamma: float = setting(0.0, "largest |log gamma| of a training slice's intensity gamma (the [0, 1] image "
                               "to the power exp(uniform(-g, g)))", rule="in [0, 1]")
    lr_schedule: str = setting("cosine", "constant as in the seed, or linear warm-up then cosine decay to 0",
                               choices=("constant", "cosine"))
    warmup_steps: int = setting(20, "warm-up steps (with --lr_schedule cosine); a run (or a leg of it) no longer "
                                "than that warms up over a tenth of its steps instead", rule=">= 0")
    best_by: str = setting("last", "which epoch best.pt (and so the prior's codes and predict.py) keeps: the lowest "
                           "validation MSE, or the last (for --lr_schedule cosine, whose last epochs sharpen the "
                           "decoder while the MSE rises: STUDIES.md)", choices=("mse", "last"))
    seed: int = setting(0, "seeds the model init and the data order", rule=">= 0")
    device: str = setting(None, "cuda, mps or cpu; None picks cuda, then mps, then cpu")
    precision: str = setting("auto", "of the VQ-VAE's forward pass; auto: bf16 autocast on CUDA, fp32 elsewhere "
                             "(the quantizer's distances and EMA updates and SSIM are always fp32)",
                             choices=("auto", "fp32", "bf16"))
    compile: bool = setting(False, "torch.compile the VQ-VAE's training step")
    resume: str = setting(None, "continue the run in RUN_DIR (or from a checkpoint file) where it stopped",
                          metavar="RUN_DIR")
    save_every_steps: int = setting(0, "also save last.pt every this many steps inside an epoch (every stage), for "
                                    "epochs too long to lose to a kill; 0: at the end of each epoch only (and on "
                                    "SIGTERM, SIGINT or SIGUSR1)", rule=">= 0")
    stage: str = setting("all", "all: the VQ-VAE, the adversarial decoder (with --gan_epochs) and the prior; "
                         "gan or prior: only that, for the run named by --resume",
                         choices=("all", "vqvae", "gan", "prior"))

    def __post_init__(self):
        check_settings(self)


@dataclass
class PriorTrainConfig:
    """How the prior is trained (each field is a flag prior_<field>)."""
    epochs: int = setting(18, "passes over the training codes", rule=">= 1")
    batch_size: int = setting(8, "code maps per AdamW step; 8 samples better than 32 at about the same time "
                              "per epoch on the phantom (STUDIES.md 16)", rule=">= 1")
    lr: float = setting(2e-3, "AdamW learning rate of the prior", rule="> 0")
    lr_schedule: str = setting("constant", "the prior's own: constant, or linear warm-up then cosine decay to 0 "
                               "at the last step of --prior_epochs", choices=("constant", "cosine"))
    warmup_steps: int = setting(50, "the prior's warm-up steps (with --prior_lr_schedule cosine)", rule=">= 0")
    weight_decay: float = setting(0.01, "AdamW weight decay of the prior", rule=">= 0")
    num_samples: int = setting(16, "samples in each epoch's grid", rule=">= 1")
    position_drop: float = setting(0.1, "probability of training a code map without its slice position, so the "
                                   "prior also samples without one", rule="in [0, 1]")
    previous_drop: float = setting(0.5, "probability of training a code map without the previous slice's, so the "
                                   "prior also samples single slices and first slices", rule="in [0, 1]")
    aug_flip: float = setting(0.5, "probability of training on the codes of a left-right flipped slice (and its "
                              "previous slice, flipped with it) instead; 0.5 lowered the validation NLL on unseen "
                              "patients (STUDIES.md)", rule="in [0, 1]")
    token_noise: float = setting(0.0, "fraction of the codes the prior sees in training (never its targets) replaced "
                                 "by random codes (taming-transformers' 1 - pkeep); 0: none", rule="in [0, 1)")
    aug_copies: int = setting(0, "augmented copies of the training slices, encoded once, that the prior trains on "
                              "beside the slices themselves (each map drawn from one of the copies + 1 alike): "
                              "in a copy each slice and its previous slice share one random rotation (up to 5 degrees), "
                              "zoom (up to 0.05), shift (up to 0.03 of the size) and gamma (0.1); 0: none", rule=">= 0")
    aug_fresh: bool = setting(False, "draw the --prior_aug_copies copies anew at the start of every epoch and "
                              "re-encode them (on-the-fly augmentation) instead of once for the whole run")
    ema: float = setting(0.0, "decay of an exponential moving average of the prior's weights, updated after every "
                         "step; the average is what is validated, sampled and saved as the prior (prior_best.pt "
                         "chosen by its validation NLL); 0: none, the trained weights themselves", rule="in [0, 1)")

    def __post_init__(self):
        check_settings(self)
        if self.aug_fresh and not self.aug_copies:
            raise ProjectError("--prior_aug_fresh redraws the --prior_aug_copies copies each epoch; pass "
                               "--prior_aug_copies 1 or more with it")


@dataclass
class GanTrainConfig:
    """The optional adversarial decoder (VQGAN, Esser et al. 2021): a copy of best.pt's decoder trained
    on the frozen codes with a PatchGAN discriminator (each field is a flag gan_<field>)."""
    epochs: int = setting(0, "passes over the training codes; 0: no adversarial decoder", rule=">= 0")
    batch_size: int = setting(32, "code maps (and real slices) per step", rule=">= 1")
    lr: float = setting(1e-4, "Adam learning rate of the decoder and the discriminator (betas 0.5, 0.9 as "
                        "taming-transformers)", rule="> 0")
    disc_weight: float = setting(0.8, "weight of the adaptive-weighted adversarial term (taming's VQGAN "
                                 "configs: 0.8)", rule=">= 0")
    disc_start: int = setting(200, "steps in which only the discriminator learns to tell reconstructions from "
                              "slices, while the decoder trains on the reconstruction loss alone", rule=">= 0")
    disc_channels: int = setting(64, "channels of the discriminator's first conv (doubled per layer, at most 8x)",
                                 rule=">= 1")
    disc_layers: int = setting(3, "stride-2 convs of the discriminator (3: 70x70-pixel patches)", rule="in [1, 12]")
    noise: bool = setting(False, "the texture decoder: learned per-pixel noise injected near the decoder's output "
                          "(modules.NoiseInjection, zero at the start), a fresh draw per slice, so it can render "
                          "MR's grain")

    def __post_init__(self):
        check_settings(self)


# (attribute, config, flag prefix): every setting of a run, in the order --help lists them
SECTIONS = (("train", TrainConfig, ""), ("model", VQVAEConfig, ""), ("prior_train", PriorTrainConfig, "prior_"),
            ("prior", PriorConfig, "prior_"), ("gan", GanTrainConfig, "gan_"))
# What a resumed run may change: how it goes on, not what it is (--epochs extends it, on a cosine
# schedule by a new leg). The prior's
# and the adversarial decoder's flags may change too until that stage has started; after that its
# own checkpoint rules them.
RESUMABLE = ("resume", "epochs", "device", "precision", "compile", "stage", "save_every_steps")


@dataclass
class RunConfig:
    """A run's settings: how it trains, the VQ-VAE, and how the prior trains and what it is."""
    train: TrainConfig
    model: VQVAEConfig
    prior_train: PriorTrainConfig
    prior: PriorConfig  # its code-map size and codes are the VQ-VAE's (PriorConfig.for_vqvae)
    gan: GanTrainConfig
    # The epoch at which each leg of a cosine schedule ends, by section ("train", "prior_train"): one leg
    # over --epochs, and one more for each extension on resume (extend_legs). Not a flag: a run's own.
    legs: dict = field(default_factory=dict)

    @classmethod
    def from_flags(cls, flags):
        """Flat flags {name: value} (absent ones at their defaults) -> RunConfig; a value out of its
        range is a ProjectError naming the flag."""
        parts = {}
        for name, config, prefix in SECTIONS:
            make = partial(PriorConfig.for_vqvae, parts["model"]) if config is PriorConfig else None
            parts[name] = settings_from(config, flags, prefix, make)
        return cls(**parts)

    def legs_of(self, section):
        """The epochs at which the legs of `section`'s schedule end ([--epochs] unless extended)."""
        return self.legs.get(section) or [getattr(self, section).epochs]

    def flags(self):
        """The run's settings as flat flags {name: value}, as typed and as config.json holds them."""
        return {k: v for name, _, prefix in SECTIONS for k, v in flags_of(getattr(self, name), prefix).items()}


def add_run_flags(parser):
    """A flag for every setting of a run, in the order of SECTIONS."""
    for _, config, prefix in SECTIONS:
        add_settings(parser, config, prefix)


def stage_flag_names(prefix):
    """The flags of the sections whose flags start with `prefix` ("prior_": how the prior trains and
    what it is; "gan_": the adversarial decoder): free on resume until that stage has started."""
    return [n for _, config, p in SECTIONS if p == prefix for n in setting_names(config, prefix)]


def refuse_changes(old, typed, free, what, fix):
    """Raise ProjectError naming every flag typed now, other than those in `free`, whose value differs
    from the run's (`old`); data and run folders compare as resolved paths."""
    def same(k, a, b):
        if k in ("data_dir", "out_dir"):
            return (a and str(Path(a).resolve())) == (b and str(Path(b).resolve()))
        return a == b
    differ = {k: (old.get(k), v) for k, v in typed.items() if k not in free and not same(k, old.get(k), v)}
    if differ:
        was = ", ".join(f"{k}={a}" for k, (a, _) in differ.items())
        now = ", ".join(f"{k}={b}" for k, (_, b) in differ.items())
        raise ProjectError(f"{what} {was} but this command asks {now}; {fix}")


# How a run trained before these flags were recorded in its config: the seed's loss, constant rate and
# best.pt by validation MSE. The defaults changed later (STUDIES.md: the batch study); a resumed old run
# must go on as it began.
TRAIN_BEFORE = {"recon_loss": "mse", "lr_schedule": "constant", "warmup_steps": 100, "best_by": "mse"}


def resume_run(flags):
    """--resume RUN_DIR or CHECKPOINT -> (checkpoint, the run's RunConfig rebuilt from it). Of the flags
    typed now, only RESUMABLE, the prior's and the adversarial decoder's may differ from the run's; any
    other is refused by name."""
    path = Path(flags["resume"])
    path = path / "last.pt" if path.is_dir() else path
    ckpt = load_checkpoint(path)
    last = path.with_name("last.pt")
    if path.name != "last.pt" and last.is_file() and (last_epoch(last) or 0) > ckpt["epoch"]:
        raise ProjectError(f"{path} is from epoch {ckpt['epoch']} but the run went on (see {last}); "
                           f"resume the run folder {path.parent}, which continues from its last epoch")
    # The run's flags: the model's from model_args, the rest from config; flags added since the run
    # was made take the values runs had before them (the model's those of the seed codebook, see
    # VQVAEConfig.from_dict; the training's TRAIN_BEFORE), else their defaults.
    defaults = RunConfig.from_flags({}).flags()
    old = {**defaults, **TRAIN_BEFORE, **{k: v for k, v in ckpt["config"].items() if k in defaults},
           **flags_of(VQVAEConfig.from_dict(ckpt["model_args"])), "out_dir": str(path.parent)}
    refuse_changes(old, flags, RESUMABLE + tuple(stage_flag_names("prior_") + stage_flag_names("gan_")),
                   f"cannot resume {path}: the run was made with",
                   "drop those flags to resume it, or start a new run without --resume")
    epochs = flags.get("epochs", old["epochs"])
    legs = extend_legs(old["lr_schedule"], ckpt["config"].get("lr_legs") or [old["epochs"]], epochs, str(path),
                       "resume without --epochs, or start a new run")
    run = RunConfig.from_flags({**old, **flags})
    run.legs["train"] = legs
    return ckpt, run


def last_epoch(path):
    """The epoch of the checkpoint at `path`, or None when it is damaged (the README's advice for a
    damaged last.pt is to resume from best.pt, which then goes on from its own epoch)."""
    try:
        return load_checkpoint(path)["epoch"]
    except ProjectError:
        return None


def resume_stage(run, ckpt, path, typed, section, what, new, model_flags=None):
    """The run with the settings of a stage on the frozen best.pt (the prior, the adversarial decoder)
    under way in `path`: its checkpoint's flags of `section` (the prefix of its flags, e.g. "prior_") and
    model_flags rule; --<section>epochs may extend it. A flag of the stage typed now that differs from its
    own is refused by name, with how to train `new` (a glob of its files to delete) instead."""
    old = {**{k: v for k, v in ckpt["config"].items() if k in stage_flag_names(section)}, **(model_flags or {})}
    fix = f"delete {path.parent}/{new} to train a new one"
    refuse_changes(old, {k: v for k, v in typed.items() if k in old}, (f"{section}epochs",),
                   f"cannot resume {what} in {path}: it was made with", f"drop those flags to resume it, or {fix}")
    epochs = typed.get(f"{section}epochs", old.get(f"{section}epochs"))
    legs = extend_legs(old.get(f"{section}lr_schedule"), ckpt["config"].get("lr_legs") or [old.get(f"{section}epochs")],
                       epochs, f"{what} in {path}", f"resume without --{section}epochs, or {fix}")
    resumed = RunConfig.from_flags({**run.flags(), **old, f"{section}epochs": epochs})
    resumed.legs = {**run.legs, {"prior_": "prior_train", "gan_": "gan"}[section]: legs}
    return resumed


def resume_prior(run, ckpt, path, typed):
    """The run with the settings of the prior under way in `path` (its model_args rule its model)."""
    return resume_stage(run, ckpt, path, typed, "prior_", "the prior", "prior_*.pt",
                        flags_of(PriorConfig.from_dict(ckpt["model_args"], path), "prior_"))


def resume_gan(run, ckpt, path, typed):
    """The run with the settings of the adversarial decoder under way in `path`."""
    return resume_stage(run, ckpt, path, typed, "gan_", "the adversarial decoder", "decoder_gan*.pt")


def check_run(run, world_size):
    """What no single setting can check: the settings together, and with the processes."""
    check_image_size(run.model.image_size)
    if run.train.batch_size % world_size:
        raise ProjectError(f"--batch_size {run.train.batch_size} (the global batch) does not split over "
                           f"{world_size} processes; use a multiple of {world_size}")
    m = run.model
    if run.train.compile and m.lookup_dim and not m.ema and m.restart_after:
        # The normalised lookup's backward needs the codebook, which restarts change in place inside the
        # compiled step; eagerly a copy is read, but a compiled graph may recompute from the original.
        raise ProjectError("--compile with --lookup_dim, a gradient codebook and restarts is not supported: "
                           "add --ema, or --restart_after 0, or drop --compile")


def extend_legs(schedule, legs, epochs, what, fix):
    """The legs of `what`'s schedule (the epoch at which each ends) when it resumes to `epochs`: on a
    cosine schedule, more epochs than its last leg add a leg (warm-up again, then decay to 0 at `epochs`:
    the last leg has decayed, so it cannot simply be stretched), fewer are refused (`fix`: what to do
    instead); a constant rate has one leg, whatever the epochs."""
    if schedule != "cosine":
        return [epochs]
    if epochs < legs[-1]:
        raise ProjectError(f"cannot shorten {what} to {epochs} epochs: its cosine schedule runs to epoch {legs[-1]} "
                           f"and would stop before it decays; {fix}")
    return legs if epochs == legs[-1] else legs + [epochs]
