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

__all__ = ["PRESETS", "BitLinear", "BitNetConfig", "BitNetLM", "KVCache", "PackedBitLinear", "bitnet_7b",
           "bitnet_mini", "bitnet_tiny"]
