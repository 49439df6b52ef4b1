"""Figures: every PNG the scripts write (matplotlib on the file-only Agg backend), each through the
one atomic writer."""
import textwrap

import numpy as np

from files import atomic_write


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed), imported on first use."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path, dpi=100):
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi))
    finally:
        pyplot().close(fig)


def save_comparison(path, inputs, indices, recons, title, num_embeddings, row_titles=None):
    """A grid with one row per slice: input | code map | reconstruction.

    inputs, recons: (N, 1, H, W) in [0, 1]; indices: (N, h, w) code indices.
    """
    plt = pyplot()

    n = inputs.shape[0]
    H, W = inputs.shape[-2:]
    fig, axes = plt.subplots(n, 3, figsize=(3 * 1.6 * W / H + 1.0, 1.6 * n + 0.6), squeeze=False)
    for i in range(n):
        panels = (inputs[i, 0], indices[i], recons[i, 0])
        for j, (ax, img) in enumerate(zip(axes[i], panels)):
            cmap, vmax = ("nipy_spectral", num_embeddings - 1) if j == 1 else ("gray", 1)
            ax.imshow(img.cpu().numpy(), cmap=cmap, vmin=0, vmax=vmax, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(("input", "code map", "reconstruction")[j], fontsize=9)
        if row_titles:
            axes[i, 0].set_ylabel(row_titles[i], fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def save_image_grid(path, images, title, ncols=8, row_labels=None, cell=1.3):
    """Images (N, 1, H, W) in [0, 1] in rows of `ncols` (each row `cell` inches high), optionally with a
    label on each row."""
    plt = pyplot()

    n = images.shape[0]
    nrows = -(-n // ncols)
    H, W = images.shape[-2:]
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * cell * W / H + 0.3, nrows * cell + 0.5),
                             squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i < n:
            ax.imshow(images[i, 0].cpu().numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.axis("on" if i < n else "off")
    for r, label in enumerate(row_labels or []):
        axes[r, 0].set_ylabel(label, fontsize=8)
    fig.suptitle(textwrap.fill(title, int(fig.get_figwidth() * 13)), fontsize=9)  # ~13 characters per inch
    fig.tight_layout()
    save_figure(fig, path)


def save_curves(path, series, xlabel, ylabel, title):
    """Line plot of {name: list of values}."""
    plt = pyplot()

    many = len(series) > 3  # a long legend goes beside the axes, not over the lines
    fig, ax = plt.subplots(figsize=(9 if many else 6, 3.5))
    for name, ys in series.items():
        xs = range(1, len(ys) + 1)
        ax.plot(xs, ys, label=name, marker="o" if len(ys) <= 50 else None, markersize=3)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if many:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    else:
        ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def save_blur_curves(path, curves, sigmas, title):
    """Blur-SSIM curves, {label: mean SSIM per sigma} (metrics.blur_ssim_curve), against the blur sigma."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, ys in curves.items():
        values = " / ".join(f"{y:.3f}" for y in ys)  # in the legend: close curves would overlap labels
        ax.plot(sigmas, ys, label=f"{label}: {values}", marker="o", markersize=4)
    ax.set_xticks(sigmas)
    ax.set_xlabel("Gaussian blur sigma (pixels)")
    ax.set_ylabel("mean SSIM(slice, blurred slice)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")  # empty: the curves fall from the top left
    fig.tight_layout()
    save_figure(fig, path)


def save_code_histogram(path, counts, title):
    """Bar chart of how often each code was chosen, codes sorted from most to least used.

    counts: (K,) code use over a split. A healthy codebook is a long, gently falling tail; a collapsed
    one is a few bars and then nothing.
    """
    plt = pyplot()

    freq = (counts.double() / counts.sum().clamp_min(1)).sort(descending=True).values.numpy()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(np.arange(1, len(freq) + 1), freq, width=1.0, color="tab:blue")
    ax.set_yscale("log")
    ax.set_xlim(0, len(freq) + 1)
    ax.set_xlabel(f"code rank (of {len(freq)}; {int((counts > 0).sum())} used)")
    ax.set_ylabel("fraction of code-map positions")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def save_orthogonal_cuts(path, volumes, labels, aspect, title):
    """One row per volume: its middle slice, and the cuts across the slices through the middle row and
    the middle column, so a stack's coherence from slice to slice shows as continuous anatomy.

    volumes: list of (P, H, W) in [0, 1] (P slices of H x W); aspect: slice spacing / pixel spacing,
    so the cuts keep the volume's proportions.
    """
    plt = pyplot()
    n = len(volumes)
    fig, axes = plt.subplots(n, 3, figsize=(9, 2.6 * n + 0.5), squeeze=False)
    for row, (vol, label) in zip(axes, zip(volumes, labels)):
        vol = np.asarray(vol, dtype=np.float32)
        P, H, W = vol.shape
        panels = ((vol[P // 2], 1, f"{label}: slice {P // 2} of {P}"),
                  (vol[:, :, W // 2].T, 1 / aspect, f"cut across the slices, column {W // 2}"),  # (H, P)
                  (vol[:, H // 2, :], aspect, f"cut across the slices, row {H // 2}"))  # (P, W)
        for ax, (img, a, name) in zip(row, panels):
            ax.imshow(img, cmap="gray", vmin=0, vmax=1, aspect=a, interpolation="nearest")
            ax.set_title(name, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
