"""Query samples (`query_samples`, `query_noise`; gradients/queries.py): each query's gradient averaged over its own
(t, ε) samples, a pure function of (noise_seed, the query's content hash, s)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler

from diffusers_attribution import AttributionConfig, enable_attribution
from diffusers_attribution.api import make_featurizer, make_scorer
from diffusers_attribution.data import content_hash
from diffusers_attribution.gradients.queries import QuerySamples
from diffusers_attribution.seeding import seed_from, seeded_randn
from tiny_pipelines import tiny_ddpm_pipeline

T = 1000


@pytest.fixture(scope="module")
def pipe():
    return enable_attribution(tiny_ddpm_pipeline())


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(1)
    return torch.rand(5, 1, 8, 8) * 2 - 1


def config(method="d-trak", **kwargs):
    return AttributionConfig(**{"method": method, "projector": "identity", "num_timesteps": 3, "batch_size": 4,
                                **kwargs})


def queries(pipe, cfg, images):
    return make_featurizer(pipe, cfg).featurize_queries(images)


def sample_gradient(unet, x0, t, eps, output):
    """∇θ f at one (t, ε) by hand, all parameters concatenated: f = the loss, or the mean output (DAS)."""
    abar = DDPMScheduler().alphas_cumprod[t]
    x_t = abar.sqrt() * x0[None] + (1 - abar).sqrt() * eps[None]
    prediction = unet(x_t, torch.tensor([t])).sample
    f = ((prediction - eps[None]) ** 2).mean() if output == "loss" else prediction.mean()
    return torch.cat([g.flatten() for g in torch.autograd.grad(f, list(unet.parameters()))]).double()


def documented_samples(query: str, count: int, shared: int, K: int):
    """(t_s, ε_s) of the module docstring, written out: the training grid with shared noise for s < shared, then
    the golden-ratio timesteps and the query's own noise."""
    out = []
    offset = seed_from(0, "query-timesteps", query) / 2.0**63
    for s in range(count):
        if s < shared:
            t = s * (T // K)
            out.append((t, seeded_randn((1, 8, 8), 0, "noise", t)))
        else:
            t = int(T * ((offset + s * (math.sqrt(5) - 1) / 2) % 1.0))
            out.append((t, seeded_randn((1, 8, 8), 0, "query-noise", query, s)))
    return out


# ------------------------------------------------------------------------------------------------ the old behaviour


@pytest.mark.parametrize("method", ["d-trak", "das", "fisher"])
def test_query_samples_equal_to_the_training_pairs_give_todays_features_bit_for_bit(pipe, images, method):
    old = queries(pipe, config(method), images)
    new = queries(pipe, config(method, query_samples=3), images)
    assert torch.equal(old, new)


def test_query_settings_leave_the_store_hash_alone_and_a_query_config_overrides_them(pipe, images):
    base = config("d-trak")
    sampled = config("d-trak", query_samples=9, query_noise="fresh")
    assert sampled.feature_hash() == base.feature_hash()
    assert not {"query_samples", "query_noise"} & set(sampled.feature_dict())
    store = pipe.featurize(images, base, progress=False)
    default = pipe.attribute(images[:2], store, progress=False).scores
    scores = pipe.attribute(images[:2], store, sampled, progress=False).scores  # no StoreMismatchError
    assert not torch.allclose(scores, default)
    # the store's kernel scorer with the query features of the sampled config
    torch.testing.assert_close(scores, make_scorer(store).scores(queries(pipe, sampled, images[:2])))
    # the store read back keeps its own query settings unless a config overrides them
    assert store.config.with_query_fields(None) is store.config
    assert store.config.with_query_fields(sampled).query_samples == 9


# ------------------------------------------------------------------------------------------------ the samples


def test_shared_then_fresh_starts_with_the_training_pairs(pipe):
    featurizer = make_featurizer(pipe, config("trak", noise_draws=2, query_samples=10))
    samples = featurizer.query_samples()
    base = featurizer.task
    keys = ["a", "b"]
    t = samples.timesteps(keys)
    assert t.shape == (2, 10)
    assert torch.equal(t[:, :6], base.timesteps(keys).repeat_interleave(2, dim=1))  # column order: k·D + d
    for s in range(6):
        assert torch.equal(samples.noise("a", int(t[0, s]), (1, 8, 8), s), base.noise("a", int(t[0, s]), (1, 8, 8), s % 2))
    fresh = samples.noise("a", int(t[0, 7]), (1, 8, 8), 7)
    assert torch.equal(fresh, seeded_randn((1, 8, 8), 0, "query-noise", "a", 7))
    assert not torch.equal(t[0, 6:], t[1, 6:])  # fresh timesteps are the query's own
    assert int(t.min()) >= 0 and int(t.max()) < T
    # sample s never depends on S, and all-fresh samples are the same sequence from s = 0
    longer = QuerySamples(base, 40).timesteps(keys)
    assert torch.equal(longer[:, :10], t)
    all_fresh = QuerySamples(base, 40, "fresh").timesteps(keys)
    assert torch.equal(all_fresh[:, 6:], longer[:, 6:])
    # a golden-ratio prefix covers [0, T) evenly: every tenth of it holds 3 or 4 of 34 samples
    counts = torch.bincount(all_fresh[0, :34] // 100, minlength=10)
    assert int(counts.min()) >= 3 and int(counts.max()) <= 4


@pytest.mark.parametrize("method,noise,output", [("trak", None, "loss"), ("trak", "fresh", "loss"),
                                                 ("das", None, "mean")])
def test_a_query_feature_is_the_mean_of_its_per_sample_autograd_gradients(pipe, images, method, noise, output):
    S, K = 7, 3
    features = queries(pipe, config(method, query_samples=S, query_noise=noise, timestep_chunk_size=2), images[:2])
    shared = 0 if noise == "fresh" else K
    for q in range(2):
        key = content_hash(images[q])
        grads = [sample_gradient(pipe.unet, images[q], t, eps, output)
                 for t, eps in documented_samples(key, S, shared, K)]
        if method == "das":  # unit-normalized per sample before the mean
            grads = [g / g.norm() for g in grads]
        torch.testing.assert_close(features[q].double(), torch.stack(grads).mean(0), rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------------ purity


@pytest.mark.parametrize("method", ["d-trak", "das"])
def test_query_features_do_not_depend_on_batch_size_order_or_company(pipe, images, method):
    cfg = config(method, query_samples=8, projector="gaussian", projection_dim=32)
    alone = queries(pipe, cfg, images[2:3])
    batched = queries(pipe, AttributionConfig(**{**cfg.to_dict(), "batch_size": 2}), images[[4, 0, 2, 1]])
    reordered = queries(pipe, cfg, images.flip(0))
    torch.testing.assert_close(batched[2], alone[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(reordered[2], alone[0], rtol=1e-5, atol=1e-7)
    twice = queries(pipe, cfg, images[[2, 2]])
    torch.testing.assert_close(twice[0], twice[1], rtol=1e-5, atol=1e-7)  # identical queries, identical features


SCRIPT = textwrap.dedent("""
    import sys, torch
    from diffusers_attribution import AttributionConfig, enable_attribution
    from diffusers_attribution.api import make_featurizer
    from tiny_pipelines import tiny_ddpm_pipeline
    torch.manual_seed(1)
    images = torch.rand(5, 1, 8, 8) * 2 - 1
    rows = [int(i) for i in sys.argv[2].split(",")]
    config = AttributionConfig(method="d-trak", projector="gaussian", projection_dim=32, num_timesteps=3,
                               batch_size=int(sys.argv[3]), query_samples=8, query_noise=sys.argv[4])
    torch.save(make_featurizer(enable_attribution(tiny_ddpm_pipeline()), config).featurize_queries(images[rows]),
               sys.argv[1])
""")


def test_query_features_are_the_same_in_two_processes(pipe, images, tmp_path):
    script = tmp_path / "query.py"
    script.write_text(SCRIPT)
    tests = str(Path(__file__).parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tests, str(Path(tests).parent)]), "OMP_NUM_THREADS": "1"}
    runs = [("a.pt", "3", "1"), ("b.pt", "0,3,4", "2")]
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / out), rows, batch, "fresh"], env=env)
             for out, rows, batch in runs]
    assert all(proc.wait(timeout=300) == 0 for proc in procs)
    a, b = torch.load(tmp_path / "a.pt"), torch.load(tmp_path / "b.pt")
    here = queries(pipe, config("d-trak", projector="gaussian", projection_dim=32, query_samples=8,
                                query_noise="fresh"), images[3:4])
    torch.testing.assert_close(a[0], b[1], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(a[0], here[0], rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------------ refused values


@pytest.mark.parametrize("value,match", [(-1, ">= 0"), (-3, ">= 0"), (10**9, "<= 10000"), (2.5, "integer"),
                                         (True, "integer")])
def test_bad_query_samples_are_refused_before_anything_is_allocated(value, match):
    with pytest.raises(ValueError, match=match):
        AttributionConfig(method="das", query_samples=value)


def test_query_sample_settings_are_refused_where_they_do_not_apply():
    with pytest.raises(ValueError, match="K·D = 30"):  # shared-then-fresh needs the training set's pairs first
        AttributionConfig(method="d-trak", query_samples=10)
    assert AttributionConfig(method="d-trak", query_samples=10, query_noise="fresh").query_samples == 10
    for method in ("tracin", "pixel-cosine"):  # TracIn's queries take query_timesteps × query_noise_draws
        with pytest.raises(ValueError, match="does not apply"):
            AttributionConfig(method=method, query_samples=100)
    with pytest.raises(ValueError, match="query_noise"):
        AttributionConfig(method="das", query_noise="sometimes")
    with pytest.raises(ValueError, match="takes no query_noise"):  # 0: the training pairs, no samples of its own
        AttributionConfig(method="ekfac", query_samples=0, query_noise="fresh")


def test_ekfac_and_journey_queries_take_query_samples(pipe, images):
    """EK-FAC's preconditioned queries go through the same path: its default S = 3·K·D is the explicit
    shared-then-fresh S = 3·K·D bit for bit, and differs from the training pairs alone; Journey-TRAK's plain
    queries too (random timesteps keyed by the query's content hash)."""
    common = dict(projector="factored", projection_dim=16, calibration_examples=4)
    ekfac = AttributionConfig(method="ekfac", num_timesteps=2, batch_size=4, **common)
    assert (ekfac.query_samples, ekfac.query_noise) == (6, None)
    store = pipe.featurize(images, ekfac, progress=False)
    default = make_featurizer(pipe, ekfac, store=store).featurize_queries(images[:2])

    def with_samples(samples):
        query = AttributionConfig(method="ekfac", num_timesteps=2, query_samples=samples, query_noise="shared-then-fresh")
        return make_featurizer(pipe, ekfac.with_query_fields(query), store=store).featurize_queries(images[:2])

    assert torch.equal(with_samples(6), default)
    pairs = with_samples(2)
    assert not torch.allclose(pairs, default)
    # query_samples=0: the training pairs keyed by position (a store written before EK-FAC's default records it)
    legacy = make_featurizer(pipe, ekfac.with_query_fields(AttributionConfig(method="ekfac", num_timesteps=2,
                                                                             query_samples=0)), store=store)
    assert legacy.query_samples() is None and torch.equal(legacy.featurize_queries(images[:2]), pairs)
    more = pipe.attribute(images[:2], store, AttributionConfig(**{**ekfac.to_dict(), "query_samples": 6}),
                          progress=False).scores
    assert more.shape == (2, 5) and torch.isfinite(more).all()
    journey = config("journey-trak", num_timesteps=2, query_samples=5)
    features = queries(pipe, journey, images[[0, 1, 0]])
    torch.testing.assert_close(features[0], features[2], rtol=1e-5, atol=1e-7)


def test_a_prompted_latent_query_is_identified_by_its_image_and_prompt():
    """Stable Diffusion: the id (and the VAE latent drawn with it) is the content hash of image and prompt, so the
    same query gives the same features in any company, and another prompt is another query."""
    from tiny_pipelines import tiny_stable_diffusion_pipeline

    sd = enable_attribution(tiny_stable_diffusion_pipeline())
    torch.manual_seed(2)
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    cfg = AttributionConfig(method="d-trak", projector="gaussian", projection_dim=32, num_timesteps=2, batch_size=2,
                            query_samples=4, query_noise="fresh")
    featurizer = make_featurizer(sd, cfg)
    alone = featurizer.featurize_queries(x[1:2], ["a cat"])
    batch = featurizer.featurize_queries(x[[0, 1, 2, 1]], ["a dog", "a cat", "a cat", "a bird"])
    torch.testing.assert_close(batch[1], alone[0], rtol=1e-4, atol=1e-6)  # batched attention: float rounding
    assert not torch.allclose(batch[3], alone[0])  # the same image with another prompt
    assert content_hash(x[1], "a cat") != content_hash(x[1], "a bird")


def test_the_cli_flags_set_query_samples_over_a_stores_config():
    import argparse

    from diffusers_attribution.cli.options import add_config_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    store_config = config("das").to_dict()
    args = parser.parse_args(["--query-samples", "40", "--query-noise", "fresh"])
    given = config_from_args(args, base=store_config)
    assert (given.query_samples, given.query_noise) == (40, "fresh")
    assert given.feature_hash() == AttributionConfig.from_dict(store_config).feature_hash()  # no StoreMismatchError
    with pytest.raises(SystemExit, match="query_samples must be >= 0"):
        config_from_args(parser.parse_args(["--query-samples", "-1"]), base=store_config)
    assert config_from_args(parser.parse_args(["--query-samples", "0"]), base=store_config).query_samples == 0


def test_fresh_noise_keeps_the_training_timesteps_with_fresh_noise(pipe):
    featurizer = make_featurizer(pipe, config("trak", noise_draws=2, query_samples=8, query_noise="fresh-noise"))
    samples, base = featurizer.query_samples(), featurizer.task
    t = samples.timesteps(["a"])[0]
    grid = base.timesteps(["a"])[0].repeat_interleave(2)
    assert t.tolist() == [int(grid[s % 6]) for s in range(8)]
    assert torch.equal(samples.noise("a", int(t[0]), (1, 8, 8), 0), seeded_randn((1, 8, 8), 0, "query-noise", "a", 0))
