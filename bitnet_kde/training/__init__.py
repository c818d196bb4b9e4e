"""Training: the LightningModule, the A8->A4 flip, logging callbacks and the warm start."""

from bitnet_kde.training.callbacks import (FiniteMetrics, HealthCheckpoint, HparamsMetrics, ProgressLog, QuantStats,
                                          batch_size, batch_tokens, health_path)
from bitnet_kde.training.flip import ActivationFlip
from bitnet_kde.training.module import DistillationModule, NonFiniteLossError, OptimConfig, warmup_cosine
from bitnet_kde.training.warmstart import from_pretrained

__all__ = ["ActivationFlip", "DistillationModule", "FiniteMetrics", "HealthCheckpoint", "HparamsMetrics",
           "NonFiniteLossError", "OptimConfig", "ProgressLog", "QuantStats", "batch_size", "batch_tokens",
           "from_pretrained", "health_path", "warmup_cosine"]
