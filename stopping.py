"""Stopping on a signal. SLURM (at the time limit, on preemption, or early with --signal), Kubernetes and
spot instances send SIGTERM long before they kill a job; Ctrl-C is SIGINT; SIGUSR1 is the usual chosen
--signal. Outside a training loop a stop is immediate (nothing of the work under way can be kept):
one line, exit code 128 + the signal's number. Inside one (deferred_signals) it waits for the end of
the step, which the stage saves (stage.Pause) before it stops with Stopped. No torch here: the scripts
catch the signals before they import it."""
import os
import signal
import sys
from contextlib import contextmanager

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
_stop = {"signum": None, "deferred": False, "resume": None, "importing": False}


class Stopped(Exception):
    """A stop asked for by a signal: a script prints the message (if any) as one line and exits with the
    shell's code for that signal, 128 + its number (SIGINT 130, SIGUSR1 138, SIGTERM 143)."""

    def __init__(self, message, signum):
        super().__init__(message)
        self.code = 128 + signum


def finished():
    """The script's work is done and saved: a signal now (the interpreter is exiting) changes nothing, and
    must not turn a finished run's exit code into a stop's."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def catch_signals(importing=False):
    """Route the stop signals to _on_signal (from the main thread; a no-op elsewhere). importing: the
    script is still importing its libraries, where no exception may be raised at a random point (numpy's
    lazy attributes then recurse without end, torch's C++ init aborts): a stop ends the process at once,
    which loses nothing, as nothing is written yet. run_main calls it again without, once they are in."""
    _stop["importing"] = importing
    try:
        for s in STOP_SIGNALS:
            signal.signal(s, _on_signal)
    except ValueError:  # not the main thread: signals stay as they were
        pass


def _on_signal(signum, frame):
    if _stop["signum"] is not None:
        return  # already stopping (a second Ctrl-C, or torchrun passing the signal on): the save goes on
    _stop["signum"] = signum
    if not _stop["deferred"]:
        print(stop_message(signum), file=sys.stderr, flush=True)
        if _stop["importing"]:
            os._exit(128 + signum)
        raise SystemExit(128 + signum)


def stop_message(signum, where=""):
    """The one line of a stop by `signum`: where it stopped, and how to go on."""
    then = f"resume with {_stop['resume']}" if _stop["resume"] else "nothing was saved to resume from; start again"
    return f"stopped{where} by {signal.Signals(signum).name}; {then}"


def resumable(command):
    """From now on a stop names `command` as the way to go on (the run has a checkpoint to resume)."""
    _stop["resume"] = command


def stop_signal():
    """The stop signal received so far (its number), or None."""
    return _stop["signum"]


def defer_signals():
    """From now on a stop signal only sets stop_signal(), until a deferred_signals block ends."""
    _stop["deferred"] = True


@contextmanager
def deferred_signals(resume):
    """Inside: a stop signal only sets stop_signal() (the training loop saves and stops at the end of its
    step); `resume` is the command that goes on from what the loop saves. A signal the loop did not
    act on (it came after the last step's check) stops at the end of the block."""
    _stop.update(deferred=True, resume=resume)
    try:
        yield
    finally:
        _stop["deferred"] = False
    if _stop["signum"] is not None:
        raise Stopped(stop_message(_stop["signum"]), _stop["signum"])
