"""Teachers: local models and API providers behind one interface."""

from bitnet_kde.teachers.base import (
    LogprobsUnsupported,
    SamplingConfig,
    Teacher,
    TeacherError,
    TeacherFailure,
    TeacherSequence,
)


def build_teacher(cfg) -> Teacher:
    """A teacher from its Hydra/OmegaConf config (a node with `_target_`, see configs/teacher/)."""
    from hydra.utils import instantiate

    if cfg is None or "_target_" not in cfg:
        raise TeacherError("no teacher configured: choose one, e.g. teacher=local_smollm2 (see configs/teacher/)")
    return instantiate(cfg, _convert_="all")


__all__ = ["build_teacher", "LogprobsUnsupported", "SamplingConfig", "Teacher", "TeacherError", "TeacherFailure",
           "TeacherSequence"]
