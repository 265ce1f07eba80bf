"""TensorBoard logger: what is logged reads back; a disabled logger touches nothing."""

import math

import pytest
import torch

from mlkd_scale.engine.trackers import TensorBoardLogger, read_scalars, read_texts


def test_scalars_and_text_round_trip(tmp_path):
    spec_md = '```json\n{"lr": 0.001}\n```'
    with TensorBoardLogger(tmp_path, enabled=True) as tb:
        for step in (1, 2, 3):
            tb.scalars(
                step,
                {
                    "loss/total": torch.tensor(step * 0.5),  # 0-d tensor
                    "loss/ffn": torch.tensor([step * 0.25], dtype=torch.bfloat16),  # 1-element, bf16
                    "lr": 1e-3 * step,  # plain float
                    "tokens": torch.tensor(100 * step),  # integer tensor
                },
            )
        tb.text("spec", spec_md)
        tb.flush()
    scalars = read_scalars(tmp_path)
    assert set(scalars) == {"loss/total", "loss/ffn", "lr", "tokens"}
    assert scalars["loss/total"] == [(1, 0.5), (2, 1.0), (3, 1.5)]
    assert [s for s, _ in scalars["loss/ffn"]] == [1, 2, 3]
    assert [v for _, v in scalars["loss/ffn"]] == pytest.approx([0.25, 0.5, 0.75])
    assert [v for _, v in scalars["lr"]] == pytest.approx([1e-3, 2e-3, 3e-3])
    assert [v for _, v in scalars["tokens"]] == [100.0, 200.0, 300.0]
    assert read_texts(tmp_path) == {"spec/text_summary": [spec_md]}


def test_nan_is_logged_not_raised(tmp_path):
    with TensorBoardLogger(tmp_path, enabled=True) as tb:
        tb.scalars(1, {"loss": torch.tensor(float("nan"))})
    assert math.isnan(read_scalars(tmp_path)["loss"][0][1])


def test_multi_element_tensor_is_rejected(tmp_path):
    with (
        TensorBoardLogger(tmp_path, enabled=True) as tb,
        pytest.raises(ValueError, match="must have one element"),
    ):
        tb.scalars(1, {"loss": torch.ones(2)})


def test_disabled_logger_creates_nothing(tmp_path):
    log_dir = tmp_path / "tb"
    with TensorBoardLogger(log_dir, enabled=False) as tb:
        tb.scalars(1, {"loss": torch.tensor(1.0)})
        tb.text("spec", "x")
        tb.flush()
    tb.close()  # closing twice is fine
    assert not log_dir.exists()
    assert list(tmp_path.iterdir()) == []


def test_purge_step_hides_events_of_a_crashed_run(tmp_path):
    """A run logged steps 1..5 but its last checkpoint was step 3; the resumed run relogs 4..5."""
    with TensorBoardLogger(tmp_path, enabled=True) as tb:
        for step in range(1, 6):
            tb.scalars(step, {"loss": float(step)})
    with TensorBoardLogger(tmp_path, enabled=True, purge_step=4) as tb:
        for step in (4, 5):
            tb.scalars(step, {"loss": 10.0 * step})
    assert read_scalars(tmp_path)["loss"] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0)]
