"""The run spec: loading, one clear message per problem, the plan arithmetic and the DeepSpeed merge."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from mlkd_scale.spec import DS_CONFIG_DIR, RunSpec, SpecError, load_spec, spec_hash
from mlkd_scale.spec.plan import Plan, resolve_plan

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory with a tiny teacher dir and a text file; the cwd, so relative paths resolve."""
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "config.json").write_text(
        json.dumps({"model_type": "bert", "num_hidden_layers": 2})
    )
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("hello world\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def minimal(**overrides) -> dict:
    """A valid spec (relative to ``workdir``); keyword arguments replace or add whole sections."""
    spec = {
        "teacher": {"path": "./teacher", "dtype": "fp32"},
        "data": {"sources": [{"path": "corpus/*.txt"}], "max_seq_length": 64},
        "train": {"max_steps": 100},
    }
    spec.update(overrides)
    return spec


def write(directory: Path, spec: dict, name: str = "spec.json") -> Path:
    path = directory / name
    if name.endswith(".json"):
        path.write_text(json.dumps(spec))
    else:
        path.write_text(yaml.safe_dump(spec))
    return path


def problems_of(directory: Path, spec: dict, world_size: int | None = None) -> list[str]:
    with pytest.raises(SpecError) as info:
        load_spec(write(directory, spec), world_size=world_size)
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


def only_problem(directory: Path, spec: dict, world_size: int | None = None) -> str:
    problems = problems_of(directory, spec, world_size)
    assert len(problems) == 1, problems
    return problems[0]


# --------------------------------------------------------------------------------------------------
# Valid specs
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["spec.json", "spec.yaml", "spec.yml"])
def test_minimal_spec_loads(workdir: Path, name: str) -> None:
    spec = load_spec(write(workdir, minimal(), name))
    assert isinstance(spec, RunSpec)
    assert spec.teacher.path == "./teacher"
    assert spec.student.num_layers == 4 and spec.student.hidden_size == 312
    assert spec.run.output_dir == "outputs/mlkd"
    assert spec.train.max_steps == 100 and spec.train.token_budget is None


def test_json_and_yaml_give_the_same_spec(workdir: Path) -> None:
    a = load_spec(write(workdir, minimal(), "a.json"))
    b = load_spec(write(workdir, minimal(), "b.yaml"))
    assert a == b
    assert spec_hash(a) == spec_hash(b)


def test_output_dir_defaults_to_run_name(workdir: Path) -> None:
    assert load_spec(write(workdir, minimal(run={"name": "tiny"}))).run.output_dir == "outputs/tiny"
    explicit = minimal(run={"name": "tiny", "output_dir": "/scratch/x"})
    assert load_spec(write(workdir, explicit)).run.output_dir == "/scratch/x"


def test_hub_names_are_not_checked(workdir: Path) -> None:
    spec = minimal(teacher={"path": "bert-base-uncased"}, data={"sources": [{"name": "wikimedia/wikipedia"}]})
    assert load_spec(write(workdir, spec)).teacher.path == "bert-base-uncased"


def test_spec_hash_is_stable_and_tracks_the_training_math(workdir: Path) -> None:
    base = RunSpec.model_validate(minimal())
    assert spec_hash(base) == spec_hash(RunSpec.model_validate(minimal()))
    assert len(spec_hash(base)) == 16 and int(spec_hash(base), 16) >= 0
    assert spec_hash(base) != spec_hash(RunSpec.model_validate(minimal(train={"max_steps": 101})))
    # Where to resume from and how often to log are not part of the run's identity.
    same = minimal(checkpoint={"resume": "never", "keep_last": 9}, logging={"every_n_steps": 1})
    assert spec_hash(base) == spec_hash(RunSpec.model_validate(same))


def test_resolve_plan_is_reexported_from_spec() -> None:
    from mlkd_scale import spec as spec_module

    assert spec_module.resolve_plan is resolve_plan and spec_module.Plan is Plan


def test_example_recipe_is_valid() -> None:
    spec = load_spec(REPO / "examples" / "bert_base_to_4l312_wiki_books.yaml")
    plan = resolve_plan(spec, world_size=8)
    assert spec.teacher.path == "bert-base-uncased"
    assert [s.name for s in spec.data.sources] == ["wikimedia/wikipedia", "bookcorpus/bookcorpus"]
    assert [s.weight for s in spec.data.sources] == [0.75, 0.25]
    assert (spec.student.num_layers, spec.student.hidden_size, spec.student.num_heads) == (4, 312, 12)
    assert spec.losses.regression_contrastive == "off"
    assert plan.global_batch_size == 512 and plan.total_steps == 100_000 and plan.warmup_steps == 1000
    assert plan.zero_stage == 2 and plan.precision == "bf16"


# --------------------------------------------------------------------------------------------------
# Plan arithmetic and the DeepSpeed config
# --------------------------------------------------------------------------------------------------


def test_plan_arithmetic_with_max_steps() -> None:
    spec = RunSpec.model_validate(
        minimal(train={"max_steps": 1000, "micro_batch_size": 8, "gradient_accumulation_steps": 4})
    )
    plan = resolve_plan(spec, world_size=2)
    assert plan.global_batch_size == 64
    assert plan.tokens_per_step == 64 * 64
    assert plan.total_steps == 1000
    assert plan.warmup_steps == 10  # ceil(0.01 * 1000)
    ds = plan.deepspeed_config
    assert ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["train_batch_size"] == 64
    assert ds["gradient_clipping"] == 1.0
    assert ds["bf16"] == {"enabled": True} and ds["fp16"] == {"enabled": False}
    assert ds["zero_optimization"] == {"stage": 2}
    assert ds["steps_per_print"] == 10**9 and ds["wall_clock_breakdown"] is False


def test_plan_steps_from_token_budget() -> None:
    spec = RunSpec.model_validate(minimal(train={"token_budget": 1_000_001, "micro_batch_size": 4}))
    plan = resolve_plan(spec, world_size=4)
    assert plan.tokens_per_step == 4 * 4 * 64
    assert plan.total_steps == -(-1_000_001 // 1024) == 977
    assert plan.warmup_steps == 10  # ceil(9.77)


def test_warmup_steps_win_over_ratio() -> None:
    spec = RunSpec.model_validate(minimal(train={"max_steps": 500, "warmup_steps": 7, "warmup_ratio": 0.5}))
    assert resolve_plan(spec, 1).warmup_steps == 7


def test_fp16_gets_dynamic_loss_scaling_unless_the_file_sets_it() -> None:
    spec = RunSpec.model_validate(minimal(train={"max_steps": 1, "precision": "fp16"}))
    assert resolve_plan(spec, 1).deepspeed_config["fp16"] == {
        "enabled": True,
        "loss_scale": 0,
        "initial_scale_power": 16,
    }
    spec = RunSpec.model_validate(
        minimal(
            train={"max_steps": 1, "precision": "fp16"},
            deepspeed={"config": {"fp16": {"initial_scale_power": 8}}},
        )
    )
    assert resolve_plan(spec, 1).deepspeed_config["fp16"]["initial_scale_power"] == 8


def test_user_deepspeed_settings_are_kept_and_auto_is_filled() -> None:
    inline = {
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": 1,  # equal to the spec: fine
        "gradient_clipping": "auto",
        "zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}},
        "communication_data_type": "fp32",
    }
    spec = RunSpec.model_validate(minimal(deepspeed={"config": inline}))
    ds = resolve_plan(spec, world_size=3).deepspeed_config
    assert ds["train_micro_batch_size_per_gpu"] == 32 and ds["train_batch_size"] == 96
    assert ds["gradient_clipping"] == 1.0
    assert ds["zero_optimization"] == {"stage": 3, "offload_param": {"device": "cpu"}}
    assert ds["communication_data_type"] == "fp32"


def test_zero_stage_and_precision_come_from_the_file_when_the_spec_leaves_them_unset(workdir: Path) -> None:
    spec = load_spec(write(workdir, minimal(deepspeed={"config": "zero3_offload.json"})))
    plan = resolve_plan(spec, 1)
    assert plan.zero_stage == 3
    zero = plan.deepspeed_config["zero_optimization"]
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert zero["offload_param"] == {"device": "cpu", "pin_memory": True}
    cpu = resolve_plan(
        load_spec(write(workdir, minimal(deepspeed={"config": "ds_configs/cpu_test.json"}))), 2
    )
    assert cpu.precision == "fp32" and cpu.zero_stage == 2
    assert cpu.deepspeed_config["bf16"] == {"enabled": False}


def test_deepspeed_config_found_as_given(workdir: Path) -> None:
    (workdir / "mine.json").write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    spec = load_spec(write(workdir, minimal(deepspeed={"config": "mine.json"})))
    assert resolve_plan(spec, 1).zero_stage == 1


@pytest.mark.parametrize("name", sorted(p.name for p in DS_CONFIG_DIR.glob("*.json")))
def test_shipped_deepspeed_configs_are_accepted_by_deepspeed(name: str) -> None:
    from deepspeed.runtime.config import DeepSpeedConfig

    spec = RunSpec.model_validate(
        minimal(
            teacher={"path": "bert-base-uncased"},
            data={"sources": [{"name": "x"}]},
            deepspeed={"config": name},
        )
    )
    plan = resolve_plan(spec, world_size=1)
    parsed = DeepSpeedConfig(plan.deepspeed_config)  # raises on unknown keys or bad batch arithmetic
    assert parsed.zero_optimization_stage == plan.zero_stage
    assert parsed.train_batch_size == plan.global_batch_size


def test_the_expected_deepspeed_configs_ship() -> None:
    names = {p.name for p in DS_CONFIG_DIR.glob("*.json")}
    assert {
        "zero0.json",
        "zero1.json",
        "zero2.json",
        "zero3.json",
        "zero3_offload.json",
        "cpu_test.json",
    } <= names
    for name in names:
        data = json.loads((DS_CONFIG_DIR / name).read_text())
        assert not {"optimizer", "scheduler", "train_batch_size", "train_micro_batch_size_per_gpu"} & set(
            data
        )


@settings(max_examples=50, deadline=None)
@given(
    micro=st.integers(1, 64),
    accum=st.integers(1, 16),
    world=st.integers(1, 64),
    seq=st.integers(8, 512),
    budget=st.integers(1, 10**12),
)
def test_plan_arithmetic_property(micro: int, accum: int, world: int, seq: int, budget: int) -> None:
    spec = RunSpec.model_validate(
        minimal(
            data={"sources": [{"name": "x"}], "max_seq_length": seq},
            train={
                "micro_batch_size": micro,
                "gradient_accumulation_steps": accum,
                "token_budget": budget,
                "global_batch_size": micro * accum * world,
            },
        )
    )
    plan = resolve_plan(spec, world)
    assert plan.global_batch_size == micro * accum * world == plan.deepspeed_config["train_batch_size"]
    assert plan.tokens_per_step == plan.global_batch_size * seq
    assert (plan.total_steps - 1) * plan.tokens_per_step < budget <= plan.total_steps * plan.tokens_per_step
    assert 0 <= plan.warmup_steps <= plan.total_steps


# --------------------------------------------------------------------------------------------------
# Bad specs: one clear line per problem, naming the field
# --------------------------------------------------------------------------------------------------


def test_wrong_type(workdir: Path) -> None:
    message = only_problem(workdir, minimal(train={"max_steps": 10, "micro_batch_size": "lots"}))
    assert message.startswith("train.micro_batch_size: ") and "'lots'" in message


def test_out_of_range(workdir: Path) -> None:
    message = only_problem(workdir, minimal(train={"max_steps": 10, "micro_batch_size": 0}))
    assert message == "train.micro_batch_size: Input should be greater than or equal to 1 (got 0)"


def test_union_errors_are_one_line(workdir: Path) -> None:
    message = only_problem(workdir, minimal(losses={"layer_mapping": "every-third"}))
    assert message == "losses.layer_mapping: Input should be 'uniform' or a valid list (got 'every-third')"


def test_unknown_top_level_key(workdir: Path) -> None:
    message = only_problem(workdir, minimal(trainer={"lr": 1}))
    assert message.startswith("trainer: unknown key; did you mean 'train'? allowed keys are: ")
    assert "checkpoint, data, deepspeed" in message


def test_unknown_nested_key(workdir: Path) -> None:
    message = only_problem(workdir, minimal(train={"max_steps": 10, "learning_rate": 1e-4}))
    assert message.startswith("train.learning_rate: unknown key;")
    assert "allowed keys are: adam_betas" in message and "lr" in message


def test_unknown_key_in_a_list_item(workdir: Path) -> None:
    spec = minimal(data={"sources": [{"path": "corpus/*.txt", "wieght": 2}]})
    message = only_problem(workdir, spec)
    assert message.startswith("data.sources.0.wieght: unknown key; did you mean 'weight'?")


def test_missing_required_section(workdir: Path) -> None:
    spec = minimal()
    del spec["teacher"]
    assert (
        only_problem(workdir, spec)
        == "teacher: required section is missing; add it (see `mlkd-scale schema`)"
    )


def test_student_heads_must_divide_width(workdir: Path) -> None:
    message = only_problem(workdir, minimal(student={"hidden_size": 312, "num_heads": 5}))
    assert message.startswith("student.num_heads: 5 heads do not divide hidden_size 312")
    assert "[3, 4, 6]" in message


def test_mha_splits_must_divide_student_width(workdir: Path) -> None:
    message = only_problem(workdir, minimal(losses={"mha_splits": 5}))
    assert message.startswith("losses.mha_splits: 5 does not divide student.hidden_size 312")


def test_layer_mapping_length(workdir: Path) -> None:
    message = only_problem(workdir, minimal(losses={"layer_mapping": [1, 2]}))
    assert message.startswith("losses.layer_mapping: has 2 entries but student.num_layers is 4")


@pytest.mark.parametrize(
    "train, state", [({"max_steps": 5, "token_budget": 10}, "both are set"), ({}, "neither is set")]
)
def test_exactly_one_budget(workdir: Path, train: dict, state: str) -> None:
    message = only_problem(workdir, minimal(train=train))
    assert message.startswith("train: set exactly one of max_steps") and message.endswith(state)


def test_global_batch_must_add_up(workdir: Path) -> None:
    spec = minimal(
        train={
            "max_steps": 5,
            "micro_batch_size": 16,
            "gradient_accumulation_steps": 1,
            "global_batch_size": 256,
        }
    )
    load_spec(write(workdir, spec))  # without a world size the cross-check cannot run yet
    message = only_problem(workdir, spec, world_size=8)
    assert message.startswith(
        "train.global_batch_size: is 256 but train.micro_batch_size 16 x "
        "train.gradient_accumulation_steps 1 x world size 8 = 128"
    )
    assert "gradient_accumulation_steps 2" in message  # the fix
    with pytest.raises(SpecError, match="world size 8 = 128"):
        resolve_plan(RunSpec.model_validate(spec), 8)


def test_warmup_longer_than_run(workdir: Path) -> None:
    message = only_problem(workdir, minimal(train={"max_steps": 5, "warmup_steps": 6}), world_size=1)
    assert message == "train.warmup_steps: 6 is more than the 5 total steps; lower it"


def test_missing_data_file(workdir: Path) -> None:
    message = only_problem(workdir, minimal(data={"sources": [{"path": "corpus/nope.jsonl"}]}))
    assert message.startswith("data.sources.0.path: corpus/nope.jsonl does not exist")


def test_glob_matching_nothing(workdir: Path) -> None:
    spec = minimal(data={"sources": [{"path": "corpus/*.txt"}, {"path": "corpus/*.parquet"}]})
    message = only_problem(workdir, spec)
    assert message.startswith("data.sources.1.path: glob corpus/*.parquet matches no files")


def test_missing_teacher_dir(workdir: Path) -> None:
    message = only_problem(workdir, minimal(teacher={"path": "./models/bert"}))
    assert message.startswith("teacher.path: directory ./models/bert does not exist")


def test_teacher_dir_without_config(workdir: Path) -> None:
    (workdir / "empty").mkdir()
    message = only_problem(workdir, minimal(teacher={"path": "./empty"}))
    assert message.startswith("teacher.path: ./empty has no config.json")


def test_student_path_is_checked(workdir: Path) -> None:
    message = only_problem(workdir, minimal(student={"init": "path", "path": "/no/such/student"}))
    assert message.startswith("student.path: directory /no/such/student does not exist")


def test_missing_deepspeed_file(workdir: Path) -> None:
    message = only_problem(workdir, minimal(deepspeed={"config": "zero9.json"}))
    assert message.startswith("deepspeed.config: file zero9.json not found")


def test_invalid_deepspeed_json(workdir: Path) -> None:
    (workdir / "broken.json").write_text('{"zero_optimization": {"stage": 2,}}')
    message = only_problem(workdir, minimal(deepspeed={"config": "broken.json"}))
    assert message.startswith("deepspeed.config: broken.json is not valid JSON (line 1 column")


def test_deepspeed_conflict_names_both_places(workdir: Path) -> None:
    (workdir / "ds.json").write_text(json.dumps({"train_micro_batch_size_per_gpu": 8}))
    message = only_problem(
        workdir, minimal(train={"max_steps": 5, "micro_batch_size": 16}, deepspeed={"config": "ds.json"})
    )
    assert message == (
        "deepspeed config ds.json sets train_micro_batch_size_per_gpu=8 but "
        "train.micro_batch_size is 16; remove it from the DeepSpeed config or change the spec"
    )


def test_deepspeed_stage_conflict_when_both_set(workdir: Path) -> None:
    spec = minimal(train={"max_steps": 5, "zero_stage": 2}, deepspeed={"config": "ds_configs/zero3.json"})
    message = only_problem(workdir, spec)
    assert message.startswith(
        "deepspeed config ds_configs/zero3.json sets zero_optimization.stage=3 but train.zero_stage is 2"
    )


def test_deepspeed_precision_conflict_when_both_set(workdir: Path) -> None:
    spec = minimal(
        train={"max_steps": 5, "precision": "bf16"}, deepspeed={"config": {"fp16": {"enabled": True}}}
    )
    assert only_problem(workdir, spec).startswith(
        "deepspeed.config (inline) asks for fp16 but train.precision is bf16"
    )


def test_deepspeed_train_batch_size_must_add_up(workdir: Path) -> None:
    spec = minimal(
        train={"max_steps": 5, "micro_batch_size": 4}, deepspeed={"config": {"train_batch_size": 12}}
    )
    message = only_problem(workdir, spec, world_size=2)
    assert message.startswith(
        "deepspeed.config (inline) sets train_batch_size=12 but train.micro_batch_size 4 x "
        "train.gradient_accumulation_steps 1 x world size 2 = 8"
    )


@pytest.mark.parametrize("section", ["optimizer", "scheduler"])
def test_deepspeed_optimizer_and_scheduler_are_refused(workdir: Path, section: str) -> None:
    (workdir / "ds.json").write_text(json.dumps({section: {"type": "AdamW", "params": {}}}))
    message = only_problem(workdir, minimal(deepspeed={"config": "ds.json"}))
    assert message.startswith(f"deepspeed config ds.json has a section '{section}'; remove it")
    assert "train." in message


def test_leftover_auto_is_refused(workdir: Path) -> None:
    spec = minimal(deepspeed={"config": {"zero_optimization": {"reduce_bucket_size": "auto"}}})
    message = only_problem(workdir, spec)
    assert "zero_optimization.reduce_bucket_size='auto'" in message


def test_several_problems_are_all_reported(workdir: Path) -> None:
    spec = {
        "teacher": {"path": "./no-teacher"},
        "student": {"num_heads": 5},
        "data": {"sources": [{"path": "corpus/*.csv"}]},
        "train": {"max_steps": 5, "lr": "fast", "zero_stage": 4},
        "deepspeed": {"config": "missing.json"},
        "extra": True,
    }
    problems = problems_of(workdir, spec)
    fields = [p.split(":", 1)[0] for p in problems]
    assert set(fields) == {
        "teacher.path",
        "student.num_heads",
        "data.sources.0.path",
        "train.lr",
        "train.zero_stage",
        "deepspeed.config",
        "extra",
    }, problems


# --------------------------------------------------------------------------------------------------
# Bad files
# --------------------------------------------------------------------------------------------------


def test_missing_spec_file(workdir: Path) -> None:
    with pytest.raises(SpecError, match=r"nope.yaml: spec file not found"):
        load_spec(workdir / "nope.yaml")


def test_unknown_suffix(workdir: Path) -> None:
    (workdir / "spec.toml").write_text("")
    with pytest.raises(SpecError, match=r"must be a \.json, \.yaml or \.yml file"):
        load_spec(workdir / "spec.toml")


def test_unparsable_json_names_line_and_column(workdir: Path) -> None:
    (workdir / "spec.json").write_text('{\n  "teacher": {"path": "x"},\n  "data": [,]\n}')
    with pytest.raises(SpecError, match=r"spec.json: invalid JSON at line 3 column \d+"):
        load_spec(workdir / "spec.json")


def test_unparsable_yaml_names_line_and_column(workdir: Path) -> None:
    (workdir / "spec.yaml").write_text("teacher:\n  path: x\ndata: [a, b\ntrain: {}\n")
    with pytest.raises(SpecError, match=r"spec.yaml: invalid YAML at line \d+ column \d+"):
        load_spec(workdir / "spec.yaml")


def test_duplicate_yaml_key(workdir: Path) -> None:
    (workdir / "spec.yaml").write_text("train:\n  max_steps: 5\ntrain:\n  max_steps: 6\n")
    with pytest.raises(SpecError, match=r"line 3 column 1: duplicate key 'train'"):
        load_spec(workdir / "spec.yaml")


@pytest.mark.parametrize("text, got", [("- a\n- b\n", "a list"), ("", "an empty file")])
def test_top_level_must_be_a_mapping(workdir: Path, text: str, got: str) -> None:
    (workdir / "spec.yaml").write_text(text)
    with pytest.raises(SpecError, match=f"must be a mapping of keys to values, got {got}"):
        load_spec(workdir / "spec.yaml")
