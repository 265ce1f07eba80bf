"""TinyBERT-style task-data augmentation: ``deepspeed launchers/augment.py --teacher_mlm DIR --input F --out D``.

Runs as plain ``python`` (one process) or under ``deepspeed``/``torchrun`` (each rank its shard;
CPU ranks need ``DS_ACCELERATOR=cpu``). Rerun the same command to resume an interrupted run;
read the result with ``mlkd_scale.data.augment.augmenter.load_augmented(OUT)``.

Under the ``deepspeed`` launcher write ``--num_variants`` instead of ``--n``: the launcher's own
argument parser sees every argument and stops on ``--n`` (an abbreviation of several of its options).
"""

import sys

from mlkd_scale.engine.augment_run import main

if __name__ == "__main__":
    sys.exit(main())
