"""A store written by diffusers-attribution 0.1.0 before the restructuring (tests/fixtures/store_v0_1_0, made
from `tiny_ddpm_pipeline()` with D-TRAK, K=3, calibrated factored k=16, shards of 5 rows, one torch thread as in
these tests) loads bit for bit and scores as it did, and featurizing the same data with its bases gives its features.

Since issue 17 (contraction orders chosen per layer by cost, the mix on blocks of rows) new projections agree
with 0.1.0 to float rounding, not bit for bit: the stored features still load bit for bit; scores and features
computed again are compared at 1e-5 of their scale (measured differences: 1.1e-6 for the scores, 1.5e-7 for
the features)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from tiny_pipelines import tiny_ddpm_pipeline

from diffusers_attribution import AttributionConfig, FeatureStore, enable_attribution
from diffusers_attribution.data import as_training_data
from diffusers_attribution.featurize import Featurizer

FIXTURES = Path(__file__).parent / "fixtures"


def assert_rounding_close(actual, expected, tol=1e-5):
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * float(expected.abs().max()))


def test_store_written_before_the_restructuring_scores_identically():
    expected = load_file(str(FIXTURES / "store_v0_1_0_expected.safetensors"))
    store = FeatureStore.from_pretrained(FIXTURES / "store_v0_1_0", verify=True)
    assert torch.equal(store.features, expected["features"])
    pipe = enable_attribution(tiny_ddpm_pipeline())
    result = pipe.attribute(expected["queries"], store, progress=False)
    assert_rounding_close(result.scores, expected["scores"])


def test_featurizing_again_gives_the_stored_features_bit_for_bit(tmp_path):
    """Calibrated bases are canonical since issue 13 (eigenvector signs fixed, projection/calibrated.py): a fresh
    calibration gives the stored bases up to the sign of each column, and with the stored bases the features are
    the stored ones (to float rounding since issue 17)."""
    expected = load_file(str(FIXTURES / "store_v0_1_0_expected.safetensors"))
    store = FeatureStore.from_pretrained(FIXTURES / "store_v0_1_0", verify=True)
    pipe = enable_attribution(tiny_ddpm_pipeline())
    featurizer = Featurizer(pipe, store.config, projection_state=store.projection_state,
                            projection_spec=store.metadata["projection"])
    data = as_training_data(expected["train"])
    features = torch.cat([featurizer.featurize_rows(data, e["start"], e["stop"])[0] for e in store.shards])
    assert_rounding_close(features, expected["features"])  # same shards, so the same batches

    config = AttributionConfig(method="d-trak", num_timesteps=3, projection_dim=16, calibration_examples=4)
    fresh = pipe.featurize(expected["train"], config, progress=False, output_dir=tmp_path / "store", shard_rows=5)
    old, new = store.projection_state, fresh.projection_state
    assert sorted(old) == sorted(new)
    flipped = 0
    for key in old:
        signs = torch.sign((old[key] * new[key]).sum(0))
        torch.testing.assert_close(new[key], old[key] * signs, rtol=1e-4, atol=1e-5)
        flipped += int((signs < 0).sum())
    assert flipped > 0  # the old store's signs were eigh's, not the canonical ones
