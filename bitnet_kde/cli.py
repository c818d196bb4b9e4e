"""Start-up shared by the root entry points (train, collect, eval, teacher baseline, dry-run).

Before Hydra reads the command line, `run` loads `.env` and turns `TEACHER_PROVIDER` and `STORAGE` from the environment into
`teacher=` / `storage=` arguments; an argument given on the command line always wins.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

# importing storage registers the config resolvers that configs/paths uses
from bitnet_kde import storage  # noqa: F401

TEACHER_VARIABLE = "TEACHER_PROVIDER"
"""Names the `teacher=` config of every stage that has a teacher."""
OLD_PROVIDER_VARIABLE = "PROVIDER"
"""The teacher baseline's former name for it, still read there while TEACHER_PROVIDER is unset."""


def load_dotenv_file(path: str | Path = ".env") -> bool:
    """Load `KEY=value` lines from `.env` into the environment (existing variables win).

    Keys are read from the environment at use time; nothing here copies them into configs.
    """
    from dotenv import load_dotenv

    return load_dotenv(path, override=False)


def group_from_env(argv: list[str], variable: str, group: str) -> list[str]:
    """Add `<group>=<$variable>` to Hydra's arguments unless the command line already picks one."""
    value = os.environ.get(variable, "").strip()
    if not value or any(a.split("=", 1)[0].lstrip("+~") == group for a in argv[1:]):
        return argv
    return [*argv, f"{group}={value}"]


def _teacher_variable(accept_old_provider: bool = False) -> str:
    """The variable that picks the teacher: TEACHER_PROVIDER, or, when asked and only that is
    set, the deprecated PROVIDER (with a one-line warning on stderr)."""
    if accept_old_provider and not os.environ.get(TEACHER_VARIABLE, "").strip() \
            and os.environ.get(OLD_PROVIDER_VARIABLE, "").strip():
        print(f"warning: {OLD_PROVIDER_VARIABLE} is deprecated, set {TEACHER_VARIABLE} instead", file=sys.stderr)
        return OLD_PROVIDER_VARIABLE
    return TEACHER_VARIABLE


def hydra_argv(argv: list[str], *, teacher: bool = True, accept_old_provider: bool = False) -> list[str]:
    """`argv` plus `teacher=$TEACHER_PROVIDER` (stages with a teacher) and `storage=$STORAGE`,
    each unless the command line already chooses that group."""
    if teacher:
        argv = group_from_env(argv, _teacher_variable(accept_old_provider), "teacher")
    return group_from_env(argv, "STORAGE", "storage")


def run(main: Callable[[], object], *, teacher: bool = True, accept_old_provider: bool = False) -> None:
    """Run a `@hydra.main` function as the program: `.env`, environment groups, then Hydra.

    `teacher=False` for stages without a teacher (the dry-run); `accept_old_provider=True` where
    PROVIDER used to be read (the teacher baseline).
    """
    load_dotenv_file()
    sys.argv = hydra_argv(sys.argv, teacher=teacher, accept_old_provider=accept_old_provider)
    main()
