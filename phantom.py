"""Synthetic pelvic T2 MR phantom: the embedded default data set, so `python train.py` runs on a
fresh clone with no data of its own.

Each phantom "patient" is an analytic 3D pelvis (body and subcutaneous fat, thighs, iliac bones,
femoral heads and necks, bladder, prostate, rectum, sacrum) cut into coronal slices at several
anterior-posterior positions, with a fine tissue grain, a smooth bias field and Rician noise inside the
body; the air outside the body is exactly zero, as in the HipMRI volumes (background-masked by the
scanner or the publisher). Grain and noise levels are tuned so that the blur-SSIM curve (SSIM of each
[0, 1]-scaled slice against itself blurred at sigma 0.5, 1, 2 px) matches a real HipMRI volume's within
0.02, so phantom SSIMs measure anatomy rather than noise. Slices are written one per
`.nii.gz` file in the HipMRI 2D release's layout (`keras_slices_train|validate|test`, files named
`case_004_week_0_slice_17.nii.gz`), so the real loader reads them. Patients never cross splits.

Usage: python phantom.py [--out_dir data/hipmri_phantom] [--preview grid.png]
       python phantom.py --compare_real VOLUME.nii.gz [--curve blur_ssim.png]
(train.py and predict.py call generate() themselves; running this file is optional)
"""
import argparse
import fcntl
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy.ndimage import gaussian_filter

from utils import ProjectError

SPLIT_DIRS = ("keras_slices_train", "keras_slices_validate", "keras_slices_test")
# Phantom patients per split and slices per patient: 320 / 60 / 60 slices, sized so the default
# 20-epoch run of the seed model takes minutes on a 2-core CPU.
PATIENTS = {"keras_slices_train": 16, "keras_slices_validate": 3, "keras_slices_test": 3}
SLICES_PER_PATIENT = 20
WIDE_CASES = {5, 20}  # cases stored 256x144 (a wider superior-inferior field), as a few real ones are
PIXDIM = (1.68, 1.56)  # mm, as in the HipMRI volumes
BLUR_SIGMAS = (0.5, 1, 2)  # px: the blur-SSIM curve's blurs
REAL_SLICES = range(86, 186)  # coronal slices of a real volume: the span of study.py's stand-in slabs
VERSION = 2  # bump when the phantom's appearance changes, so stale copies are regenerated


def _ellipse(u, v, cu, cv, ru, rv):
    """Normalised squared radius of (u, v) in an axis-aligned ellipse: < 1 inside."""
    return ((u - cu) / ru) ** 2 + ((v - cv) / rv) ** 2


def _segment_dist(u, v, p, q):
    """Distance from each (u, v) to the segment p-q."""
    d = np.subtract(q, p)
    t = np.clip(((u - p[0]) * d[0] + (v - p[1]) * d[1]) / (d @ d), 0, 1)
    return np.hypot(u - p[0] - t * d[0], v - p[1] - t * d[1])


def _section(t, tc, rt):
    """Scale of an ellipsoid's cross-section at depth t (0 where the slice misses it)."""
    return np.sqrt(np.clip(1 - ((t - tc) / rt) ** 2, 0, None))


def _smooth_noise(rng, shape, sigma):
    """Unit-variance Gaussian random field smoothed at `sigma` pixels."""
    f = gaussian_filter(rng.normal(size=shape), sigma)
    return f / f.std()


def _patient(rng):
    """Random anatomy of one phantom patient (lengths in units of 128 pixels)."""
    return dict(
        body_w=rng.uniform(0.66, 0.80), body_u=rng.normal(0, 0.02), fat=rng.uniform(0.05, 0.12),
        thigh_split=rng.uniform(-0.42, -0.30), bone_u=rng.uniform(0.38, 0.46),
        head_v=rng.uniform(-0.20, -0.10), head_r=rng.uniform(0.085, 0.11),
        bladder=(rng.uniform(0.10, 0.22), rng.uniform(0.08, 0.17), rng.uniform(-0.5, -0.2)),
        prostate=(rng.uniform(0.07, 0.11), rng.uniform(0.05, 0.08), rng.uniform(0.0, 0.2)),
        rectum_gas=rng.uniform() < 0.5, muscle=rng.uniform(0.28, 0.38), fat_level=rng.uniform(0.8, 0.95),
        noise=rng.uniform(0.012, 0.028), bias=rng.normal(0, 0.25, size=4), scale=rng.uniform(250, 400),
        tilt=rng.normal(0, 0.04),
    )


def render_slice(p, t, shape, rng):
    """One coronal slice at depth t in [-1, 1] (anterior to posterior) -> float array `shape` >= 0.

    Rows run left-right, columns inferior to superior, as in slices cut from the HipMRI volumes.
    """
    H, W = shape
    u, v = np.meshgrid((np.arange(H) - H / 2 + 0.5) / 128, (np.arange(W) - W / 2 + 0.5) / 128,
                       indexing="ij")
    v = v + p["tilt"] * u  # a slightly oblique slice plane
    img = np.zeros(shape)

    # Body: hips widest at the femoral heads, narrowing towards the waist; the thighs part below
    # the crotch. Subcutaneous fat is a bright ring under the skin.
    w = p["body_w"] * _section(t, 0.0, 1.1) * (1 - 0.25 * np.clip(v - p["head_v"], 0, None) ** 2)
    rho = np.abs(u - p["body_u"]) / np.maximum(w, 1e-3)
    crotch = _ellipse(u, v, p["body_u"], p["thigh_split"] - 0.3, 0.05 + 0.1 * abs(t), 0.3) < 1
    body = (rho < 1) & ~crotch
    fat = body & ((rho > 1 - p["fat"] / np.maximum(w, 1e-3)) |
                  (_ellipse(u, v, p["body_u"], p["thigh_split"] - 0.3, 0.08 + 0.1 * abs(t), 0.36) < 1))
    # Tissue grain of a few pixels (0.2 at sigma 1.3 px), in muscle, fat and marrow alike: with the noise
    # level it sets how much a slight blur costs in SSIM, tuned to a real volume (see compare_real).
    texture = 1 + 0.2 * _smooth_noise(rng, shape, 1.3)
    img[body] = p["muscle"] * texture[body]
    # Intermuscular fat planes: the zero crossings of a smooth random field give thin curved lines.
    planes = np.abs(_smooth_noise(rng, shape, 14)) < 0.05
    img[body & planes] = p["fat_level"] * 0.8
    img[fat] = p["fat_level"] * texture[fat]
    # Pelvic fat around the organs, walled in by the obturator muscles.
    if abs(t) < 0.75:
        k = _section(t, 0.1, 0.8)
        img[_ellipse(u, v, p["body_u"], -0.02, (p["bone_u"] - 0.05) * k + 1e-3, 0.26) < 1] = p["muscle"] * 0.75
        img[_ellipse(u, v, p["body_u"], -0.02, (p["bone_u"] - 0.13) * k + 1e-3, 0.23) < 1] = p["fat_level"] * 0.7

    _draw_bones(img, u, v, t, p, texture)
    _draw_organs(img, u, v, t, p)

    img = gaussian_filter(img, 0.7)  # partial-volume edges
    b = p["bias"]
    img *= np.exp(0.3 * (b[0] * u + b[1] * v + b[2] * u * v + b[3] * (u ** 2 + v ** 2)))  # coil bias field
    # Rician noise: magnitude of the complex signal plus Gaussian noise in both channels.
    s = p["noise"]
    img = np.hypot(img + rng.normal(0, s, shape), rng.normal(0, s, shape))
    # Air is exactly zero, noise included, as in the background-masked HipMRI volumes: Rician noise in
    # the air (a fifth or more of each slice) made any blur cost SSIM for the noise, not the anatomy.
    img[~body] = 0
    return img * p["scale"]


def _draw_bones(img, u, v, t, p, texture):
    """Into img, at depth t of patient p (u, v: the slice's coordinates): the pelvic bones."""
    # Pelvic bones, visible in the middle third: iliac wing from acetabulum up and out, femoral head
    # and neck; dark cortex around fatty (brighter) marrow.
    if abs(t) < 0.55:
        k = _section(t, 0.0, 0.6)
        for s in (-1, 1):
            cu = p["body_u"] + s * p["bone_u"]
            ilium = _segment_dist(u, v, (cu, p["head_v"] + 0.08), (cu + s * 0.2, 0.6))
            neck = _segment_dist(u, v, (cu, p["head_v"]), (cu + s * 0.16, p["head_v"] - 0.3))
            head = np.sqrt(_ellipse(u, v, cu, p["head_v"], p["head_r"] * k + 1e-3, p["head_r"] * k + 1e-3))
            for dist, r in ((ilium / 0.05, 1), (neck / 0.055, 1), (head, 1)):
                r = r * k
                img[dist < r] = 0.08  # cortex
                img[dist < r * 0.75] = 0.55 * texture[dist < r * 0.75]  # marrow
    # Sacrum, posterior slices only.
    if t > 0.5:
        sac = _ellipse(u, v, p["body_u"], 0.25, 0.1 * _section(t, 0.8, 0.35) + 1e-3, 0.25)
        img[sac < 1] = 0.08
        img[sac < 0.6] = 0.5


def _draw_organs(img, u, v, t, p):
    """Into img, at depth t of patient p (u, v: the slice's coordinates): bladder, prostate and rectum."""
    # Bladder: urine is the brightest tissue on T2; thin dark wall.
    bu, bv, bt = p["bladder"]
    k = _section(t, bt, 0.5)
    if k > 0:
        e = _ellipse(u, v, p["body_u"], 0.15, bu * k, bv * k)
        img[e < 1.15] = 0.2
        img[e < 1] = 1.0
    # Prostate under the bladder: darker transition zone, brighter peripheral zone, urethra.
    pu, pv, pt = p["prostate"]
    k = _section(t, pt, 0.3)
    if k > 0:
        e = _ellipse(u, v, p["body_u"], -0.1, pu * k, pv * k)
        img[e < 1] = 0.62
        img[e < 0.55] = 0.4
        img[_ellipse(u, v, p["body_u"], -0.1, 0.012, 0.012) < 1] = 0.15
    # Rectum behind the prostate: dark wall, gas (black) or fluid (bright) lumen.
    k = _section(t, 0.5, 0.3)
    if k > 0:
        e = _ellipse(u, v, p["body_u"], -0.12, 0.07 * k, 0.22)
        img[e < 1] = 0.12
        img[e < 0.5] = 0.02 if p["rectum_gas"] else 0.75


def _affine():
    return np.diag([PIXDIM[0], PIXDIM[1], 1.0, 1.0])


def generate(out_dir, seed=0, patients=PATIENTS, slices_per_patient=SLICES_PER_PATIENT):
    """Write the phantom set under `out_dir` (idempotent: an existing complete set is kept).

    `patients` maps each split folder to its number of phantom patients (tests make tiny sets).
    Written to a temporary sibling folder, then renamed, so an interrupted run never leaves a
    half-written set that looks complete. Returns `out_dir` as a Path.
    """
    out_dir = Path(out_dir)
    marker = out_dir / f".complete_v{VERSION}"
    if marker.exists():
        return out_dir
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        # One writer at a time (torchrun's processes, or two runs started together): the others wait, then
        # find the set complete, instead of replacing the folder one of them is already reading.
        with open(out_dir.parent / f".{out_dir.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not marker.exists():
                _write(out_dir, marker, seed, patients, slices_per_patient)
    except OSError as e:  # a full disk, a read-only folder: one line, and no half-written set left behind
        raise ProjectError(f"could not write the phantom data set to {out_dir}: {e.strerror or e}; free space "
                           f"(it takes about 15 MB) or pass --data_dir") from None
    return out_dir


def _case_slices(seed, case, slices_per_patient):
    """One phantom patient's slices as stored: (file name, int16 array) pairs, anterior to posterior."""
    rng = np.random.default_rng([seed, case])
    p = _patient(rng)
    week = int(rng.integers(0, 8))
    shape = (256, 144) if case in WIDE_CASES else (256, 128)
    depths = np.linspace(-0.8, 0.8, slices_per_patient) + rng.normal(0, 0.02, slices_per_patient)
    return [(f"case_{case:03d}_week_{week}_slice_{i}.nii.gz",
             np.round(render_slice(p, t, shape, rng)).astype(np.int16)) for i, t in enumerate(depths)]


def _write(out_dir, marker, seed, patients, slices_per_patient):
    """The set into a temporary sibling folder, renamed to out_dir when complete."""
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    case = 0
    try:
        for split in SPLIT_DIRS:
            (tmp / split).mkdir(parents=True)
            for _ in range(patients[split]):
                case += 1
                for name, img in _case_slices(seed, case, slices_per_patient):
                    nib.save(nib.Nifti1Image(img, _affine()), tmp / split / name)
        (tmp / marker.name).touch()
    except BaseException:  # a full disk or Ctrl-C: the partial set would only take space
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)


def save_preview(data_dir, path, cases=(1, 5, 9), positions=8):
    """A grid of slices: one row per phantom patient, anterior to posterior."""
    from figures import pyplot, save_figure
    plt = pyplot()
    fig, axes = plt.subplots(len(cases), positions, figsize=(1.3 * positions, 2.5 * len(cases)))
    for r, case in enumerate(cases):
        files = sorted(Path(data_dir).glob(f"*/case_{case:03d}_*.nii.gz"),
                       key=lambda f: int(f.name.split("_slice_")[1].split(".")[0]))
        for ax, f in zip(axes[r], files[:: max(1, len(files) // positions)]):
            ax.imshow(np.asarray(nib.load(f).dataobj), cmap="gray")
            ax.set_title(f.name.split("_week")[0] + "\n" + f.name.split("_week_")[1][2:-7], fontsize=7)
            ax.axis("off")
    fig.suptitle("synthetic pelvic T2 phantom: coronal slices, anterior (left) to posterior", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=90)


def mixed_blur_ssim_curve(slices, sigmas=BLUR_SIGMAS):
    """metrics.blur_ssim_curve over 2D slices of several shapes (the phantom's 256x128 and 256x144):
    each slice min-max scaled to [0, 1] as the loader does, each shape's curve weighted by its count."""
    import torch  # imported here: dataset imports this module, and generating the phantom needs no torch
    from dataset import scale_unit
    from metrics import blur_ssim_curve
    by_shape = {}
    for a in slices:
        by_shape.setdefault(a.shape, []).append(scale_unit(a))
    total = np.zeros(len(sigmas))
    for group in by_shape.values():
        total += len(group) * np.array(blur_ssim_curve(torch.from_numpy(np.stack(group))[:, None], sigmas))
    return list(total / len(slices))


def phantom_slices(seed=0, slices_per_patient=SLICES_PER_PATIENT, cases=None):
    """The phantom's slices as generate() stores them (int16 arrays), rendered in memory; cases: the
    1-based case numbers (default: all of PATIENTS)."""
    cases = cases or range(1, sum(PATIENTS.values()) + 1)
    return [img for case in cases for _, img in _case_slices(seed, case, slices_per_patient)]


def real_slices(volume, ks=REAL_SLICES):
    """Coronal slices vol[:, k, :] of a HipMRI 3D volume, as study.py cuts its stand-in."""
    from utils import ProjectError
    volume = Path(volume)
    if not volume.is_file():
        raise ProjectError(f"--compare_real {volume} is not a file; pass a HipMRI 3D volume "
                           f"(e.g. ../shared/data/hipmri_3d/Case_018_Week7_LFOV.nii.gz)")
    try:
        # Read whole, once: each slice taken from a .nii.gz proxy would decompress the file again.
        data = np.asarray(nib.load(volume).dataobj)
    except (nib.filebasedimages.ImageFileError, OSError, EOFError, ValueError) as e:
        raise ProjectError(f"--compare_real {volume}: cannot read it as NIfTI "
                           f"({' '.join(str(e).split())[:150]})") from None
    if data.ndim != 3 or data.shape[1] <= max(ks):
        raise ProjectError(f"--compare_real {volume} has shape {data.shape}; it needs a 3D volume with more "
                           f"than {max(ks)} slices along axis 1")
    return [data[:, k, :] for k in ks]


def compare_real(volume, curve_path=None, seed=0):
    """Print the blur-SSIM curves of the real volume's coronal slices and of the whole phantom as a
    Markdown table, optionally save them as a figure; returns (real, phantom) lists per BLUR_SIGMAS."""
    real = mixed_blur_ssim_curve(real_slices(volume))
    synthetic = mixed_blur_ssim_curve(phantom_slices(seed))
    print(f"blur-SSIM: mean SSIM(x, gaussian_filter(x, sigma)), mode reflect, slices min-max scaled to [0, 1]; "
          f"real: {Path(volume).name} coronal slices {REAL_SLICES.start}-{REAL_SLICES.stop - 1}, "
          f"phantom: all {sum(PATIENTS.values()) * SLICES_PER_PATIENT} slices (seed {seed})\n")
    print("| sigma (px) | real | phantom | phantom - real |\n| --- | --- | --- | --- |")
    for s, r, p in zip(BLUR_SIGMAS, real, synthetic):
        print(f"| {s:g} | {r:.4f} | {p:.4f} | {p - r:+.4f} |")
    if curve_path:
        from figures import save_blur_curves
        save_blur_curves(curve_path, {"real": real, "phantom": synthetic}, BLUR_SIGMAS,
                         f"SSIM of each slice against itself blurred: {Path(volume).name.split('.')[0]} vs phantom")
        print(f"\nfigure: {curve_path}")
    return real, synthetic


def main(args):
    if args.compare_real:
        compare_real(args.compare_real, args.curve, args.seed)
        return
    out = generate(args.out_dir, args.seed)
    print(f"phantom in {out}")
    if args.preview:
        save_preview(out, args.preview)


if __name__ == "__main__":
    from utils import run_main
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out_dir", default="data/hipmri_phantom")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preview", default=None, help="also save a PNG grid of slices here")
    parser.add_argument("--compare_real", default=None, metavar="VOLUME",
                        help="instead of generating: print the blur-SSIM curves of this real HipMRI 3D volume's "
                             "coronal slices and of the phantom")
    parser.add_argument("--curve", default=None, help="with --compare_real: also save the curves as a PNG here")
    run_main(main, parser.parse_args())
