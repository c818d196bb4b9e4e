"""Start-up and error reporting shared by the root entry points (train, collect, eval, teacher
baseline, dry-run).

Before Hydra reads the command line, `run` loads `.env` and turns `TEACHER_PROVIDER` and
`STORAGE` from the environment into `teacher=` / `storage=` arguments; an argument given on the
command line always wins.

A user error (a config that does not compose or combine, a missing input, missing or refused
credentials, an unreachable service: see `user_error`) ends the program with one line on stderr,
`error: <what to fix>`, and exit status 1; its traceback goes to the run's log file (Hydra's
`<task>.log` in the run folder) and, with `BITNET_KDE_DEBUG=1`, to the console too. Any other exception is a bug and keeps its full traceback.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from hydra.errors import CompactHydraException, InstantiationException
from omegaconf.errors import OmegaConfBaseException

# importing storage also registers the config resolvers that configs/paths uses
from bitnet_kde import storage
from bitnet_kde.teachers import TeacherError
from bitnet_kde.tokenizer import EmbeddedModelMissing

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


def override_key(override: str) -> str:
    """The key a Hydra override sets: `+model.d_model=64` -> `model.d_model`; `~callbacks.x` -> `callbacks.x`."""
    return override.split("=", 1)[0].lstrip("+~")


def group_from_env(argv: list[str], variable: str, group: str) -> list[str]:
    """Add `<group>=<$variable>` to Hydra's arguments unless the command line already picks one."""
    value = os.environ.get(variable, "").strip()
    if not value or any(override_key(a) == group for a in argv[1:]):
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


DEBUG_VARIABLE = "BITNET_KDE_DEBUG"
"""Set to 1 to print a user error's traceback on the console as well."""

USER_ERRORS: tuple[type[BaseException], ...] = (TeacherError, storage.StorageError, EmbeddedModelMissing,
                                                FileNotFoundError)
"""Errors whose message says what to fix. Besides these, every `ValueError` subclass defined in
this package is one (settings and input checks raise those, and so do the prompt and trace readers:
`PromptLoadError`, `TraceValidationError`), and so is a `FloatingPointError` subclass of ours (a
training loss that went non-finite, named with its step and term). They are matched by module
rather than imported so that starting an entry point does not load pyarrow."""


def user_error(exc: BaseException) -> BaseException | None:
    """The user error behind `exc` (itself, or a cause it wraps, e.g. inside Hydra's
    InstantiationException), or None when `exc` is an unexpected failure."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        ours = isinstance(e, (ValueError, FloatingPointError)) and type(e).__module__.split(".")[0] == "bitnet_kde"
        if isinstance(e, USER_ERRORS) or ours or isinstance(e, OmegaConfBaseException):
            return e
        e = e.__cause__ or e.__context__
    if isinstance(exc, CompactHydraException) and not (isinstance(exc, InstantiationException)
                                                       and exc.__cause__ is not None):
        return exc  # composition: unknown group option, bad override, missing key, target not found
    return None


def error_line(exc: BaseException) -> str:
    """`exc` as one line: its message's lines joined (config errors name the key), credentials scrubbed."""
    text = str(exc).split("Config search path", 1)[0]  # Hydra's listing of every search path
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()] or [type(exc).__name__]
    line = " ".join(lines)
    if isinstance(exc, (OmegaConfBaseException, CompactHydraException)):
        line = f"config: {line}"
    return storage.scrub(line)


def _debug() -> bool:
    """Debugging asked for with BITNET_KDE_DEBUG (not HYDRA_FULL_ERROR: `run` sets that itself, and
    processes started from a run, such as DDP ranks, inherit it)."""
    return os.environ.get(DEBUG_VARIABLE, "").strip().lower() in ("1", "true", "yes", "on")


def report(exc: BaseException, *, debug: bool = False) -> int:
    """Print the one-line report of user error `exc`, write its traceback to the run's log file(s)
    (and to the console when `debug`); returns the exit status."""
    cause = user_error(exc) or exc
    line = error_line(cause)
    trace = storage.scrub("".join(traceback.format_exception(exc)))
    # Hydra's job logging (still set up after the job) writes the run's log file
    files = [h for h in logging.getLogger().handlers
             if isinstance(h, logging.FileHandler) and h.baseFilename != os.devnull]
    record = logging.LogRecord("bitnet_kde.cli", logging.ERROR, __file__, 0, "%s\n%s", (line, trace), None)
    for handler in files:
        handler.handle(record)
    if debug:
        print(trace, file=sys.stderr, end="")
        hint = ""
    elif files:
        hint = f" (traceback in {files[0].baseFilename}; {DEBUG_VARIABLE}=1 prints it here)"
    else:
        hint = f" ({DEBUG_VARIABLE}=1 prints the traceback)"
    print(f"error: {line}{hint}", file=sys.stderr)
    return 1


class _WithoutHydraBanner:
    """sys.stderr minus Hydra's "Error executing job with overrides: [...]" line, which it writes
    just before re-raising a failed job's exception (which `run` then reports itself)."""

    BANNER = "Error executing job with overrides:"

    def __init__(self, stream) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        return len(text) if text.startswith(self.BANNER) else self._stream.write(text)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def run(main: Callable[[], object], *, teacher: bool = True, accept_old_provider: bool = False) -> None:
    """Run a `@hydra.main` function as the program: `.env`, environment groups, then Hydra; a user
    error ends it with one line (see the module docstring).

    `teacher=False` for stages without a teacher (the dry-run); `accept_old_provider=True` where
    PROVIDER used to be read (the teacher baseline).
    """
    load_dotenv_file()
    sys.argv = hydra_argv(sys.argv, teacher=teacher, accept_old_provider=accept_old_provider)
    debug = _debug()
    # Hydra then re-raises the job's exception instead of printing its own report
    hydra_full_error = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    stderr, sys.stderr = sys.stderr, _WithoutHydraBanner(sys.stderr)
    try:
        main()
    except Exception as exc:  # sorted into user errors and bugs below
        if user_error(exc) is None:
            raise
        sys.stderr = stderr
        sys.exit(report(exc, debug=debug))
    finally:
        sys.stderr = stderr
        if hydra_full_error is None:  # leave the environment as it was for the caller
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = hydra_full_error
