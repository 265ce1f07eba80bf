"""Experiment trackers (``logging.report_to``): TensorBoard, MLflow, W&B behind one logger.

:func:`open_trackers` builds the run's logger; :mod:`.fanout` explains how a resume continues the
same MLflow/W&B runs with every step once. MLflow and W&B are optional extras, imported only when
``report_to`` names them.
"""

from mlkd_scale.engine.trackers.fanout import STATE_FILE, Trackers, open_trackers, read_state
from mlkd_scale.engine.trackers.tensorboard import TensorBoardLogger, read_scalars, read_texts

__all__ = ["STATE_FILE", "TensorBoardLogger", "Trackers", "open_trackers", "read_scalars", "read_state", "read_texts"]
