"""Student config, initialisation and layer mapping."""

import pytest
import torch
from tiny_models import tiny_batch, tiny_teacher

from mlkd_scale.models import build_student, build_student_config, resolve_layer_mapping
from mlkd_scale.models.taps import encoder_modules
from mlkd_scale.spec import StudentSpec


def test_uniform_mapping_is_tinybert_s():
    assert resolve_layer_mapping("uniform", 4, 12) == [3, 6, 9, 12]
    assert resolve_layer_mapping("uniform", 6, 12) == [2, 4, 6, 8, 10, 12]
    assert resolve_layer_mapping("uniform", 4, 6) == [1, 3, 4, 6]
    assert resolve_layer_mapping([1, 1, 5], 3, 6) == [1, 1, 5]


@pytest.mark.parametrize(
    "mapping,message",
    [([1, 2], "has 2 entries but the student has 3"), ([0, 2, 7], r"\[0, 7\] are outside the teacher's layers 1..6")],
)
def test_bad_explicit_mapping(mapping, message):
    with pytest.raises(ValueError, match=message):
        resolve_layer_mapping(mapping, 3, 6)


def test_uniform_mapping_needs_a_shallower_student():
    with pytest.raises(ValueError, match="at most as many layers"):
        resolve_layer_mapping("uniform", 8, 6)


def test_student_config_keeps_the_teachers_interface_and_takes_its_own_heads():
    teacher = tiny_teacher(with_head=True, num_labels=5)
    cfg = build_student_config(teacher.config, StudentSpec(num_layers=2, hidden_size=30, num_heads=5, intermediate_size=40))
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size) == (2, 30, 5, 40)
    assert cfg.vocab_size == teacher.config.vocab_size
    assert cfg.max_position_embeddings == teacher.config.max_position_embeddings
    assert cfg.num_labels == 5
    assert teacher.config.hidden_size == 48, "the teacher's config must not be changed"


def test_random_student_has_the_teachers_class_and_trains():
    teacher = tiny_teacher(with_head=True)
    student = build_student(teacher, StudentSpec(num_layers=2, hidden_size=32, num_heads=4, intermediate_size=40), [2, 4])
    assert type(student) is type(teacher)
    assert student.config._attn_implementation == "sdpa"
    assert all(p.requires_grad and p.dtype == torch.float32 for p in student.parameters())
    assert student(**tiny_batch()).logits.shape == (4, 3)


def test_teacher_layer_init_copies_mapped_layers_with_fewer_heads():
    teacher = tiny_teacher(with_head=True)
    spec = StudentSpec(num_layers=2, hidden_size=48, num_heads=3, intermediate_size=64, init="teacher_layers")
    student = build_student(teacher, spec, [2, 4])
    t_emb, t_layers = encoder_modules(teacher)
    s_emb, s_layers = encoder_modules(student)
    torch.testing.assert_close(s_emb.word_embeddings.weight, t_emb.word_embeddings.weight)
    torch.testing.assert_close(s_layers[0].output.dense.weight, t_layers[1].output.dense.weight)
    torch.testing.assert_close(s_layers[1].attention.self.query.weight, t_layers[3].attention.self.query.weight)
    torch.testing.assert_close(student.classifier.weight, teacher.classifier.weight)
    assert student.config.num_attention_heads == 3


def test_teacher_layer_init_needs_matching_widths():
    teacher = tiny_teacher()
    spec = StudentSpec(num_layers=2, hidden_size=24, num_heads=3, intermediate_size=64, init="teacher_layers")
    with pytest.raises(ValueError, match="needs the teacher's width"):
        build_student(teacher, spec, [2, 4])


def test_student_from_path(tmp_path):
    teacher = tiny_teacher()
    first = build_student(teacher, StudentSpec(num_layers=2, hidden_size=24, num_heads=2, intermediate_size=32), [2, 4])
    first.save_pretrained(tmp_path / "s")
    again = build_student(teacher, StudentSpec(init="path", path=str(tmp_path / "s")), [2, 4])
    torch.testing.assert_close(again.embeddings.word_embeddings.weight, first.embeddings.word_embeddings.weight)

