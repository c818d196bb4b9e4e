"""Training: the LightningModule, the A8->A4 flip, logging callbacks and the warm start."""

from bitnet_kde.training.callbacks import FiniteMetrics, HparamsMetrics, QuantStats, batch_size, batch_tokens
from bitnet_kde.training.flip import ActivationFlip
from bitnet_kde.training.module import DistillationModule, NonFiniteLossError, OptimConfig, warmup_cosine
from bitnet_kde.training.warmstart import from_pretrained

__all__ = ["ActivationFlip", "DistillationModule", "FiniteMetrics", "HparamsMetrics", "NonFiniteLossError",
           "OptimConfig", "QuantStats", "batch_size", "batch_tokens", "from_pretrained", "warmup_cosine"]
