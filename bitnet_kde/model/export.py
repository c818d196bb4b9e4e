"""Loading a trained student for inference: from a Lightning checkpoint (and, later, a packed export)."""

from __future__ import annotations

import torch

from bitnet_kde.model.bitnet import BitNetLM


def load_student(path: str, map_location: str | torch.device = "cpu") -> BitNetLM:
    """The student of a Lightning checkpoint, in eval mode, with its saved activation bits (A8/A4)."""
    from bitnet_kde.training import DistillationModule  # training imports the model package

    module = DistillationModule.load_from_checkpoint(path, map_location=map_location, weights_only=False)
    return module.model.eval()
