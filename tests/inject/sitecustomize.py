"""Fault injection for tests that run train.py or predict.py as a real process.

Put this folder on PYTHONPATH and set VQVAE_INJECT:
  nan_from_step=N  from the N-th Adam step on, the step leaves NaN weights (as a diverging run does);
  enospc_from=N    torch.save writes a few bytes and then fails with ENOSPC (disk full) from its
                   N-th call on;
  signal_at_step=N:SIG  right after the N-th optimizer step (Adam or AdamW; the adversarial decoder's
                   two optimizers step twice per training step) the process sends itself signal SIG
                   (TERM, INT, USR1 or KILL), as SLURM, Kubernetes or Ctrl-C would;
                   signal_at_step=N:SIG:R the same in torchrun's rank R only;
  signal_at_import=MODULE:SIG  the process sends itself signal SIG when MODULE starts to import (before
                   the script has all its libraries, as a Ctrl-C right after the start does).
"""
import os

_spec = os.environ.get("VQVAE_INJECT")
if _spec and _spec.startswith("signal_at_import="):  # before torch: the point is to stop inside its import
    import signal
    import sys

    _module, _sig = _spec.split("=")[1].split(":")

    class _SignalAtImport:
        def find_spec(self, name, path=None, target=None):
            if name == _module:
                os.kill(os.getpid(), getattr(signal, f"SIG{_sig}"))
            return None  # the import itself goes on through the usual finders
    sys.meta_path.insert(0, _SignalAtImport())
elif _spec:
    import errno

    import torch

    _kind, _n = _spec.split("=")
    _calls = {"n": 0}

    def _after(n, orig, fault):
        def wrapped(*args, **kwargs):
            _calls["n"] += 1
            return (fault if _calls["n"] >= n else orig)(*args, **kwargs)
        return wrapped

    def _nan_step(self, *args, **kwargs):
        _orig_step(self, *args, **kwargs)
        for group in self.param_groups:
            for p in group["params"]:
                p.data.fill_(float("nan"))

    def _disk_full(obj, f, *args, **kwargs):
        f.write(b"\0" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if _kind == "nan_from_step":
        _orig_step = torch.optim.Adam.step
        torch.optim.Adam.step = _after(int(_n), _orig_step, _nan_step)
    elif _kind == "signal_at_step":
        import signal

        _at, _sig, *_rank = _n.split(":")
        _mine = not _rank or os.environ.get("RANK", "0") == _rank[0]

        def _signalling(orig):
            def step(self, *args, **kwargs):
                out = orig(self, *args, **kwargs)
                _calls["n"] += 1
                if _calls["n"] == int(_at) and _mine:
                    os.kill(os.getpid(), getattr(signal, f"SIG{_sig}"))
                return out
            return step
        torch.optim.Adam.step = _signalling(torch.optim.Adam.step)
        if torch.optim.AdamW.step is not torch.optim.Adam.step:
            torch.optim.AdamW.step = _signalling(torch.optim.AdamW.step)
    elif _kind == "enospc_from":
        torch.save = _after(int(_n), torch.save, _disk_full)
