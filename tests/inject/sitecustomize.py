"""Fault injection for tests that run train.py or predict.py as a real process.

Put this folder on PYTHONPATH and set VQVAE_INJECT:
  nan_from_step=N  from the N-th Adam step on, the step leaves NaN weights (as a diverging run does);
  enospc_from=N    torch.save writes a few bytes and then fails with ENOSPC (disk full) from its
                   N-th call on.
"""
import os

_spec = os.environ.get("VQVAE_INJECT")
if _spec:
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
    elif _kind == "enospc_from":
        torch.save = _after(int(_n), torch.save, _disk_full)
