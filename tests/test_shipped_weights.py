"""The digits DDPM shipped with the package (what `diffusers-attribution demo` loads) is the recipe's own
training run: retraining `train_digits_ddpm(load_digits_images(), DigitsRecipe())` reproduces it."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch
from safetensors.torch import load_file

from diffusers_attribution.demo.digits import (
    DigitsRecipe,
    load_digits_ddpm,
    load_digits_images,
    shipped_digits_ddpm_path,
    train_digits_ddpm,
)

# Measured on the machine that made the weights (one CPU thread, as tests run): retraining is bit-identical
# (max |Δ| = 0). With two threads, or another CPU's kernels, float sums are reduced in another order and
# after 1200 AdamW steps the weights differ by up to 3.7e-5 (measured with 2 threads); this bound allows
# that and nothing more: another recipe, seed or data order changes them by orders of magnitude more.
TOLERANCE = 1e-4


def test_shipped_weights_load_offline_and_name_their_recipe():
    path = shipped_digits_ddpm_path()
    weights = path / "unet" / "diffusion_pytorch_model.safetensors"
    assert 0.5e6 < weights.stat().st_size < 1e6  # ~0.7 MB, safetensors (never a pickle)
    assert not list(path.rglob("*.bin")) and not list(path.rglob("*.pt"))
    assert json.loads((path / "digits_recipe.json").read_text()) == {**json.loads(json.dumps(asdict(DigitsRecipe()))),
                                                                     "n_train": None}
    pipe = load_digits_ddpm()

    def public(config) -> dict:
        return json.loads(json.dumps({key: value for key, value in config.items() if not key.startswith("_")}))

    assert public(pipe.unet.config) == public(DigitsRecipe().make_unet().config)
    assert public(pipe.scheduler.config) == public(DigitsRecipe().make_scheduler().config)


@pytest.mark.slow
def test_retraining_reproduces_the_shipped_weights():
    trained = train_digits_ddpm(load_digits_images(), DigitsRecipe(), progress=False).unet.state_dict()
    shipped = load_file(shipped_digits_ddpm_path() / "unet" / "diffusion_pytorch_model.safetensors")
    assert shipped.keys() == trained.keys()
    differences = {name: (shipped[name] - trained[name]).abs().max().item() for name in shipped}
    worst = max(differences, key=differences.get)
    assert differences[worst] <= TOLERANCE, (worst, differences[worst])
    # Training moves the weights far more than the bound: it is not vacuous.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(DigitsRecipe().seed)
        initial = DigitsRecipe().make_unet().state_dict()
    assert max((shipped[name] - initial[name]).abs().max().item() for name in shipped) > 1000 * TOLERANCE
