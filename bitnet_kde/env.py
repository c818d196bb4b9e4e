"""`python -m bitnet_kde.env`: what this machine offers for training, and what to choose."""

from __future__ import annotations

import platform
from pathlib import Path

import torch


def load_dotenv_file(path: str | Path = ".env") -> bool:
    """Load `KEY=value` lines from `.env` into the environment (existing variables win).

    Keys are read from the environment at use time; nothing here copies them into configs.
    """
    from dotenv import load_dotenv

    return load_dotenv(path, override=False)


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
