"""The BitNet student model."""

from bitnet_kde.model.bitnet import (
    PRESETS,
    BitLinear,
    BitNetConfig,
    BitNetLM,
    KVCache,
    PackedBitLinear,
    bitnet_7b,
    bitnet_mini,
    bitnet_tiny,
)
from bitnet_kde.model.pretrained import PretrainedError, from_llama

__all__ = ["PRESETS", "BitLinear", "BitNetConfig", "BitNetLM", "KVCache", "PackedBitLinear", "bitnet_7b",
           "PretrainedError", "bitnet_mini", "bitnet_tiny", "from_llama"]
