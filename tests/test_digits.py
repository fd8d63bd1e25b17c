"""Tests for the embedded sklearn-digits data and the tiny digits DDPM."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from diffusers_attribution.demo.digits import (
    DigitsRecipe,
    generate_digits,
    load_digits_dataset,
    load_digits_images,
    load_or_train_digits_ddpm,
    train_digits_ddpm,
)

# A fast recipe: same architecture, few steps, small batches.
SMALL = replace(DigitsRecipe(), num_steps=30, batch_size=16, lr_warmup_steps=5, seed=3)


def _state(pipe):
    return {k: v.clone() for k, v in pipe.unet.state_dict().items()}


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_load_all_digits_shape_and_range():
    x = load_digits_images()
    assert x.shape == (1797, 1, 8, 8)
    assert x.dtype == torch.float32
    assert x.min().item() == -1.0 and x.max().item() == 1.0


def test_load_subset_is_seeded_and_labels_match():
    a, la = load_digits_images(n=100, seed=1, return_labels=True)
    b, lb = load_digits_images(n=100, seed=1, return_labels=True)
    c = load_digits_images(n=100, seed=2)
    assert a.shape == (100, 1, 8, 8) and la.shape == (100,)
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert not torch.equal(a, c)
    assert set(la.tolist()) <= set(range(10))


def test_load_digits_dataset():
    pytest.importorskip("datasets")
    ds = load_digits_dataset(n=10)
    assert len(ds) == 10 and set(ds.column_names) == {"image", "label"}
    img = ds[0]["image"]
    assert img.mode == "L" and img.size == (8, 8)
    x = load_digits_images(n=10)
    restored = torch.from_numpy(np.asarray(img, dtype=np.float32)) / 127.5 - 1
    assert torch.allclose(restored, x[0, 0], atol=1 / 127.5)


def test_default_recipe_size():
    n = sum(p.numel() for p in DigitsRecipe().make_unet().parameters())
    assert 150_000 <= n <= 170_000


def test_training_is_deterministic_and_loss_decreases():
    images = load_digits_images(n=256)
    losses_a, losses_b = [], []
    a = train_digits_ddpm(images, SMALL, progress=False, losses=losses_a)
    b = train_digits_ddpm(images, SMALL, progress=False, losses=losses_b)
    _assert_same_weights(_state(a), _state(b))
    assert losses_a == losses_b and len(losses_a) == 30
    first, last = sum(losses_a[:5]) / 5, sum(losses_a[-5:]) / 5
    assert last < first

    c = train_digits_ddpm(images, replace(SMALL, seed=4, num_steps=1), progress=False)
    assert not torch.equal(
        a.unet.conv_in.weight, c.unet.conv_in.weight
    ), "a different seed should give different weights"


def test_load_or_train_caches_and_reloads(tmp_path):
    first = load_or_train_digits_ddpm(tmp_path, SMALL, n_train=64, progress=False)
    entries = [p for p in tmp_path.iterdir()]
    assert len(entries) == 1 and entries[0].name.startswith("digits-ddpm-")
    assert (entries[0] / "model_index.json").exists()

    second = load_or_train_digits_ddpm(tmp_path, SMALL, n_train=64, progress=False)
    _assert_same_weights(_state(first), _state(second))
    direct = train_digits_ddpm(load_digits_images(n=64), SMALL, progress=False)
    _assert_same_weights(_state(first), _state(direct))
    assert len(list(tmp_path.iterdir())) == 1  # no leftover temp dirs

    s = generate_digits(second, n=4, seed=0, num_inference_steps=5)
    assert s.shape == (4, 1, 8, 8)
    assert s.min() >= -1 and s.max() <= 1
    assert torch.equal(s, generate_digits(second, n=4, seed=0, num_inference_steps=5))
