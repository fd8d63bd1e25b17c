"""The factored hooks projector against P_outᵀ G P_in built by hand from autograd per-sample gradients."""

import math
import warnings

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.hooks import HookRegistry, ModelHook
from torch import nn

from diffusers_attribution import AttributionConfig, FeatureStore, enable_attribution
from diffusers_attribution.adapters import ModelInputs, PipelineAdapter
from diffusers_attribution.projection.factored import FactoredProjector, split_dims, weight_dims
from diffusers_attribution.featurize import Featurizer
from diffusers_attribution.gradients.reference import per_example_gradients
from diffusers_attribution.gradients.hooks import attribution_hooks
from diffusers_attribution.seeding import seed_from
from diffusers_attribution.gradients.task import AttributionTask, gradients_only_for, select_parameters
from tiny_pipelines import save_tiny_lora, tiny_ddpm_pipeline, tiny_stable_diffusion_pipeline


class Toy(nn.Module):
    """Every layer kind the projector handles, plus a bare parameter that it leaves out."""

    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(2, 8, 3, padding=1)
        self.time = nn.Linear(4, 8)  # on [R, 4]
        self.norm = nn.GroupNorm(2, 8)
        self.strided = nn.Conv2d(8, 6, 3, stride=2, padding=2, dilation=2, groups=2)
        self.reflect = nn.Conv2d(6, 6, 2, padding=1, padding_mode="reflect", groups=3, bias=False)
        self.tokens = nn.Linear(6, 6)  # on [R, L, 6]
        self.ln = nn.LayerNorm(6)
        self.conv_out = nn.Conv2d(6, 2, 1)
        self.classes = nn.Embedding(5, 8, padding_idx=0)  # looked up by t // 250: rows 0 (padding) to 3
        self.table = nn.Parameter(torch.linspace(0.5, 1.5, 6))  # used directly: left out

    def forward(self, x, t, return_dict=False):
        freqs = torch.arange(1, 3, dtype=torch.float32)
        emb = torch.cat([torch.sin(t[:, None] / 300 * freqs), torch.cos(t[:, None] / 300 * freqs)], 1)
        h = self.conv_in(x) + (self.time(emb) + self.classes(t // 250))[:, :, None, None]
        h = self.reflect(self.strided(torch.nn.functional.silu(self.norm(h))))
        r, c, height, width = h.shape
        tokens = self.ln(self.tokens(h.flatten(2).transpose(1, 2))) * self.table
        h = tokens.transpose(1, 2).reshape(r, c, height, width)
        return (torch.nn.functional.interpolate(self.conv_out(h), size=x.shape[-2:]),)


class ToyAdapter(PipelineAdapter):
    family = "toy"

    def __init__(self, denoiser):
        self.pipe, self.denoiser = None, denoiser
        self.noise_scheduler = DDPMScheduler(num_train_timesteps=1000)
        self.prediction_type = "epsilon"

    def denoiser_kwargs(self, x_t, t, conditioning):
        return {"x": x_t, "t": t}


def expected_features(projector, gradients):
    """φ written out from full per-sample gradients G and the projector's own matrices."""
    blocks = sorted((b for bs in projector.blocks.values() for b in bs), key=lambda b: b.offset)
    parts = []
    for b in blocks:
        g = gradients[b.name].double()
        if b.role == "weight":
            p_out, p_in = projector.matrix(b.name, "out", torch.float64), projector.matrix(b.name, "in", torch.float64)
            full = p_out.T @ g.reshape(len(g), b.d_out, b.d_in) @ p_in  # [B, k_out, k_in]
            parts.append(full.flatten(1)[:, : b.k] * b.entry_scale().double())
        else:
            parts.append(g.flatten(1) @ projector.matrix(b.name, "dense", torch.float64))
    return torch.cat(parts, 1)


def toy_setup(**overrides):
    torch.manual_seed(0)
    model = Toy()
    config = AttributionConfig(**{"method": "trak", "num_timesteps": 3, "timestep_schedule": "random",  # t per example
                                  "projection_dim": 300, **overrides})
    task = AttributionTask(ToyAdapter(model), config)
    parameters = select_parameters(model, config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        projector = FactoredProjector(model, parameters, config.projection_dim, seed=5, layer_dims=config.layer_dims)
    inputs = ModelInputs(torch.randn(4, 2, 8, 8, generator=torch.Generator().manual_seed(1)))
    return model, task, parameters, projector, inputs


def factored_and_reference(model, task, parameters, projector, inputs, keys):
    with gradients_only_for(model, parameters):
        phi = projector.features(task, parameters, inputs, keys)
        grads = per_example_gradients(task, parameters, inputs, keys)
    return phi, expected_features(projector, grads)


def assert_close_rel(actual, expected, tol=1e-5):
    scale = expected.abs().max()
    assert scale > 0
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol, atol=tol * float(scale))


# every structure of a weight's grid: both sides Gaussian (whole or cut), one side exact (P = I), cut
GRIDS = {"strided.weight": [3, 5], "conv_in.weight": 13, "conv_out.weight": 7, "tokens.weight": 29, "time.weight": 29,
         "classes.weight": 11}


def test_linear_conv_groups_bias_and_norms_match_autograd():
    model, task, parameters, projector, inputs = toy_setup(layer_dims=GRIDS)
    assert projector.excluded == ["table"]  # the bare parameter is left out, by choice
    roles = {b.name: b.role for bs in projector.blocks.values() for b in bs}
    assert roles["strided.weight"] == "weight" and roles["norm.weight"] == "norm-weight"
    assert roles["ln.bias"] == "norm-bias" and roles["tokens.bias"] == "bias" and roles["classes.weight"] == "weight"
    assert projector.dim == 300
    structure = {name: (projector.block(name).exact_out, projector.block(name).exact_in,
                        projector.block(name).k_out * projector.block(name).k_in > projector.block(name).k)
                 for name in GRIDS}
    assert structure == {"strided.weight": (False, False, False), "conv_in.weight": (False, False, True),
                         "conv_out.weight": (True, False, True), "tokens.weight": (True, False, True),
                         "time.weight": (False, True, True), "classes.weight": (False, False, True)}
    phi, expected = factored_and_reference(model, task, parameters, projector, inputs, [0, 1, 2, 3])
    assert phi.shape == (4, 300) and phi.dtype == torch.float32
    # block by block, so that a failure names the layer
    for b in (b for bs in projector.blocks.values() for b in bs):
        cols = slice(b.offset, b.offset + b.k)
        assert_close_rel(phi[:, cols], expected[:, cols])
    assert all(p.grad is None for p in model.parameters())  # nothing accumulated into .grad


def test_independent_of_batch_size_and_timestep_chunks():
    model, task, parameters, projector, inputs = toy_setup()
    with gradients_only_for(model, parameters):
        together = projector.features(task, parameters, inputs, [0, 1, 2, 3])
        chunked_config = AttributionConfig(**{**task.config.to_dict(), "timestep_chunk_size": 2})
        chunked_task = AttributionTask(task.adapter, chunked_config)
        assert len(chunked_task.chunks()) == 2
        chunked = projector.features(chunked_task, parameters, inputs, [0, 1, 2, 3])
        one_by_one = torch.cat([
            projector.features(task, parameters, ModelInputs(inputs.x0[i : i + 1]), [i]) for i in range(4)
        ])
    assert_close_rel(chunked, together)
    assert_close_rel(one_by_one, together)


def test_selecting_only_left_out_parameters_is_an_error():
    with pytest.raises(ValueError, match="projector='gaussian'"):
        toy_setup(parameters=["table"])
    torch.manual_seed(0)
    model = Toy()
    with pytest.warns(UserWarning, match="leaves out 1 of"):
        FactoredProjector(model, dict(model.named_parameters()), 300)


def test_dimension_split_is_exact_and_configurable():
    for k in (16, 300, 1000, 4096):
        dims = split_dims({"a": 10_000, "b": 100, "c": 9, "d": 1}, k)
        assert sum(dims.values()) == k and min(dims.values()) >= 1
        assert dims["c"] <= 9 and dims["d"] == 1  # capped at the parameter's size while Σ sizes ≥ k
    dims = split_dims({"a": 40_000, "b": 10_000}, 3001)  # ∝ sqrt(size): 2 : 1
    assert abs(dims["a"] - 2 * dims["b"]) <= 2
    for k, d_out, d_in in [(7, 3, 5), (64, 16, 72), (97, 320, 2880), (15, 3, 5)]:
        k_out, k_in = weight_dims(k, d_out, d_in)
        assert k_out * k_in >= k and k_out <= d_out and k_in <= d_in
    _, _, _, projector, _ = toy_setup(layer_dims={"strided.weight": [2, 3], "*.bias": 2})
    blocks = {b.name: b for bs in projector.blocks.values() for b in bs}
    assert (blocks["strided.weight"].k_out, blocks["strided.weight"].k_in, blocks["strided.weight"].k) == (2, 3, 6)
    assert blocks["conv_in.bias"].k == 2 and projector.dim == 300
    with pytest.raises(ValueError, match="layer_dims"):
        toy_setup(layer_dims={"*": 100})
    with pytest.raises(ValueError, match="only applies"):
        AttributionConfig(projector="gaussian", layer_dims={"*": 4})


def test_matrices_are_seeded_pure_functions():
    _, _, _, projector, _ = toy_setup()
    b = projector.blocks["strided"][0]
    p_in = projector.matrix(b.name, "in")
    # the definition: float32 draws on the CPU from the named seed, whatever dtype is asked for
    generator = torch.Generator().manual_seed(seed_from(5, "factored", b.name, b.shape, "in", b.d_in, b.k_in))
    assert torch.equal(p_in, torch.randn(b.d_in, b.k_in, generator=generator))
    assert torch.equal(projector.matrix(b.name, "in", torch.float64), p_in.double())
    bias = projector.block("strided.bias")  # dense blocks: N(0, 1/k), so that E‖Pᵀg‖² = ‖g‖²
    generator = torch.Generator().manual_seed(seed_from(5, "factored", bias.name, bias.shape, "dense", 6, bias.k))
    expected = torch.randn(6, bias.k, generator=generator) / math.sqrt(bias.k)
    assert torch.equal(projector.matrix(bias.name, "dense"), expected)
    assert torch.equal(projector.matrix(b.name, "out", torch.bfloat16), projector.matrix(b.name, "out").bfloat16())
    _, _, _, again, _ = toy_setup()
    assert torch.equal(again.matrix(b.name, "out"), projector.matrix(b.name, "out"))
    assert again.spec() == projector.spec()
    model, _, parameters, _, _ = toy_setup()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        other = FactoredProjector(model, parameters, 300, seed=6)
    assert not torch.equal(other.matrix(b.name, "in"), p_in)


@pytest.mark.parametrize("d_out,d_in,k,exact", [(30, 30, 13, (False, False)), (3, 40, 20, (True, False)),
                                               (40, 3, 20, (False, True)), (8, 4, 29, (False, True))])
def test_inner_products_preserved_in_expectation(d_out, d_in, k, exact):
    """E⟨φ, φ'⟩ = ⟨G, G'⟩ over seeds, for ragged grids (k < k_out·k_in), with Gaussian or exact (P = I) sides."""
    layer = nn.Linear(d_in, d_out)
    g, h = torch.randn(2, d_out, d_in, generator=torch.Generator().manual_seed(0)).double()
    g[-1] *= 5 if exact[0] else 1  # weight the row / column that the ragged cut shortens, so a wrong
    g[:, -1] *= 5 if exact[1] else 1  # per-row or per-column scale moves the mean well beyond the noise
    h = g + 0.5 * h
    estimates = []
    for seed in range(600):
        p = FactoredProjector(layer, {"weight": layer.weight}, k, seed=seed)
        block = p.block("weight")
        assert block.k_out * block.k_in > k  # ragged: the last row is cut
        assert (block.exact_out, block.exact_in) == exact
        p_out, p_in = p.matrix("weight", "out", torch.float64), p.matrix("weight", "in", torch.float64)
        a, b = ((p_out.T @ x @ p_in).flatten()[:k] * block.entry_scale().double() for x in (g, h))
        estimates.append(float(a @ b))
    mean, stderr = torch.tensor(estimates).mean(), torch.tensor(estimates).std() / math.sqrt(len(estimates))
    exact_value = float((g * h).sum())
    assert abs(mean - exact_value) < 4 * stderr
    assert 4 * stderr < 0.1 * exact_value  # power: each wrong scale tried moves the mean by 12-15%


class Counter(ModelHook):
    def __init__(self):
        super().__init__()
        self.count = 0

    def pre_forward(self, module, *args, **kwargs):
        self.count += 1
        return args, kwargs


def test_hooks_leave_no_state_behind():
    pipe = tiny_ddpm_pipeline()
    unet = pipe.unet
    counter = Counter()
    HookRegistry.check_if_exists_or_initialize(unet.conv_out).register_hook(counter, "someone-else")

    def state():
        return {name: (sorted(m.__dict__), getattr(m, "_diffusers_hook", None)) for name, m in unet.named_modules()}

    before = state()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 500])
    reference = unet(x, t).sample
    modules = {name: m for name, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.GroupNorm))}
    with attribution_hooks(modules) as capture:
        assert hasattr(unet.conv_in, "_diffusers_hook") and "forward" in unet.conv_in.__dict__
        out = unet(x, t).sample
        assert torch.equal(out, reference)  # the zero anchor changes nothing
        capture.backward(out.pow(2).sum())
        (a, delta), = capture.hooks["conv_in"].captured
        assert a.shape == (2, 1, 8, 8) and delta.shape == (2, 8, 8, 8)
        hooks = list(capture.hooks.values())
    assert all(not h.captured and h._input is None for h in hooks)
    assert state() == before
    assert not hasattr(unet.conv_in, "_diffusers_hook") and "forward" not in unet.conv_in.__dict__
    assert list(unet.conv_out._diffusers_hook.hooks) == ["someone-else"]
    count = counter.count
    unet(x, t)
    assert counter.count == count + 1  # the other hook still runs
    with pytest.raises(RuntimeError, match="inside"), attribution_hooks(modules):
        unet(x, t)
        raise RuntimeError("an error inside the block")
    assert state() == before
    assert all(p.grad is None for p in unet.parameters())


def test_lora_only_attribution_on_a_stable_diffusion_unet(tmp_path):
    pipe = enable_attribution(tiny_stable_diffusion_pipeline())
    pipe.load_lora_weights(save_tiny_lora(pipe, tmp_path / "lora"), adapter_name="tiny_lora")
    config = AttributionConfig(method="das", parameters="lora", num_timesteps=2, projection_dim=256,
                               calibration_examples=0)
    featurizer = Featurizer(pipe, config)
    spec = featurizer.projector.spec()
    assert spec["excluded"] == [] and all(".lora_" in name for name in spec["parameters"])
    assert len(spec["parameters"]) == len(featurizer.parameters) > 0
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    keys = [0, 1, 2]
    inputs = featurizer.adapter.encode(images, ["a cat", "a dog", None], keys, config.noise_seed)
    with gradients_only_for(featurizer.adapter.denoiser, featurizer.parameters):
        grads = per_example_gradients(featurizer.task, featurizer.parameters, inputs, keys)
    phi = featurizer.features(images, ["a cat", "a dog", None], keys)
    assert_close_rel(phi, expected_features(featurizer.projector, grads))


def test_end_to_end_featurize_and_attribute_on_a_tiny_ddpm(tmp_path):
    pipe = enable_attribution(tiny_ddpm_pipeline())
    assert AttributionConfig().projector == "factored"  # the default
    config = AttributionConfig(method="d-trak", num_timesteps=4, projection_dim=512, batch_size=3, timestep_chunk_size=3,
                             calibration_examples=0)
    images = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1
    store = pipe.featurize(images, config, progress=False)
    featurizer = Featurizer(pipe, config)
    assert featurizer.projector.excluded == []  # every UNet2DModel parameter is a Linear/Conv2d/GroupNorm one
    inputs = featurizer.adapter.encode(images, [None] * 5, list(range(5)), config.noise_seed)
    with gradients_only_for(pipe.unet, featurizer.parameters):
        grads = per_example_gradients(featurizer.task, featurizer.parameters, inputs, list(range(5)))
    assert_close_rel(store.features, expected_features(featurizer.projector, grads))
    store.save_pretrained(tmp_path / "store")
    result = pipe.attribute(images[:2], FeatureStore.from_pretrained(tmp_path / "store"))  # the spec survives JSON
    assert result.scores.shape == (2, 5)


def test_mixed_precision_forward_is_projected_in_float32():
    pipe = enable_attribution(tiny_ddpm_pipeline())
    config = AttributionConfig(num_timesteps=2, projection_dim=256, dtype="bfloat16", calibration_examples=0)
    images = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(3)) * 2 - 1
    featurizer = Featurizer(pipe, config)
    phi = featurizer.features(images, [None] * 3, [0, 1, 2])
    inputs = featurizer.adapter.encode(images, [None] * 3, [0, 1, 2], config.noise_seed)
    with gradients_only_for(pipe.unet, featurizer.parameters):
        grads = per_example_gradients(featurizer.task, featurizer.parameters, inputs, [0, 1, 2])
    expected = expected_features(featurizer.projector, grads).float()
    assert phi.dtype == torch.float32 and torch.isfinite(phi).all()
    cosine = torch.nn.functional.cosine_similarity(phi, expected, dim=1)
    assert cosine.min() > 0.98  # bf16 forward noise only


@pytest.mark.parametrize("order", ["both", "out", "in"])
def test_every_contraction_order_matches_autograd(monkeypatch, order):
    """`_weight` computes the same P_outᵀ G P_in in each order (random and identity sides alike)."""
    import diffusers_attribution.projection.factored as factored

    monkeypatch.setattr(factored, "_order", lambda block, positions, groups, conv=False: order)
    model, task, parameters, projector, inputs = toy_setup(layer_dims=GRIDS)
    keys = list(range(len(inputs.x0)))
    assert_close_rel(*factored_and_reference(model, task, parameters, projector, inputs, keys))
    with warnings.catch_warnings():  # given identity sides (calibration's start) are skipped, not multiplied
        warnings.simplefilter("ignore")
        identity = FactoredProjector(model, parameters, None, bases={
            "conv_in.weight": {"out": torch.eye(8), "in": torch.eye(18)},
            "tokens.weight": {"out": torch.eye(6), "in": torch.linalg.qr(torch.randn(6, 4)).Q},
            "strided.weight": {"out": torch.linalg.qr(torch.randn(6, 3)).Q, "in": torch.eye(36)}})
    assert identity.block("conv_in.weight").identity("in") and not identity.block("tokens.weight").identity("in")
    assert_close_rel(*factored_and_reference(model, task, parameters, identity, inputs, keys))


class SamePadding(nn.Module):
    """Convs with padding="same" (an even kernel: the extra pixel goes right/bottom) and "valid"."""

    def __init__(self):
        super().__init__()
        self.same = nn.Conv2d(2, 5, 4, padding="same", dilation=2)
        self.valid = nn.Conv2d(5, 2, 3, padding="valid")

    def forward(self, x, t, return_dict=False):
        return (torch.nn.functional.interpolate(self.valid(torch.tanh(self.same(x))), size=x.shape[-2:]),)


@pytest.mark.parametrize("order", ["both", "out", "in"])
def test_string_padding_in_every_order(monkeypatch, order):
    import diffusers_attribution.projection.factored as factored

    monkeypatch.setattr(factored, "_order", lambda block, positions, groups, conv=False: order)
    torch.manual_seed(0)
    model = SamePadding()
    config = AttributionConfig(method="trak", num_timesteps=2, projection_dim=40, calibration_examples=0)
    task = AttributionTask(ToyAdapter(model), config)
    parameters = select_parameters(model, config)
    projector = FactoredProjector(model, parameters, 40, seed=2, layer_dims={"same.weight": [3, 6]})
    inputs = ModelInputs(torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(1)))
    assert_close_rel(*factored_and_reference(model, task, parameters, projector, inputs, [0, 1, 2]))
