"""The library's EK-FAC against kronfluence (Grosse et al.'s EK-FAC, pomonam/kronfluence) on the LDS digits model.

Both see the same (t, ε) samples and the same damping λ:
  curvature  kronfluence's EK-FAC factors are fitted on the (example, t, ε) *pairs* of the library's calibration
             examples (`projector.fit_examples`: 64 of the 500 digits × K = 10 pairs), one pair per kronfluence
             "example", with the same loss (mean squared error of ε_θ) and the same Monte-Carlo sample of the
             model's Gaussian likelihood (`fisher="mc"`; `--fisher empirical`: the loss itself).
  gradients  every training example's and every query's pairs are scored as kronfluence examples and the
             pairwise scores averaged over each side's K pairs: (1/K²) Σ_{k,l} ∇ℓ(q, k)ᵀ (Ĝ + λ)⁻¹ ∇ℓ(z, l) =
             g(q)ᵀ (Ĝ + λ)⁻¹ g(z), the library's τ with g the time-averaged loss gradient (scores are linear in each
             gradient). The pairs are built by the library's own adapter and task (the same noise, timesteps and
             noising), so only the curvature code differs.
  damping    λ = the library's (ratio · mean Λ of the library's fit), given to kronfluence as `damping_factor`.
Differences left by design: kronfluence tracks nn.Linear / nn.Conv2d only (a bias is an extra input column of
its layer's Kronecker factor); the library also attributes GroupNorm parameters (a diagonal correction) and
rotates a bias by its layer's Q_S with its own Λ. The MC samples of the two fits are different draws.

    pip install --no-deps kronfluence==1.0.1 einops einconv opt-einsum   # not a dependency of the package
    OMP_NUM_THREADS=1 python benchmarks/ekfac_kronfluence.py [--ratio R] [--fisher empirical] [--seed S]

Prints the per-query Spearman of kronfluence's scores against the library's at every coordinate and at the
default projection (k = 2048), both with the queries' gradients from the same 10 pairs as kronfluence's, then the
library at its defaults (3·K query samples, the 10 pairs first), and the LDS (generated / real) of each, from the
committed ground truth in
benchmarks/data/lds_digits. `kronfluence_scores` is also what tests/test_kronfluence.py runs on a tiny model.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def pair_dataset(featurizer, images: torch.Tensor, keys: list):
    """The (x_t, t, target) of every (example, t, ε) pair of `images` under the featurizer's config (its task's
    timesteps and noise, its adapter's noising and target), example-major: a TensorDataset of B·K·D rows."""
    from torch.utils.data import TensorDataset

    task, adapter = featurizer.task, featurizer.adapter
    inputs = adapter.encode(images, [None] * len(images), keys, featurizer.config.noise_seed)
    if inputs.conditioning:
        raise ValueError("the kronfluence comparison covers unconditional pipelines only")
    draws = task.noise_draws
    timesteps = task.timesteps(keys).repeat_interleave(draws, dim=1)  # [B, K·D], column c: draw c % D
    shape = inputs.x0.shape[1:]
    noise = torch.stack([task.noise(key, int(t), shape, column % draws)
                         for key, row in zip(keys, timesteps) for column, t in enumerate(row)]).to(inputs.x0)
    x0 = inputs.x0.repeat_interleave(timesteps.shape[1], dim=0)
    t = timesteps.flatten().to(x0.device)
    with torch.no_grad():
        x_t, target = adapter.add_noise(x0, noise, t), adapter.target(x0, noise, t)
    return TensorDataset(x_t.detach().cpu(), t.cpu(), target.detach().cpu()), timesteps.shape[1]


def kronfluence_task(adapter, seed: int = 0):
    """kronfluence's `Task`: the per-pair loss (1/D)‖ε_θ − target‖², its MC-sampled version for the true Fisher
    (y = sg(ε_θ) + sqrt(D/2) ξ, as curvature.SampledLoss), and the loss as the measurement."""
    from kronfluence.task import Task

    class PairLoss(Task):
        def __init__(self):
            super().__init__()
            self.generator = torch.Generator().manual_seed(seed)

        def compute_train_loss(self, batch, model, sample: bool = False):
            x_t, t, target = batch
            prediction = adapter.predict(x_t, t, {}, denoiser=model).flatten(1)
            if sample:
                xi = torch.randn(prediction.shape, generator=self.generator).to(prediction)
                target = prediction.detach() + math.sqrt(prediction.shape[1] / 2) * xi
            return (prediction - target.flatten(1)).pow(2).mean(1).sum()

        def compute_measurement(self, batch, model):
            return self.compute_train_loss(batch, model, sample=False)

    return PairLoss()


def kronfluence_scores(featurizer, train_images: torch.Tensor, query_images: torch.Tensor, damping: float, *,
                       fisher: str = "mc", fit_indices: list[int] | None = None, batch_size: int = 64,
                       output_dir: str | None = None) -> torch.Tensor:
    """kronfluence's EK-FAC scores [n_q, N] of the queries against the training images, at the featurizer's (t, ε)
    samples (module docstring), its factors fitted on the pairs of `fit_indices` (default: the library's
    calibration examples) with damping λ = `damping`. The featurizer's denoiser is wrapped by kronfluence in place
    and unwrapped again."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments

    model = featurizer.adapter.denoiser
    if fit_indices is None:
        fit_indices = featurizer.projector.fit_examples(len(train_images))
    fit, _ = pair_dataset(featurizer, train_images[fit_indices], list(fit_indices))
    train, per_train = pair_dataset(featurizer, train_images, list(range(len(train_images))))
    queries, per_query = pair_dataset(featurizer, query_images, [f"query:{i}" for i in range(len(query_images))])
    task = kronfluence_task(featurizer.adapter)
    originals = dict(model.named_children())
    requires = {name: p.requires_grad for name, p in model.named_parameters()}
    model.eval()
    with tempfile.TemporaryDirectory() as scratch:
        try:
            model = prepare_model(model, task)
            analyzer = Analyzer("ekfac", model, task, cpu=featurizer.adapter.device.type == "cpu", disable_tqdm=True,
                                output_dir=output_dir or scratch)
            factor_args = FactorArguments(strategy="ekfac", use_empirical_fisher=fisher == "empirical",
                                          activation_covariance_dtype=torch.float64,
                                          gradient_covariance_dtype=torch.float64, lambda_dtype=torch.float64)
            analyzer.fit_all_factors("factors", fit, per_device_batch_size=batch_size, factor_args=factor_args,
                                     overwrite_output_dir=True)
            analyzer.compute_pairwise_scores("scores", "factors", queries, train, per_device_query_batch_size=batch_size,
                                             per_device_train_batch_size=batch_size, overwrite_output_dir=True,
                                             score_args=ScoreArguments(damping_factor=damping,
                                                                       precondition_dtype=torch.float64,
                                                                       per_sample_gradient_dtype=torch.float64,
                                                                       score_dtype=torch.float64))
            pairs = analyzer.load_pairwise_scores("scores")["all_modules"].double()
        finally:
            for name, child in originals.items():  # undo kronfluence's TrackedModule wrappers
                setattr(featurizer.adapter.denoiser, name, child)
            _unwrap(featurizer.adapter.denoiser)
            for name, p in featurizer.adapter.denoiser.named_parameters():
                p.requires_grad_(requires.get(name, p.requires_grad))
    return pairs.view(len(query_images), per_query, len(train_images), per_train).mean((1, 3))


def _unwrap(model: torch.nn.Module) -> None:
    """Replace every kronfluence TrackedModule under `model` by the module it wraps."""
    from kronfluence.module.tracked_module import TrackedModule

    for name, child in list(model.named_children()):
        if isinstance(child, TrackedModule):
            setattr(model, name, child.original_module)
        else:
            _unwrap(child)


def library_scores(pipe, config, train_images, queries: dict[str, torch.Tensor], ratio: float | None = None):
    """The library's EK-FAC scores {name: [n_q, N]} (float64) at the config's λ (or λ = ratio · mean Λ), its
    featurizer and λ."""
    from diffusers_attribution.api import make_featurizer

    featurizer = make_featurizer(pipe, config)
    store = featurizer.featurize_dataset(train_images, progress=False)
    damping = featurizer.method.damping(featurizer, damping_ratio=ratio)
    phi = store.features.double()
    scores = {name: featurizer.method.queries(featurizer, images, damping=damping).double() @ phi.T
              for name, images in queries.items()}
    return scores, featurizer, damping


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over queries (rows) of the Spearman correlation of two score matrices."""
    from diffusers_attribution.evaluation.lds import spearman_rows

    return float(spearman_rows(a.double().numpy(), b.double().numpy()).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratio", type=float, default=None, help="λ / mean Λ (default: the method's damping_ratio)")
    parser.add_argument("--fisher", default="mc", choices=("mc", "empirical"))
    parser.add_argument("--seed", type=int, default=0, help="noise_seed (and projection_seed)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", default=None, help="write the table's numbers to this JSON file")
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import lds_digits as L  # noqa: E402  (beside this script)
    from diffusers_attribution import AttributionConfig
    from diffusers_attribution.evaluation.lds import lds

    pipe = L.full_model(Path(L.default_workdir()), progress=False)
    gt, images = L.load_ground_truth(), L.training_images()
    names = ("generated", "real")
    queries = {name: gt["queries"][name] for name in names}
    method = "ekfac" if args.fisher == "mc" else "ekfac-empirical"
    total = sum(p.numel() for p in pipe.unet.parameters())
    base = {"method": method, "num_timesteps": 10, "projector": "factored", "batch_size": 32, "noise_seed": args.seed,
            "projection_seed": args.seed, "device": args.device}
    if args.ratio is not None:
        base["damping_ratio"] = args.ratio
    same = {"query_samples": 10}  # the queries' gradients from the training pairs: kronfluence's samples
    rows = {}
    for label, fields in (("every coordinate", {"projection_dim": total, "sketch_dim": total, **same}),
                          ("default projection (k = 2048)", {"projection_dim": L.PROJECTION_DIM, **same}),
                          ("defaults (k = 2048, 3·K query samples)", {"projection_dim": L.PROJECTION_DIM})):
        start = time.perf_counter()
        scores, featurizer, damping = library_scores(pipe, AttributionConfig(**base, **fields), images, queries)
        rows[label] = {"scores": scores, "damping": damping, "seconds": time.perf_counter() - start,
                       "dim": featurizer.projector.sketch.dim, "featurizer": featurizer}
    full = rows["every coordinate"]
    # the same λ and the same pairs for kronfluence (the full-coordinate featurizer: its calibration examples)
    start = time.perf_counter()
    featurizer = full["featurizer"]
    both = torch.cat([queries[name] for name in names])
    kron = kronfluence_scores(featurizer, images, both, full["damping"], fisher=args.fisher,
                              fit_indices=featurizer.projector.fit_examples(len(images)))
    kron = dict(zip(names, kron.split([len(queries[name]) for name in names])))
    kron_seconds = time.perf_counter() - start
    two = L.load_ground_truth(seeds=(0, 1))  # the committed outputs averaged with training seed 1's
    print(f"λ = {full['damping']:.4g} (ratio {base.get('damping_ratio', 'default')} of mean Λ), fisher {args.fisher}, "
          f"noise seed {args.seed}")
    print("| scores | coordinates kept | Spearman vs kronfluence (generated / real) | LDS generated | LDS real | "
          "two-seed ground truth: generated | real | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    record = {"seed": args.seed, "fisher": args.fisher, "damping": full["damping"], "rows": {}}
    for label, row in [*rows.items(), ("kronfluence 1.0.1", {"scores": kron, "dim": "all (Linear/Conv2d)",
                                                              "seconds": kron_seconds})]:
        rho = [spearman(row["scores"][n], kron[n]) for n in names]
        fits = [lds(row["scores"][n], truth["masks"], truth["outputs"][n], seed=args.seed).mean
                for truth in (gt, two) for n in names]
        name = label if label.startswith("kronfluence") else f"library, {label}"
        print(f"| {name} | {row['dim']} | {rho[0]:.3f} / {rho[1]:.3f} | "
              + " | ".join(f"{fit:.3f}" for fit in fits) + f" | {row['seconds']:.0f} |", flush=True)
        record["rows"][name] = {"spearman": rho, "lds": fits, "seconds": row["seconds"], "kept": row["dim"]}
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
