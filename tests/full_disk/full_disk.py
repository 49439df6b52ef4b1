"""Fill a small real file system right before one chosen write, so that write meets a real ENOSPC.

A target names the write by file or folder name (fnmatch pattern), optionally the N-th time: "last.pt#2" is
the second time last.pt is written, "log.txt#1" the first line appended to log.txt, "dir:samples" the
making of a folder named samples. Just before it, install()'s hook
  1. records the sha256 of every file under the file system's root in `hashes` (a JSON file outside it),
     so a test can check afterwards that nothing written before the full disk changed;
  2. writes `ballast` (a file in that root) until the file system says ENOSPC;
  3. for a folder target (and with `inodes`), also creates empty files in `ballast`_inodes/ until ENOSPC:
     tmpfs gives a folder no data pages, so only a file system out of inodes refuses mkdir.
The chosen write itself is then left to the real file system. Installed by this folder's sitecustomize.py (env
VQVAE_FULL_DISK=target, VQVAE_BALLAST, VQVAE_HASHES) for a script run as a process, or by a test with
monkeypatch's setattr for a call in the test's own process.
"""
import builtins
import errno
import fnmatch
import hashlib
import io
import json
import os
import re
from pathlib import Path


def fill(ballast, hashes, inodes=False):
    """Steps 1-3 of the module's docstring; `ballast`'s folder is the file system's root."""
    ballast, root = Path(ballast), Path(ballast).parent
    record = {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
              for p in sorted(root.rglob("*")) if p.is_file() and not p.name.startswith(ballast.name)}
    Path(hashes).write_text(json.dumps(record, indent=1))
    chunk = b"\0" * (1 << 20)
    with open(ballast, "wb", buffering=0) as f:  # unbuffered: a partial write is followed by ENOSPC at once
        try:
            while True:
                f.write(chunk)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
    if inodes:
        spare = root / f"{ballast.name}_inodes"
        spare.mkdir()
        try:
            for i in range(1_000_000):
                (spare / str(i)).touch()
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise


def _name(path):
    """The file a path will become: atomic_write's temporary .NAME.tmpPID is NAME."""
    name = os.path.basename(os.fsdecode(path))
    tmp = re.fullmatch(r"\.(.+)\.tmp\d+", name)
    return tmp.group(1) if tmp else name


class _Appender:
    """A file opened for appending whose write() calls count as writes of it (log lines are appended to
    a file opened long before): `before_write` runs before each one that is more than a newline."""

    def __init__(self, f, before_write):
        self._f, self._before_write = f, before_write

    def write(self, s):
        if s.strip():
            self._before_write()
        return self._f.write(s)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._f.__exit__(*exc)


def install(target, ballast, hashes, setattr=setattr):
    """Hook open, os.open and os.mkdir so the write named by `target` meets a full disk (see the docstring)."""
    folder = target.startswith("dir:")
    pattern, _, nth = target.removeprefix("dir:").partition("#")
    nth, seen, done = int(nth or 1), {"n": 0}, {"fired": False}

    def fire():
        if not done["fired"]:
            done["fired"] = True
            fill(ballast, hashes, inodes=folder)

    def hit(path):
        if done["fired"] or not fnmatch.fnmatch(_name(path), pattern):
            return False
        seen["n"] += 1
        return seen["n"] == nth

    real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir

    def hooked_open(file, mode="r", *args, **kwargs):
        if folder or not isinstance(file, (str, bytes, os.PathLike)) or not set(mode) & set("wax+"):
            return real_open(file, mode, *args, **kwargs)
        if "a" in mode and fnmatch.fnmatch(_name(file), pattern):  # a log: its nth line is the write
            return _Appender(real_open(file, mode, *args, **kwargs), lambda: hit(file) and fire())
        if hit(file):
            fire()
        return real_open(file, mode, *args, **kwargs)

    def hooked_os_open(path, flags, *args, **kwargs):  # the run folder's .lock is written through os.open
        if not folder and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and hit(path):
            fire()
        return real_os_open(path, flags, *args, **kwargs)

    def hooked_mkdir(path, *args, **kwargs):
        if folder and hit(path):
            fire()
        return real_mkdir(path, *args, **kwargs)

    setattr(builtins, "open", hooked_open)
    setattr(io, "open", hooked_open)  # pathlib opens through io.open
    setattr(os, "open", hooked_os_open)
    setattr(os, "mkdir", hooked_mkdir)
