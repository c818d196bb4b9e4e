"""Data loading: trace datasets, batching and the Lightning DataModule."""

from bitnet_kde.data.datamodule import KDTraceDataModule, TraceDataset, collate_traces, split_of

__all__ = ["KDTraceDataModule", "TraceDataset", "collate_traces", "split_of"]
