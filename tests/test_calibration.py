"""The calibrated factored projection (the default) against autograd per-sample gradients, and its storage."""

import warnings

import pytest
import torch
from test_factored import Toy, ToyAdapter, assert_close_rel

from diffusers_attribution import AttributionConfig, FeatureStore, enable_attribution
from diffusers_attribution.adapters import ModelInputs
from diffusers_attribution.projection import calibrated as calibration
from diffusers_attribution.projection.calibrated import (CalibratedProjector, calibrate, calibration_count,
                                                         calibration_indices, calibration_moments)
from diffusers_attribution.featurize import Featurizer
from diffusers_attribution.gradients.reference import per_example_gradients
from diffusers_attribution.store import CorruptStoreError, StoreMismatchError
from diffusers_attribution.store.files import PROJECTION_NAME
from diffusers_attribution.gradients.task import AttributionTask, gradients_only_for, select_parameters
from tiny_pipelines import tiny_ddpm_pipeline


@pytest.fixture(scope="module")
def toy():
    torch.manual_seed(0)
    model = Toy()
    config = AttributionConfig(method="trak", num_timesteps=3, timestep_schedule="random", projection_dim=40,
                               calibration_examples=6)
    task = AttributionTask(ToyAdapter(model), config)
    parameters = select_parameters(model, config)
    x = torch.randn(6, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    batches = [(ModelInputs(x[:3]), [0, 1, 2]), (ModelInputs(x[3:]), [3, 4, 5])]
    with gradients_only_for(model, parameters), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the bare `table` parameter is left out
        bases = calibrate(task, model, parameters, batches, sketch_dim=120, seed=0)
        grads = per_example_gradients(task, parameters, ModelInputs(x), list(range(6)))
    return model, task, parameters, x, bases, grads


def test_bases_diagonalize_the_per_sample_gradient_moments(toy):
    """U_pᵀ E[G Gᵀ] U_p and V_pᵀ E[Gᵀ G] V_p are diagonal with the leading eigenvalues, from autograd's G."""
    model, _, parameters, _, bases, grads = toy
    assert "table" not in bases and len(bases) >= 10
    for name, sides in bases.items():
        g = grads[name].double()
        if "dense" in sides:
            moments = {"dense": g.flatten(1).T @ g.flatten(1) / len(g)}
        else:
            G = g.reshape(len(g), g.shape[1], -1)
            moments = {"out": torch.einsum("noi,npi->op", G, G) / len(g), "in": torch.einsum("noi,nop->ip", G, G) / len(g)}
        for side, moment in moments.items():
            basis = sides[side].double()
            scale = float(moment.diagonal().sum())
            torch.testing.assert_close(basis.T @ basis, torch.eye(basis.shape[1], dtype=torch.float64), atol=1e-5, rtol=0)
            rotated = basis.T @ moment @ basis
            leading = torch.linalg.eigvalsh(moment).flip(0)[: basis.shape[1]]
            torch.testing.assert_close(rotated.diagonal(), leading, atol=1e-5 * scale, rtol=1e-4)
            off = rotated - torch.diag(rotated.diagonal())
            assert off.abs().max() <= 1e-5 * scale, (name, side)


def test_features_equal_rotated_autograd_gradients_times_the_mix(toy):
    model, task, parameters, x, bases, grads = toy
    projector = CalibratedProjector(model, parameters, 40, 3, bases)
    assert projector.sketch.dim >= 120  # the rectangles hold at least the top sketch_dim coordinates
    with gradients_only_for(model, parameters):
        phi = projector.features(task, parameters, ModelInputs(x), list(range(6)))
        halves = torch.cat([projector.features(task, parameters, ModelInputs(x[i : i + 2]), [i, i + 1])
                            for i in range(0, 6, 2)])
    blocks = sorted((b for bs in projector.sketch.blocks.values() for b in bs), key=lambda b: b.offset)
    coordinates = []
    for block in blocks:
        g, sides = grads[block.name].double(), bases[block.name]
        if "dense" in sides:
            coordinates.append(g.flatten(1) @ sides["dense"].double())
        else:
            G = g.reshape(len(g), block.d_out, block.d_in)
            coordinates.append((sides["out"].double().T @ G @ sides["in"].double()).flatten(1))
    mix = projector.mix("cpu").double()
    assert mix.shape == (projector.sketch.dim, 40)
    assert_close_rel(phi, torch.cat(coordinates, 1) @ mix)
    assert_close_rel(halves, phi)  # independent of batch size
    # the mix is a pure function of (seed, k_mid, k)
    assert torch.equal(CalibratedProjector(model, parameters, 40, 3, bases).mix("cpu"), projector.mix("cpu"))
    assert not torch.equal(CalibratedProjector(model, parameters, 40, 4, bases).mix("cpu"), projector.mix("cpu"))


def test_signed_partition_mix_puts_each_coordinate_in_one_feature(toy):
    """Version 2's mix: every sketch coordinate goes, with sign ±1, to exactly one feature, each feature sums
    ⌊k_mid/k⌋ or ⌈k_mid/k⌉ of them; `finish` (a gather) equals the product with that dense matrix, and over
    seeds E⟨φ, φ'⟩ = ⟨h, h'⟩ (checked against the closed form of the variance)."""
    model, _, parameters, _, bases, _ = toy
    projector = CalibratedProjector(model, parameters, 40, 3, bases)
    assert projector.version == 2 and projector.spec()["mix"] == "signed-partition"
    mix, rows = projector.mix("cpu"), projector.sketch.dim
    assert torch.equal(mix.abs().sum(1), torch.ones(rows)) and set(mix.unique().tolist()) == {-1.0, 0.0, 1.0}
    per_feature = (mix != 0).sum(0)
    assert int(per_feature.min()) == rows // 40 and int(per_feature.max()) == -(-rows // 40)
    h = torch.randn(5, rows, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(projector.finish(h), h @ mix, rtol=1e-6, atol=1e-6)
    # unbiased inner products: the mean over 400 seeds lies within 4 standard errors of ⟨h0, h1⟩
    estimates = torch.tensor([float(torch.dot(*CalibratedProjector(model, parameters, 40, seed, bases).finish(h[:2])))
                              for seed in range(400)])
    exact = float(torch.dot(h[0], h[1]))
    assert abs(float(estimates.mean()) - exact) < 4 * float(estimates.std()) / 20
    assert float(estimates.std()) > 0  # a real estimate, not the identity


def test_version_1_stores_keep_the_gaussian_mix_and_unknown_versions_are_refused(toy):
    model, _, parameters, _, bases, _ = toy
    new = CalibratedProjector(model, parameters, 40, 3, bases)
    old = CalibratedProjector(model, parameters, 40, 3)
    old.load_state_dict(new.state_dict(), {**new.spec(), "version": 1})
    assert old.version == 1 and "mix" not in old.spec()
    gaussian = old.mix("cpu")
    assert (gaussian != 0).float().mean() > 0.99  # dense
    assert abs(float(gaussian.var()) * 40 - 1) < 0.1  # N(0, 1/k)
    h = torch.randn(3, new.sketch.dim, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(old.finish(h), h @ gaussian)
    with pytest.raises(ValueError, match="version 3.*upgrade"):
        old.load_state_dict(new.state_dict(), {**new.spec(), "version": 3})


def test_config_defaults_and_errors():
    config = AttributionConfig()
    assert (config.projector, config.calibration_examples, config.sketch_dim) == ("factored", 64, 2 * 2048)
    assert AttributionConfig(method="tracin").calibration_examples == 0
    assert AttributionConfig(layer_dims={"*": 4}, projection_dim=64).calibration_examples == 0
    assert AttributionConfig(projector="gaussian").calibration_examples == 0
    with pytest.raises(ValueError, match="calibration_examples"):
        AttributionConfig(projector="gaussian", calibration_examples=8)
    with pytest.raises(ValueError, match="sketch_dim"):
        AttributionConfig(projection_dim=64, sketch_dim=32)
    with pytest.raises(ValueError, match="layer_dims"):
        AttributionConfig(layer_dims={"*": 4}, calibration_examples=8)
    assert calibration_indices(10, 4, 0) == calibration_indices(10, 4, 0) != calibration_indices(10, 4, 1)
    assert calibration_indices(3, 64, 0) == [0, 1, 2]


def test_store_round_trip_resume_and_errors(tmp_path, monkeypatch):
    pipe = enable_attribution(tiny_ddpm_pipeline())
    config = AttributionConfig(num_timesteps=2, projection_dim=48, batch_size=3, calibration_examples=5)
    images = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    store = pipe.featurize(images, config, progress=False)
    assert store.metadata["projection"]["calibrated"] and store.projection_state
    with pytest.raises(RuntimeError, match="calibrated"):
        Featurizer(pipe, config).featurize_queries(images[:1])

    saved = FeatureStore.from_pretrained(store.save_pretrained(tmp_path / "saved"))
    assert (tmp_path / "saved" / PROJECTION_NAME).is_file()
    assert all(torch.equal(saved.projection_state[k], v) for k, v in store.projection_state.items())
    torch.testing.assert_close(pipe.attribute(images[:2], saved).scores, pipe.attribute(images[:2], store).scores)

    # in a directory: calibrated once, saved first; a resumed run reuses the saved bases
    directory = tmp_path / "sharded"
    sharded = pipe.featurize(images, config, progress=False, output_dir=directory, shard_rows=3)
    torch.testing.assert_close(sharded.features, store.features)
    (directory / "config.json").unlink()
    (directory / "features-00001-of-00003.safetensors").unlink()
    monkeypatch.setattr(Featurizer, "fit", lambda *a: pytest.fail("calibrated again instead of resuming"))
    resumed = pipe.featurize(images, config, progress=False, output_dir=directory, shard_rows=3)
    torch.testing.assert_close(resumed.features, store.features)
    monkeypatch.undo()

    other = AttributionConfig(**{**config.to_dict(), "noise_seed": 1})  # bases of another calibration are refused
    with pytest.raises(StoreMismatchError, match="calibrated for another feature_hash"):
        pipe.featurize(images, other, progress=False, output_dir=directory, shard_rows=3)

    path = tmp_path / "saved" / PROJECTION_NAME
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(CorruptStoreError, match="projection"):
        FeatureStore.from_pretrained(tmp_path / "saved")


def test_bfloat16_forward_with_calibrated_bases_stays_close():
    """Mixed precision: the forward under bf16 autocast, the projection and the mix in float32."""
    pipe = tiny_ddpm_pipeline()
    images = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(3)) * 2 - 1
    full = Featurizer(pipe, AttributionConfig(num_timesteps=2, projection_dim=64, calibration_examples=4))
    full.fit_projection(full.training_data(images))
    half = Featurizer(pipe, AttributionConfig(num_timesteps=2, projection_dim=64, calibration_examples=4,
                                              dtype="bfloat16"), projection_state=full.projector.state_dict())
    phi32, phi16 = full.features(images, [None] * 4, [0, 1, 2, 3]), half.features(images, [None] * 4, [0, 1, 2, 3])
    assert phi16.dtype == torch.float32 and torch.isfinite(phi16).all()
    assert torch.nn.functional.cosine_similarity(phi16, phi32, dim=1).min() > 0.98


def test_one_pass_equals_two_passes_and_calibration_is_deterministic(toy, monkeypatch):
    """Energies from the kept pass-1 coordinates = from a second pass; same seeds → the same bases; the moments
    do not depend on how the examples are batched (float64 sums of per-example coordinates)."""
    model, task, parameters, x, bases, _ = toy
    batches = [(ModelInputs(x[:3]), [0, 1, 2]), (ModelInputs(x[3:]), [3, 4, 5])]
    with gradients_only_for(model, parameters), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = calibrate(task, model, parameters, batches, sketch_dim=120, seed=0)
        monkeypatch.setattr(calibration, "KEEP_BYTES", 0)
        assert calibration_moments(task, model, parameters, batches, 0)["coordinates"] is None
        two_pass = calibrate(task, model, parameters, batches, sketch_dim=120, seed=0)
        monkeypatch.undo()
        by_two = calibration_moments(task, model, parameters, [(ModelInputs(x[i : i + 2]), [i, i + 1])
                                                              for i in range(0, 6, 2)], 0)
        by_six = calibration_moments(task, model, parameters, [(ModelInputs(x), list(range(6)))], 0)
    assert bases.keys() == again.keys() == two_pass.keys()
    for name in bases:
        for side in bases[name]:
            assert torch.equal(bases[name][side], again[name][side])
            assert torch.equal(bases[name][side], two_pass[name][side]), (name, side)
    assert by_two["count"] == by_six["count"] == 6 and by_six["coordinates"].shape == (6, by_six["projector"].dim)
    for name, moments in by_six.items():
        if isinstance(moments, tuple):
            for a, b in zip(moments, by_two[name]):
                assert_close_rel(a, b)


def test_calibration_examples_are_capped_by_the_training_set():
    assert [calibration_count(n, 64) for n in (5, 40, 200, 1000, 1500, 2048, 10**6)] == [5, 32, 32, 32, 46, 64, 64]
    assert calibration_count(1000, 0) == 0 and calibration_count(10**6, 100) == 100
    featurizer = Featurizer(tiny_ddpm_pipeline(), AttributionConfig(num_timesteps=2, projection_dim=32))
    data = featurizer.training_data(torch.zeros(200, 1, 8, 8))
    indices = featurizer.projector.fit_examples(len(data))
    assert indices == calibration_indices(200, 32, 0) and len(set(indices)) == 32
    assert list(featurizer.fit_identity(data)["examples"]) == [str(i) for i in indices]


def test_featurization_loop_mixes_blocks_of_rows_like_single_batches(monkeypatch):
    """featurize_rows finishes `finish_rows` sketch rows at once: the same φ as mixing batch by batch."""
    pipe = tiny_ddpm_pipeline()
    images = torch.rand(7, 1, 8, 8, generator=torch.Generator().manual_seed(4)) * 2 - 1
    featurizer = Featurizer(pipe, AttributionConfig(num_timesteps=2, projection_dim=24, batch_size=2,
                                                    calibration_examples=4))
    data = featurizer.training_data(images)
    featurizer.fit_projection(data)
    assert featurizer.projector.finish_rows == 256  # FINISH_ROWS: the tiny sketch fits FINISH_BYTES
    blocks, _ = featurizer.featurize_rows(data, 1, 7)
    monkeypatch.setattr(CalibratedProjector, "partial_dim", 64 << 20)  # → one row per finish
    per_batch, _ = featurizer.featurize_rows(data, 1, 7)
    direct = torch.cat([featurizer.features(images[i : i + 2], [None] * 2, [i, i + 1]) for i in (1, 3, 5)])
    assert_close_rel(blocks, per_batch)
    assert_close_rel(blocks, direct)
