"""A store written by diffusers-attribution 0.1.0 before the restructuring (tests/fixtures/store_v0_1_0, made
from `tiny_ddpm_pipeline()` with D-TRAK, K=3, calibrated factored k=16, shards of 5 rows, one torch thread as in
these tests) loads and scores exactly as it did, and featurizing the same data again gives the same bits."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from tiny_pipelines import tiny_ddpm_pipeline

from diffusers_attribution import AttributionConfig, FeatureStore, enable_attribution

FIXTURES = Path(__file__).parent / "fixtures"


def test_store_written_before_the_restructuring_scores_identically():
    expected = load_file(str(FIXTURES / "store_v0_1_0_expected.safetensors"))
    store = FeatureStore.from_pretrained(FIXTURES / "store_v0_1_0", verify=True)
    assert torch.equal(store.features, expected["features"])
    pipe = enable_attribution(tiny_ddpm_pipeline())
    result = pipe.attribute(expected["queries"], store, progress=False)
    assert torch.equal(result.scores, expected["scores"])  # bit-identical, not just close


def test_featurizing_again_gives_the_stored_features_bit_for_bit(tmp_path):
    expected = load_file(str(FIXTURES / "store_v0_1_0_expected.safetensors"))
    pipe = enable_attribution(tiny_ddpm_pipeline())
    config = AttributionConfig(method="d-trak", num_timesteps=3, projection_dim=16, calibration_examples=4)
    fresh = pipe.featurize(expected["train"], config, progress=False, output_dir=tmp_path / "store", shard_rows=5)
    assert torch.equal(fresh.features, expected["features"])  # same shards, so the same batches
    result = pipe.attribute(expected["queries"], fresh, progress=False)
    assert torch.equal(result.scores, expected["scores"])
