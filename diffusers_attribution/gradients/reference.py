"""Per-example gradients ∇θ F_i by ordinary autograd, one example at a time: the reference path.

Each example's K timesteps share one forward/backward pass (batch K), so this costs about one training
step per example; the factored hooks path gets all examples of a batch from a single pass.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..adapters import ModelInputs
from .task import AttributionTask


def per_example_gradients(
    task: AttributionTask, parameters: dict[str, torch.nn.Parameter], inputs: ModelInputs, keys: Sequence
) -> dict[str, torch.Tensor]:
    """{name: [B, *param.shape]} float32 gradients of each example's output F_i."""
    names = list(parameters)
    tensors = [parameters[name] for name in names]
    per_example: list[list[torch.Tensor]] = []
    for i, key in enumerate(keys):
        example = ModelInputs(inputs.x0[i : i + 1], {k: v[i : i + 1] for k, v in inputs.conditioning.items()})
        total = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in tensors]
        for columns in task.chunks():
            output = task.outputs(example, [key], columns).sum()
            grads = torch.autograd.grad(output, tensors, allow_unused=True)
            for acc, grad in zip(total, grads):
                if grad is not None:
                    acc += grad.float()
        per_example.append(total)
    return {name: torch.stack([grads[j] for grads in per_example]) for j, name in enumerate(names)}
