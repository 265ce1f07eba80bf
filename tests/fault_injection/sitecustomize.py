"""Fault injection for tests/test_faults.py: every rank of a launched run imports this at start-up.

tests/run_fixtures.py puts this directory on the children's PYTHONPATH and the faults in the
environment variable ``MLKD_FAULTS`` (JSON). Only processes with ``RANK`` set (the ranks, not the
``deepspeed`` runner or ``launch.py``) act on it. The library carries no test-only branches: the
faults wrap library functions from the outside. Keys (all optional):

``step_sleep_s``            seconds to sleep after every optimizer step (slows a run so a test can
                            signal it mid-way)
``kill_at_step``            ``{"rank": r, "step": s}``: SIGKILL rank r right after optimizer step s
``kill_marker``             a file: the killed rank writes the time (``time.time()``) before dying
``kill_in_save``            ``{"rank": r, "step": s}``: SIGKILL rank r while it writes its rank_state
                            file of checkpoint s (its DeepSpeed shards are already on disk)
``slow_save_s``             ``{"rank": r, "seconds": t}``: rank r sleeps t seconds before writing
                            any rank_state file (a checkpoint that outlives the grace period)
``nonfinite``               ``{"rank": r, "steps": [...], "value": "nan"|"inf"}``: rank r's loss is
                            multiplied by ``value`` in those optimizer steps
``fingerprints``            a file: rank 0 appends ``{"step", "params", "optimizer"}`` after every
                            step, exact sums of the weights and the optimizer state
"""

import json
import os

_FAULTS = json.loads(os.environ.get("MLKD_FAULTS", "{}"))


def _install(faults: dict) -> None:
    import signal
    import sys
    import time

    from mlkd_scale.engine import checkpoint, trainer

    if faults.get("fingerprints"):
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/
        from run_fixtures import state_fingerprint

    rank = int(os.environ["RANK"])
    train_step, loss, atomic_write = trainer.Trainer.train_step, trainer.Trainer._loss, checkpoint.atomic_write

    def die():
        if faults.get("kill_marker"):
            with open(faults["kill_marker"], "w") as f:
                f.write(str(time.time()))
        os.kill(os.getpid(), signal.SIGKILL)

    def faulty_train_step(self):
        terms = train_step(self)
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
        if bad and bad["rank"] == rank and self.step + 1 in bad["steps"]:
            total = total * float(bad.get("value", "nan"))
        return total, terms

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
        return atomic_write(path, write, mode)

    trainer.Trainer.train_step = faulty_train_step
    trainer.Trainer._loss = faulty_loss
    checkpoint.atomic_write = faulty_atomic_write


if _FAULTS and "RANK" in os.environ:
    _install(_FAULTS)
