"""The header every report starts with: when it was made and on what machine and software.

Eval, the 7B dry-run, the teacher baseline and the benchmark scripts all write it through
`run_info()`, so their figures can be compared knowing where each came from.
"""

from __future__ import annotations

import os
import platform
from datetime import datetime, timezone

import torch


def run_info(device: torch.device | str | None = None) -> dict:
    """`{"created_at": <UTC, ISO 8601>, "machine": {...}}` for the top of a report.

    `machine` holds the platform, processor, Python and torch versions, CPU count, torch's
    thread count and the device the figures were measured on: `device` when given (a CUDA
    device by its name), else the first GPU when there is one, else `cpu`.
    """
    return {
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": _device_name(device),
        },
    }


def describe(machine: dict) -> str:
    """One line for tables and logs: `x86_64, 2 threads, torch 2.13.0+cpu, cpu`."""
    return f"{machine['processor']}, {machine['threads']} threads, torch {machine['torch']}, {machine['device']}"


def _device_name(device: torch.device | str | None) -> str:
    if device is None:
        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
