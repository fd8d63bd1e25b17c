"""Counter-based seeding: every random draw is a pure function of the names that identify it.

`seed_from("noise", 0, "train:17", 250)` gives the same integer on every machine, so the noise of
(example, timestep) never depends on batch size, batch composition, device or number of processes.
"""

from __future__ import annotations

import hashlib

import torch


def seed_from(*parts) -> int:
    """A 63-bit seed from the string forms of `parts` (sha256, so nearby inputs give unrelated seeds)."""
    digest = hashlib.sha256(":".join(str(part) for part in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def seeded_randn(shape, *parts, dtype=torch.float32) -> torch.Tensor:
    """Standard normal draws from a CPU generator seeded by `parts` (CPU, so identical on any device)."""
    generator = torch.Generator().manual_seed(seed_from(*parts))
    return torch.randn(tuple(shape), generator=generator, dtype=dtype)
