"""Data: the general-distillation corpus (:mod:`~mlkd_scale.data.corpus`) and the augmentation of task
data (:mod:`~mlkd_scale.data.augment`). Task data sets (GLUE, SQuAD) live in :mod:`mlkd_scale.tasks`."""
