"""The LoRA text-to-image recipe (evaluation.recipes.LoraTextToImageRecipe) and the captioned digits it trains on."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from diffusers_attribution.demo.captioned_digits import COLOURS, captioned_digits, tiny_captioned_sd_pipeline
from diffusers_attribution.evaluation import LossSpec, QueryLosses, RetrainHarness, subset_masks
from diffusers_attribution.evaluation.recipes import LoraTextToImageRecipe

BASE = partial(tiny_captioned_sd_pipeline, seed=0, size=8, block_out_channels=(16, 32))


def lora_state(pipe) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in pipe.unet.named_parameters() if ".lora_" in name}


@pytest.fixture(scope="module")
def data():
    return captioned_digits(12, seed=0, size=8)


@pytest.fixture(scope="module")
def recipe():
    return LoraTextToImageRecipe(base=BASE, rank=4, learning_rate=1e-2, batch_size=4, num_steps=3)


def test_captioned_digits_deterministic_styled_and_prefix_stable():
    first, again = captioned_digits(20, seed=3, size=8), captioned_digits(20, seed=3, size=8)
    assert [c for _, c in first] == [c for _, c in again]
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(first, again))
    image, caption = first[0]
    assert image.shape == (3, 8, 8) and image.dtype == torch.float32 and -1 <= image.min() and image.max() <= 1
    words = caption.split()
    assert words[0] == "a" and words[1] in COLOURS and words[2] == "digit" and words[3].isdigit()
    assert len({c.split()[1] for _, c in first}) > 1 and len({c.split()[-2] for _, c in first}) == 2
    # the held-out continuation of the same permutation keeps its styles; another seed changes them
    tail = captioned_digits(5, seed=3, size=8, offset=15)
    assert [c for _, c in tail] == [c for _, c in first[15:]]
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(tail, first[15:]))
    assert [c for _, c in captioned_digits(20, seed=4, size=8)] != [c for _, c in first]
    assert captioned_digits(2, seed=3, size=16)[0][0].shape == (3, 16, 16)


def test_recipe_trains_only_lora_weights_deterministically(recipe, data):
    base = recipe.base_pipeline()
    base_state = {name: p.detach().clone() for name, p in base.unet.named_parameters()}
    pipe = recipe.train(data, seed=0)
    assert not any(".lora_" in name for name, _ in base.unet.named_parameters())  # the base is never modified
    assert all(torch.equal(p, base_state[name]) for name, p in base.unet.named_parameters())
    lora = lora_state(pipe)
    assert lora and all(p.dtype == torch.float32 for p in lora.values())
    assert {name.split(".lora_")[1].split(".")[1] for name in lora} == {"default"}
    for name, p in pipe.unet.named_parameters():  # everything else is the base's
        if ".lora_" not in name:
            assert torch.equal(p, base_state[name.replace(".base_layer", "")]), name
    assert any(name.endswith("lora_B.default.weight") and p.abs().sum() > 0 for name, p in lora.items())  # trained
    assert not any(p.requires_grad for p in pipe.unet.parameters())
    again = lora_state(recipe.train(data, seed=0))
    assert all(torch.equal(lora[name], again[name]) for name in lora)
    other_seed = lora_state(recipe.train(data, seed=1))
    subset = lora_state(recipe.train(data[:8], seed=0))
    assert any(not torch.equal(lora[name], other_seed[name]) for name in lora)
    assert any(not torch.equal(lora[name], subset[name]) for name in lora)
    described = recipe.describe()
    assert described["kind"] == "lora-text-to-image" and described["rank"] == 4
    assert "0x" not in described["base"] and "size=8" in described["base"]
    assert described == LoraTextToImageRecipe(base=BASE, rank=4, learning_rate=1e-2, batch_size=4,
                                              num_steps=3).describe()


def test_recipe_runs_through_the_retrain_harness(recipe, data, tmp_path):
    queries = torch.stack([image for image, _ in data[:3]])
    prompts = [caption for _, caption in data[:3]]
    measure = QueryLosses({"real": queries}, LossSpec(timesteps=4, noise_draws=1), prompts={"real": prompts})
    masks = subset_masks(len(data), 2, alpha=0.5, seed=0)
    harness = RetrainHarness(recipe, data, masks, tmp_path / "runs", measure, progress=False)
    results = harness.run()
    assert results.complete
    losses = results.outputs("real")
    assert losses.shape == (2, 3) and torch.isfinite(losses).all() and not torch.equal(losses[0], losses[1])
    # a second harness with an equal recipe resumes (its description is stable) and finds every result
    again = RetrainHarness(LoraTextToImageRecipe(base=BASE, rank=4, learning_rate=1e-2, batch_size=4, num_steps=3),
                           data, masks, tmp_path / "runs", measure, progress=False)
    assert [again.is_done(job, again.prepare()) for job in again.jobs()] == [True, True]
    assert torch.equal(again.load().outputs("real"), losses)
