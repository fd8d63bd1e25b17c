"""The core path checked against independent computations: autograd per (example, timestep), closed-form
kernel scores, seeded determinism, JL inner products, and clear errors on bad input."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from diffusers_attribution import (
    AttributionConfig,
    FeatureStore,
    InvalidImageError,
    StoreMismatchError,
    UnsupportedPipelineError,
    enable_attribution,
)
from diffusers_attribution.methods.base import get_method
from diffusers_attribution.seeding import seeded_randn
from tiny_pipelines import tiny_ddpm_pipeline

K = 3


def exact_config(**kwargs):
    base = dict(method="d-trak", num_timesteps=K, projector="identity", batch_size=4)
    return AttributionConfig(**{**base, **kwargs})


def reference_gradient(pipe, image, config, key=None, timesteps=None):
    """g(z) = (1/(K·D)) Σ_t Σ_d ∇θ f(z, t, ε_{t,d}), written out by hand: one autograd call per (timestep, draw).

    Timesteps: the uniform grid of config.num_timesteps (or `timesteps`); D = config.noise_draws (None = 1);
    ε_{t,0} is seeded by (seed, "noise", [key,] t) and ε_{t,d>0} by (seed, "noise", [key,] t, d)."""
    unet = pipe.unet
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    abar = scheduler.alphas_cumprod
    params = [p for n, p in unet.named_parameters()]
    total = [torch.zeros_like(p) for p in params]
    T = scheduler.config.num_train_timesteps
    if timesteps is None:
        timesteps = [k * (T // config.num_timesteps) for k in range(config.num_timesteps)]
    draws = config.noise_draws or 1
    for t, d in [(int(t), d) for t in timesteps for d in range(draws)]:
        seed_parts = (t,) if d == 0 else (t, d)
        if config.noise_mode == "shared":
            eps = seeded_randn(image.shape, config.noise_seed, "noise", *seed_parts)
        else:
            eps = seeded_randn(image.shape, config.noise_seed, "noise", key, *seed_parts)
        x0 = image[None]
        x_t = abar[t].sqrt() * x0 + (1 - abar[t]).sqrt() * eps[None]
        pred = unet(x_t, torch.tensor([t])).sample
        prediction_type = scheduler.config.prediction_type
        if prediction_type == "epsilon":
            target = eps[None]
        elif prediction_type == "v_prediction":
            target = abar[t].sqrt() * eps[None] - (1 - abar[t]).sqrt() * x0
        else:
            target = x0
        if config.output == "loss":
            f = ((pred - target) ** 2).mean()
        elif config.output == "squared-norm":
            f = (pred**2).mean()
        elif config.output == "l2-norm":
            f = (pred**2).sum().sqrt()
        elif config.output == "weighted-mse":
            b = scheduler.betas[t]
            f = ((pred - target) ** 2).mean() * b / (2 * (1 - b) * (1 - abar[t]))
        else:
            raise AssertionError(config.output)
        for acc, g in zip(total, torch.autograd.grad(f, params)):
            acc += g / (len(timesteps) * draws)
    return torch.cat([g.flatten() for g in total])


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(1)
    return torch.rand(7, 1, 8, 8) * 2 - 1


@pytest.mark.parametrize(
    "prediction_type,output,noise_mode",
    [
        ("epsilon", "squared-norm", "shared"),
        ("epsilon", "loss", "per-example"),
        ("v_prediction", "loss", "shared"),
        ("sample", "loss", "shared"),
        ("epsilon", "weighted-mse", "shared"),
        ("v_prediction", "l2-norm", "per-example"),
    ],
)
def test_features_equal_hand_written_autograd(images, prediction_type, output, noise_mode):
    pipe = enable_attribution(tiny_ddpm_pipeline(prediction_type=prediction_type))
    config = exact_config(output=output, noise_mode=noise_mode)
    store = pipe.featurize(images[:3], config, progress=False)
    for i in range(3):
        expected = reference_gradient(pipe, images[i], config, key=i)
        torch.testing.assert_close(store.features[i], expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("noise_mode", ["shared", "per-example"])
def test_noise_draws_average_hand_written_gradients(images, noise_mode):
    """K = 2 timesteps × D = 2 draws: the mean of 4 autograd gradients per example; D = 1 is the single-draw path."""
    pipe = enable_attribution(tiny_ddpm_pipeline())
    config = exact_config(num_timesteps=2, noise_draws=2, noise_mode=noise_mode, output="loss")
    store = pipe.featurize(images[:3], config, progress=False)
    for i in range(3):
        torch.testing.assert_close(store.features[i], reference_gradient(pipe, images[i], config, key=i),
                                   rtol=1e-4, atol=1e-6)
    # Chunks of (timestep, draw) columns that do not divide K·D = 4 add up to the same features.
    chunked = pipe.featurize(images[:3], exact_config(**{**config.to_dict(), "timestep_chunk_size": 3}), progress=False)
    torch.testing.assert_close(chunked.features, store.features, rtol=1e-5, atol=1e-7)
    # Queries get the same draws as training examples (one task for both).
    from diffusers_attribution.featurize import Featurizer

    torch.testing.assert_close(Featurizer(pipe, config).featurize_queries(images[:1])[0],
                               reference_gradient(pipe, images[0], config, key="query:0"), rtol=1e-4, atol=1e-6)
    one, unset = exact_config(num_timesteps=2, noise_draws=1), exact_config(num_timesteps=2)
    assert one.feature_hash() == unset.feature_hash() != config.feature_hash()
    assert torch.equal(pipe.featurize(images[:3], one, progress=False).features,
                       pipe.featurize(images[:3], unset, progress=False).features)


def test_noise_draws_factored_and_tracin(images):
    """The factored hooks see K·D rows per example; TracIn averages its training gradient over the draws."""
    from diffusers_attribution.featurize import Featurizer
    from diffusers_attribution.gradients.timesteps import timestep_features

    pipe = enable_attribution(tiny_ddpm_pipeline())
    config = AttributionConfig(method="d-trak", num_timesteps=2, noise_draws=3, projection_dim=256, batch_size=4)
    store = pipe.featurize(images, config, progress=False)
    featurizer = Featurizer(pipe, config, projection_state=store.projection_state)  # the calibrated bases
    keys = list(range(len(images)))
    inputs = featurizer.adapter.encode(images, [None] * len(images), keys, config.noise_seed)
    # An independent route: every (example, t, d) row projected on its own, then averaged.
    rows = timestep_features(featurizer, inputs, keys, featurizer.task.timesteps(keys), draws=3).features
    torch.testing.assert_close(store.features, rows, rtol=1e-4, atol=1e-6)
    single = pipe.featurize(images, AttributionConfig(**{**config.to_dict(), "noise_draws": None}), progress=False)
    assert not torch.allclose(single.features, store.features)

    tracin = exact_config(method="tracin", num_timesteps=1, noise_draws=2, output="loss", parameters=["conv_out.*"])
    features = pipe.featurize(images[:2], tracin, progress=False).features
    t = Featurizer(pipe, tracin).task.timesteps([0, 1])
    columns = [i for i, (n, _) in enumerate(pipe.unet.named_parameters()) if n.startswith("conv_out.")]
    sizes = [p.numel() for p in pipe.unet.parameters()]
    keep = torch.cat([torch.arange(sum(sizes[:i]), sum(sizes[: i + 1])) for i in columns])
    for i in range(2):
        expected = reference_gradient(pipe, images[i], tracin, key=i, timesteps=t[i].tolist())[keep]
        torch.testing.assert_close(features[i], expected, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="noise_draws"):
        AttributionConfig(method="pixel-cosine", noise_draws=2)
    with pytest.raises(ValueError, match="noise_draws"):
        exact_config(noise_draws=0)


def test_identity_scores_equal_closed_form(images):
    pipe = enable_attribution(tiny_ddpm_pipeline())
    # A small parameter set keeps the primal (p × p) solve cheap; the library itself uses the dual form here.
    config = exact_config(method="trak", damping=0.05, parameters=["conv_out.*"])
    store = pipe.featurize(images, config, progress=False)
    queries = images[:2] * 0.5
    result = pipe.attribute(queries, store)
    selected = [i for i, (n, _) in enumerate(pipe.unet.named_parameters()) if n.startswith("conv_out.")]
    sizes = [p.numel() for p in pipe.unet.parameters()]
    columns = np.concatenate([np.arange(sum(sizes[:i]), sum(sizes[: i + 1])) for i in selected])
    G = np.stack([reference_gradient(pipe, x, config).numpy()[columns] for x in images]).astype(np.float64)
    Q = np.stack([reference_gradient(pipe, x, config).numpy()[columns] for x in queries]).astype(np.float64)
    expected = Q @ np.linalg.solve(G.T @ G + 0.05 * np.eye(G.shape[1]), G.T)
    np.testing.assert_allclose(result.scores.numpy(), expected, rtol=2e-3, atol=1e-6 * np.abs(expected).max())
    assert result.scores.dtype == torch.float32 and result.scores.shape == (2, len(images))
    # The default λ is a fixed fraction (the method's default ratio) of the mean non-zero eigenvalue of the kernel,
    # computed here independently.
    default_config = exact_config(method="trak", parameters=["conv_out.*"])
    assert default_config.damping_ratio == get_method("trak").defaults["damping_ratio"]
    default = pipe.attribute(queries, pipe.featurize(images, default_config, progress=False))
    eigenvalues = np.linalg.eigvalsh(G @ G.T)
    expected_damping = default_config.damping_ratio * eigenvalues.sum() / len(images)
    assert default.metadata["damping"] == pytest.approx(expected_damping, rel=1e-4)
    # A query config's ratio overrides the store's (λ changes scores, never features).
    override = pipe.attribute(queries, pipe.featurize(images, default_config, progress=False),
                              config=exact_config(method="trak", parameters=["conv_out.*"], damping_ratio=0.5))
    assert override.metadata["damping"] == pytest.approx(0.5 * eigenvalues.sum() / len(images), rel=1e-4)


def test_primal_and_dual_forms_agree():
    torch.manual_seed(0)
    from diffusers_attribution.scoring import KernelScorer

    train, query = torch.randn(40, 12), torch.randn(3, 12)
    primal = KernelScorer(train, damping=0.3)  # N > k
    dual = KernelScorer(train[:, :12].repeat(1, 4)[:, :48], damping=0.3)  # N < k
    assert not primal.dual and dual.dual
    phi = train.double()
    expected = query.double() @ torch.linalg.solve(phi.T @ phi + 0.3 * torch.eye(12, dtype=torch.float64), phi.T)
    torch.testing.assert_close(primal.scores(query), expected.float(), rtol=1e-4, atol=1e-5)
    wide, q_wide = train.repeat(1, 4), query.repeat(1, 4)
    expected = q_wide.double() @ wide.double().T @ torch.linalg.inv(
        wide.double() @ wide.double().T + 0.3 * torch.eye(40, dtype=torch.float64)
    )
    torch.testing.assert_close(KernelScorer(wide, damping=0.3).scores(q_wide), expected.float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("projector", ["gaussian", "rademacher"])
def test_random_projection_preserves_inner_products(images, projector):
    pipe = enable_attribution(tiny_ddpm_pipeline())
    exact = pipe.featurize(images, exact_config(), progress=False).features.double()
    k = 4096
    projected = pipe.featurize(images, exact_config(projector=projector, projection_dim=k), progress=False)
    P = projected.features.double()
    norms = exact.norm(dim=1)
    # JL: |<Pu, Pv> - <u, v>| ≲ c ‖u‖‖v‖ / sqrt(k); 6/sqrt(k) ≈ 0.094 bounds every pair with margin.
    error = (P @ P.T - exact @ exact.T).abs() / (norms[:, None] * norms[None, :])
    assert error.max() < 6 / math.sqrt(k)
    assert error.max() > 0  # a real random projection, not the identity


def test_features_reproducible_and_independent_of_batch_size(images):
    pipe = enable_attribution(tiny_ddpm_pipeline())
    config = exact_config(projector="gaussian", projection_dim=64, noise_mode="per-example")
    a = pipe.featurize(images, config, progress=False).features
    b = pipe.featurize(images, AttributionConfig(**{**config.to_dict(), "batch_size": 3}), progress=False).features
    c = pipe.featurize(images[[4, 5, 6]], config, progress=False).features  # other positions → other keys
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(a[4:], c)  # per-example noise depends on the example id
    other_seed = pipe.featurize(images, AttributionConfig(**{**config.to_dict(), "projection_seed": 1}), progress=False)
    assert not torch.allclose(a, other_seed.features)


def test_random_timesteps_are_seeded_per_example(images):
    pipe = enable_attribution(tiny_ddpm_pipeline())
    from diffusers_attribution.featurize import Featurizer

    task = Featurizer(pipe, exact_config(timestep_schedule="random", num_timesteps=20)).task
    t = task.timesteps([0, 1, 0])
    assert t.shape == (3, 20) and torch.equal(t[0], t[2]) and not torch.equal(t[0], t[1])
    assert int(t.min()) >= 0 and int(t.max()) < 1000
    uniform = Featurizer(pipe, exact_config(num_timesteps=10)).task.timesteps([0])
    assert uniform[0].tolist() == list(range(0, 1000, 100))
    # timestep_fraction f: the grid and the random draws lie in [0, ⌊f·T⌋), and fresh query samples too
    low = Featurizer(pipe, exact_config(num_timesteps=10, timestep_fraction=0.3)).task
    assert low.timesteps([0])[0].tolist() == list(range(0, 300, 30))
    drawn = Featurizer(pipe, exact_config(timestep_schedule="random", num_timesteps=50, timestep_fraction=0.2)).task
    assert int(drawn.timesteps([0, 1]).max()) < 200
    sampled = Featurizer(pipe, exact_config(num_timesteps=10, timestep_fraction=0.3, query_samples=40)).query_samples()
    fresh = sampled.timesteps(["a", "b"])[:, 10:]
    assert int(fresh.max()) < 300 and len(set(fresh[0].tolist())) > 20
    for bad in (0, 1.5, -0.1, True, "0.3"):
        with pytest.raises(ValueError, match="timestep_fraction"):
            exact_config(timestep_fraction=bad)
    # 1 is the whole range: the hash of a config without the field (stores written before it)
    assert exact_config(timestep_fraction=1).feature_hash() == exact_config().feature_hash()
    assert exact_config(timestep_fraction=0.3).feature_hash() != exact_config().feature_hash()


def test_enable_attribution_keeps_the_stock_class(tmp_path):
    from diffusers import DDPMPipeline

    pipe = tiny_ddpm_pipeline()
    stock = type(pipe)
    assert enable_attribution(pipe) is pipe
    assert type(pipe).__name__ == stock.__name__ and isinstance(pipe, stock)
    pipe.save_pretrained(tmp_path)
    reloaded = DDPMPipeline.from_pretrained(tmp_path)
    assert type(reloaded) is DDPMPipeline
    torch.testing.assert_close(reloaded.unet.conv_in.weight, pipe.unet.conv_in.weight)


def test_mixin_as_a_base_class(images):
    from diffusers import DDPMPipeline

    from diffusers_attribution import AttributionMixin

    class MyPipeline(DDPMPipeline, AttributionMixin):
        pass

    source = tiny_ddpm_pipeline()
    pipe = MyPipeline(unet=source.unet, scheduler=source.scheduler)
    result = pipe.attribute(images[:2], images, exact_config())
    assert result.scores.shape == (2, len(images))
    assert result.topk(3).indices.shape == (2, 3)


def test_store_round_trip_and_mismatch(tmp_path, images):
    pipe = enable_attribution(tiny_ddpm_pipeline())
    config = exact_config(projector="gaussian", projection_dim=32)
    store = pipe.featurize(images, config, progress=False)
    store.save_pretrained(tmp_path / "store")
    loaded = FeatureStore.from_pretrained(tmp_path / "store")
    torch.testing.assert_close(loaded.features, store.features)
    assert loaded.config == store.config and loaded.metadata["example_hashes"] == store.metadata["example_hashes"]
    a = pipe.attribute(images[:2], loaded).scores
    torch.testing.assert_close(a, pipe.attribute(images[:2], str(tmp_path / "store")).scores)
    other = enable_attribution(tiny_ddpm_pipeline(seed=1))
    with pytest.raises(StoreMismatchError, match="model_fingerprint"):
        other.attribute(images[:2], loaded)
    # λ changes scores, not features: a query config may override the store's damping.
    damped = pipe.attribute(images[:2], loaded, AttributionConfig(**{**config.to_dict(), "damping": 0.5}))
    assert damped.metadata["damping"] == 0.5 and not torch.allclose(damped.scores, a)
    with pytest.raises(StoreMismatchError, match="num_timesteps"):
        pipe.attribute(images[:2], loaded, exact_config(projector="gaussian", projection_dim=32, num_timesteps=5))


def test_bad_input_gives_clear_errors(images):
    pipe = enable_attribution(tiny_ddpm_pipeline())
    config = exact_config()
    with pytest.raises(InvalidImageError, match=r"expects \(1, 8, 8\)"):
        pipe.featurize(torch.zeros(3, 3, 8, 8), config, progress=False)
    with pytest.raises(InvalidImageError, match=r"expects \(1, 8, 8\)"):
        pipe.attribute(torch.zeros(1, 1, 16, 16), images, config)
    with pytest.raises(ValueError, match="empty"):
        pipe.featurize(torch.zeros(0, 1, 8, 8), config, progress=False)
    nan = images.clone()
    nan[2, 0, 3, 3] = float("nan")
    with pytest.raises(InvalidImageError, match="training example 2: .*NaN"):
        pipe.featurize(nan, config, progress=False)
    with pytest.raises(InvalidImageError, match=r"\[-1, 1\]"):
        pipe.attribute(images[:1] * 3, images, config)
    with pytest.raises(ValueError, match="not one of"):
        AttributionConfig(method="nope")
    with pytest.raises(ValueError, match="no LoRA weights"):
        pipe.featurize(images, exact_config(parameters="lora"), progress=False)


def test_unsupported_pipeline_names_what_is_missing():
    from diffusers import DiffusionPipeline

    class TextOnly(DiffusionPipeline):
        def __init__(self, scheduler):
            super().__init__()
            self.register_modules(scheduler=scheduler)

    with pytest.raises(UnsupportedPipelineError, match="TextOnly.*components.*scheduler"):
        enable_attribution(TextOnly(DDPMScheduler()))
    with pytest.raises(UnsupportedPipelineError, match="not a diffusers pipeline"):
        enable_attribution(object())


def test_image_inputs_pil_numpy_and_datasets(images):
    import PIL.Image

    pipe = enable_attribution(tiny_ddpm_pipeline())
    config = exact_config(projector="gaussian", projection_dim=16)
    uint8 = ((images[:, 0].numpy() + 1) * 127.5).round().astype(np.uint8)
    pil = [PIL.Image.fromarray(a, mode="L") for a in uint8]
    from_tensor = pipe.featurize(torch.from_numpy(uint8[:, None] / 127.5 - 1).float(), config, progress=False)
    from_pil = pipe.featurize(pil, config, progress=False)
    torch.testing.assert_close(from_pil.features, from_tensor.features, rtol=1e-4, atol=1e-6)
    from_numpy = pipe.attribute([a for a in uint8[:2]], from_pil)
    torch.testing.assert_close(from_numpy.scores, pipe.attribute(pil[:2], from_pil).scores)
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"image": pil, "label": list(range(len(pil)))})
    from_ds = pipe.featurize(ds, config, progress=False)
    torch.testing.assert_close(from_ds.features, from_pil.features)
    grid = from_numpy.to_image_grid(ds, k=3)
    assert grid.size[0] > grid.size[1] > 0


def test_gradients_only_for_nests_and_restores_the_model_exactly():
    """Nested in one for the same parameters it changes nothing; for other parameters it switches and restores
    the outer block's state; on exit the flags and train/eval modes are what they were before."""
    from diffusers_attribution.gradients.task import gradients_only_for

    unet = tiny_ddpm_pipeline().unet.train()
    unet.conv_in.weight.requires_grad_(False)
    before = ({n: p.requires_grad for n, p in unet.named_parameters()}, {n: m.training for n, m in unet.named_modules()})
    first = {"conv_out.weight": unet.conv_out.weight}
    second = {"conv_in.weight": unet.conv_in.weight}
    flags = lambda: {n for n, p in unet.named_parameters() if p.requires_grad}
    with gradients_only_for(unet, first):
        assert flags() == {"conv_out.weight"} and not unet.training
        with gradients_only_for(unet, first):
            assert flags() == {"conv_out.weight"}
        assert flags() == {"conv_out.weight"}
        with gradients_only_for(unet, second):
            assert flags() == {"conv_in.weight"}
            with gradients_only_for(unet, second):
                assert flags() == {"conv_in.weight"}
        assert flags() == {"conv_out.weight"} and not unet.training
    assert ({n: p.requires_grad for n, p in unet.named_parameters()}, {n: m.training for n, m in unet.named_modules()}) == before
