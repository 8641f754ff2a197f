"""Transformer -> Mamba-2 / hybrid distillation ("Thinking Slow, Fast"; MambaInLlama).

:func:`student_config` / :func:`init_student` (attention-initialised students,
:mod:`.convert`), :class:`DistillStep` / :func:`kd_loss` (KL to the teacher's logits with the
teacher in the same compiled step, :mod:`.step`).  ``python -m experiments.distill``
distils a trained run.
"""
from .convert import STUDENTS, init_student, student_config
from .step import DistillStep, kd_loss, kl_per_token

__all__ = ["STUDENTS", "DistillStep", "init_student", "kd_loss", "kl_per_token", "student_config"]
