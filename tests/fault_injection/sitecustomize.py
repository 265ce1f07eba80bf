"""Fault injection for tests/test_faults.py: every rank of a launched run imports this at start-up.

tests/run_fixtures.py puts this directory on the children's PYTHONPATH and the faults in the
environment variable ``MLKD_FAULTS`` (JSON). Only processes with ``RANK`` set (the ranks, not the
``deepspeed`` runner or ``launch.py``) act on it. The library carries no test-only branches: the
faults wrap library functions (and ``torch.save``) from the outside. Keys (all optional):

``step_sleep_s``            seconds to sleep after every optimizer step of general distillation
                            (slows a run so a test can signal it mid-way)
``kill_at_step``            ``{"rank": r, "step": s}``: SIGKILL rank r right after optimizer step s
                            of general distillation
``kill_marker``             a file: the killed rank writes the time (``time.time()``) before dying
``kill_in_save``            ``{"rank": r, "step": s}``: SIGKILL rank r while it writes its rank_state
                            file of checkpoint s (its DeepSpeed shards are already on disk)
``kill_in_shard``           ``{"rank": r, "step": s, "file": "model_states"|"optim_states"}``: when
                            rank r ``torch.save``\\ s a DeepSpeed shard (``*model_states.pt`` or
                            ``*optim_states.pt``; ``file`` narrows it to one kind) of checkpoint s,
                            it writes half of the serialized bytes to the target and SIGKILLs itself:
                            a truncated shard on disk, whatever checkpoint engine DeepSpeed uses
``kill_in_commit``          ``{"rank": r, "step": s, "file": "COMPLETE"|"latest"}``: SIGKILL rank r
                            (rank 0 commits) inside ``checkpoint.atomic_write`` of checkpoint s's
                            ``COMPLETE`` (or of ``latest`` naming it), after half the text reached
                            the temporary file and before the rename
``slow_save_s``             ``{"rank": r, "seconds": t}``: rank r sleeps t seconds before writing
                            any rank_state file (a checkpoint that outlives the grace period)
``nonfinite``               ``{"rank": r, "steps": [...], "value": "nan"|"inf"}``: rank r's loss is
                            multiplied by ``value`` in those optimizer steps
``fingerprints``            a file: rank 0 appends ``{"step", "params", "optimizer"}`` after every
                            step, exact sums of the weights and the optimizer state

Every loop (general distillation, each task stage) reports each optimizer step to its
``RunGuard.check_step`` with the *run step* (a task run counts Stage 2's steps on from Stage 1's);
these keys act there, before the ranks' stop agreement of that step:

``run_step_sleep_s``        seconds to sleep in every ``check_step``
``kill_at_run_step``        ``{"rank": r, "step": s}``: SIGKILL rank r at run step s (its checkpoint
                            of that step, if one is due, is not written)
``run_step_file``           a file: rank 0 appends each run step it reaches (a line), for waiting
"""

import json
import os

_FAULTS = json.loads(os.environ.get("MLKD_FAULTS", "{}"))


def _install(faults: dict) -> None:
    import io
    import signal
    import sys
    import time

    import torch

    rank = int(os.environ["RANK"])

    def die():
        if faults.get("kill_marker"):
            with open(faults["kill_marker"], "w") as f:
                f.write(str(time.time()))
        os.kill(os.getpid(), signal.SIGKILL)

    # torch.save first, before any module that might bind it by name (``from torch import save``).
    torch_save = torch.save

    def target_path(f) -> str | None:
        """The file ``torch.save`` writes to: a path, or an open file (its descriptor's path)."""
        if isinstance(f, (str, os.PathLike)):
            return os.fspath(f)
        try:
            return os.readlink(f"/proc/self/fd/{f.fileno()}")
        except (AttributeError, OSError, io.UnsupportedOperation):
            return None

    def faulty_torch_save(obj, f, *args, **kwargs):
        kill = faults.get("kill_in_shard")
        path = target_path(f) if kill and kill["rank"] == rank else None
        if path is not None:
            name, tag = os.path.basename(path), os.path.basename(os.path.dirname(path))
            kinds = [kill["file"]] if kill.get("file") else ["model_states", "optim_states"]
            if tag == f"step{kill['step']:08d}" and any(f"{kind}.pt" in name for kind in kinds):
                buffer = io.BytesIO()
                torch_save(obj, buffer, *args, **kwargs)
                part = buffer.getvalue()[: buffer.tell() // 2]
                if isinstance(f, (str, os.PathLike)):
                    with open(f, "wb") as out:
                        out.write(part)
                        out.flush()
                        os.fsync(out.fileno())
                else:
                    f.write(part)
                    f.flush()
                    os.fsync(f.fileno())
                die()
        return torch_save(obj, f, *args, **kwargs)

    torch.save = faulty_torch_save
    torch.serialization.save = faulty_torch_save

    from mlkd_scale.engine import faults as run_faults
    from mlkd_scale.engine import general_kd as trainer
    from mlkd_scale.engine import stage_runner
    from mlkd_scale.engine.checkpoints import files as checkpoint_files
    from mlkd_scale.engine.checkpoints import manager as checkpoint

    if faults.get("fingerprints"):
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/
        from run_fixtures import state_fingerprint

    train_step, loss = stage_runner.StageRunner.train_step, trainer.Trainer._loss
    atomic_write = checkpoint.atomic_write
    check_step = run_faults.RunGuard.check_step

    def faulty_train_step(self, stop_at=None):
        terms = train_step(self, stop_at)
        kill = faults.get("kill_at_step")
        if kill and kill["rank"] == rank and kill["step"] == self.step:
            die()
        if faults.get("fingerprints") and rank == 0:
            with open(faults["fingerprints"], "a") as f:
                f.write(json.dumps({"step": self.step, **state_fingerprint(self.engine)}) + "\n")
        time.sleep(faults.get("step_sleep_s", 0))
        return terms

    def faulty_loss(self, batch):
        total, terms = loss(self, batch)
        bad = faults.get("nonfinite")
        if bad and bad["rank"] == rank and self.runner.step + 1 in bad["steps"]:
            total = total * float(bad.get("value", "nan"))
        return total, terms

    def faulty_check_step(self, engine, step):
        kill = faults.get("kill_at_run_step")
        if kill and kill["rank"] == rank and kill["step"] == step:
            die()
        if faults.get("run_step_file") and rank == 0:
            with open(faults["run_step_file"], "a") as f:
                f.write(f"{step}\n")
        time.sleep(faults.get("run_step_sleep_s", 0))
        return check_step(self, engine, step)

    def half_then_die(write, mode):
        """A ``write(f)`` for atomic_write that writes half of what ``write`` would, then dies."""
        probe = io.StringIO() if "b" not in mode else io.BytesIO()
        write(probe)
        text = probe.getvalue()

        def partial(f):
            f.write(text[: len(text) // 2])
            f.flush()
            os.fsync(f.fileno())
            die()

        return partial, text

    def faulty_atomic_write(path, write, mode="wb"):
        name = os.path.basename(str(path))
        if name.startswith("rank") and name.endswith(".pt"):
            kill = faults.get("kill_in_save")
            tag = os.path.basename(os.path.dirname(os.path.dirname(str(path))))
            if kill and kill["rank"] == rank and tag == checkpoint.tag_for(kill["step"]):
                die()
            slow = faults.get("slow_save_s")
            if slow and slow["rank"] == rank:
                time.sleep(slow["seconds"])
        kill = faults.get("kill_in_commit")
        if kill and kill["rank"] == rank and name == kill["file"]:
            partial, text = half_then_die(write, mode)
            tag = checkpoint.tag_for(kill["step"])
            names = os.path.basename(os.path.dirname(str(path))) if name == checkpoint.COMPLETE else text.strip()
            if names == tag:
                return atomic_write(path, partial, mode)
        return atomic_write(path, write, mode)

    stage_runner.StageRunner.train_step = faulty_train_step
    trainer.Trainer._loss = faulty_loss
    run_faults.RunGuard.check_step = faulty_check_step
    checkpoint.atomic_write = faulty_atomic_write  # the manager's own writes (rank_state)
    checkpoint_files.atomic_write = faulty_atomic_write  # COMPLETE and latest, through atomic_write_text


if _FAULTS and "RANK" in os.environ:
    _install(_FAULTS)
