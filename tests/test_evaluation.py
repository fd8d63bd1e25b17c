"""Evaluation tooling checked against independent computations: LDS against hand-computed sums and
scipy's Spearman, deterministic masks, the retraining harness on a tiny model (with resume and sharding),
the diffusion loss written out by hand, damping chosen without the evaluation queries, and counterfactuals."""

import json
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from diffusers_attribution.demo.digits import DigitsRecipe
from diffusers_attribution.evaluation.counterfactual import counterfactual
from diffusers_attribution.evaluation.damping import (
    KernelPath,
    evaluate_with_validation_damping,
    select_damping,
    split_queries,
)
from diffusers_attribution.evaluation.lds import lds, spearman_rows, summarize_seeds
from diffusers_attribution.evaluation.masks import removal_masks, subset_masks
from diffusers_attribution.evaluation.outputs import LossSpec, QueryLosses, diffusion_losses
from diffusers_attribution.evaluation.retrain import (
    DigitsTrainingRecipe,
    RetrainHarness,
    RetrainMismatchError,
    load_results,
)
from diffusers_attribution.scoring import KernelScorer
from diffusers_attribution.seeding import seeded_randn
from tiny_pipelines import tiny_ddpm_pipeline

TINY = DigitsRecipe(block_out_channels=(8, 16), norm_num_groups=4, num_steps=3, batch_size=4, lr_warmup_steps=1)


# ------------------------------------------------------------------------------------------------ LDS


def test_lds_matches_hand_computed_sums_and_scipy():
    # 2 queries, N = 4 training examples, M = 5 subsets.
    scores = torch.tensor([[1.0, 2.0, 0.0, -1.0],
                           [0.5, -0.5, 3.0, 1.0]])
    masks = torch.tensor([[1, 1, 0, 0],
                          [0, 1, 1, 0],
                          [1, 0, 0, 1],
                          [0, 0, 1, 1],
                          [1, 1, 1, 0]], dtype=torch.bool)
    # Σ_{i∈s} τ_i(q0) = 3, 2, 0, -1, 3 ; Σ τ_i(q1) = 0, 2.5, 1.5, 4, 3
    losses = torch.tensor([[0.10, 0.30],
                           [0.20, 0.20],
                           [0.40, 0.25],
                           [0.50, 0.05],
                           [0.15, 0.10]])
    result = lds(scores, masks, losses, num_bootstrap=500, seed=0)
    # Query 0: -loss = -.1, -.2, -.4, -.5, -.15 ranks 5, 3, 2, 1, 4; predicted 3, 2, 0, -1, 3 ranks 4.5, 3, 2, 1, 4.5.
    ra, rb = np.array([4.5, 3, 2, 1, 4.5]), np.array([5, 3, 2, 1, 4])
    ra, rb = ra - ra.mean(), rb - rb.mean()
    expected0 = (ra * rb).sum() / np.sqrt((ra * ra).sum() * (rb * rb).sum())
    assert result.per_query[0].item() == pytest.approx(expected0, abs=1e-12)
    # Query 1 independently with scipy, predicted sums written out by hand.
    expected1 = spearmanr([0, 2.5, 1.5, 4, 3], -losses[:, 1].numpy()).statistic
    assert result.per_query[1].item() == pytest.approx(expected1, abs=1e-12)
    assert result.mean == pytest.approx((expected0 + expected1) / 2, abs=1e-12)
    assert result.ci[0] <= result.mean <= result.ci[1]
    assert result.num_subsets == 5 and result.num_undefined == 0
    again = lds(scores, masks, losses, num_bootstrap=500, seed=0)
    assert again.ci == result.ci  # seeded bootstrap
    # Higher-is-better outputs flip the sign.
    assert lds(scores, masks, losses, higher_is_better=True).mean == pytest.approx(-result.mean)


def test_lds_random_cases_against_scipy_and_bootstrap_interval():
    rng = np.random.default_rng(0)
    n_q, N, M = 6, 30, 12
    scores = torch.from_numpy(rng.normal(size=(n_q, N)))
    masks = torch.from_numpy(rng.random((M, N)) < 0.5)
    outputs = torch.from_numpy(np.round(rng.normal(size=(M, n_q)), 1))  # rounding makes ties
    result = lds(scores, masks, outputs, num_bootstrap=1000, seed=3)
    predicted = scores.numpy() @ masks.numpy().T.astype(float)
    expected = [spearmanr(predicted[q], -outputs[:, q].numpy()).statistic for q in range(n_q)]
    np.testing.assert_allclose(result.per_query.numpy(), expected, atol=1e-12)
    boot = np.random.default_rng(3)
    samples = np.asarray(expected)[boot.integers(0, n_q, size=(1000, n_q))].mean(1)
    assert result.ci == pytest.approx((np.quantile(samples, 0.025), np.quantile(samples, 0.975)))
    # A constant output makes that query's rho undefined: left out of the mean.
    outputs[:, 0] = 1.0
    partial = lds(scores, masks, outputs)
    assert np.isnan(partial.per_query[0].item()) and partial.num_undefined == 1
    assert partial.mean == pytest.approx(np.mean(expected[1:]))
    summary = summarize_seeds([result, partial])
    assert summary.mean == pytest.approx((result.mean + partial.mean) / 2)
    assert summary.std == pytest.approx(np.std([result.mean, partial.mean], ddof=1))
    with pytest.raises(ValueError, match="outputs must be"):
        lds(scores, masks, outputs.T)


def test_spearman_rows_ties():
    a = np.array([[1, 1, 2, 3, 3, 3], [0, 0, 0, 0, 0, 0]], dtype=float)
    b = np.array([[6, 5, 4, 4, 2, 1], [1, 2, 3, 4, 5, 6]], dtype=float)
    rho = spearman_rows(a, b)
    assert rho[0] == pytest.approx(spearmanr(a[0], b[0]).statistic)
    assert np.isnan(rho[1])


# ------------------------------------------------------------------------------------------------ masks


def test_masks_are_deterministic_with_exact_alpha():
    a = subset_masks(101, 8, alpha=0.5, seed=7)
    assert a.dtype == torch.bool and a.shape == (8, 101)
    assert torch.equal(a, subset_masks(101, 8, alpha=0.5, seed=7))
    assert (a.sum(1) == 50).all()  # round(0.5 · 101) = 50 (banker's rounding of 50.5)
    assert torch.equal(subset_masks(101, 16, alpha=0.5, seed=7)[:8], a)  # more subsets keep the first ones
    assert not torch.equal(a, subset_masks(101, 8, alpha=0.5, seed=8))
    assert len({tuple(row.tolist()) for row in a}) == 8
    b = subset_masks(40, 500, alpha=0.3, seed=0)
    assert (b.sum(1) == 12).all()
    assert abs(b.double().mean(0) - 0.3).max() < 0.12  # every example is in about 30 % of the subsets
    r = removal_masks(6, torch.tensor([[0, 5], [2, 3]]))
    assert r.tolist() == [[False, True, True, True, True, False], [True, True, False, False, True, True]]
    with pytest.raises(ValueError):
        subset_masks(10, 2, alpha=1.5)


# ------------------------------------------------------------------------------------------------ outputs


def test_diffusion_loss_equals_hand_written():
    pipe = tiny_ddpm_pipeline()
    torch.manual_seed(0)
    queries = torch.rand(3, 1, 8, 8) * 2 - 1
    spec = LossSpec(timesteps=4, noise_draws=2, seed=5, rows_per_batch=5)  # odd batch: rows split across queries
    losses = diffusion_losses(pipe, queries, spec, keys=["a", "b", "c"])
    abar = pipe.scheduler.alphas_cumprod
    for i, key in enumerate("abc"):
        noise = seeded_randn((8, 1, 8, 8), 5, "lds-loss", key)
        total = 0.0
        for row, (t, d) in enumerate([(t, d) for t in (0, 250, 500, 750) for d in range(2)]):
            x_t = abar[t].sqrt() * queries[i] + (1 - abar[t]).sqrt() * noise[row]
            with torch.no_grad():
                pred = pipe.unet(x_t[None], torch.tensor([t])).sample
            total += float(((pred - noise[row][None]) ** 2).mean())
        assert losses[i].item() == pytest.approx(total / 8, rel=1e-5)
    again = diffusion_losses(pipe, queries, replace(spec, rows_per_batch=4096), keys=["a", "b", "c"])
    torch.testing.assert_close(losses, again)


# ------------------------------------------------------------------------------------------------ harness


class CountingRecipe(DigitsTrainingRecipe):
    calls: list = []

    def train(self, data, seed):
        CountingRecipe.calls.append((len(data), seed))
        return super().train(data, seed)


def test_harness_trains_measures_and_resumes(tmp_path):
    torch.manual_seed(0)
    images = torch.rand(12, 1, 8, 8) * 2 - 1
    queries = torch.rand(2, 1, 8, 8) * 2 - 1
    masks = subset_masks(12, 2, alpha=0.5, seed=0)
    measure = QueryLosses({"generated": queries, "real": images[:3]}, LossSpec(timesteps=5))
    recipe = CountingRecipe(TINY)
    CountingRecipe.calls = []

    # Process 0 of 2 trains only subset 0 (explicit rank); process 1 of 2 (an accelerate-like state) the other.
    first = RetrainHarness(recipe, images, masks, tmp_path, measure, rank=0, world_size=2, progress=False).run()
    assert CountingRecipe.calls == [(6, 0)] and first.done.tolist() == [[True, False]]
    barriers = []
    state = SimpleNamespace(process_index=1, num_processes=2, device=torch.device("cpu"),
                            wait_for_everyone=lambda: barriers.append(1))
    results = RetrainHarness(recipe, images, masks, tmp_path, measure, accelerator=state, progress=False).run()
    assert CountingRecipe.calls == [(6, 0), (6, 0)] and results.complete and barriers == [1]
    assert results.outputs("generated").shape == (2, 2) and results.outputs("real").shape == (2, 3)
    assert torch.isfinite(results.outputs("generated")).all()
    # The stored loss is that of the model trained on exactly the subset (deterministic recipe).
    subset_model = DigitsTrainingRecipe(TINY).train(images[masks[1]], 0)
    torch.testing.assert_close(results.values["real"][0, 1], measure(subset_model)["real"])
    CountingRecipe.calls = []

    # Rerun: nothing is trained again; a deleted result is the only one retrained.
    again = RetrainHarness(recipe, images, masks, tmp_path, measure, progress=False).run()
    assert CountingRecipe.calls == []
    torch.testing.assert_close(again.outputs("generated"), results.outputs("generated"))
    (tmp_path / "subset-00001-seed-0.safetensors").unlink()
    RetrainHarness(recipe, images, masks, tmp_path, measure, progress=False).run()
    assert CountingRecipe.calls == [(6, 0)]
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporaries
    loaded = load_results(tmp_path)
    assert torch.equal(loaded.masks, masks) and loaded.complete
    assert json.loads((tmp_path / "harness.json").read_text())["recipe"]["num_steps"] == 3

    # Another recipe or other queries in the same directory are refused, not mixed.
    with pytest.raises(RetrainMismatchError, match="recipe"):
        RetrainHarness(DigitsTrainingRecipe(replace(TINY, num_steps=4)), images, masks, tmp_path, measure,
                       progress=False).run()
    with pytest.raises(RetrainMismatchError, match="measure"):
        RetrainHarness(recipe, images, masks, tmp_path, QueryLosses({"generated": queries * 0.5}, LossSpec(timesteps=5)),
                       progress=False).run()


def test_counterfactual_removes_top_k_and_compares_with_random(tmp_path):
    torch.manual_seed(1)
    images = torch.rand(10, 1, 8, 8) * 2 - 1
    recipe = DigitsTrainingRecipe(TINY)
    full = recipe.train(images, 0)

    def generate(pipe, seed):
        from diffusers_attribution.demo.digits import generate_digits

        return generate_digits(pipe, 1, seed=seed, num_inference_steps=4)

    scores = torch.arange(10.0).repeat(2, 1)  # top-3 = 9, 8, 7 for both queries
    result = counterfactual(recipe, images, scores, [11, 12], 3, tmp_path, full_model=full, generate=generate,
                            encoder=lambda x: x.flatten(1), progress=False)
    assert result.removed.tolist() == [[9, 8, 7]] * 2
    assert result.random_removed.shape == (2, 3) and not torch.equal(result.random_removed[0], result.random_removed[1])
    torch.testing.assert_close(result.original[0], generate(full, 11)[0])
    expected = generate(recipe.train(images[:7], 0), 12)
    torch.testing.assert_close(result.regenerated[1], expected[0])
    assert result.l2[1].item() == pytest.approx(float((expected[0] - result.original[1]).norm()), rel=1e-5)
    summary = result.summary()
    assert set(summary) >= {"l2_mean", "l2_random_mean", "cosine_mean", "cosine_random_mean"}


# ------------------------------------------------------------------------------------------------ damping


def _linear_world(seed=0, N=40, k=12, M=24, n_q=20):
    """Training features, queries and retraining outputs from a known linear datamodel with noise."""
    rng = np.random.default_rng(seed)
    phi = torch.from_numpy(rng.normal(size=(N, k)))
    q = torch.from_numpy(rng.normal(size=(n_q, k)))
    masks = torch.from_numpy(rng.random((M, N)) < 0.5)
    true = q @ torch.linalg.solve(phi.T @ phi + 5.0 * torch.eye(k, dtype=torch.float64), phi.T)
    losses = -(masks.double() @ true.T) + 0.3 * torch.from_numpy(rng.normal(size=(M, n_q)))
    return phi, q, masks, losses


def test_damping_selection_never_reads_evaluation_queries():
    phi, q, masks, losses = _linear_world()
    validation, evaluation = split_queries(len(q), 8, seed=0)
    assert not set(validation.tolist()) & set(evaluation.tolist())
    ratios = [1e-3, 1e-2, 1e-1, 1, 10]
    selection, result = evaluate_with_validation_damping(phi, q, masks, losses, validation, evaluation, ratios)

    # Independent check: brute-force LDS on the validation queries with KernelScorer at each λ.
    mean_eig = float(phi.pow(2).sum() / min(phi.shape))
    brute = [lds(KernelScorer(phi, damping=r * mean_eig).scores(q[validation]), masks, losses[:, validation]).mean
             for r in ratios]
    assert selection.validation_lds == pytest.approx(brute, abs=1e-4)
    assert selection.ratio == ratios[int(np.argmax(brute))]
    assert result.num_queries == len(evaluation)
    torch.testing.assert_close(KernelPath(phi).scores(q[:2], 0.7), KernelScorer(phi, damping=0.7).scores(q[:2]).double(),
                               rtol=1e-4, atol=1e-6)

    # Scrambling the evaluation queries' features and outputs changes nothing about λ.
    q2, losses2 = q.clone(), losses.clone()
    q2[evaluation] = torch.randn(len(evaluation), q.shape[1], dtype=torch.float64) * 100
    losses2[:, evaluation] = torch.rand(len(losses), len(evaluation), dtype=torch.float64)
    selection2, result2 = evaluate_with_validation_damping(phi, q2, masks, losses2, validation, evaluation, ratios)
    assert selection2.validation_lds == selection.validation_lds and selection2.damping == selection.damping
    assert result2.mean != result.mean
    # The same λ as selecting from the validation rows alone.
    alone = select_damping(phi, q[validation], masks, losses[:, validation], ratios)
    assert alone.damping == pytest.approx(selection.damping)
    with pytest.raises(ValueError, match="overlap"):
        evaluate_with_validation_damping(phi, q, masks, losses, validation, torch.cat([evaluation, validation[:1]]))
