"""Put this folder on PYTHONPATH and set VQVAE_FULL_DISK=TARGET, VQVAE_BALLAST and VQVAE_HASHES: the small
file system that holds VQVAE_BALLAST is really filled right before the write TARGET names (full_disk.py), so
train.py or predict.py, run as a process, meets a real ENOSPC there."""
import os

if os.environ.get("VQVAE_FULL_DISK"):
    import full_disk

    full_disk.install(os.environ["VQVAE_FULL_DISK"], os.environ["VQVAE_BALLAST"], os.environ["VQVAE_HASHES"])
