"""SQuAD v1.1 / v2.0 for task distillation: one import for reading, features, answers and scores.

The pipeline, each step in its own module:

1. :mod:`~mlkd_scale.tasks.squad.examples` -- official JSON files or the hub copies
   (``rajpurkar/squad``, ``rajpurkar/squad_v2``) -> ``list[SquadExample]``, answer offsets checked.
2. :mod:`~mlkd_scale.tasks.squad.features` -- examples -> padded, doc-stride windows with
   start/end labels (train) or context offsets (eval), as in Hugging Face ``run_qa.py``.
3. :mod:`~mlkd_scale.tasks.squad.postprocess` -- start/end logits -> one answer per question,
   with the v2.0 null-score rule and the per-question null-score differences.
4. :mod:`~mlkd_scale.tasks.squad.metrics` -- the official EM/F1 (v1.1 and v2.0 rules) and the
   dev-set tuning of the v2.0 null threshold.

Typical evaluation::

    examples = read_squad("dev-v2.0.json")
    feats = prepare_eval_features(examples, tokenizer)
    start, end = run_model(model_inputs(feats))           # [F, L] each
    preds = postprocess_predictions(examples, feats, start, end, version_2=True)
    f1, thresh = best_threshold(preds.non_null_answers, preds.null_diffs, examples)
    scores = squad_metrics(apply_threshold(preds.non_null_answers, preds.null_diffs, thresh),
                           examples, version_2=True)
"""

from mlkd_scale.tasks.squad.examples import (
    SquadAnswer,
    SquadDataError,
    SquadExample,
    examples_from_rows,
    load_squad_hub,
    parse_squad_json,
    read_squad,
    read_squad_json,
)
from mlkd_scale.tasks.squad.features import (
    CLS_INDEX,
    model_inputs,
    prepare_eval_features,
    prepare_train_features,
)
from mlkd_scale.tasks.squad.metrics import (
    best_threshold,
    exact_match,
    f1,
    normalize_answer,
    squad_metrics,
)
from mlkd_scale.tasks.squad.postprocess import SquadPredictions, apply_threshold, postprocess_predictions

__all__ = [
    "CLS_INDEX",
    "SquadAnswer",
    "SquadDataError",
    "SquadExample",
    "SquadPredictions",
    "apply_threshold",
    "best_threshold",
    "exact_match",
    "examples_from_rows",
    "f1",
    "load_squad_hub",
    "model_inputs",
    "normalize_answer",
    "parse_squad_json",
    "postprocess_predictions",
    "prepare_eval_features",
    "prepare_train_features",
    "read_squad",
    "read_squad_json",
    "squad_metrics",
]
