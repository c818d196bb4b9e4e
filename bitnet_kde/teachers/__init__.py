"""Teachers: local models and API providers behind one interface."""

from bitnet_kde.teachers.api import resolve_key
from bitnet_kde.teachers.base import (
    LogprobsUnsupported,
    SampledTraceConfig,
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


def check_credentials(cfg) -> None:
    """Raise `TeacherError` if teacher config `cfg` needs an API key that is not set, without
    building the teacher: a stage calls it first, before it loads any model, tokenizer or data."""
    if cfg is None or not cfg.get("api_key_env"):
        return  # an in-process teacher
    name = f"{cfg.get('provider', 'unknown')}/{cfg.get('model', 'unknown')}"
    resolve_key(name, cfg.get("provider"), cfg.get("base_url"), str(cfg.get("api_key_env")))


__all__ = [
    "LogprobsUnsupported",
    "SampledTraceConfig",
    "SamplingConfig",
    "Teacher",
    "TeacherError",
    "TeacherFailure",
    "TeacherSequence",
    "build_teacher",
    "check_credentials",
]
