"""The README cannot go stale: every figure it quotes for the default run equals
resources/default_run_metrics.json (the run's own metrics files, copied), rounded as printed; the README
stays a front page (at most 25 KB, the essentials in its first 10 KB); and the links between README.md,
STUDIES.md and CONTRIBUTING.md (files, their headings, resources/ images) resolve. Fast: no training."""
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "STUDIES.md", "CONTRIBUTING.md")


@pytest.fixture(scope="module")
def readme():
    return (ROOT / "README.md").read_text()


@pytest.fixture(scope="module")
def run():
    return json.loads((ROOT / "resources" / "default_run_metrics.json").read_text())


def one(pattern, text):
    """The groups of the single match of `pattern` (whitespace in it matches any run of whitespace)."""
    found = re.findall(pattern.replace(" ", r"\s+"), text)
    assert len(found) == 1, f"{pattern!r} found {len(found)} times in the README"
    return found[0]


def test_readme_quotes_the_default_run_as_measured(readme, run):
    t, p, g, tm = run["test"], run["prior"], run["generation"], run["timings"]
    # predict.py's own two lines, as the quick start shows them
    assert one(r"test SSIM ([\d.]+) \+- ([\d.]+) \(n=(\d+)\), PSNR ([\d.]+) dB", readme) == (
        f"{t['ssim_mean']:.4f}", f"{t['ssim_std']:.4f}", str(t["n"]), f"{t['psnr_mean']:.2f}")
    assert one(r"test SSIM in the body ([\d.]+) \+- ([\d.]+) \(n=(\d+)\); air: ([\d.]+%) of the (\d+%) black pixels",
               readme) == (f"{t['body_ssim_mean']:.4f}", f"{t['body_ssim_std']:.4f}", str(t["body_n"]),
                           f"{t['air']['zeros_kept']:.1%}", f"{t['air']['zero_pixels']:.0%}")
    assert one(r"codebook: ([\d.]+%) of (\d+) codes used, perplexity ([\d.]+)", readme) == (
        f"{t['codebook_usage']:.1%}", str(t["num_embeddings"]), f"{t['perplexity']:.1f}")
    assert one(r"prior: test NLL ([\d.]+) bits per code", readme) == f"{p['test_nll_bits']:.4f}"
    for name, label in (("samples", "samples"), ("reconstructions", "test reconstructions"),
                        ("train_subset", "real train slices")):
        assert one(rf"vs test: {label} FID ([\d.]+) KID ([\d.]+) \+- ([\d.]+)", readme) == (
            f"{g['fid'][name]:.2f}", f"{g['kid'][name]:.4f}", f"{g['kid_std'][name]:.4f}")
    assert one(r"`train.py` took (\d+ min \d+ s) and `predict.py --num_volumes 2` (\d+ min \d+ s)", readme) == (
        tm["train_py"], tm["predict_py"])
    assert one(r"best validation NLL is ([\d.]+) bits per code \(epoch (\d+) of (\d+)\)", readme) == (
        f"{p['best_val_nll_bits']:.4f}", str(p["best_epoch"]), str(p["epochs"]))
    fid, kid = g["fid"], g["kid"]
    assert one(r"samples score FID ([\d.]+) and KID ([\d.]+), the reconstructions ([\d.]+) and ([\d.]+), and "
               r"real training slices ([\d.]+) and ([\d.]+) \(n = (\d+) samples, (\d+) test slices\)", readme) == (
        f"{fid['samples']:.2f}", f"{kid['samples']:.4f}", f"{fid['reconstructions']:.2f}",
        f"{kid['reconstructions']:.4f}", f"{fid['train_subset']:.2f}", f"{kid['train_subset']:.4f}",
        str(g["num_samples"]), str(t["n"]))
    # the phantom's row of "What to expect": SSIM, codes, KID of reconstructions and samples in floors
    floor = kid["train_subset"]
    assert one(r"\| phantom, synthetic \(16 / 3\) \| [^|]+ \| [^|]+ \| ([\d.]+) \| ([\d.]+) \| ([\d.]+%) \| (\d+)x / (\d+)x \|",
               readme) == (f"{t['ssim_mean']:.4f}", f"{t['body_ssim_mean']:.4f}", f"{t['codebook_usage']:.1%}",
                           f"{kid['reconstructions'] / floor:.0f}", f"{kid['samples'] / floor:.0f}")


def test_readme_is_a_front_page(readme):
    size = len(readme.encode())
    assert size <= 25_000, f"README.md is {size} bytes"
    head = readme.encode()[:10_000].decode(errors="ignore")
    for heading in ("## Install and quick start", "## Training on the HipMRI release", "## What to expect",
                    "## The flags that matter"):
        assert heading in head, f"{heading!r} is not in the README's first 10 KB"
    # the next section starts within the first 10 KB too, so the flags table ends there
    assert "\n## " in head[head.index("## The flags that matter") + 5:]
    hashes = re.findall(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}\b", readme)
    assert not hashes, f"commit hashes in the README: {hashes}"


def slug(heading):
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path):
    return {slug(m) for m in re.findall(r"^#+ (.+)$", path.read_text(), flags=re.M)}


@pytest.mark.parametrize("doc", DOCS)
def test_links_resolve(doc):
    text = (ROOT / doc).read_text()
    targets = re.findall(r"\]\(([^)\s]+)\)", text) + re.findall(r'<img src="([^"]+)"', text)
    assert targets
    for target in targets:
        if target.startswith(("http://", "https://")):
            continue
        path, _, anchor = target.partition("#")
        file = ROOT / path if path else ROOT / doc
        assert file.exists(), f"{doc} links to {target}, which does not exist"
        if anchor:
            assert anchor in anchors(file), f"{doc} links to {target}: no such heading"
