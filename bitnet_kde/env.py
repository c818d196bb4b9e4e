"""`python -m bitnet_kde.env`: what this machine offers for training, and what to choose."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def load_dotenv_file(path: str | Path = ".env") -> bool:
    """Load `KEY=value` lines from `.env` into the environment (existing variables win).

    Keys are read from the environment at use time; nothing here copies them into configs.
    """
    from dotenv import load_dotenv

    return load_dotenv(path, override=False)


def group_from_env(argv: list[str], variable: str, group: str) -> list[str]:
    """Add `<group>=<$variable>` to Hydra's arguments unless the command line already picks one.

    `TEACHER_PROVIDER` chooses the KD teacher (collect, train), `PROVIDER` the chat provider
    (teacher baseline) and `STORAGE` the storage backend, so all can live in `.env`; an argument
    on the command line always wins.
    """
    value = os.environ.get(variable, "").strip()
    if not value or any(a.split("=", 1)[0].lstrip("+~") == group for a in argv[1:]):
        return argv
    return [*argv, f"{group}={value}"]


def teacher_from_env(argv: list[str], variable: str) -> list[str]:
    """`teacher=<$variable>` unless given (see `group_from_env`)."""
    return group_from_env(argv, variable, "teacher")


def report() -> list[str]:
    lines = [
        f"python      {platform.python_version()} ({platform.machine()})",
        f"torch       {torch.__version__}",
        f"cpu threads {torch.get_num_threads()}",
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"cuda:{i}      {p.name}, {p.total_memory / 2**30:.1f} GiB, "
                         f"bf16={'yes' if torch.cuda.is_bf16_supported() else 'no'}")
        lines.append("advice      trainer=gpu (bf16-mixed)")
    else:
        lines.append("cuda        not available")
        lines.append("advice      trainer=cpu (fp32: bf16 matmuls are far slower than fp32 on most CPUs)")
    return lines


if __name__ == "__main__":
    print("\n".join(report()))
