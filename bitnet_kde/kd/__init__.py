"""KD traces: the Parquet format teachers write and the student trains on."""

from bitnet_kde.kd.traces import (
    SCHEMA_VERSION,
    TRACE_SCHEMA,
    TraceValidationError,
    list_shards,
    read_traces,
    trace_metadata,
    validate_traces,
    write_manifest,
    write_trace_shard,
)

__all__ = [
    "SCHEMA_VERSION",
    "TRACE_SCHEMA",
    "TraceValidationError",
    "list_shards",
    "read_traces",
    "trace_metadata",
    "validate_traces",
    "write_manifest",
    "write_trace_shard",
]
