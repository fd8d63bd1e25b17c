"""Journey-TRAK (Georgiev et al., "The Journey, Not the Destination", 2023): training features are TRAK's, with
20 random timesteps per example; queries are the steps of a sampling trajectory (trajectory.py:
`attribute_trajectory`, which scores them with the store's own method's scorer).
"""

from __future__ import annotations

from .base import register_method
from .trak import KernelMethod


@register_method
class JourneyTRAK(KernelMethod):
    """Training features: TRAK's, with 20 random timesteps per example; queries: `attribute_trajectory`."""

    name = "journey-trak"
    title = "Journey-TRAK (Georgiev et al., 2023)"
    default_output = "loss"
    defaults = {"num_timesteps": 20, "timestep_schedule": "random", "query_noise_draws": 4}
    reads = ("noise_draws", "query_noise_draws", "query_samples", "query_noise")

