"""Influence with pair-level curvature (curvature.py, methods/ekfac.py, methods/fisher.py) against explicit
curvature matrices built from autograd per-pair gradients on tiny models."""

from types import SimpleNamespace

import pytest
import torch
from test_factored import ToyAdapter
from torch import nn

from diffusers_attribution import AttributionConfig
from diffusers_attribution.adapters import ModelInputs
from diffusers_attribution.curvature import (
    FisherAccumulator,
    PreconditionedProjector,
    curvature_task,
    ekfac_calibrate,
    layer_rows,
    pair_features,
)
from diffusers_attribution.gradients.reference import per_example_gradients
from diffusers_attribution.gradients.hooks import attribution_hooks
from diffusers_attribution.gradients.timesteps import PointTask, point_chunks
from diffusers_attribution.projection.registry import make_projector
from diffusers_attribution.store.format import FeatureStore, read_shard_run
from diffusers_attribution.gradients.task import AttributionTask, gradients_only_for, select_parameters


class KToy(nn.Module):
    """Conv2d and Linear layers (Kronecker factors; Linear on [R, 4] and on tokens [R, L, 4]) plus a GroupNorm
    (diagonal correction)."""

    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(2, 4, 3, padding=1)
        self.time = nn.Linear(4, 4)
        self.norm = nn.GroupNorm(2, 4)
        self.tokens = nn.Linear(4, 3)
        self.conv_out = nn.Conv2d(3, 2, 1, bias=False)

    def forward(self, x, t, return_dict=False):
        freqs = torch.arange(1, 3, dtype=torch.float32)
        emb = torch.cat([torch.sin(t[:, None] / 300 * freqs), torch.cos(t[:, None] / 300 * freqs)], 1)
        h = torch.nn.functional.silu(self.norm(self.conv_in(x) + self.time(emb)[:, :, None, None]))
        r, _, height, width = h.shape
        tokens = self.tokens(h.flatten(2).transpose(1, 2))
        h = tokens.transpose(1, 2).reshape(r, 3, height, width)
        return (self.conv_out(torch.nn.functional.silu(h)),)


def setup(projector="identity", noise_draws=2, **overrides):
    torch.manual_seed(0)
    model = KToy()
    config = AttributionConfig(method="trak", num_timesteps=3, noise_draws=noise_draws, projector=projector,
                               projection_dim=24, calibration_examples=0, **overrides)
    adapter = ToyAdapter(model)
    task = AttributionTask(adapter, config)
    parameters = select_parameters(model, config)
    x = torch.randn(5, 2, 6, 6, generator=torch.Generator().manual_seed(1))
    return model, config, adapter, task, parameters, x


def pair_gradients(task, parameters, inputs, keys, objective=None):
    """Autograd per-pair gradients {name: [B·K·D, ...]} (example-major) and the flat [B·K·D, p] matrix."""
    point = PointTask(task.adapter, task.config)
    if objective is not None:
        point.objective = objective
    grads = {name: [] for name in parameters}
    for _, _, chunk_inputs, chunk_keys in point_chunks(inputs, keys, task.timesteps(keys), task.noise_draws, 4):
        for name, value in per_example_gradients(point, parameters, chunk_inputs, chunk_keys).items():
            grads[name].append(value)
    grads = {name: torch.cat(values).double() for name, values in grads.items()}
    return grads, torch.cat([g.flatten(1) for g in grads.values()], 1)


# ---------------------------------------------------------------------------------------------- projected Fisher


def test_projected_fisher_equals_the_sum_of_explicit_per_pair_outer_products():
    model, config, adapter, task, parameters, x = setup()
    projector = make_projector(config, model, parameters)
    featurizer = SimpleNamespace(adapter=adapter, config=config, parameters=parameters, projector=projector, task=task)
    keys = list(range(5))
    accumulator = FisherAccumulator(projector.dim, task.num_columns)
    with gradients_only_for(model, parameters):
        phi = pair_features(featurizer, ModelInputs(x), keys, accumulator)
        _, psi = pair_gradients(task, parameters, ModelInputs(x), keys)
        core = per_example_gradients(task, parameters, ModelInputs(x), keys)
    expected = psi.T @ psi / task.num_columns  # Σ_i (1/(K·D)) Σ_{t,d} ψψᵀ
    assert accumulator.pairs == 5 * task.num_columns
    torch.testing.assert_close(accumulator.matrix, expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()))
    # the per-pair features average to the core task's (time-averaged) features
    flat = torch.cat([g.flatten(1) for g in core.values()], 1).double()
    torch.testing.assert_close(phi.double(), flat, rtol=1e-4, atol=1e-6 * float(flat.abs().max()))
    # not the TRAK kernel of the time-averaged features
    assert (accumulator.matrix - flat.T @ flat).abs().max() > 0.1 * expected.abs().max()


def test_projected_fisher_batches_and_shards_add_up_to_one_pass():
    model, config, adapter, task, parameters, x = setup(projector="gaussian")
    projector = make_projector(config, model, parameters)
    featurizer = SimpleNamespace(adapter=adapter, config=config, parameters=parameters, projector=projector, task=task)
    whole = FisherAccumulator(projector.dim, task.num_columns)
    shards = [FisherAccumulator(projector.dim, task.num_columns) for _ in range(2)]
    with gradients_only_for(model, parameters):
        pair_features(featurizer, ModelInputs(x), list(range(5)), whole)
        for accumulator, rows in ((shards[0], [0, 1]), (shards[1], [2, 3, 4])):
            for i in rows:  # one example per batch
                pair_features(featurizer, ModelInputs(x[i : i + 1]), [i], accumulator)
    shards[0].merge(shards[1])
    assert shards[0].pairs == whole.pairs
    torch.testing.assert_close(shards[0].matrix, whole.matrix, rtol=1e-5, atol=1e-7 * float(whole.matrix.abs().max()))


def test_fisher_scores_are_the_closed_form():
    from diffusers_attribution.methods.base import get_method

    generator = torch.Generator().manual_seed(3)
    phi, queries = torch.randn(30, 6, generator=generator), torch.randn(4, 6, generator=generator)
    a = torch.randn(50, 6, generator=generator, dtype=torch.float64)
    fisher = a.T @ a
    store = FeatureStore(phi, AttributionConfig(method="trak", damping_ratio=0.05), {"num_examples": 30})
    store.method_state = {"pair_fisher": fisher}
    scorer = get_method("fisher").scorer(store)
    damping = 0.05 * float(fisher.trace()) / 6
    assert scorer.damping == pytest.approx(damping)
    expected = queries.double() @ torch.linalg.inv(fisher + damping * torch.eye(6, dtype=torch.float64)) @ phi.double().T
    torch.testing.assert_close(scorer.scores(queries).double(), expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- EK-FAC


def test_layer_rows_reproduce_autograd_per_pair_weight_gradients():
    """Σ_pos δ_pos a_posᵀ of the K-FAC-expand rows is ∇_W ℓ of one pair (Conv2d patches, Linear tokens)."""
    model, config, adapter, task, parameters, x = setup()
    modules = {"conv_in": model.conv_in, "time": model.time, "tokens": model.tokens, "conv_out": model.conv_out}
    point = PointTask(adapter, config)
    keys = [(0, 333, 0), (1, 666, 1)]
    inputs = ModelInputs(x[:2])
    with gradients_only_for(model, parameters):
        reference = per_example_gradients(point, parameters, inputs, keys)
        for row in range(2):
            with attribution_hooks(modules) as capture:
                capture.backward(point.outputs(ModelInputs(x[row : row + 1]), keys[row : row + 1]).sum())
                for name, module in modules.items():
                    (a, delta), = capture.hooks[name].captured
                    a_rows, d_rows = layer_rows(module, a, delta)
                    grad = (d_rows.T @ a_rows).reshape(module.weight.shape)
                    torch.testing.assert_close(grad, reference[f"{name}.weight"][row], rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def ekfac():
    model, config, adapter, task, parameters, x = setup(projector="factored")
    batches = [(ModelInputs(x[:3]), [0, 1, 2]), (ModelInputs(x[3:]), [3, 4])]
    total = sum(p.numel() for p in parameters.values())
    with gradients_only_for(model, parameters):
        result = ekfac_calibrate(task, model, parameters, batches, sketch_dim=total, seed=0, fisher="empirical",
                                 damping_ratio=0.1, rows_per_pass=7)
        grads, _ = pair_gradients(task, parameters, ModelInputs(x), list(range(5)))
        core = per_example_gradients(task, parameters, ModelInputs(x), list(range(5)))
    return model, config, task, parameters, x, result, grads, core


def explicit_factors(model, task, parameters, x):
    """A = E[a aᵀ], S = E[δ δᵀ] per layer over every position of every pair, from torch's own module hooks."""
    modules = {"conv_in": model.conv_in, "time": model.time, "tokens": model.tokens, "conv_out": model.conv_out}
    point = curvature_task(task.adapter, task.config, "empirical", 0)
    inputs_of, grads_of = {}, {}
    handles = [m.register_forward_hook(lambda m, i, o, n=n: inputs_of.__setitem__(n, i[0].detach()))
               for n, m in modules.items()]
    handles += [m.register_full_backward_hook(lambda m, gi, go, n=n: grads_of.__setitem__(n, go[0].detach()))
                for n, m in modules.items()]
    A = {n: 0 for n in modules}
    S = {n: 0 for n in modules}
    count = {n: 0 for n in modules}
    try:
        for _, _, chunk_inputs, chunk_keys in point_chunks(ModelInputs(x), list(range(5)), task.timesteps(list(range(5))),
                                                            task.noise_draws, 30):
            point.outputs(chunk_inputs, chunk_keys).sum().backward()
            for name, module in modules.items():
                a, d = layer_rows(module, inputs_of[name].double(), grads_of[name].double())
                A[name] = A[name] + a.T @ a
                S[name] = S[name] + d.T @ d
                count[name] += len(a)
    finally:
        for handle in handles:
            handle.remove()
        model.zero_grad(set_to_none=True)
    return {n: A[n] / count[n] for n in modules}, {n: S[n] / count[n] for n in modules}


def test_ekfac_bases_diagonalize_the_explicit_kronecker_factors(ekfac):
    model, _, task, parameters, x, result, _, _ = ekfac
    A, S = explicit_factors(model, task, parameters, x)
    for name in A:
        for side, factor in (("in", A[name]), ("out", S[name])):
            basis = result["bases"][f"{name}.weight"][side].double()
            rotated = basis.T @ factor @ basis
            scale = float(factor.diagonal().sum())
            off = rotated - torch.diag(rotated.diagonal())
            assert off.abs().max() <= 1e-5 * scale, (name, side)
            leading = torch.linalg.eigvalsh(factor).flip(0)[: basis.shape[1]]  # null directions may be dropped
            torch.testing.assert_close(rotated.diagonal(), leading, rtol=1e-4, atol=1e-6 * scale)
    # biases are rotated by their layer's Q_S; the GroupNorm keeps the identity (diagonal correction)
    torch.testing.assert_close(result["bases"]["conv_in.bias"]["dense"], result["bases"]["conv_in.weight"]["out"])
    torch.testing.assert_close(result["bases"]["norm.weight"]["dense"], torch.eye(4))


def test_ekfac_eigenvalues_are_second_moments_of_rotated_autograd_pair_gradients(ekfac):
    _, _, _, parameters, _, result, grads, _ = ekfac
    for name, values in result["eigenvalues"].items():
        g = grads[name]
        sides = result["bases"][name]
        if "dense" in sides:
            rotated = g.flatten(1) @ sides["dense"].double()
        else:
            rotated = sides["out"].double().T @ g.reshape(len(g), g.shape[1], -1) @ sides["in"].double()
        expected = rotated.pow(2).mean(0)
        torch.testing.assert_close(values.double(), expected, rtol=1e-3, atol=1e-6 * float(expected.max()))
    # mean Λ over every coordinate of the full (orthonormal) bases: Σ_p E‖G_p‖²_F / Σ_p numel_p (rotations keep ‖·‖_F)
    total = sum(float(grads[name].flatten(1).pow(2).sum(1).mean()) for name in parameters)
    assert result["mean_eigenvalue"] == pytest.approx(total / sum(p.numel() for p in parameters.values()), rel=1e-4)


def test_ekfac_scores_equal_the_explicit_damped_inverse(ekfac):
    """φ̃(q)·φ(z) = g(q)ᵀ (Ĝ + λI)⁻¹ g(z), Ĝ = ⊕_layers (Q_S ⊗ Q_A) diag(Λ) (Q_S ⊗ Q_A)ᵀ built as an explicit
    matrix, at the featurization's λ_f and at another λ, exactly when the mix is one-to-one (k ≥ the kept
    coordinates); the features are the whitened coordinates times M (version 2) or, for a version-1 curvature (no
    λ_f: the stores written before), H M with queries (H ⊘ (Λ + λ)) M."""
    model, config, task, parameters, x, result, _, core = ekfac
    blocks, curvature = [], []
    for name in parameters:  # the explicit curvature matrix, block-diagonal over parameters
        sides = result["bases"][name]
        q = sides["dense"].double() if "dense" in sides else torch.kron(sides["out"].double(), sides["in"].double())
        curvature.append(q @ torch.diag(result["eigenvalues"][name].double().flatten()) @ q.T)
        blocks.append(core[name].flatten(1).double())
    g = torch.cat(blocks, 1)
    matrix = torch.block_diag(*curvature)
    total = len(matrix)
    assert result["feature_damping"] == pytest.approx(0.1 * result["mean_eigenvalue"])

    def explicit(damping):
        return g @ torch.linalg.solve(matrix + damping * torch.eye(total, dtype=torch.float64), g.T)

    exact = PreconditionedProjector(model, parameters, total, 0, result)  # k = every coordinate: a signed permutation
    small = PreconditionedProjector(model, parameters, 16, 0, result)
    assert exact.spec()["eigenvalue_correction"]["version"] == 2
    with gradients_only_for(model, parameters):
        h = exact.sketch.features(task, parameters, ModelInputs(x), list(range(5))).double()
        train = exact.features(task, parameters, ModelInputs(x), list(range(5))).double()
        train_small = small.features(task, parameters, ModelInputs(x), list(range(5))).double()
        for damping in (result["feature_damping"], 3.0 * result["mean_eigenvalue"]):
            query = exact.for_queries(damping).features(task, parameters, ModelInputs(x), list(range(5))).double()
            expected = explicit(damping)
            torch.testing.assert_close(query @ train.T, expected, rtol=1e-3, atol=1e-5 * float(expected.abs().max()))
            torch.testing.assert_close(exact.precondition(h, damping).double(), query, rtol=1e-4,
                                       atol=1e-6 * float(query.abs().max()))
    eigenvalues = small.sketch_eigenvalues.double()
    whitened = h / (eigenvalues + result["feature_damping"]).sqrt()
    mix = small.mix("cpu").double()
    torch.testing.assert_close(train_small, whitened @ mix, rtol=1e-4, atol=1e-6 * float(train_small.abs().max()))
    # version 1 (a curvature without λ_f): training H M, queries (H ⊘ (Λ + λ)) M
    old = PreconditionedProjector(model, parameters, 16, 0, {k: v for k, v in result.items() if k != "feature_damping"})
    assert old.spec()["eigenvalue_correction"]["version"] == 1 and "feature_damping" not in old.curvature_state()
    damping = 0.3 * result["mean_eigenvalue"]
    with gradients_only_for(model, parameters):
        train = old.features(task, parameters, ModelInputs(x), list(range(5))).double()
        query = old.for_queries(damping).features(task, parameters, ModelInputs(x), list(range(5))).double()
    torch.testing.assert_close(train, h @ mix, rtol=1e-4, atol=1e-6 * float(train.abs().max()))
    torch.testing.assert_close(query, (h / (eigenvalues + damping)) @ mix, rtol=1e-4, atol=1e-6 * float(query.abs().max()))


def test_ekfac_state_round_trip_and_truncation(ekfac):
    model, _, task, parameters, x, result, _, _ = ekfac
    projector = PreconditionedProjector(model, parameters, 16, 0, result)
    again = PreconditionedProjector(model, parameters, 16, 0)
    assert not again.fitted
    again.load_state_dict(projector.state_dict())  # the bases (projection.safetensors)
    with pytest.raises(RuntimeError, match="eigenvalues"):
        again.for_queries(1.0)
    again.load_curvature(projector.curvature_state())  # Λ and λ_f (method_state.safetensors)
    assert torch.equal(again.sketch_eigenvalues, projector.sketch_eigenvalues)
    assert again.feature_damping == projector.feature_damping == result["feature_damping"]
    assert again.spec() == projector.spec() and again.mean_eigenvalue == projector.mean_eigenvalue
    with gradients_only_for(model, parameters):
        small = ekfac_calibrate(task, model, parameters, [(ModelInputs(x), list(range(5)))], sketch_dim=40, seed=0,
                                fisher="mc", damping_ratio=0.1)
    kept = sum(v.numel() for v in small["eigenvalues"].values())
    assert 40 <= kept < sum(p.numel() for p in parameters.values())
    assert small["feature_damping"] == pytest.approx(0.1 * small["mean_eigenvalue"])
    with gradients_only_for(model, parameters):  # an absolute λ (config.damping) whitens the features instead
        absolute = ekfac_calibrate(task, model, parameters, [(ModelInputs(x), list(range(5)))], sketch_dim=40, seed=0,
                                   fisher="mc", damping_ratio=0.1, damping=0.5)
    assert absolute["feature_damping"] == 0.5 and absolute["mean_eigenvalue"] == small["mean_eigenvalue"]


def test_mc_fisher_sample_is_unbiased_for_the_ggn():
    """E_ξ[∇ℓ̃ ∇ℓ̃ᵀ] = (2/D) JᵀJ for a linear model ε_θ = W x (J = ∂ vec(ε_θ)/∂ vec(W))."""
    from diffusers_attribution.curvature import SampledLoss

    torch.manual_seed(0)
    x = torch.randn(3)
    weight = torch.randn(4, 3, requires_grad=True)
    objective, total, draws = SampledLoss(7), torch.zeros(12, 12, dtype=torch.float64), 4000
    for _ in range(draws):
        (grad,) = torch.autograd.grad(objective((weight @ x)[None], None, None).sum(), weight)
        total += torch.outer(grad.flatten().double(), grad.flatten().double())
    jacobian = torch.kron(torch.eye(4), x[None]).double()  # ∂(W x)/∂ vec(W), row-major
    ggn = 2 / 4 * jacobian.T @ jacobian
    torch.testing.assert_close(total / draws, ggn, rtol=0, atol=0.1 * float(ggn.abs().max()))


# ---------------------------------------------------------------------------------------------- end to end, DAS


def tiny_setup(**fields):
    from tiny_pipelines import tiny_ddpm_pipeline

    pipe = tiny_ddpm_pipeline(attention=False)
    config = AttributionConfig(**{"num_timesteps": 2, "noise_draws": 2, "batch_size": 3, **fields})
    images = torch.rand(7, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return pipe, config, images


def reference_pair_gradients(featurizer, images, keys, output):
    """Per-pair autograd gradients of `output` through the featurizer's own projector: [B, K·D, k]."""
    from diffusers_attribution.objectives import OBJECTIVES

    task = featurizer.task
    inputs = featurizer.adapter.encode(images, [None] * len(images), keys, featurizer.config.noise_seed)
    projector = featurizer.projector
    with gradients_only_for(featurizer.adapter.denoiser, featurizer.parameters):
        grads, flat = pair_gradients(task, featurizer.parameters, inputs, keys, OBJECTIVES[output])
    return flat.view(len(keys), task.num_columns, -1), inputs, projector


def reference_residuals(featurizer, config, inputs):
    """DAS's r_i = mean_p sqrt(ℓ_ip) / ‖sqrt(ℓ_i)‖ of the 7 tiny_setup examples (K·D = 4 pairs), from the losses."""
    point = curvature_task(featurizer.adapter, config, "empirical", 0)
    losses = torch.cat([point.outputs(chunk_inputs, chunk_keys).detach().double() for _, _, chunk_inputs, chunk_keys
                        in point_chunks(inputs, list(range(7)), featurizer.task.timesteps(list(range(7))), 2, 100)])
    roots = losses.view(7, 4).sqrt()
    return (roots.sum(1) / roots.norm(dim=1)) / 4


def test_das_matches_its_closed_form_with_the_default_damping_rule(tmp_path):
    """s = φ(q)(ΦᵀΦ + λI)⁻¹Φᵀ ⊙ r with unit-normalized per-pair gradients of the mean output (exact, identity
    projector), r_i = mean_p sqrt(ℓ_ip) / ‖sqrt(ℓ_i)‖, λ = ratio · ‖Φ‖²_F / min(N, k)."""
    from diffusers_attribution.methods.base import get_method
    from diffusers_attribution.scoring import default_damping

    pipe, config, images = tiny_setup(method="das", projector="identity", damping_ratio=0.3)
    featurizer = get_method("das").featurizer(pipe, config)
    store = featurizer.featurize_dataset(images, progress=False)
    psi, inputs, _ = reference_pair_gradients(featurizer, images, list(range(7)), "mean")
    phi = (psi / psi.norm(dim=2, keepdim=True)).mean(1)
    torch.testing.assert_close(store.features.double(), phi, rtol=1e-4, atol=1e-6 * float(phi.abs().max()))
    residuals = reference_residuals(featurizer, config, inputs)
    torch.testing.assert_close(store.method_state["residuals"], residuals, rtol=1e-5, atol=1e-7)

    queries = featurizer.featurize_queries(images[:2])
    psi_q, _, _ = reference_pair_gradients(featurizer, images[:2], ["query:0", "query:1"], "mean")
    torch.testing.assert_close(queries.double(), (psi_q / psi_q.norm(dim=2, keepdim=True)).mean(1), rtol=1e-4,
                               atol=1e-6 * float(phi.abs().max()))
    damping = default_damping(store.features, 0.3)
    kernel = phi.T @ phi if phi.shape[0] > phi.shape[1] else None
    inverse_part = (queries.double() @ phi.T) @ torch.linalg.inv(phi @ phi.T + damping * torch.eye(7, dtype=torch.float64)) \
        if kernel is None else queries.double() @ torch.linalg.inv(kernel + damping * torch.eye(len(kernel))) @ phi.T
    expected = inverse_part * residuals[None]
    scorer = get_method("das").scorer(store)
    assert scorer.damping == pytest.approx(damping)
    torch.testing.assert_close(scorer.scores(queries).double(), expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()))
    saved = FeatureStore.from_pretrained(store.save_pretrained(tmp_path / "das"), verify=True)
    torch.testing.assert_close(get_method("das").scorer(saved).scores(queries), scorer.scores(queries))
    with pytest.raises(ValueError, match="residuals"):
        get_method("das").scorer(FeatureStore(store.features, config, {"num_examples": 7}))
    sharded = get_method("das").featurizer(pipe, config).featurize_dataset(images, progress=False, output_dir=tmp_path / "s",
                                                            shard_rows=3)  # residuals collected per shard
    assert torch.equal(sharded.method_state["residuals"], store.method_state["residuals"])
    torch.testing.assert_close(sharded.features, store.features)


def test_das_fisher_matches_its_closed_form_with_the_default_damping_rule(tmp_path):
    """s = φ(q)(F + λI)⁻¹Φᵀ ⊙ r: F = Σ_i (1/(K·D)) Σ_p ψ_ip ψ_ipᵀ of autograd per-pair gradients of the mean output
    (not normalized), φ their mean, r DAS's residuals, λ = ratio · tr(F) / k (exact: identity projector, conv_out)."""
    from diffusers_attribution.methods.base import get_method

    pipe, config, images = tiny_setup(method="das-fisher", projector="identity", damping_ratio=0.3,
                                      parameters=["conv_out.*"])
    featurizer = get_method("das-fisher").featurizer(pipe, config)
    store = featurizer.featurize_dataset(images, progress=False)
    psi, inputs, _ = reference_pair_gradients(featurizer, images, list(range(7)), "mean")
    phi, fisher = psi.mean(1), torch.einsum("ipk,ipl->kl", psi, psi) / 4
    scale = float(fisher.abs().max())
    torch.testing.assert_close(store.features.double(), phi, rtol=1e-4, atol=1e-6 * float(phi.abs().max()))
    torch.testing.assert_close(store.method_state["pair_fisher"], fisher, rtol=1e-4, atol=1e-6 * scale)
    assert int(store.method_state["pairs"]) == 28
    residuals = reference_residuals(featurizer, config, inputs)
    torch.testing.assert_close(store.method_state["residuals"], residuals, rtol=1e-5, atol=1e-7)

    queries = featurizer.featurize_queries(images[:2])
    psi_q, _, _ = reference_pair_gradients(featurizer, images[:2], ["query:0", "query:1"], "mean")
    torch.testing.assert_close(queries.double(), psi_q.mean(1), rtol=1e-4, atol=1e-6 * float(phi.abs().max()))
    k = fisher.shape[0]
    damping = 0.3 * float(fisher.trace()) / k
    expected = queries.double() @ torch.linalg.inv(fisher + damping * torch.eye(k, dtype=torch.float64)) @ phi.T
    expected = expected * residuals[None]
    scorer = get_method("das-fisher").scorer(store)
    assert scorer.damping == pytest.approx(damping)
    scores = scorer.scores(queries).double()
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()))
    # neither DAS's kernel of the averaged features nor the projected Fisher without the residual weights
    kernel = phi.T @ phi
    damped = 0.3 * float(kernel.trace()) / k
    das_like = queries.double() @ torch.linalg.inv(kernel + damped * torch.eye(k, dtype=torch.float64)) @ phi.T
    assert not torch.allclose(das_like * residuals[None], expected, rtol=1e-2)
    assert not torch.allclose(expected / residuals[None], expected, rtol=1e-3)
    saved = FeatureStore.from_pretrained(store.save_pretrained(tmp_path / "das-fisher"), verify=True)
    torch.testing.assert_close(get_method("das-fisher").scorer(saved).scores(queries), scorer.scores(queries))
    sharded = get_method("das-fisher").featurizer(pipe, config).featurize_dataset(
        images, progress=False, output_dir=tmp_path / "s", shard_rows=3)  # F and r collected per shard, then combined
    assert torch.equal(sharded.method_state["residuals"], store.method_state["residuals"])
    torch.testing.assert_close(sharded.method_state["pair_fisher"], store.method_state["pair_fisher"], rtol=1e-10,
                               atol=1e-12 * scale)
    torch.testing.assert_close(sharded.features, store.features)


def test_fisher_featurizer_end_to_end_and_store_round_trip(tmp_path):
    """Calibrated factored features, F from the same per-pair projected loss gradients, saved and reloaded."""
    from diffusers_attribution.methods.base import get_method
    from diffusers_attribution.store.errors import CorruptStoreError
    from diffusers_attribution.store.files import METHOD_STATE_NAME

    pipe, config, images = tiny_setup(method="fisher", projection_dim=32, calibration_examples=4)
    featurizer = get_method("fisher").featurizer(pipe, config)
    store = featurizer.featurize_dataset(images, progress=False)
    psi, _, projector = reference_pair_gradients(featurizer, images, list(range(7)), "loss")
    # ψ through the projector: reproject the autograd gradients with the projector's own (calibrated, linear) map
    inputs = featurizer.adapter.encode(images, [None] * 7, list(range(7)), config.noise_seed)
    point = PointTask(featurizer.adapter, config)
    rows = []
    with gradients_only_for(featurizer.adapter.denoiser, featurizer.parameters):
        for _, _, chunk_inputs, chunk_keys in point_chunks(inputs, list(range(7)), featurizer.task.timesteps(list(range(7))), 2, 100):
            rows.append(projector.features(point, featurizer.parameters, chunk_inputs, chunk_keys).double())
    psi_p = torch.cat(rows)
    expected = psi_p.T @ psi_p / 4
    torch.testing.assert_close(store.method_state["pair_fisher"], expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()))
    torch.testing.assert_close(store.features.double(), psi_p.view(7, 4, -1).mean(1), rtol=1e-4,
                               atol=1e-5 * float(store.features.abs().max()))
    assert int(store.method_state["pairs"]) == 28
    queries = featurizer.featurize_queries(images[:2])
    scores = get_method("fisher").scorer(store).scores(queries)
    saved = FeatureStore.from_pretrained(store.save_pretrained(tmp_path / "fisher"), verify=True)
    torch.testing.assert_close(get_method("fisher").scorer(saved).scores(queries), scores)
    path = tmp_path / "fisher" / METHOD_STATE_NAME
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(CorruptStoreError):
        FeatureStore.from_pretrained(tmp_path / "fisher")
    with pytest.raises(ValueError, match="loss"):
        AttributionConfig(method="fisher", output="squared-norm")


def test_ekfac_featurizer_store_scores_new_queries_without_training_data(tmp_path):
    from diffusers_attribution import enable_attribution
    from diffusers_attribution.methods.base import get_method

    pipe, config, images = tiny_setup(method="ekfac-empirical", projection_dim=32, calibration_examples=4,
                                      damping_ratio=0.1)
    method = get_method("ekfac-empirical")
    featurizer = method.featurizer(pipe, config)
    store = featurizer.featurize_dataset(images, progress=False)
    assert featurizer.projector.fisher == "empirical" and store.metadata["projection"]["eigenvalue_correction"]["fisher"] == "empirical"
    queries = featurizer.featurize_queries(images[:2])
    scores = method.scorer(store).scores(queries)
    saved = FeatureStore.from_pretrained(store.save_pretrained(tmp_path / "ekfac"), verify=True)
    from diffusers_attribution.api import make_featurizer

    again = make_featurizer(pipe, saved.config, store=saved)  # no training data: the store's bases and Λ
    torch.testing.assert_close(again.featurize_queries(images[:2]), queries)
    torch.testing.assert_close(method.scorer(saved).scores(again.featurize_queries(images[:2])), scores)
    result = enable_attribution(pipe).attribute(images[:2], saved)  # through the public API, the store's λ
    torch.testing.assert_close(result.scores, scores, rtol=1e-4, atol=1e-6 * float(scores.abs().max()))
    with pytest.raises(ValueError, match="featurize_queries"):
        method.scorer(saved, damping_ratio=0.5)
    # the query side carries 1/(Λ + λ): a larger λ shrinks the preconditioned query
    sketch = method.query_sketch(featurizer, images[:2])
    small, large = (featurizer.projector.precondition(sketch, r * featurizer.projector.mean_eigenvalue) for r in (0.01, 10))
    assert small.norm() > large.norm()
    # sharded featurization in a directory: the EK-FAC bases and Λ are computed once and saved first
    sharded = featurizer.featurize_dataset(images, progress=False, output_dir=tmp_path / "sharded", shard_rows=3)
    torch.testing.assert_close(sharded.features, store.features)
    torch.testing.assert_close(method.scorer(sharded).scores(queries), scores)


def test_ekfac_features_depend_on_the_damping_so_a_folder_of_another_damping_is_refused(tmp_path):
    """EK-FAC whitens its features at the config's λ (`Method.feature_fields`): featurizing at another ratio into a
    folder of the first must not silently return (or resume) the first store; kernel methods' λ stays score-only."""
    from dataclasses import replace

    from diffusers_attribution.methods.base import get_method
    from diffusers_attribution.store.errors import StoreMismatchError

    pipe, config, images = tiny_setup(method="ekfac", projection_dim=32, calibration_examples=4, damping_ratio=1e-4)
    other = replace(config, damping_ratio=0.5)
    assert config.feature_hash() != other.feature_hash()
    assert config.feature_dict(method_fields=False) == other.feature_dict(method_fields=False)
    das = AttributionConfig(method="das-fisher", damping_ratio=1e-4)
    assert das.feature_hash() == replace(das, damping_ratio=0.5).feature_hash()
    method = get_method("ekfac")
    first = method.featurizer(pipe, config).featurize_dataset(images, progress=False, output_dir=tmp_path / "s",
                                                              shard_rows=3)
    fresh = method.featurizer(pipe, other).featurize_dataset(images, progress=False)
    assert not torch.allclose(first.features, fresh.features)  # the features do depend on λ_f
    with pytest.raises(StoreMismatchError, match="damping"):
        method.featurizer(pipe, other).featurize_dataset(images, progress=False, output_dir=tmp_path / "s", shard_rows=3)
    # the same ratio resumes and reloads (the hash is stable), and a reloaded store still loads with verification
    again = method.featurizer(pipe, config).featurize_dataset(images, progress=False, output_dir=tmp_path / "s",
                                                              shard_rows=3)
    torch.testing.assert_close(again.features, first.features)
    FeatureStore.from_pretrained(tmp_path / "s", verify=True)


def test_fisher_in_a_directory_in_shards_and_two_processes_equals_one_pass(tmp_path):
    """Per-shard partial F summed in shard order: the same F (and features) in memory, sharded, resumed, and
    featurized by 2 processes (accelerate's debug launcher on CPU, gloo)."""
    from diffusers_attribution.methods.base import get_method
    from diffusers_attribution.store.writer import PARTS

    pipe, config, images = tiny_setup(method="fisher", projection_dim=16, calibration_examples=3)
    memory = get_method("fisher").featurizer(pipe, config).featurize_dataset(images, progress=False)
    sharded = get_method("fisher").featurizer(pipe, config).featurize_dataset(images, progress=False, output_dir=tmp_path / "s",
                                                               shard_rows=3)
    torch.testing.assert_close(sharded.features, memory.features)
    torch.testing.assert_close(sharded.method_state["pair_fisher"], memory.method_state["pair_fisher"], rtol=1e-12, atol=1e-14)
    assert int(sharded.method_state["pairs"]) == 28 and len(list((tmp_path / "s" / PARTS).iterdir())) == 3
    (tmp_path / "s" / "config.json").unlink()
    (tmp_path / "s" / "features-00001-of-00003.safetensors").unlink()
    resumed = get_method("fisher").featurizer(pipe, config).featurize_dataset(images, progress=False, output_dir=tmp_path / "s",
                                                               shard_rows=3)
    assert torch.equal(resumed.method_state["pair_fisher"], sharded.method_state["pair_fisher"])
    # two processes (accelerate's debug launcher: forked CPU processes over gloo), each its share of the shards
    from test_distributed import launch

    launch(_fisher_in_process, tmp_path / "two")
    two = FeatureStore.from_pretrained(tmp_path / "two", verify=True)
    torch.testing.assert_close(two.features, memory.features)
    assert torch.equal(two.method_state["pair_fisher"], sharded.method_state["pair_fisher"])
    writers = {read_shard_run(p)["process"] for p in (tmp_path / "two").glob("features-*.safetensors")}
    assert writers == {"0/2", "1/2"}


def _fisher_in_process(directory) -> None:
    from accelerate import PartialState

    from diffusers_attribution.methods.base import get_method

    pipe, config, images = tiny_setup(method="fisher", projection_dim=16, calibration_examples=3)
    get_method("fisher").featurizer(pipe, config).featurize_dataset(images, progress=False, output_dir=directory, shard_rows=3,
                                                     accelerator=PartialState(cpu=True))


def test_lora_only_fisher_and_ekfac_on_a_stable_diffusion_unet(tmp_path):
    """LoRA weights only, text conditioning: the pair path and the EK-FAC hooks run through cross-attention."""
    from diffusers_attribution import enable_attribution
    from diffusers_attribution.gradients.timesteps import timestep_features
    from diffusers_attribution.methods.base import get_method
    from tiny_pipelines import save_tiny_lora, tiny_stable_diffusion_pipeline

    pipe = enable_attribution(tiny_stable_diffusion_pipeline())
    pipe.load_lora_weights(save_tiny_lora(pipe, tmp_path / "lora"), adapter_name="tiny_lora")
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    captions = ["a cat", "a dog", None]
    data = [{"image": image, "text": caption} for image, caption in zip(images, captions)]
    fields = {"parameters": "lora", "num_timesteps": 2, "projection_dim": 24, "calibration_examples": 3, "batch_size": 3}

    fisher = get_method("fisher").featurizer(pipe, AttributionConfig(method="fisher", **fields))
    store = fisher.featurize_dataset(data, progress=False)
    assert all(".lora_" in name for name in fisher.parameters)
    inputs = fisher.adapter.encode(images, captions, [0, 1, 2], fisher.config.noise_seed)
    norms = timestep_features(fisher, inputs, [0, 1, 2], fisher.task.timesteps([0, 1, 2])).norms.double()
    matrix = store.method_state["pair_fisher"]
    torch.testing.assert_close(matrix, matrix.T)
    assert float(matrix.trace()) == pytest.approx(float(norms.pow(2).sum() / 2), rel=1e-4)  # Σ ‖ψ‖² / (K·D)

    ekfac = get_method("ekfac").featurizer(pipe, AttributionConfig(method="ekfac", **fields))
    ekfac_store = ekfac.featurize_dataset(data, progress=False)
    bases = ekfac.projector.bases
    assert bases and all(".lora_" in name for name in bases)
    assert all(values.min() >= 0 for values in ekfac.projector.eigenvalues.values())
    result = pipe.attribute(images[:2], ekfac_store, prompts=["a cat", "a dog"])
    assert result.scores.shape == (2, 3) and torch.isfinite(result.scores).all()


def test_ekfac_with_the_squared_norm_measurement_keeps_the_loss_curvature(ekfac):
    """D-TRAK's squared norm as the measurement (the paper's option): A, S and Λ stay those of the training loss."""
    model, config, task, parameters, x, result, _, _ = ekfac
    measured = AttributionTask(task.adapter, AttributionConfig(**{**config.to_dict(), "output": "squared-norm"}))
    batches = [(ModelInputs(x[:3]), [0, 1, 2]), (ModelInputs(x[3:]), [3, 4])]
    total = sum(p.numel() for p in parameters.values())
    with gradients_only_for(model, parameters):
        other = ekfac_calibrate(measured, model, parameters, batches, sketch_dim=total, seed=0, fisher="empirical",
                                damping_ratio=0.1, rows_per_pass=7)
    for name, values in other["eigenvalues"].items():  # the same Λ (on the rectangle the measurement keeps)
        torch.testing.assert_close(values, result["eigenvalues"][name][tuple(slice(0, n) for n in values.shape)])
    projector = PreconditionedProjector(model, parameters, 16, 0, other)
    with gradients_only_for(model, parameters):
        loss_h = PreconditionedProjector(model, parameters, 16, 0, result).sketch.features(task, parameters, ModelInputs(x[:1]), [0])
        norm_h = projector.sketch.features(measured, parameters, ModelInputs(x[:1]), [0])
    assert (loss_h - norm_h).abs().max() > 1e-3 * loss_h.abs().max()  # the measurement's gradient differs
