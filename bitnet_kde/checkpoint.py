"""Loading a trained student for inference: from a training checkpoint or a native export folder.

A training checkpoint is the file Lightning writes for `train.py` (`last.ckpt`), local or on any
store `bitnet_kde.storage` reaches. It is read with `torch.load(weights_only=True)`, without
Lightning: the student is rebuilt from the saved `model` hyper-parameter, as `DistillationModule`
builds it, and gets the `model.`-prefixed tensors of its state dict, the saved activation mode and
the saved quantization warm-up blend. A warm-started run saves its student's resolved shape
there, so the pretrained source is never read again.

A checkpoint is a pickle, and a pickle can run code when it is read. The weights-only unpickler
allows only tensors and plain containers, so a file holding anything else is refused, never
run; and only the storage module's protocols are read (an `http(s)://` URL is refused with the
list of them; docs/STORAGE.md).
"""

from __future__ import annotations

import os
import pickle

import torch

from bitnet_kde import storage
from bitnet_kde.export.native import is_export_dir, load_packed
from bitnet_kde.model import BitNetConfig, BitNetLM
from bitnet_kde.model.pretrained import split_spec

STUDENT_PREFIX = "model."
"""Where `DistillationModule` keeps the student, so where its tensors sit in the state dict."""


def _refused_object(error: pickle.UnpicklingError) -> str:
    """The line of torch's page-long refusal that names the object (e.g. `GLOBAL io.open`)."""
    for line in str(error).splitlines():
        if "WeightsUnpickler error:" in line:
            return line.split("WeightsUnpickler error:", 1)[1].split(" Please use")[0].strip()
    return type(error).__name__


def load_student(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> BitNetLM:
    """The student of a training checkpoint or of a packed export directory, in eval mode.

    Either way the model comes back in its saved activation mode (A8 or A4). From a checkpoint
    it is the training form (fp32 latent weights) with its saved warm-up blend (`quant_lambda`,
    1 when the checkpoint predates it); from an export it is the packed form.
    """
    if is_export_dir(path):
        return load_packed(path, map_location=map_location)
    with storage.open_url(path, "rb") as f:
        try:
            checkpoint = torch.load(f, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            raise ValueError(f"{path}: refused to load: the checkpoint holds objects other than tensors and plain "
                             f"containers ({_refused_object(e)}); only load checkpoints you trust") from None
    spec = checkpoint.get("hyper_parameters", {}).get("model")
    if spec is None:
        raise ValueError(f"{path}: not a bitnet-kde training checkpoint (no 'model' hyper-parameter)")
    spec, init = split_spec(spec)
    if init["init_from"]:
        raise ValueError(f"{path}: its 'model' hyper-parameter names a warm-start source instead of the student's "
                         "shape; it was not written by DistillationModule")
    model = BitNetLM(BitNetConfig.from_spec(spec))
    state = {k[len(STUDENT_PREFIX):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(STUDENT_PREFIX)}
    model.load_state_dict(state)
    model.set_activation_bits(int(checkpoint.get("activation_bits", 8)))
    model.set_quant_lambda(float(checkpoint.get("quant_lambda", 1.0)))
    return model.to(map_location).eval()
