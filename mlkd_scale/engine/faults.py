"""Preemption, lost ranks and non-finite steps: the fault policy every training loop shares.

A loop builds one :class:`RunGuard` (collectively, on every rank, after the process group exists)
and calls :meth:`RunGuard.check_step` once per optimizer step. What it provides:

**Preemption.** SIGTERM or SIGUSR1 (``STOP_SIGNALS``) to a rank asks the run to stop. Ranks must
stop at the *same* step, or the checkpoint's collectives would deadlock; so every step the ranks
all-reduce (MAX) one int32 "stop" flag over a separate **gloo** group. A CPU collective adds no
GPU host sync; it costs one small message round (about 0.5 ms between 2 processes on a loaded
2-core machine, tens of microseconds on an idle host, one network round trip across nodes), and
it is the only per-step cost of the scheme. A cheaper scheme without a collective (e.g. a file on
the shared file system naming the stop step) would need a file-system poll per step and races
with a rank that is already past the named step. On agreement every rank finishes the step it is
in, writes a checkpoint with the crash-safe :class:`~mlkd_scale.engine.checkpoints.manager.CheckpointManager`
and exits with :data:`EXIT_PREEMPTED`. ``faults.preemption_grace_s`` bounds all of it: a watchdog
thread armed when a rank first hears of the stop (its own signal or the agreement) ends the
process with :data:`EXIT_GRACE_EXPIRED` when the time is up and the checkpoint is not committed.
``latest`` then still names the previous complete checkpoint (``COMPLETE`` is written last).

**DeepSpeed's launcher.** The ``deepspeed`` command (``deepspeed/launcher/runner.py``) installs no
signal handler on a single node (nor with ``--no_ssh``): SIGTERM ends it at once and its child
``deepspeed.launcher.launch`` keeps running, re-parented, with every rank training on, headless.
So each rank whose parent is ``deepspeed.launcher.launch`` watches (once a second, in a daemon
thread) that its parent and its parent's parent are still the ones it started under, and treats a
change as a stop request. ``launch.py`` itself, on SIGTERM/SIGINT, sends SIGTERM to one rank at a
time and SIGKILLs a rank that is still alive 30 s later (a fixed DeepSpeed constant), so keep the
grace period under 30 s there. ``torchrun`` passes SIGTERM on to its workers the same way (SIGKILL
after 30 s). Schedulers that signal every process (Slurm at the time limit or
on preemption; ``kill -TERM -- -<pgid>``) reach the ranks directly.

**Lost ranks.** DeepSpeed's ``launch.py`` polls its ranks once a second; when one exits with a
non-zero status it SIGTERMs the others (30 s, then SIGKILL) and exits with that status. Without it
(torchrun, Slurm ``srun`` per rank) the survivors find out themselves: a collective with a dead
rank fails at once on gloo ("Connection reset by peer") and within ``faults.collective_timeout_s``
on NCCL (set in ``init_process_group``); :meth:`RunGuard.peer_failure` turns that error into one
message and :data:`EXIT_PEER_LOST`. ``latest`` is untouched: CheckpointManager writes ``COMPLETE``
and ``latest`` only after every rank finished its files.

**Non-finite steps.** DeepSpeed already skips an optimizer step whose gradients are not finite,
and then neither changes the weights and optimizer state nor steps the lr schedule; it counts the
skip in ``engine.skipped_steps`` (saved in its checkpoints) and ``engine.was_step_applied()``
returns False. In 0.19.8 that holds for fp16 (the loss scaler), bf16 (``bf16.check_grad_overflow``,
default true), and fp32 under ZeRO 1/2/3 (a non-finite global gradient norm is an overflow). The
gap is fp32 without ZeRO, where the plain torch optimizer steps on anything:
:func:`skip_nonfinite_steps` closes it with one host sync per optimizer step (a finiteness check
of the all-reduced gradients' norm), only in that configuration. A non-finite *loss* does not
always make non-finite gradients (``loss + nan`` has the gradients of ``loss``), so
:func:`poison_nonfinite` multiplies a non-finite loss by NaN before backward: the gradients are
then NaN and the same check skips the step, with no host sync. ``check_step`` reads
``was_step_applied()`` (a host bool, no sync) and counts skipped steps in a row; at
``faults.max_nonfinite_steps`` the run stops with :data:`EXIT_NONFINITE` and writes no checkpoint,
so ``latest`` stays on the last good one. While a streak is open, loops hold back periodic
checkpoints (:attr:`RunGuard.checkpoint_ok`) so that a diverging run does not rotate good
checkpoints out.
"""

from __future__ import annotations

import datetime
import functools
import math
import os
import signal
import sys
import threading

import psutil
import torch
import torch.distributed as dist

from mlkd_scale.engine.distributed import DistInfo

#: Exit statuses of the launchers (``mlkd_scale.launch``); 0 = finished or ``--stop_after_steps``,
#: 1 = an unexpected error (traceback), 2 = bad input (spec, data, checkpoint).
EXIT_NONFINITE = 3  # faults.max_nonfinite_steps skipped steps in a row; latest = last good checkpoint
EXIT_PEER_LOST = 4  # a collective failed or timed out (a rank died); relaunch resumes from latest
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on a signal after writing a checkpoint; relaunch continues
EXIT_GRACE_EXPIRED = 76  # stopped on a signal, the grace period ran out first; relaunch resumes from latest

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_WATCH_INTERVAL_S = 1.0


class RunStopped(Exception):
    """The run ends on purpose with ``exit_code``; ``message`` says why and what to do next.

    ``announce`` is True on the rank that prints the message (rank 0), so it appears once.
    """

    def __init__(self, message: str, exit_code: int, announce: bool = True):
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code
        self.announce = announce


# ----------------------------------------------------------------------------- non-finite steps


def poison_nonfinite(loss: torch.Tensor) -> torch.Tensor:
    """``loss`` itself when finite; otherwise ``loss * NaN``, whose gradients are all NaN.

    No host sync: the choice is made on the device. For a finite loss the product with 1.0 is exact.
    """
    finite = torch.isfinite(loss.detach())
    return loss * torch.where(finite, torch.ones_like(loss), torch.full_like(loss, math.nan))


def skip_nonfinite_steps(optimizer: torch.optim.Optimizer, max_norm: float = 0.0) -> None:
    """Make a plain torch optimizer skip steps with non-finite gradients the way DeepSpeed's own do,
    clipping the gradients to ``max_norm`` (0 = no clipping) from the same norm.

    DeepSpeed's engine reads ``optimizer.overflow`` after ``optimizer.step()``: when True it counts
    a skipped step and does not step the lr schedule. The check is one host sync per optimizer step
    (the global gradient norm's finiteness); DeepSpeed's engine calls the step only at the
    accumulation boundary, after the gradients are all-reduced (identical on every rank), so every
    rank decides, and clips, alike. The norm is also left in ``optimizer._global_grad_norm``, where
    the engine looks for it (``engine.get_global_grad_norm()``).
    """
    inner = optimizer.step

    @functools.wraps(inner)  # keeps the lr scheduler's mark on the step (else torch warns every run)
    def step(*args, **kwargs):
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params]) if params else None
        optimizer._global_grad_norm = norm
        optimizer.overflow = norm is not None and not bool(torch.isfinite(norm))
        if optimizer.overflow:
            optimizer.zero_grad(set_to_none=True)
            return None
        if max_norm > 0 and params:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        return inner(*args, **kwargs)

    optimizer.step = step
    optimizer.overflow = False


def ensure_nonfinite_skipping(engine) -> None:
    """Give ``engine`` DeepSpeed's skip-on-non-finite behaviour where its optimizer lacks it (fp32
    without ZeRO: a plain torch optimizer, no ``overflow`` attribute).

    There the wrapped step also does the gradient clipping, from the norm it computes anyway, and
    the engine's own clipping is switched off: DeepSpeed's fp32 clipping takes one norm per
    parameter in a Python loop, all-reduces it and multiplies every gradient even when nothing
    needs clipping, on top of which the finiteness check took a second norm.
    """
    if not hasattr(engine.optimizer, "overflow"):
        skip_nonfinite_steps(engine.optimizer, engine.gradient_clipping())
        engine._config.gradient_clipping = 0.0


# ----------------------------------------------------------------------------- the guard


def _cmdline(pid: int) -> str:
    try:
        return " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return ""


def _parent_of(pid: int) -> int | None:
    try:
        return psutil.Process(pid).ppid()
    except psutil.Error:
        return None


def is_comm_failure(error: BaseException) -> bool:
    """Whether ``error`` is a failed or timed-out collective (rather than a bug in the step)."""
    if isinstance(error, dist.DistError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        marker in text
        for marker in ("gloo", "Gloo", "NCCL", "Connection reset", "Connection closed", "Socket Timeout", "timed out")
    )


class RunGuard:
    """Stop requests agreed across ranks, the grace-period watchdog, the non-finite step streak.

    Collective to build (it creates a gloo group); call :meth:`check_step` on every rank once per
    optimizer step and :meth:`close` at the end. ``describe_latest`` names the last complete
    checkpoint for messages.
    """

    def __init__(self, faults, info: DistInfo, describe_latest=lambda: "none"):
        self.grace_s = faults.preemption_grace_s
        self.max_nonfinite = faults.max_nonfinite_steps
        self.info = info
        self.describe_latest = describe_latest
        self.streak = 0  # optimizer steps skipped in a row
        self.reason: str | None = None  # why this rank wants to stop (None: it does not)
        self.committed = False  # the stop checkpoint is complete
        self._deadline: threading.Timer | None = None
        self._lock = threading.Lock()
        timeout = datetime.timedelta(seconds=faults.collective_timeout_s)
        self._group = dist.new_group(backend="gloo", timeout=timeout) if dist.is_initialized() else None
        self._flag = torch.zeros(1, dtype=torch.int32)
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        self._closed = threading.Event()
        watched = self._launcher_chain()
        if watched:
            threading.Thread(target=self._watch, args=(watched,), daemon=True, name="launcher-watch").start()

    # -- stop requests

    def _on_signal(self, signum, frame) -> None:
        self.request_stop(f"received {signal.Signals(signum).name}")

    def request_stop(self, reason: str) -> None:
        """Ask the run to stop at the end of the current step (thread- and signal-safe enough: a flag
        and a timer). The first request arms the grace-period watchdog."""
        with self._lock:
            if self.reason is not None:
                return
            self.reason = reason
            self._deadline = threading.Timer(self.grace_s, self._expire)
            self._deadline.daemon = True
            self._deadline.start()
        print(
            f"rank {self.info.rank}: {reason}; stopping after this optimizer step with a checkpoint "
            f"(grace period {self.grace_s:g} s)",
            file=sys.stderr,
            flush=True,
        )

    def _expire(self) -> None:
        if self.committed:
            print(f"rank {self.info.rank}: checkpoint written; exit ran past the grace period", file=sys.stderr, flush=True)
            os._exit(EXIT_PREEMPTED)
        print(
            f"rank {self.info.rank}: the grace period of {self.grace_s:g} s (faults.preemption_grace_s) ran out "
            f"before the stop checkpoint was complete; exiting with status {EXIT_GRACE_EXPIRED}. "
            f"`latest` still names the last complete checkpoint ({self.describe_latest()}); relaunch to resume",
            file=sys.stderr,
            flush=True,
        )
        os._exit(EXIT_GRACE_EXPIRED)

    def _launcher_chain(self) -> list[tuple[int, int]]:
        """(pid, expected parent) pairs to watch: this rank's parent and grandparent under DeepSpeed's
        ``launch.py``, whose front (the ``deepspeed`` command) dies on SIGTERM without telling it."""
        parent = os.getppid()
        if "deepspeed.launcher.launch" not in _cmdline(parent):
            return []
        chain = [(os.getpid(), parent)]
        grandparent = _parent_of(parent)
        if grandparent is not None and grandparent > 1 and "deepspeed" in _cmdline(grandparent):
            chain.append((parent, grandparent))
        return chain

    def _watch(self, chain: list[tuple[int, int]]) -> None:
        while not self._closed.wait(_WATCH_INTERVAL_S):
            for pid, parent in chain:
                if _parent_of(pid) != parent:
                    gone = "deepspeed launcher" if pid != os.getpid() else "deepspeed.launcher.launch"
                    self.request_stop(f"the {gone} (pid {parent}) exited")
                    return

    def stop_agreed(self) -> bool:
        """One all-reduce (MAX) of the stop flag over the gloo group: True on every rank, at the same
        step, once any rank asked to stop."""
        self._flag.fill_(1 if self.reason is not None else 0)
        if self._group is not None:
            dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, group=self._group)
        stop = bool(self._flag.item())
        if stop and self.reason is None:
            self.request_stop("another rank asked to stop")
        return stop

    # -- per step

    @property
    def checkpoint_ok(self) -> bool:
        """False while skipped steps are in a row: periodic checkpoints wait for a good step."""
        return self.streak == 0

    def check_step(self, engine, step: int) -> bool:
        """After optimizer step ``step``: count a skipped (non-finite) step, stop after too many in a
        row (raises :class:`RunStopped`), and return whether the ranks agreed to stop now."""
        if engine.was_step_applied():
            self.streak = 0
        else:
            self.streak += 1
            if self.streak >= self.max_nonfinite:
                raise RunStopped(
                    f"stopped at step {step}: {self.streak} optimizer steps in a row had non-finite losses or "
                    f"gradients and were skipped (faults.max_nonfinite_steps = {self.max_nonfinite}); no checkpoint "
                    f"of this state was written, `latest` names the last good one ({self.describe_latest()}). "
                    "Lower train.lr, raise train.warmup_*, or check the data, then relaunch to resume",
                    EXIT_NONFINITE,
                    announce=self.info.is_main,
                )
        return self.stop_agreed()

    def preempted(self, step: int, tag: str) -> RunStopped:
        """The exception to raise once the stop checkpoint ``tag`` is committed on every rank."""
        self.committed = True
        return RunStopped(
            f"stopped at step {step} ({self.reason}); checkpoint {tag} written; relaunch to continue "
            f"(exit status {EXIT_PREEMPTED})",
            EXIT_PREEMPTED,
            announce=self.info.is_main,
        )

    def peer_failure(self, error: BaseException, step: int) -> RunStopped:
        """One message for a failed collective: which rank, which step, where to resume from."""
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return RunStopped(
            f"rank {self.info.rank} lost the other ranks after step {step} (a rank died, or a collective ran past "
            f"faults.collective_timeout_s): {first[:300]}\n`latest` names the last complete checkpoint "
            f"({self.describe_latest()}); relaunch to resume from it",
            EXIT_PEER_LOST,
        )

    def close(self) -> None:
        """Stop watching and give the signals back. After a stop request the handlers stay (a late
        SIGTERM from ``launch.py`` must not kill a rank that is exiting cleanly) and so does the
        watchdog: the exit is still bounded."""
        self._closed.set()
        if self.reason is not None:
            return
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}
