"""Fingerprints of weights: the one rule that tells whether features came from the same model.

    tensor_digest(named) = sha256 over, for each (name, tensor) in order: "name:shape", then the float32 bytes
                           of a strided sample of ≤ 4096 (+1) values; the first 16 hex digits.

Any fine-tune or different adapter changes it; it costs far less than hashing all weights.
"""

from __future__ import annotations

import hashlib
from typing import Iterable

import torch


def tensor_digest(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """The digest above over `named` in the order given."""
    h = hashlib.sha256()
    for name, tensor in named:
        flat = tensor.detach().flatten()
        h.update(f"{name}:{tuple(tensor.shape)}".encode())
        h.update(flat[:: max(1, flat.numel() // 4096)].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def state_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """`tensor_digest` of a state dict, names sorted."""
    return tensor_digest((name, state[name]) for name in sorted(state))


def model_fingerprint(denoiser: torch.nn.Module, parameters: dict[str, torch.nn.Parameter]) -> dict[str, str | None]:
    """Three digests: `denoiser` (all parameters, base model and adapters), `attributed` (the selected ones) and
    `lora` (the LoRA weights of every loaded adapter; None without any), in `named_parameters` order."""
    lora = [(name, p) for name, p in denoiser.named_parameters() if ".lora_" in name]
    return {"denoiser": tensor_digest(denoiser.named_parameters()), "attributed": tensor_digest(parameters.items()),
            "lora": tensor_digest(lora) if lora else None}
