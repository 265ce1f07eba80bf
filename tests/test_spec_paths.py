"""Every path field of the spec: an OS error is one SpecError line naming the field, never a traceback;
source listings are bounded; the run's output folders may not be a root, the home directory or a file."""

from __future__ import annotations

import copy
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlkd_scale.data.corpus.sources import DataError, resolve_files
from mlkd_scale.spec import SourceSpec, SpecError, listing, load_spec
from mlkd_scale.spec.fs import PathProblem, inspect_path, output_dir_problems
from mlkd_scale.spec.listing import list_files, list_source_files

REPO = Path(__file__).resolve().parent.parent
LONG = "x" * 300  # one path component longer than any file system takes (255 bytes)


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (tmp_path / "glue").mkdir()
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("hello\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def general(**sections) -> dict:
    spec = {
        "teacher": {"path": "./teacher"},
        "data": {"sources": [{"path": "corpus/*.txt"}], "max_seq_length": 64},
        "train": {"max_steps": 10},
    }
    return {**spec, **sections}


def task(**task_keys) -> dict:
    return {"teacher": {"path": "./teacher"}, "task": {"name": "rte", **task_keys}, "train": {}}


def set_dotted(spec: dict, dotted: str, value) -> dict:
    spec = copy.deepcopy(spec)
    *parents, last = dotted.split(".")
    target = spec
    for key in parents:
        target = target[int(key)] if isinstance(target, list) else target.setdefault(key, {})
    target[last] = value
    return spec


def write_spec(directory: Path, spec: dict) -> Path:
    path = directory / "spec.json"
    path.write_text(json.dumps(spec))
    return path


def problems_of(directory: Path, spec: dict) -> list[str]:
    with pytest.raises(SpecError) as info:
        load_spec(write_spec(directory, spec))
    return info.value.problems


# (spec, the field's dotted path as the message names it, where to put the value in the spec)
FIELDS = [
    (general(), "teacher.path", "teacher.path"),
    (general(student={"init": "path"}), "student.path", "student.path"),
    (general(), "data.sources.0.path", "data.sources.0.path"),
    (general(), "data.pretokenized_dir", "data.pretokenized_dir"),
    (general(), "deepspeed.config", "deepspeed.config"),
    (general(), "checkpoint.resume", "checkpoint.resume"),
    (general(), "checkpoint.dir", "checkpoint.dir"),
    (general(), "logging.tensorboard_dir", "logging.tensorboard_dir"),
    (general(), "run.output_dir", "run.output_dir"),
    (task(), "task.data_dir", "task.data_dir"),
    (task(), "task.augmented_dir", "task.augmented_dir"),
    (task(name="squad_v2"), "task.squad.train_file", "task.squad.train_file"),
    (task(name="squad_v2"), "task.squad.dev_file", "task.squad.dev_file"),
]
IDS = [field for _, field, _ in FIELDS]


@pytest.mark.parametrize("base, field, where", FIELDS, ids=IDS)
def test_unknown_user_home_names_the_field(workdir: Path, base: dict, field: str, where: str) -> None:
    (problem,) = problems_of(workdir, set_dotted(base, where, "~nosuchuser_mlkd/x"))
    assert problem.startswith(f"{field}: ~nosuchuser_mlkd/x starts with ~nosuchuser_mlkd")
    assert "no user 'nosuchuser_mlkd'" in problem and "write the path out in full" in problem


@pytest.mark.parametrize("base, field, where", FIELDS, ids=IDS)
def test_overlong_component_names_the_field(workdir: Path, base: dict, field: str, where: str) -> None:
    (problem,) = problems_of(workdir, set_dotted(base, where, f"{workdir}/{LONG}/x"))
    assert problem.startswith(f"{field}: ") and "has a path component of 300 bytes" in problem
    assert "more than the 255 a file name may have; shorten it" in problem


def test_symlink_loop_is_named(workdir: Path) -> None:
    os.symlink("loop_b", workdir / "loop_a")
    os.symlink("loop_a", workdir / "loop_b")
    (problem,) = problems_of(workdir, task(data_dir="loop_a/x"))
    assert problem == (
        "task.data_dir: loop_a/x goes round a loop of symbolic links; fix the links or give the real path"
    )


def test_permission_denied_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real_stat = Path.stat

    def denied(self, *args, **kwargs):
        if "secret" in str(self):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_stat(self, *args, **kwargs)

    monkeypatch.setattr(Path, "stat", denied)
    with pytest.raises(
        PathProblem, match=r"^task\.data_dir: permission denied while looking up /secret/glue"
    ):
        inspect_path("task.data_dir", "/secret/glue", "give a folder")


@pytest.mark.parametrize(
    "value, message",
    [
        ("a\x00b", "contains a NUL character; remove it"),
        ("/x/\ud800", "cannot be a file name (it is not valid Unicode text); fix the text"),
        ("  ", "is empty; give a folder"),
    ],
)
def test_values_no_path_can_hold(value: str, message: str) -> None:
    with pytest.raises(PathProblem) as info:
        inspect_path("task.data_dir", value, "give a folder")
    assert str(info.value).startswith("task.data_dir: ") and message in str(info.value)


def test_missing_and_wrong_kind_keep_their_wording(workdir: Path) -> None:
    assert problems_of(workdir, task(data_dir="no/such")) == [
        (
            "task.data_dir: directory no/such does not exist; give the task's folder in the original GLUE "
            "layout (e.g. glue_data/RTE) or leave it unset to read the hub copy"
        )
    ]
    (problem,) = problems_of(workdir, task(name="squad_v1", squad={"train_file": "glue"}))
    assert problem == "task.squad.train_file: glue is not a file; give an official-format SQuAD JSON"


# -- bounded listings ------------------------------------------------------------------------------


def _tree(root: Path, dirs: int = 30, files: int = 10) -> Path:
    for d in range(dirs):
        (root / f"d{d}" / "sub").mkdir(parents=True)
        for f in range(files):
            (root / f"d{d}" / "sub" / f"f{f}.txt").write_text("x\n")
    return root


def test_a_broad_glob_stops_at_the_entry_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _tree(tmp_path)
    monkeypatch.setattr(listing, "MAX_LISTED_ENTRIES", 100)
    pattern = f"{tmp_path}/**/*.nomatch"
    with pytest.raises(PathProblem) as info:
        list_source_files("data.sources.0.path", pattern)
    message = str(info.value)
    assert message.startswith(f"data.sources.0.path: stopped listing the files of glob {pattern} after 100 ")
    assert "narrow it: start the pattern at the directory that holds the corpus" in message
    assert len(list_files("f", pattern, max_entries=10_000)) == 0  # with room it finishes: no match


def test_a_slow_listing_stops_at_the_time_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _tree(tmp_path, dirs=3)
    monkeypatch.setattr(listing, "MAX_LISTING_SECONDS", 0.0)
    with pytest.raises(PathProblem, match=r"directory .* without finishing .* or 0 s\); narrow it"):
        list_source_files("data.sources.0.path", str(tmp_path))


def test_validation_and_the_run_list_the_same_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _tree(tmp_path, dirs=3, files=2)
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "h.txt").write_text("x\n")
    (tmp_path / "d0" / "notes.md").write_text("x\n")
    os.symlink(tmp_path, tmp_path / "d1" / "loop")  # a link back up the tree is not followed round
    expected = sorted(str(p) for p in tmp_path.glob("d*/sub/*.txt"))
    for value in (str(tmp_path), f"{tmp_path}/**/*.txt", f"{tmp_path}/d*/sub/f?.txt"):
        pairs = resolve_files(SourceSpec(path=value))
        assert [file for file, _ in pairs] == expected, value
        assert list_source_files("x", value) == pairs
    monkeypatch.setattr(listing, "MAX_LISTED_ENTRIES", 5)
    with pytest.raises(DataError, match=r"^data source: stopped listing the files of directory"):
        resolve_files(SourceSpec(path=str(tmp_path)))


def test_a_source_without_known_files(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("x\n")
    with pytest.raises(
        PathProblem, match=r"matched no \.txt/\.jsonl/\.json/\.parquet files \(1 of other kinds"
    ):
        list_source_files("data.sources.0.path", str(tmp_path))
    with pytest.raises(PathProblem, match=r"cannot tell the format of .*a\.csv from its suffix; set format"):
        list_source_files("data.sources.0.path", str(tmp_path / "a.csv"))
    assert list_source_files("f", str(tmp_path / "a.csv"), "text") == [(str(tmp_path / "a.csv"), "text")]


# -- output folders --------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["run.output_dir", "checkpoint.dir", "logging.tensorboard_dir"])
@pytest.mark.parametrize(
    "value, message",
    [
        ("/", "/ is the root of the file system; "),
        ("/tmp/../..", "/tmp/../.. (= /) is the root of the file system; "),
        ("~", "is the home directory; "),
        ("corpus/a.txt", "corpus/a.txt exists and is not a directory; "),
        ("corpus/a.txt/run", "corpus/a.txt/run cannot be created, "),
    ],
)
def test_output_folders_that_cannot_be_the_run_s(workdir: Path, field: str, value: str, message: str) -> None:
    (problem,) = problems_of(workdir, set_dotted(general(), field, value))
    assert problem.startswith(f"{field}: ") and message in problem, problem
    assert "give a folder of" in problem


def test_output_dir_from_the_run_name(workdir: Path) -> None:
    (problem,) = problems_of(workdir, general(run={"name": "../" * 40}))
    assert problem.startswith("run.output_dir: outputs/../") and "is the root of the file system" in problem


def test_good_output_folders_pass(tmp_path: Path) -> None:
    for value in (str(tmp_path), str(tmp_path / "new" / "deeper"), "outputs/x"):
        assert output_dir_problems("run.output_dir", value, "fix") == []


@pytest.mark.parametrize(
    "value, message",
    [
        ("corpus/a.txt", "corpus/a.txt exists and is not a directory"),
        ("/", "/ is the root of the file system"),
    ],
)
def test_pretokenized_dir_may_be_new_but_not_a_file_or_root(workdir: Path, value: str, message: str) -> None:
    spec = general(data={"sources": [{"path": "corpus"}], "pretokenized_dir": value})
    (problem,) = problems_of(workdir, spec)
    assert problem.startswith(f"data.pretokenized_dir: {message}; give the --out directory of `mlkd-scale")
    assert load_spec(write_spec(workdir, set_dotted(spec, "data.pretokenized_dir", "new/dir")))


def test_an_output_dir_through_a_dangling_link(workdir: Path) -> None:
    os.symlink("nowhere", workdir / "dangling")
    for value in ("dangling", "dangling/run"):
        (problem,) = problems_of(workdir, general(run={"output_dir": value}))
        assert (
            problem.startswith(f"run.output_dir: {value} cannot be created, ")
            and "is a link to nothing" in problem
        )


def test_sections_that_fail_still_get_their_paths_checked(workdir: Path) -> None:
    spec = general(run={"output_dir": "/"}, train={"max_steps": 0})
    spec["data"]["max_seq_length"] = 1  # the data section fails as a whole; its sources are still checked
    spec["data"]["sources"][0]["path"] = "~nosuchuser_mlkd/*.txt"
    fields = sorted(p.split(":")[0] for p in problems_of(workdir, spec))
    assert fields == ["data.max_seq_length", "data.sources.0.path", "run.output_dir", "train.max_steps"]


# -- the command line ------------------------------------------------------------------------------


def _validate(spec: dict, cwd: Path) -> subprocess.CompletedProcess:
    (cwd / "spec.json").write_text(json.dumps(spec))
    return subprocess.run(
        [sys.executable, "-m", "mlkd_scale.cli", "validate", "spec.json"],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize(
    "change, field",
    [
        ({"task": {"name": "sst2", "data_dir": "~nosuchuser_mlkd/x"}}, "task.data_dir"),
        ({"task": {"name": "sst2", "augmented_dir": f"/tmp/{LONG}"}}, "task.augmented_dir"),
        ({"task": {"name": "squad", "squad": {"dev_file": f"/tmp/{LONG}/dev.json"}}}, "task.squad.dev_file"),
        ({"run": {"output_dir": "/"}, "task": {"name": "sst2"}}, "run.output_dir"),
    ],
)
def test_validate_exits_2_with_one_message(workdir: Path, change: dict, field: str) -> None:
    result = _validate({"teacher": {"path": "bert-base-uncased"}, "train": {}, **change}, workdir)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert lines[0] == "spec.json: invalid run spec (1 problem)" and len(lines) == 2
    assert lines[1].startswith(f"  {field}: ")


def test_validate_an_unmatched_glob_over_usr_fails_fast(workdir: Path) -> None:
    """/usr/**/*.nomatch walked the whole tree (over 100 s); now the listing stops at its bounds."""
    spec = general(data={"sources": [{"path": "/usr/**/*.nomatch"}]})
    result = _validate(spec, workdir)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()[1:]
    assert line.startswith("  data.sources.0.path: ") and "/usr/**/*.nomatch" in line
    assert "narrow it" in line or "matches no files" in line  # a small /usr can be listed in full


@pytest.mark.parametrize("name", [LONG, "owner/name--x", "a..b", "one/two three", "-dash"])
def test_model_names_that_are_neither_a_directory_nor_a_hub_id(workdir: Path, name: str) -> None:
    (problem,) = problems_of(workdir, general(teacher={"path": name}))
    assert problem.startswith("teacher.path: ") and "is neither a local directory nor a hub model name" in problem
    for good in ("bert-base-uncased", "google/bert_uncased_L-2_H-128_A-2", "org/model.v1_2"):
        assert load_spec(write_spec(workdir, general(teacher={"path": good}))).teacher.path == good
