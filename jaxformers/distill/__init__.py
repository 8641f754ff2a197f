"""Transformer -> Mamba-2 / hybrid distillation ("Thinking Slow, Fast"; MambaInLlama).

:func:`student_config` / :func:`init_student` (attention-initialised students,
:mod:`.convert`), :class:`DistillStep` / :func:`kd_loss` (KL to the teacher's logits with the
teacher in the same compiled step; ``stage="align"``: layer-wise alignment of the converted
layers to the teacher's hidden states, :mod:`.step`).  ``python -m experiments.distill``
distils a trained run.
"""
from .convert import STUDENTS, init_student, student_config
from .step import DistillStep, align_loss, kd_loss, kl_per_token, teacher_hidden_states

__all__ = ["STUDENTS", "DistillStep", "align_loss", "init_student", "kd_loss", "kl_per_token", "student_config",
           "teacher_hidden_states"]
