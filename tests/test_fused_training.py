"""The training step's fused head + loss against the loss on the model's logits."""

from __future__ import annotations

import torch

from bitnet_kde.losses import DistillationLoss, LossConfig, ProjectedLogits
from bitnet_kde.model import BitNetConfig, BitNetLM


def test_training_step_loss_and_gradients_equal_the_loss_on_logits():
    torch.manual_seed(0)
    model = BitNetLM(BitNetConfig.from_name("tiny", vocab_size=96)).double()
    b, t, k = 2, 12, 5
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 96, (b, t), generator=g)
    loss_mask = torch.ones(b, t, dtype=torch.bool)
    loss_mask[:, :3] = False
    loss_mask[:, -1] = False
    lp = torch.log_softmax(torch.randn(b, t, k + 1, generator=g, dtype=torch.float64), -1)
    batch = {"input_ids": ids, "loss_mask": loss_mask, "kd_valid": torch.rand(b, t, generator=g) < 0.8,
             "format_mask": torch.rand(b, t, generator=g) < 0.3, "topk_ids": torch.randint(0, 96, (b, t, k), generator=g),
             "topk_logprobs": lp[..., :k], "other_logprob": lp[..., k]}
    loss_fn = DistillationLoss(LossConfig(chunk_size=7))
    hidden = model(ids, return_hidden=True)  # as the training step asks (FSDP2 hooks on forward)
    assert torch.equal(model.lm_head(hidden), model(ids))
    grads = []
    for out in (loss_fn(ProjectedLogits(hidden, model.lm_head.weight), batch), loss_fn(model(ids), batch)):
        model.zero_grad()
        out["loss"].backward(retain_graph=True)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    fused, plain = grads
    assert set(fused) == set(plain) and fused["embed.weight"].abs().max() > 0
    for name in plain:
        assert torch.allclose(fused[name], plain[name], rtol=1e-9, atol=1e-12), name
