"""Self-attribution on real data: a DDPM trained on scikit-learn's digits, each of 50 training digits used as
a query must rank itself first among all 1797 training digits (D-TRAK) for at least 90% of the queries."""

import pytest
import torch

from diffusers_attribution import AttributionConfig, enable_attribution
from diffusers_attribution.demo.digits import load_digits_ddpm, load_digits_images


@pytest.mark.slow
def test_training_images_rank_themselves_first():
    pipe = enable_attribution(load_digits_ddpm())  # the shipped weights: the recipe's run (test_shipped_weights.py)
    train = load_digits_images()
    queries = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:50]
    store = pipe.featurize(train, AttributionConfig(method="d-trak", num_timesteps=10, projection_dim=2048), progress=False)
    result = pipe.attribute(train[queries], store)
    top1 = result.topk(1).indices[:, 0]
    share = (top1 == queries).float().mean().item()
    print(f"self-attribution top-1 rate: {share:.2f}")
    assert share >= 0.9
