"""Shared fixtures: a tiny phantom data set and the flags of a tiny model."""
import os
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Decoded-split caches of the tests' throwaway data sets go to a throwaway folder (the scripts the
# tests start inherit it), not to the project's cache/.
os.environ["VQVAE_CACHE_DIR"] = tempfile.mkdtemp(prefix="vqvae_test_cache_")

import phantom  # noqa: E402

# A model small enough to train in seconds on 32x16 images (2 downsamplings -> 8x4 code map),
# and a prior over those 32 codes to match. At the seed's constant rate and plain lookup: these runs of a
# few steps are shorter than the default cosine schedule's 20 warm-up steps, many are extended on resume,
# which a cosine schedule refuses, and the equality tests of --compile and torchrun hold for the plain
# lookup (README: Limitations); tests of the schedule and the lookup ask for them.
TINY_MODEL = ["--image_size", "32", "16", "--num_hiddens", "16", "--num_residual_hiddens", "8",
              "--num_downsampling_layers", "2", "--channels", "8", "8", "16", "--blocks", "0", "1", "1",
              "--embedding_dim", "8", "--num_embeddings", "32", "--lr_schedule", "constant", "--lookup_dim", "0",
              "--prior_epochs", "2", "--prior_hidden_dim", "16", "--prior_num_heads", "2",
              "--prior_num_layers", "1", "--prior_num_samples", "4"]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """Phantom in the release layout: 2 train patients, 1 validation, 1 test, 4 slices each."""
    out = tmp_path_factory.mktemp("data") / "phantom"
    patients = {"keras_slices_train": 2, "keras_slices_validate": 1, "keras_slices_test": 1}
    return phantom.generate(out, patients=patients, slices_per_patient=4)
