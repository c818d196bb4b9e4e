"""Data loading: trace datasets, streaming, batching and the Lightning DataModule."""

from bitnet_kde.data.datamodule import KDTraceDataModule, TraceDataset, collate_traces
from bitnet_kde.data.stream import TraceIndex, TraceStream, split_of

__all__ = ["KDTraceDataModule", "TraceDataset", "TraceIndex", "TraceStream", "collate_traces", "split_of"]
