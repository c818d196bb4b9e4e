"""Start-up shared by the root entry points (train, collect, eval, teacher baseline, dry-run).

Before Hydra reads the command line, `run` loads `.env`, registers the config resolvers that
configs/paths uses and turns `TEACHER_PROVIDER` and `STORAGE` from the environment into
`teacher=` / `storage=` arguments; an argument given on the command line always wins.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from bitnet_kde import storage
from bitnet_kde.env import group_from_env, load_dotenv_file, teacher_from_env

TEACHER_VARIABLE = "TEACHER_PROVIDER"
"""Names the `teacher=` config of every stage that has a teacher."""
OLD_PROVIDER_VARIABLE = "PROVIDER"
"""The teacher baseline's former name for it, still read there while TEACHER_PROVIDER is unset."""


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
        argv = teacher_from_env(argv, _teacher_variable(accept_old_provider))
    return group_from_env(argv, "STORAGE", "storage")


def run(main: Callable[[], object], *, teacher: bool = True, accept_old_provider: bool = False) -> None:
    """Run a `@hydra.main` function as the program: `.env`, resolvers, environment groups, then Hydra.

    `teacher=False` for stages without a teacher (the dry-run); `accept_old_provider=True` where
    PROVIDER used to be read (the teacher baseline).
    """
    load_dotenv_file()
    storage.register_resolvers()
    sys.argv = hydra_argv(sys.argv, teacher=teacher, accept_old_provider=accept_old_provider)
    main()
