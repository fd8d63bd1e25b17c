"""TracIn, ReTrac, Journey-TRAK, ensembles, similarity baselines and the timestep-bias diagnostics, each checked
against an independent computation: autograd gradients written out here, the sampler re-run by hand, and
hand-built score matrices."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler

from diffusers_attribution import AttributionConfig, StoreMismatchError, enable_attribution
from diffusers_attribution.evaluation.bias import generally_influential, timestep_gradient_norms
from diffusers_attribution.methods import (
    ensemble_attribute,
    featurize_ensemble,
    retrac_scores,
    similarity_scores,
    tracin_scores,
)
from diffusers_attribution.seeding import seed_from, seeded_randn
from diffusers_attribution.store.errors import UntrustedReferenceError
from tiny_pipelines import tiny_ddpm_pipeline

T = 1000



@pytest.fixture(scope="module")
def images():
    torch.manual_seed(1)
    return torch.rand(5, 1, 8, 8) * 2 - 1


def gradient(unet, x0, t, eps, scheduler=DDPMScheduler()):
    """∇θ of the training loss mean((ε_θ(x_t, t) - ε)²) at one (t, ε), all parameters concatenated."""
    abar = scheduler.alphas_cumprod[t]
    x_t = abar.sqrt() * x0[None] + (1 - abar).sqrt() * eps[None]
    loss = ((unet(x_t, torch.tensor([t])).sample - eps[None]) ** 2).mean()
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(unet.parameters()))]).double()


def noise(t, draw, key=None):
    """The documented noise of draw d at timestep t (shared mode when key is None)."""
    parts = (0, "noise") + ((key,) if key is not None else ()) + (t,) + ((draw,) if draw else ())
    return seeded_randn((1, 8, 8), *parts)


def train_timestep(i):
    """TracIn's training timestep of example i: the core task's random schedule, K = 1."""
    return int(torch.randint(0, T, (1,), generator=torch.Generator().manual_seed(seed_from(0, "timesteps", i))))


def tracin_reference(unet, train, queries, grid, draws, normalize):
    """(G [N, p], Q [n, p]) of TracIn (ReTrac with `normalize`), by hand."""
    unit = (lambda g: g / g.norm()) if normalize else (lambda g: g)
    timesteps = [train_timestep(i) for i in range(len(train))]
    G = torch.stack([unit(gradient(unet, x, t, noise(t, 0))) for x, t in zip(train, timesteps)])
    Q = torch.stack([
        torch.stack([unit(gradient(unet, q, t, noise(t, d))) for t in grid for d in range(draws)]).mean(0)
        for q in queries
    ])
    return G, Q


def small(**kwargs):
    return AttributionConfig(**{"projector": "identity", "query_timesteps": 3, "query_noise_draws": 2, "batch_size": 8,
                                **kwargs})


# ------------------------------------------------------------------------------------------------ TracIn


def test_tracin_is_the_checkpoint_sum_of_gradient_dot_products(images, tmp_path):
    pipe = enable_attribution(tiny_ddpm_pipeline())
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    unet_a, unet_b = tiny_ddpm_pipeline(seed=1).unet, tiny_ddpm_pipeline(seed=2).unet
    unet_a.save_pretrained(tmp_path / "ckpt-a")
    from safetensors.torch import save_file

    save_file(unet_b.state_dict(), str(tmp_path / "ckpt-b.safetensors"))
    rates = [0.3, 0.7]
    train, queries = images[:4], images[3:] * 0.5
    grid = [0, 333, 666]
    expected = sum(
        rate * (Q @ G.T)
        for rate, (G, Q) in zip(rates, [tracin_reference(u, train, queries, grid, 2, False) for u in (unet_a, unet_b)])
    )
    # The API with one checkpoint in memory and one on disk …
    result = tracin_scores(pipe, train, queries, checkpoints=[str(tmp_path / "ckpt-a"), unet_b.state_dict()],
                           learning_rates=rates, config=small(method="tracin"), progress=False)
    torch.testing.assert_close(result.scores.double(), expected, rtol=1e-4, atol=1e-6 * expected.abs().max())
    assert result.config.checkpoints[1] == {"state_dict": result.config.checkpoints[1]["state_dict"]}
    # … and the mixin with both as paths in the config, through a saved store.
    config = small(method="tracin", checkpoints=[str(tmp_path / "ckpt-a"), str(tmp_path / "ckpt-b.safetensors")],
                   learning_rates=rates)
    store = pipe.featurize(train, config, progress=False)
    assert store.features.shape == (4, 2 * sum(p.numel() for p in pipe.unet.parameters()))
    store.save_pretrained(tmp_path / "store")
    with pytest.raises(UntrustedReferenceError, match="names checkpoints"):  # a loaded store's paths: opt in
        pipe.attribute(queries, str(tmp_path / "store"))
    again = pipe.attribute(queries, str(tmp_path / "store"), trust_remote_references=True)
    torch.testing.assert_close(again.scores.double(), expected, rtol=1e-4, atol=1e-6 * expected.abs().max())
    assert again.metadata["learning_rates"] == rates
    for name, value in pipe.unet.state_dict().items():  # the pipeline's own weights are back
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)
    with pytest.raises(StoreMismatchError, match="checkpoints"):  # another checkpoint list: another store
        pipe.attribute(queries, store, small(method="tracin", checkpoints=[str(tmp_path / "ckpt-a")]))
    with pytest.raises(StoreMismatchError, match="learning_rates"):  # refused, not silently scored with the store's
        pipe.attribute(queries, store, small(method="tracin", checkpoints=config.checkpoints, learning_rates=[1, 1]))
    # the query grid is query-side: a query config sets it against the store (its features are the same)
    coarse = [0, 500]
    expected = sum(rate * (Q @ G.T) for rate, (G, Q) in zip(
        rates, [tracin_reference(u, train, queries, coarse, 2, False) for u in (unet_a, unet_b)]))
    other = small(method="tracin", checkpoints=config.checkpoints, learning_rates=rates, query_timesteps=2)
    assert other.feature_hash() == config.feature_hash()
    rescored = pipe.attribute(queries, store, other, trust_remote_references=True)
    torch.testing.assert_close(rescored.scores.double(), expected, rtol=1e-4, atol=1e-6 * expected.abs().max())


def test_retrac_normalizes_every_per_timestep_gradient(images):
    pipe = enable_attribution(tiny_ddpm_pipeline())
    train, queries = images[:4], images[4:]
    grid = [0, 333, 666]
    G, Q = tracin_reference(pipe.unet, train, queries, grid, 2, normalize=True)
    result = retrac_scores(pipe, train, queries, config=small(method="retrac"), progress=False)
    torch.testing.assert_close(result.scores.double(), Q @ G.T, rtol=1e-4, atol=1e-7)
    # Unnormalized TracIn on the same gradients differs: the normalization is not a global rescaling.
    G_raw, Q_raw = tracin_reference(pipe.unet, train, queries, grid, 2, normalize=False)
    tracin = tracin_scores(pipe, train, queries, config=small(method="tracin"), progress=False).scores.double()
    torch.testing.assert_close(tracin, Q_raw @ G_raw.T, rtol=1e-4, atol=1e-6 * tracin.abs().max())
    assert not torch.allclose(tracin / tracin.norm(), result.scores.double() / result.scores.norm(), rtol=1e-2)
    # In a projected space the normalization is of the projected vector: training features are unit vectors.
    store = pipe.featurize(train, small(method="retrac", projector="gaussian", projection_dim=64), progress=False)
    torch.testing.assert_close(store.features.norm(dim=1), torch.ones(4), rtol=1e-5, atol=1e-5)


def test_tracin_training_features_are_the_core_task_features(images):
    """Draw 0 of a timestep is the core task's noise: K = 1 random timestep gives the core TRAK features."""
    pipe = enable_attribution(tiny_ddpm_pipeline())
    common = dict(projector="gaussian", projection_dim=32, num_timesteps=1, timestep_schedule="random")
    tracin = pipe.featurize(images, AttributionConfig(method="tracin", **common), progress=False).features
    core = pipe.featurize(images, AttributionConfig(method="trak", output="loss", **common), progress=False).features
    torch.testing.assert_close(tracin, core, rtol=1e-4, atol=1e-6)


def test_method_config_defaults_and_errors():
    for method, K in (("trak", 10), ("d-trak", 30)):  # the new fields stay out of their hash
        config = AttributionConfig(method=method)
        assert (config.num_timesteps, config.timestep_schedule) == (K, "uniform")
        assert not {"checkpoints", "learning_rates", "query_timesteps", "encoder"} & set(config.feature_dict())
    tracin = AttributionConfig(method="tracin")
    assert (tracin.num_timesteps, tracin.timestep_schedule, tracin.query_timesteps, tracin.query_noise_draws) == (
        1, "random", 100, 16)
    journey = AttributionConfig(method="journey-trak")
    assert (journey.output, journey.num_timesteps, journey.timestep_schedule) == ("loss", 20, "random")
    restored = AttributionConfig.from_json(AttributionConfig(method="retrac", checkpoints=["a", {"revision": "r"}],
                                                             learning_rates=[1, 2]).to_json())
    assert restored.checkpoints == ["a", {"revision": "r"}] and restored.learning_rates == [1.0, 2.0]
    # the default per setting (docs/benchmarks.md): DAS-Fisher for every parameter, EK-FAC for the LoRA weights, and
    # each method's damping ratio chosen on its setting's benchmark; an explicit method or ratio is kept
    default = AttributionConfig()
    assert (default.method, default.damping_ratio, default.timestep_fraction) == ("das-fisher", 0.0032, 0.3)
    assert AttributionConfig(method="das-fisher", parameters="lora").timestep_fraction is None
    assert {AttributionConfig(method=m).timestep_fraction for m in ("das", "trak", "d-trak", "fisher", "ekfac")} == {None}
    # a store written before the field existed left it out: for DAS-Fisher that meant every timestep (legacy 1.0)
    from diffusers_attribution.store.schema import validate_config

    written = {k: v for k, v in AttributionConfig(method="das-fisher", timestep_fraction=1.0).to_dict().items()
               if k != "timestep_fraction"}
    assert validate_config(written, "old store").timestep_fraction == 1.0
    assert validate_config(AttributionConfig().to_dict(), "new store").timestep_fraction == 0.3
    assert AttributionConfig(method="das").damping_ratio == 0.00056
    lora = AttributionConfig(parameters="lora")
    assert (lora.method, lora.damping_ratio) == ("ekfac", 0.56)
    assert AttributionConfig(parameters=["*lora_B*"]).method == "das-fisher"
    methods = ("das", "das-fisher", "trak", "d-trak", "fisher", "ekfac-empirical")
    assert {m: AttributionConfig(method=m, parameters="lora").damping_ratio for m in methods} \
        == {"das": 32.0, "das-fisher": 3200.0, "trak": 1e4, "d-trak": 180.0, "fisher": 1e4, "ekfac-empirical": 0.32}
    assert AttributionConfig(method="das", parameters="lora", damping_ratio=0.1).damping_ratio == 0.1
    assert AttributionConfig.from_json(lora.to_json()) == lora
    # EK-FAC's (MC) query samples: 3 per training pair on every parameter (following the config's own K and D), the
    # training pairs alone for the LoRA weights; an explicit value wins; every other method: the training pairs
    ekfac = [AttributionConfig(method="ekfac", **kwargs).query_samples
             for kwargs in ({}, {"num_timesteps": 20}, {"noise_draws": 2}, {"parameters": "lora"}, {"query_samples": 10})]
    assert ekfac == [30, 60, 60, None, 10]
    assert AttributionConfig.from_json(AttributionConfig(method="ekfac").to_json()).query_samples == 30
    others = ("das", "das-fisher", "trak", "d-trak", "fisher", "ekfac-empirical")
    assert {m: AttributionConfig(method=m).query_samples for m in others} == dict.fromkeys(others)
    with pytest.raises(ValueError, match="does not apply"):
        AttributionConfig(method="d-trak", query_timesteps=5)
    with pytest.raises(ValueError, match="learning_rates"):
        AttributionConfig(method="tracin", checkpoints=["a", "b"], learning_rates=[1.0])


# ------------------------------------------------------------------------------------------------ Journey


def test_journey_records_x0_and_attributes_each_step(images, tmp_path):
    pipe = enable_attribution(tiny_ddpm_pipeline(scheduler="ddim"))
    config = AttributionConfig(method="journey-trak", projector="identity", num_timesteps=2, query_noise_draws=2)
    store = pipe.featurize(images, config, progress=False)
    result = pipe.attribute_trajectory(3, store, num_inference_steps=4)
    assert result.scores.shape == (4, len(images))

    # The sampler by hand: DDIM (eta = 0), x̂0 = (x_t - sqrt(1 - ᾱ_t) ε̂) / sqrt(ᾱ_t), clipped to [-1, 1].
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(4)
    assert result.timesteps.tolist() == scheduler.timesteps.tolist()
    x = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for s, t in enumerate(scheduler.timesteps):
            eps = pipe.unet(x, t).sample
            abar = scheduler.alphas_cumprod[t]
            x0 = ((x - (1 - abar).sqrt() * eps) / abar.sqrt()).clamp(-1, 1)
            torch.testing.assert_close(result.x0_hats[s : s + 1], x0, rtol=1e-4, atol=1e-5)
            x = scheduler.step(eps, t, x, eta=0.0).prev_sample
    torch.testing.assert_close(result.final_image, (x[0] / 2 + 0.5).clamp(0, 1) * 2 - 1, rtol=1e-4, atol=1e-5)

    # Step 1 by hand: φ = mean over 2 fresh noises of ∇ loss at (x̂0, t), then the kernel against the store.
    unet, s = pipe.unet, 1
    t = int(result.timesteps[s])
    phi = torch.stack([gradient(unet, result.x0_hats[s], t, noise(t, d, key=f"step:{s}")) for d in range(2)]).mean(0)
    G = []
    for i, x0 in enumerate(images):  # Journey's training features: 2 random timesteps per example
        ts = torch.randint(0, T, (2,), generator=torch.Generator().manual_seed(seed_from(0, "timesteps", i))).tolist()
        G.append(torch.stack([gradient(unet, x0, t_i, noise(t_i, 0)) for t_i in ts]).mean(0))
    G = torch.stack(G)
    damping = 0.1 * (G @ G.T).trace() / len(images)
    assert result.metadata["damping"] == pytest.approx(float(damping), rel=1e-4)
    expected = phi @ G.T @ torch.linalg.inv(G @ G.T + damping * torch.eye(len(images), dtype=torch.float64))
    torch.testing.assert_close(result.scores[s].double(), expected, rtol=1e-3, atol=1e-4 * expected.abs().max())

    figure = result.plot(k=3, path=tmp_path / "journey.png", train_dataset=images)
    assert (tmp_path / "journey.png").stat().st_size > 1000 and len(figure.axes) >= 5
    assert len(result.top_examples(3)) == 3


# ------------------------------------------------------------------------------------------------ ensembles


def test_ensemble_is_the_mean_of_member_scores(images):
    config = AttributionConfig(method="trak", projector="gaussian", projection_dim=48, num_timesteps=2)
    pipes = [enable_attribution(tiny_ddpm_pipeline(seed=s)) for s in (0, 1)]
    stores = [p.featurize(images, config, progress=False) for p in pipes]
    queries = images[:2] * 0.5
    members = [p.attribute(queries, s).scores for p, s in zip(pipes, stores)]
    result = ensemble_attribute(list(zip(pipes, stores)), queries)
    torch.testing.assert_close(result.scores, (members[0] + members[1]) / 2)
    torch.testing.assert_close(result.metadata["member_scores"], torch.stack(members))

    # Checkpoints loaded in turn into one pipeline: the same stores, and the same ensemble.
    pipe = pipes[0]
    checkpoints = [pipes[0].unet.state_dict(), {k: v.clone() for k, v in pipes[1].unet.state_dict().items()}]
    pipe_copy = enable_attribution(tiny_ddpm_pipeline(seed=0))
    by_checkpoint = featurize_ensemble(pipe_copy, images, config, checkpoints=checkpoints, progress=False)
    torch.testing.assert_close(by_checkpoint[1].features, stores[1].features)
    again = ensemble_attribute([(pipe_copy, s) for s in by_checkpoint], queries, checkpoints=checkpoints)
    torch.testing.assert_close(again.scores, result.scores)

    # A list of stores of one model (here: two projection seeds) through `pipe.attribute`.
    other_seed = pipe.featurize(images, AttributionConfig(**{**config.to_dict(), "projection_seed": 1}), progress=False)
    both = pipe.attribute(queries, [stores[0], other_seed])
    torch.testing.assert_close(both.scores, (members[0] + pipe.attribute(queries, other_seed).scores) / 2)
    with pytest.raises(ValueError, match="different"):
        ensemble_attribute([(pipe, stores[0]), (pipe, pipe.featurize(images[:4], config, progress=False))], queries)


# ------------------------------------------------------------------------------------------------ baselines


def test_pixel_baselines_match_hand_computation(images):
    pipe = enable_attribution(tiny_ddpm_pipeline())
    queries = images[:2] * 0.7
    X, Q = images.flatten(1).double().numpy(), queries.flatten(1).double().numpy()
    dot = pipe.attribute(queries, images, AttributionConfig(method="pixel-dot")).scores.numpy()
    np.testing.assert_allclose(dot, Q @ X.T, rtol=1e-5)
    cosine = similarity_scores(images, queries, "pixel-cosine").scores.numpy()
    expected = (Q / np.linalg.norm(Q, axis=1, keepdims=True)) @ (X / np.linalg.norm(X, axis=1, keepdims=True)).T
    np.testing.assert_allclose(cosine, expected, rtol=1e-5)
    assert cosine.argmax(1).tolist() == [0, 1]  # a scaled copy is its own nearest neighbour


def test_embedding_cosine_with_clip_and_dinov2(images, tmp_path):
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection, Dinov2Config,
                              Dinov2Model)

    torch.manual_seed(0)
    clip = CLIPVisionModelWithProjection(CLIPVisionConfig(
        image_size=16, patch_size=4, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        projection_dim=16)).eval()
    queries = images[:2] * 0.5

    def cosine(a, b):
        a, b = F.normalize(a.double(), dim=1), F.normalize(b.double(), dim=1)
        return (a @ b.T).float()

    def pixels(x, mean, std):  # [-1, 1] gray → [0, 1] RGB, bicubic to 16, normalized
        x = F.interpolate(((x + 1) / 2).repeat(1, 3, 1, 1), size=(16, 16), mode="bicubic", antialias=True).clamp(0, 1)
        return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]

    clip_stats = ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711])
    with torch.no_grad():
        embed = lambda x: clip(pixel_values=pixels(x, *clip_stats)).image_embeds  # noqa: E731
        expected = cosine(embed(queries), embed(images))
    result = similarity_scores(images, queries, "embedding-cosine", encoder=clip)
    torch.testing.assert_close(result.scores, expected, rtol=1e-4, atol=1e-5)

    # Through the mixin with config.encoder a saved model directory; and with the encoder's own processor.
    clip.save_pretrained(tmp_path / "clip")
    pipe = enable_attribution(tiny_ddpm_pipeline())
    config = AttributionConfig(method="embedding-cosine", encoder=str(tmp_path / "clip"))
    torch.testing.assert_close(pipe.attribute(queries, images, config).scores, expected, rtol=1e-4, atol=1e-5)
    processor = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    with torch.no_grad():
        rgb = lambda x: list(((x + 1) / 2).repeat(1, 3, 1, 1))  # noqa: E731
        embed = lambda x: clip(**processor(images=rgb(x), do_rescale=False, return_tensors="pt")).image_embeds  # noqa
        expected_processor = cosine(embed(queries), embed(images))
    torch.testing.assert_close(similarity_scores(images, queries, "embedding-cosine", encoder=clip,
                                                 processor=processor).scores, expected_processor, rtol=1e-4, atol=1e-5)

    dino = Dinov2Model(Dinov2Config(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=1,
                                    num_attention_heads=4, mlp_ratio=2)).eval()
    with torch.no_grad():
        imagenet = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
        embed = lambda x: dino(pixel_values=pixels(x, *imagenet)).pooler_output  # noqa: E731
        expected = cosine(embed(queries), embed(images))
    torch.testing.assert_close(similarity_scores(images, queries, "embedding-cosine", encoder=dino).scores, expected,
                               rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="image encoder"):
        pipe.attribute(queries, images, AttributionConfig(method="embedding-cosine"))


# ------------------------------------------------------------------------------------------------ diagnostics


def test_generally_influential_on_a_hand_built_score_matrix():
    scores = torch.tensor([
        # example: 0    1    2    3    4    5
        [0.9, 0.1, 0.2, 0.0, 0.3, 1.0],  # top-2: 5, 0
        [0.8, 0.7, 0.1, 0.0, 0.2, 0.9],  # top-2: 5, 0
        [0.1, 0.2, 0.8, 0.0, 0.3, 0.9],  # top-2: 5, 2
        [0.9, 0.1, 0.0, 0.2, 0.3, 1.5],  # top-2: 5, 0
    ])
    half = generally_influential(scores, k=2, share=0.5)
    torch.testing.assert_close(half.frequency, torch.tensor([0.75, 0, 0.25, 0, 0, 1.0]))
    assert half.count == 2 and half.indices.tolist() == [5, 0]
    strict = generally_influential(scores, k=2, share=0.75)  # "more than" a share: 0.75 is not more than 0.75
    assert strict.indices.tolist() == [5]
    assert generally_influential(scores, k=1, share=0.0).indices.tolist() == [5]


def test_gradient_norm_profile_equals_autograd_norms(images, tmp_path):
    pipe = enable_attribution(tiny_ddpm_pipeline())
    config = AttributionConfig(method="tracin", projector="identity", batch_size=8)
    profile = timestep_gradient_norms(pipe, images[:2], config, timesteps=[0, 500, 999], draws=2, progress=False)
    assert profile.norms.shape == (2, 3, 2)
    for i in range(2):
        for k, t in enumerate([0, 500, 999]):
            for d in range(2):
                expected = gradient(pipe.unet, images[i], t, noise(t, d)).norm()
                assert float(profile.norms[i, k, d]) == pytest.approx(float(expected), rel=1e-4)
    torch.testing.assert_close(profile.mean(), profile.norms.mean(dim=(0, 2)))
    profile.plot(path=tmp_path / "profile.png")
    assert (tmp_path / "profile.png").stat().st_size > 1000
    assert math.isfinite(profile.summary()["max_over_min"])


def test_journey_on_a_flow_matching_pipeline_derives_x0_from_the_velocity():
    """SD3 (rectified flow): x̂0 = x_σ - σ v̂. Euler's last step lands on σ = 0, x = x - σ v̂: the final latents
    equal the last step's x̂0, so the decoded final image equals the last query image."""
    from tiny_pipelines import tiny_sd3_pipeline

    pipe = enable_attribution(tiny_sd3_pipeline())
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    config = AttributionConfig(method="journey-trak", projector="identity", num_timesteps=2, query_noise_draws=1,
                               parameters=["*proj_out*"])
    store = pipe.featurize(images, config, progress=False)
    result = pipe.attribute_trajectory("a cat", store, num_inference_steps=3, progress=False)
    assert result.scores.shape == (3, 3) and torch.isfinite(result.scores).all()
    steps = result.timesteps.tolist()
    assert steps == sorted(steps, reverse=True) and all(0 <= t < 1000 for t in steps)
    torch.testing.assert_close(result.query_images[-1], result.final_image, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(result.query_images[0], result.final_image, atol=1e-2)
