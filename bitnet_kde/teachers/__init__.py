"""Teachers: local models and API providers behind one interface."""

from bitnet_kde.teachers.base import (
    LogprobsUnsupported,
    SamplingConfig,
    Teacher,
    TeacherError,
    TeacherFailure,
    TeacherLimits,
    TeacherSequence,
)

__all__ = ["LogprobsUnsupported", "SamplingConfig", "Teacher", "TeacherError", "TeacherFailure", "TeacherLimits",
           "TeacherSequence"]
