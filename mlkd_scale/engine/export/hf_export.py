"""Export the student of a DeepSpeed checkpoint to a plain Hugging Face directory.

The checkpoint holds the whole trainable wrapper (``student.*`` and ``objective.*``), sharded by
ZeRO and partly in bf16. Users want only the student, in fp32, loadable with
``AutoModel.from_pretrained`` on any machine (no GPU, no DeepSpeed engine, no run spec), so:

1. consolidate the fp32 master weights with DeepSpeed's own ``zero_to_fp32`` (ZeRO 1-3); for
   ZeRO-0 there are no shards and the ``module`` entry of ``mp_rank_00_model_states.pt`` is the
   model (in a bf16 ZeRO-0 run those are the bf16 weights, upcast: ZeRO-0 keeps its fp32 master
   copy inside the optimizer state, unnamed);
2. keep the ``student.`` keys, rebuild the model class named in ``<ckpt_dir>/hf_meta/config.json``
   and load them strictly;
3. write ``save_pretrained`` (safetensors) + the tokenizer + the model card (``README.md``,
   :mod:`~mlkd_scale.engine.export.model_card`) into a temp directory next to ``out_dir`` and rename it
   into place, so a crash never leaves a half-written export.

``out_dir`` may be absent, empty, or a previous export (it holds ``mlkd_export.json``), which is
replaced; any other non-empty directory is refused so that nothing of the user's is overwritten.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModel, AutoTokenizer

from mlkd_scale.engine.checkpoints.files import verify
from mlkd_scale.engine.checkpoints.manager import (
    COMPLETE,
    HF_META,
    LATEST,
    CheckpointError,
    CheckpointManager,
    is_complete,
    list_tags,
    read_complete,
    strip_deepspeed_keys,
)
from mlkd_scale.engine.checkpoints.safe_load import load_plain, plain_data_only
from mlkd_scale.engine.export.model_card import model_card

EXPORT_MARKER = "mlkd_export.json"
STUDENT_PREFIX = "student."


def resolve_tag_dir(checkpoint: str | Path) -> Path:
    """A tag directory as given, or the newest checkpoint of a checkpoint directory that verifies
    (``latest`` first); a given tag directory must verify. Changes nothing on disk."""
    path = Path(checkpoint)
    if not path.is_dir():
        raise CheckpointError(
            f"{path} is not a directory; give a checkpoint directory or one of its step* tag directories"
        )
    if is_complete(path):
        verify(path)
        return path
    if not (path / LATEST).is_file() and not list_tags(path):
        raise CheckpointError(
            f"{path} is not a checkpoint: it has neither a {COMPLETE} file (tag directory) "
            f"nor {LATEST} or step* checkpoints (checkpoint directory)"
        )
    checkpoints = CheckpointManager(path, keep_last=1, rank=0, world_size=1)
    tag_dir, failed = checkpoints.newest_verified()
    if tag_dir is None:
        raise CheckpointError(f"{path} holds no complete checkpoint; export one of its step* directories")
    for damaged, found in failed:
        print(f"warning: skipped {damaged.name}, it does not verify: {'; '.join(found)}", file=sys.stderr)
    if checkpoints.latest_name() != tag_dir.name:
        print(
            f"warning: {path / LATEST} names {checkpoints.latest_name()}, not a checkpoint that verifies; "
            f"exporting {tag_dir.name}",
            file=sys.stderr,
        )
    return tag_dir


def consolidated_state_dict(tag_dir: Path) -> dict[str, torch.Tensor]:
    """The wrapper's full fp32 state dict, whatever the ZeRO stage that saved it."""
    if (tag_dir / "zero_pp_rank_0_mp_rank_00_model_states.pt").is_file():  # ZeRO-3
        zero = True
    else:
        model_file = tag_dir / "mp_rank_00_model_states.pt"
        if not model_file.is_file():
            raise CheckpointError(
                f"{tag_dir} holds no DeepSpeed model states file; the checkpoint is damaged"
            )
        states = load_plain(model_file, mmap=True)
        zero = states.get("param_shapes") is not None  # DeepSpeed records them only under ZeRO 1-3
        if not zero:
            return {k: v.float() if v.is_floating_point() else v for k, v in states["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with plain_data_only():
        return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)


def client_state_of(tag_dir: Path) -> dict:
    """What the training run saved with checkpoint ``tag_dir`` (step, spec, ...), without DeepSpeed's entries."""
    name = "zero_pp_rank_0_mp_rank_00_model_states.pt"
    path = tag_dir / name if (tag_dir / name).is_file() else tag_dir / "mp_rank_00_model_states.pt"
    return strip_deepspeed_keys(load_plain(path, mmap=True))


def _build_student(hf_meta: Path) -> torch.nn.Module:
    """The student class named in the saved config (its head matters), else the bare AutoModel."""
    try:
        config = AutoConfig.from_pretrained(hf_meta)
    except (OSError, ValueError, KeyError, TypeError) as error:  # damaged JSON, unknown model type, ...
        raise CheckpointError(
            f"{hf_meta / 'config.json'} cannot be read as a model config ({type(error).__name__}: "
            f"{str(error).splitlines()[0][:200]}); the run writes it once beside its checkpoints: restore it "
            "from a copy, or write the student's config.json there"
        ) from None
    arch = (config.architectures or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    model = cls(config) if cls is not None else AutoModel.from_config(config)
    return model.float()


def _read_tokenizer(hf_meta: Path):
    try:
        return AutoTokenizer.from_pretrained(hf_meta)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(
            f"the tokenizer files in {hf_meta} cannot be read ({type(error).__name__}: "
            f"{str(error).splitlines()[0][:200]}); restore them from the teacher's tokenizer"
        ) from None


def _load_student_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], tag_dir: Path) -> None:
    student = {k[len(STUDENT_PREFIX) :]: v for k, v in state.items() if k.startswith(STUDENT_PREFIX)}
    if not student:
        raise CheckpointError(f"{tag_dir} holds no '{STUDENT_PREFIX}*' weights; was it saved by mlkd_scale?")
    expected = model.state_dict()
    missing = [k for k in expected if k not in student]
    unexpected = [k for k in student if k not in expected]
    wrong_shape = [
        f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}"
        for k, v in student.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if missing or unexpected or wrong_shape:
        raise CheckpointError(
            f"the student weights in {tag_dir} do not fit {type(model).__name__} built from "
            f"{tag_dir.parent / HF_META}: missing [{_show(missing)}], unexpected [{_show(unexpected)}], "
            f"wrong shape (checkpoint vs config) [{_show(wrong_shape)}]"
        )
    model.load_state_dict(student, strict=True)


def _show(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointError(f"export output {out_dir} exists and is not a directory; choose another path")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / EXPORT_MARKER).is_file():
        raise CheckpointError(
            f"export output {out_dir} is a non-empty directory that is not a previous export; "
            "choose a new or empty directory"
        )


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, results: dict | None = None) -> Path:
    """Write the student of ``checkpoint`` (a checkpoint dir or a tag dir) as a HF directory ``out_dir``.

    ``results`` (e.g. its dev metrics) go into the model card; without them the card shows the best
    result the checkpoint recorded, if any.
    """
    tag_dir = resolve_tag_dir(checkpoint)
    hf_meta = tag_dir.parent / HF_META
    if not (hf_meta / "config.json").is_file():
        raise CheckpointError(
            f"{hf_meta / 'config.json'} is missing; export needs the student's config, "
            "which the training run writes next to its checkpoints"
        )
    out_dir = Path(out_dir).absolute()
    _check_out_dir(out_dir)

    model = _build_student(hf_meta)
    _load_student_weights(model, consolidated_state_dict(tag_dir), tag_dir)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        model.save_pretrained(tmp)
        if (hf_meta / "tokenizer_config.json").is_file():
            _read_tokenizer(hf_meta).save_pretrained(tmp)
        info = {
            "checkpoint": str(tag_dir.absolute()),
            "step": read_complete(tag_dir)["step"],
            "time": time.time(),
        }
        (tmp / EXPORT_MARKER).write_text(json.dumps(info, indent=1) + "\n")
        (tmp / "README.md").write_text(model_card(client_state_of(tag_dir), model, tag_dir.name, results))
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _replace_dir(new: Path, target: Path) -> None:
    """Rename ``new`` to ``target``; an existing (empty or previous-export) target is moved aside first."""
    if target.exists():
        _check_out_dir(target)  # re-check: it may have changed while we were exporting
        old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
        os.rename(target, old / "x")
        os.rename(new, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(new, target)
