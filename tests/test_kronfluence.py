"""The library's EK-FAC against an independent implementation: kronfluence (pomonam/kronfluence), on a tiny DDPM with
the same (t, ε) pairs and the same damping (benchmarks/ekfac_kronfluence.py builds kronfluence's side)."""

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("kronfluence")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from ekfac_kronfluence import kronfluence_scores, library_scores, spearman  # noqa: E402

from diffusers_attribution import AttributionConfig  # noqa: E402


@pytest.mark.parametrize("ratio", [1e-4, 1e-2])
def test_ekfac_at_every_coordinate_ranks_like_kronfluence(ratio):
    from tiny_pipelines import tiny_ddpm_pipeline

    from diffusers_attribution.demo.digits import load_digits_images

    pipe = tiny_ddpm_pipeline(attention=True)
    # kronfluence attributes nn.Linear / nn.Conv2d (weights and biases): the library the same parameters
    layers = [name for name, module in pipe.unet.named_modules() if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))]
    parameters = [f"{name}.{kind}" for name in layers for kind in ("weight", "bias")
                  if getattr(pipe.unet.get_submodule(name), kind, None) is not None]
    total = sum(pipe.unet.get_parameter(name).numel() for name in parameters)
    digits = load_digits_images(20, seed=0)
    images, queries = digits[:16], digits[16:]
    # query_samples=K: the queries' gradients from the training pairs, the samples kronfluence sees (the default is 3·K)
    config = AttributionConfig(method="ekfac-empirical", num_timesteps=4, batch_size=4, projection_dim=total,
                               sketch_dim=total, calibration_examples=16, damping_ratio=ratio, parameters=parameters,
                               query_samples=4)
    scores, featurizer, damping = library_scores(pipe, config, images, {"queries": queries})
    assert featurizer.projector.fit_examples(len(images)) == list(range(16))  # curvature from every example's pairs
    reference = kronfluence_scores(featurizer, images, queries, damping, fisher="empirical")
    assert reference.shape == scores["queries"].shape
    assert spearman(scores["queries"], reference) >= 0.99
    # kronfluence left the denoiser as it was: the library featurizes it again to the same scores
    again, _, _ = library_scores(pipe, config, images, {"queries": queries})
    torch.testing.assert_close(again["queries"], scores["queries"])
