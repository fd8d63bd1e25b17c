"""Issue 22's flow: one featurization loop for every method, every caller scoring through the store's method's
scorer, and a method, a projector fitted on data and a pipeline family that are one new file each.

    data → adapter → task → projector → reduction → method state → writer        store → scorer → result
"""

from __future__ import annotations

import contextlib
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_pipelines import tiny_ddpm_pipeline

from diffusers_attribution import AttributionConfig, FeatureStore, enable_attribution
from diffusers_attribution.api import make_featurizer
from diffusers_attribution.methods.base import get_method
from diffusers_attribution.scoring import KernelScorer
from diffusers_attribution.store.format import read_shard_run

FIXTURES = Path(__file__).parent / "fixtures"


def setup():
    pipe = enable_attribution(tiny_ddpm_pipeline(attention=False))
    pipe.set_progress_bar_config(disable=True)
    images = torch.rand(7, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return pipe, images


# ---------------------------------------------------------------------------------------------- every caller


@pytest.mark.parametrize("method", ["das", "das-fisher", "d-trak", "journey-trak", "fisher"])
def test_journey_scores_per_step_features_with_the_stores_own_scorer(method, monkeypatch):
    """Per-step queries against a store are scored by its method's scorer: DAS's residual weights (and its
    per-pair normalization) and the Fisher's curvature are not dropped, as they were by a plain kernel scorer."""
    import diffusers_attribution.trajectory as trajectory

    pipe, images = setup()
    config = AttributionConfig(method=method, num_timesteps=2, projection_dim=16, calibration_examples=3,
                               batch_size=4)
    store = pipe.featurize(images, config, progress=False)
    captured = []
    features = trajectory.timestep_features

    def spy(*args, **kwargs):
        out = features(*args, **kwargs)
        captured.append((out.features, kwargs))
        return out

    monkeypatch.setattr(trajectory, "timestep_features", spy)
    result = pipe.attribute_trajectory(3, store, num_inference_steps=3, progress=False)
    (phi, kwargs), = captured
    expected = get_method(method).scorer(store).scores(phi)
    assert torch.equal(result.scores, expected)
    assert kwargs["normalize"] == (method == "das")
    if method in ("das", "das-fisher", "fisher"):  # what a plain kernel scorer of the same features would have returned
        assert not torch.allclose(KernelScorer(store).scores(phi), expected, rtol=1e-3, atol=0)


def test_journey_refuses_a_store_whose_queries_are_not_per_step_gradients():
    pipe, images = setup()
    store = pipe.featurize(images, AttributionConfig(method="pixel-cosine"), progress=False)
    with pytest.raises(ValueError, match="per-step"):
        pipe.attribute_trajectory(3, store, num_inference_steps=2, progress=False)


@pytest.mark.parametrize("method", sorted(p.name for p in (FIXTURES / "stores_cec49ed").iterdir() if p.is_dir()))
def test_stores_written_before_the_redesign_score_as_before(method):
    """One store of each method written by the code before the redesign (cec49ed, tests/fixtures/stores_cec49ed,
    made by a script from `tiny_ddpm_pipeline()`: K = 2 or 1, k = 8 calibrated or 128 random, shards of 4 rows, one
    torch thread): its features load bit for bit and its scores are the ones recorded then."""
    expected = load_file(str(FIXTURES / "stores_cec49ed" / "expected.safetensors"))
    store = FeatureStore.from_pretrained(FIXTURES / "stores_cec49ed" / method, verify=True)
    assert "method_facts" not in store.metadata and store.method_facts["kernel"] == get_method(method).kernel
    assert torch.equal(store.features, expected[f"{method}.features"])
    # written before EK-FAC's default of 3·K·D query samples: its queries stay the training pairs (query_samples=0)
    assert store.config.query_samples == (0 if method == "ekfac" else None)
    pipe = enable_attribution(tiny_ddpm_pipeline())
    scores = pipe.attribute(expected["queries"], store, progress=False).scores
    torch.testing.assert_close(scores, expected[f"{method}.scores"], rtol=1e-5,
                               atol=1e-5 * float(expected[f"{method}.scores"].abs().max()))


# ---------------------------------------------------------------------------------------------- every method's store


def _config(method: str) -> AttributionConfig:
    if method == "tracin":
        return AttributionConfig(method="tracin", num_timesteps=1, projection_dim=128, query_timesteps=2,
                                 query_noise_draws=1, batch_size=3)
    return AttributionConfig(method=method, batch_size=3)


def _checkpoints(pipe) -> dict:
    """TracIn over two checkpoints: the pipeline's weights and a seeded perturbation of them."""
    weights = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    generator = torch.Generator().manual_seed(3)
    moved = {k: v + 0.01 * torch.randn(v.shape, generator=generator) for k, v in weights.items()}
    return {"checkpoints": [weights, moved]}


@pytest.mark.parametrize("method", ["tracin", "pixel-cosine"])
def test_every_method_writes_a_resumable_store_in_shards_and_processes(method, tmp_path, monkeypatch):
    """TracIn's and a similarity baseline's stores go through the one loop: written into a folder, killed after a
    shard and resumed (only the missing shards computed), and by 2 processes: the in-memory store's features."""
    from test_distributed import launch

    pipe, images = setup()
    config, options = _config(method), (_checkpoints(pipe) if method == "tracin" else {})
    memory = pipe.featurize(images, config, progress=False, **options)
    if method == "tracin":
        assert memory.dim == 2 * 128  # one block of k per checkpoint

    featurizer_class = type(make_featurizer(pipe, config, **options))
    rows, computed = featurizer_class.rows, []

    def killed_after_one_shard(self, data, start, stop, bar=None):
        if computed:
            raise KeyboardInterrupt
        computed.append((start, stop))
        return rows(self, data, start, stop, bar)

    monkeypatch.setattr(featurizer_class, "rows", killed_after_one_shard)
    with pytest.raises(KeyboardInterrupt):
        pipe.featurize(images, config, progress=False, output_dir=tmp_path / "s", shard_rows=3, **options)
    assert not (tmp_path / "s" / "config.json").exists()
    computed.clear()

    def counted(self, data, start, stop, bar=None):
        computed.append((start, stop))
        return rows(self, data, start, stop, bar)

    monkeypatch.setattr(featurizer_class, "rows", counted)
    resumed = pipe.featurize(images, config, progress=False, output_dir=tmp_path / "s", shard_rows=3, **options)
    assert computed == [(3, 6), (6, 7)]
    assert torch.equal(resumed.features, memory.features)
    assert resumed.example_hashes == memory.example_hashes and resumed.metadata["method_facts"]["title"]
    monkeypatch.setattr(featurizer_class, "rows", rows)

    launch(_featurize_in_process, tmp_path / "two", method)
    two = FeatureStore.from_pretrained(tmp_path / "two", verify=True)
    assert torch.equal(two.features, memory.features)
    assert {read_shard_run(p)["process"] for p in (tmp_path / "two").glob("features-*.safetensors")} == {"0/2", "1/2"}
    queries = images[:2]
    torch.testing.assert_close(pipe.attribute(queries, two, progress=False, **options).scores,
                               pipe.attribute(queries, memory, progress=False, **options).scores)


def _featurize_in_process(directory, method) -> None:
    from accelerate import PartialState

    pipe, images = setup()
    options = _checkpoints(pipe) if method == "tracin" else {}
    pipe.featurize(images, _config(method), progress=False, output_dir=directory, shard_rows=3,
                   accelerator=PartialState(cpu=True), **options)


# ---------------------------------------------------------------------------------------------- one new file each

TOY_METHOD = '''
from diffusers_attribution.methods.base import Method, register_method


@register_method
class ToyKernel(Method):
    """TRAK's kernel on D-TRAK's output, declared, nothing else written."""

    name = "toy-kernel"
    title = "Toy kernel method (a test)"
    default_output = "squared-norm"
    defaults = {"num_timesteps": 2, "damping_ratio": 0.5}
    kernel = True
'''

TOY_PROJECTOR = '''
import torch

from diffusers_attribution.gradients.reference import per_example_gradients
from diffusers_attribution.projection.base import Projector
from diffusers_attribution.projection.registry import register_projector


class ScaledGaussian(Projector):
    """φ = (g ⊙ s) R: s = 1 / mean |g| per coordinate, fitted on three training examples; R seeded Gaussian."""

    kind = "toy-scaled"
    fits_on_data = True
    fit_batch_size = 2

    def __init__(self, shapes, dim, seed):
        super().__init__(shapes, dim, seed)
        self.width = sum(shape.numel() for shape in self.shapes.values())
        generator = torch.Generator().manual_seed(seed)
        self.matrix = torch.randn(self.width, dim, generator=generator) / dim ** 0.5
        self.scale = None

    @property
    def fitted(self):
        return self.scale is not None

    def fit_examples(self, num_examples):
        return list(range(min(3, num_examples)))

    def fit(self, task, parameters, batches, progress=False):
        total = torch.zeros(self.width, dtype=torch.float64)
        count = 0
        for inputs, keys in batches:
            flat = self._flat(per_example_gradients(task, parameters, inputs, keys))
            total += flat.abs().double().sum(0)
            count += len(flat)
        self.scale = (1.0 / (total / count + 1e-6)).float()

    def _flat(self, gradients):
        return torch.cat([gradients[name].flatten(1) for name in self.shapes], 1).detach().cpu().float()

    def project(self, gradients):
        return (self._flat(gradients) * self.scale) @ self.matrix

    def spec(self):
        return {**super().spec(), "fitted": True}

    def state_dict(self):
        return {"scale": self.scale[None].contiguous()}

    def load_state_dict(self, state, spec=None):
        self.scale = state["scale"][0].float()


@register_projector("toy-scaled")
def make(config, denoiser, parameters):
    return ScaledGaussian({name: p.shape for name, p in parameters.items()}, config.projection_dim, config.projection_seed)
'''

TOY_FAMILY = '''
from diffusers_attribution.adapters import register_adapter
from diffusers_attribution.adapters.unconditional import UnconditionalAdapter


@register_adapter
class ToyFamily(UnconditionalAdapter):
    family = "toy-family"
    priority = UnconditionalAdapter.priority + 1
'''


@contextlib.contextmanager
def modules_in_the_package(tmp_path: Path, files: dict[str, tuple[str, str]]):
    """Each (package, source) written as `<name>.py` in its own folder appended to that package's __path__; all
    of it (registrations, modules, paths) undone afterwards."""
    import importlib

    from diffusers_attribution import discovery
    from diffusers_attribution.adapters import registry as adapters
    from diffusers_attribution.methods import registry as methods
    from diffusers_attribution.projection import registry as projectors

    for package in ("diffusers_attribution.methods", "diffusers_attribution.projection", "diffusers_attribution.adapters"):
        discovery.discover(package)  # the package's own entries registered first: they are what is restored
    saved = (dict(methods._REGISTRY), dict(methods._ALIASES), dict(projectors._FACTORIES), list(adapters._ADAPTERS))
    added = []
    try:
        for name, (package, source) in files.items():
            folder = tmp_path / package.rsplit(".", 1)[1]
            folder.mkdir(exist_ok=True)
            (folder / f"{name}.py").write_text(textwrap.dedent(source))
            importlib.import_module(package).__path__.append(str(folder))
            added.append((package, name, str(folder)))
        yield
    finally:
        for package, name, folder in added:
            module = importlib.import_module(package)
            module.__path__.remove(folder)
            sys.modules.pop(f"{package}.{name}", None)
            vars(module).pop(name, None)
            discovery._imported.get(package, set()).discard(name)
        methods._REGISTRY.clear(), methods._REGISTRY.update(saved[0])
        methods._ALIASES.clear(), methods._ALIASES.update(saved[1])
        projectors._FACTORIES.clear(), projectors._FACTORIES.update(saved[2])
        projectors._DECLARED = None  # the names read from the modules' source: read again without the toy
        adapters._ADAPTERS[:] = saved[3]


def test_a_method_a_fitted_projector_and_a_family_are_one_new_file_each(tmp_path):
    """Written here as three modules (no other file edited): featurized in memory and in a folder, saved,
    reloaded, and scored through the public API; the store says which method, projector and family made it."""
    files = {"toy_kernel": ("diffusers_attribution.methods", TOY_METHOD),
             "toy_scaled": ("diffusers_attribution.projection", TOY_PROJECTOR),
             "toy_family": ("diffusers_attribution.adapters", TOY_FAMILY)}
    with modules_in_the_package(tmp_path, files):
        pipe, images = setup()
        config = AttributionConfig(method="toy-kernel", projector="toy-scaled", projection_dim=6, batch_size=4)
        assert config.output == "squared-norm" and config.num_timesteps == 2
        store = pipe.featurize(images, config, progress=False)
        assert store.metadata["family"] == "toy-family" and store.metadata["projection"]["kind"] == "toy-scaled"
        assert store.method_facts == {"title": "Toy kernel method (a test)", "fingerprints": ["model_fingerprint"],
                                      "kernel": True}
        saved = FeatureStore.from_pretrained(store.save_pretrained(tmp_path / "saved"), verify=True)
        assert saved.kernel is not None and torch.equal(saved.projection_state["scale"], store.projection_state["scale"])
        assert "Toy kernel method (a test)" in (tmp_path / "saved" / "README.md").read_text()
        sharded = pipe.featurize(images, config, progress=False, output_dir=tmp_path / "sharded", shard_rows=4)
        assert torch.equal(sharded.features, store.features)  # shards of whole batches: the same passes

        queries = images[:2]
        scores = pipe.attribute(queries, store, progress=False).scores
        for other in (saved, FeatureStore.from_pretrained(tmp_path / "sharded")):  # the saved fit projects the queries
            torch.testing.assert_close(pipe.attribute(queries, other, progress=False).scores, scores)
        # the closed form: τ = φ(q) (ΦᵀΦ + λI)⁻¹ Φᵀ with λ = 0.5 · tr(ΦᵀΦ) / min(N, k) (the method's ratio)
        featurizer = make_featurizer(pipe, saved.config, store=saved)
        phi, q = store.features.double(), featurizer.featurize_queries(queries).double()
        damping = 0.5 * float(phi.pow(2).sum()) / min(phi.shape)
        expected = q @ torch.linalg.inv(phi.T @ phi + damping * torch.eye(6, dtype=torch.float64)) @ phi.T
        torch.testing.assert_close(scores.double(), expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()))


# ---------------------------------------------------------------------------------------------- queries at scale


@pytest.mark.parametrize("method", ["das", "d-trak", "fisher", "tracin", "pixel-cosine", "ekfac"])
def test_top_k_equals_the_dense_top_k_across_shards_and_a_session_the_separate_calls(method, tmp_path):
    """`attribute(..., top_k=k)`: the dense path's top-k (indices; scores to float32 GEMM rounding) for every method
    with a scorer, across shard boundaries (shards of 3 rows); a session gives the scores of separate calls."""
    pipe, images = setup()
    fields = {"num_timesteps": 2, "projection_dim": 4, "calibration_examples": 3, "batch_size": 3}  # N = 7 > k: primal
    if method == "tracin":
        config = _config("tracin")
    elif method == "pixel-cosine":
        config = AttributionConfig(method=method)
    else:
        config = AttributionConfig(method=method, **fields)
    pipe.featurize(images, config, progress=False, output_dir=tmp_path / "s", shard_rows=3)
    store = FeatureStore.from_pretrained(tmp_path / "s")
    queries = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(5)) * 2 - 1
    dense = pipe.attribute(queries, store, progress=False)
    session = pipe.attribution_session(store)
    assert getattr(session.scorer, "dual", False) is False  # the streaming path, not the dense one
    torch.testing.assert_close(session.attribute(queries).scores, dense.scores)
    for k in (1, 4, 7):
        top = session.attribute(queries, top_k=k)
        assert top.scores is None and top.top.indices.shape == (3, k)
        expected = dense.topk(k)
        assert torch.equal(top.topk(k).indices, expected.indices)
        torch.testing.assert_close(top.topk(k).scores, expected.scores, rtol=1e-4,
                                   atol=1e-5 * float(dense.scores.abs().max()))
    with pytest.raises(ValueError, match="top_k"):
        session.attribute(queries, top_k=0)
    with pytest.raises(ValueError, match="top_k"):
        session.attribute(queries, top_k=8)
    with pytest.raises(ValueError, match="top-4 only"):
        session.attribute(queries, top_k=4).topk(5)
    # rows held on a device (search_device; "cpu" here, the GPU in docs/scale.md): the same exact top-k
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        if not hasattr(session.scorer, "resident"):
            with pytest.raises(ValueError, match="search_device needs a kernel method"):
                pipe.attribution_session(store, search_device=device)
            continue
        resident = pipe.attribution_session(store, search_device=device)
        for k in (1, 7):
            top = resident.attribute(queries, top_k=k, exact=True)
            assert top.metadata["search"] == {"kind": "resident", "device": device, "num_rows": 7, "exact": True}
            assert torch.equal(top.top.indices, dense.topk(k).indices)
            torch.testing.assert_close(top.top.scores, dense.topk(k).scores, rtol=1e-4,
                                       atol=1e-5 * float(dense.scores.abs().max()))


def test_an_index_built_on_this_machine_answers_top_k_unless_exact(tmp_path, monkeypatch):
    """`session.build_index()` (or `diffusers-attribution index STORE`): later top-k queries come from the cached
    index (here an exact Flat one: the same top-k), `exact=True` bypasses it; the cache lives outside the store."""
    pytest.importorskip("faiss")
    from diffusers_attribution import search

    monkeypatch.setattr(search, "default_cache_dir", lambda: tmp_path / "cache")
    pipe, images = setup()
    config = AttributionConfig(method="das", num_timesteps=2, projection_dim=4, calibration_examples=3, batch_size=3)
    pipe.featurize(images, config, progress=False, output_dir=tmp_path / "s", shard_rows=3)
    queries = images[:2]
    session = pipe.attribution_session(tmp_path / "s")
    assert session.index is None
    exact = session.attribute(queries, top_k=3)
    index = session.build_index(kind="flat")
    assert index.num_rows == 7 and list((tmp_path / "cache").glob("*.faiss")) and not list((tmp_path / "s").glob("*.faiss"))
    approximate = session.attribute(queries, top_k=3)
    assert approximate.metadata["search"]["kind"] == "flat" and "search" not in exact.metadata
    assert torch.equal(approximate.top.indices, exact.top.indices)
    torch.testing.assert_close(approximate.top.scores, exact.top.scores, rtol=1e-4, atol=1e-6)
    again = pipe.attribution_session(tmp_path / "s")  # a new session finds the cached index
    assert again.index is not None and "search" not in again.attribute(queries, top_k=3, exact=True).metadata
    # the command line builds the same index (found in the cache: nothing is built twice)
    from diffusers_attribution.cli import main

    assert main(["index", str(tmp_path / "s"), "--kind", "flat", "--json"]) == 0
    assert len(list((tmp_path / "cache").glob("*.faiss"))) == 1


@pytest.mark.parametrize("feature_dtype", ["float16", "bfloat16"])
def test_half_precision_stores_are_half_the_size_and_score_close_to_float32(feature_dtype, tmp_path):
    """`feature_dtype`: shards in half precision (the kernel stays float64, computed from the stored rows); scores
    within 1e-2 of the float32 store's scale (bfloat16 keeps 8 bits of mantissa, float16 11), the same top-1."""
    pipe, images = setup()
    fields = {"method": "d-trak", "num_timesteps": 2, "projection_dim": 4, "calibration_examples": 3, "batch_size": 3}
    full = pipe.featurize(images, AttributionConfig(**fields), progress=False, output_dir=tmp_path / "f32")
    half = pipe.featurize(images, AttributionConfig(**fields, feature_dtype=feature_dtype), progress=False,
                          output_dir=tmp_path / "half")
    memory = pipe.featurize(images, AttributionConfig(**fields, feature_dtype=feature_dtype), progress=False)
    assert torch.equal(memory.features, half.features)  # the same rounding in memory and on disk
    size = {name: sum(p.stat().st_size for p in (tmp_path / name).glob("features-*")) for name in ("f32", "half")}
    assert size["f32"] - size["half"] == 7 * 4 * 2  # N·k values of 2 bytes instead of 4 (headers alike)
    assert half.kernel.dtype == torch.float64
    torch.testing.assert_close(half.kernel, half.features.double().T @ half.features.double(), rtol=1e-9, atol=0)
    queries = images[:3]
    a, b = (pipe.attribute(queries, s, progress=False).scores for s in (full, half))
    assert float((a - b).abs().max()) <= 1e-2 * float(a.abs().max())
    assert torch.equal(a.argmax(1), b.argmax(1))
    with pytest.raises(ValueError, match="feature_dtype"):
        AttributionConfig(**fields, feature_dtype="int8")
