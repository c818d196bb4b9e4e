"""Fully sharded data parallel training (FSDP2) of the student: `FSDP2Strategy` (what
`trainer=fsdp` builds) and `shard_student`, which `DistillationModule.configure_model` calls.

Lightning's `FSDPStrategy` (FSDP1) accepts only GPU accelerators; `ModelParallelStrategy` with
FSDP2's `fully_shard` also runs on CPU processes with gloo, which is how the tests prove it.
BitLinear keeps fp32 latent weights as ordinary parameters (quantized in its forward), so they
shard like any other weight: each rank stores 1/N of them, of their gradients and of the AdamW
states, and a block's full weights exist only while that block runs.
"""

from __future__ import annotations

from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed._composable import checkpoint
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard

from bitnet_kde.model import BitNetLM


class FSDP2Strategy(ModelParallelStrategy):
    """ModelParallelStrategy with data parallelism only (every device one FSDP rank).

    Args:
        activation_checkpointing: recompute each block's activations in the backward pass instead
            of keeping them (memory of one block's activations instead of all of them, ~1/3 more
            compute); for GPUs whose memory the activations of long sequences would exhaust.
        **kwargs: the `ModelParallelStrategy` arguments (`save_distributed_checkpoint`,
            `process_group_backend`, `timeout`).
    """

    def __init__(self, activation_checkpointing: bool = False, **kwargs):
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1, **kwargs)
        self.activation_checkpointing = activation_checkpointing

    def setup_environment(self) -> None:
        # "auto" would mean one data-parallel rank per node (tensor parallel inside a node)
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()


def shard_student(model: BitNetLM, mesh: DeviceMesh, activation_checkpointing: bool = False) -> None:
    """Shard each block on its own (one block's full weights at a time), then the root: the
    embedding, the tied LM head and the final norm. In place."""
    for block in model.blocks:
        if activation_checkpointing:
            checkpoint(block)  # composable: parameter names (and so checkpoints) stay unchanged
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
