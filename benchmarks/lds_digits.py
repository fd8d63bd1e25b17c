"""LDS benchmark on scikit-learn's digits: a ground truth of retrained DDPMs, then a table of attribution methods.

The setting (a cheaper, documented version of D-TRAK's protocol; docs/benchmarks.md):
  training set  N = 500 digits: `load_digits_images(500, seed=0)`; held-out real queries: the next 64 of the same
                permutation (`load_digits_images(564, seed=0)[500:]`), never trained on.
  recipe        `LDS_RECIPE`: the digits UNet (~164k parameters) trained 600 steps of batch 64 (~150 epochs of a
                250-image subset), training seed 0 for every model (common random numbers across subsets).
  model         the attributed model = the recipe on all 500 digits; queries generated from it with deterministic
                DDIM (50 steps, `generate_digits(pipe, 96, seed=1234)`): the first 32 are the *validation* split
                (used only to choose λ), the other 64 the *evaluation* queries.
  ground truth  64 random half-size subsets (α = 0.5, mask seed 0), one model each; output = the diffusion loss on
                every query averaged over 100 evenly spaced timesteps × 2 fixed noises (`LossSpec`).

Two phases:
    # 1. ground truth (64 retrainings, ~30-45 min on 2 free CPU cores; resumable: rerun the same command):
    nice -n 19 python benchmarks/lds_digits.py --build-ground-truth
    #    in 2 processes:  ... --build-ground-truth --rank 0 --world-size 2  and  --rank 1 --world-size 2
    #    or with accelerate: ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 \\
    #                        benchmarks/lds_digits.py --build-ground-truth
    #    writes benchmarks/data/lds_digits/{ground_truth.json, masks.safetensors, outputs.safetensors,
    #    queries.safetensors} (small, committed); the retrained models are not kept.
    # 2. the table, from the committed ground truth (minutes; --quick for the cheap rows only):
    python benchmarks/lds_digits.py [--quick] [--only d-trak]
    #    writes benchmarks/data/lds_digits/results.json and docs/lds_digits.png, prints a markdown table.
    # optional counterfactual experiment (one top-k retraining per query and method, one random per query):
    nice -n 19 python benchmarks/lds_digits.py --counterfactual
    # choosing the library defaults on the 32 validation queries only (λ, noise draws, k, ensembling), then timing:
    python benchmarks/lds_digits.py --choose-defaults [--only SETTINGS] [--projector P]
    python benchmarks/lds_digits.py --choose-timing
    # EK-FAC's damping ratio (every coordinate once per seed, the default projection derived at each grid ratio):
    python benchmarks/lds_digits.py --choose-ekfac
    # DAS-Fisher's timestep fraction and ratio (validation queries only; --ground-truth-seeds 0,1 for both seeds):
    python benchmarks/lds_digits.py --choose-fraction [--ground-truth-seeds 0,1]
    # the default method from the table run's validation curves (rows featurizing at most 2x D-TRAK K=10;
    # --time-rounds 2: time the contenders again, interleaved, and use the minimum):
    python benchmarks/lds_digits.py --choose-method [--time-rounds 2]

Every LDS is reported as mean ± std over 3 attribution noise seeds (`AttributionConfig.noise_seed` = 0, 1, 2)
with the mean of the per-seed 95 % bootstrap intervals over queries.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if not (ROOT / "diffusers_attribution").is_dir():
    raise SystemExit("run from a checkout of diffusers-attribution")
sys.path.insert(0, str(ROOT))

from peak_memory import PeakMemory  # noqa: E402  (benchmarks/, beside this script)
from diffusers_attribution import AttributionConfig, enable_attribution  # noqa: E402
from diffusers_attribution.projection.registry import projector_names  # noqa: E402
from diffusers_attribution.demo.digits import (  # noqa: E402
    DigitsRecipe,
    generate_digits,
    load_digits_images,
    load_or_train_digits_ddpm,
)
from diffusers_attribution.evaluation.damping import KernelPath, select_damping  # noqa: E402
from diffusers_attribution.evaluation.lds import lds, summarize_seeds  # noqa: E402
from diffusers_attribution.evaluation.masks import subset_masks  # noqa: E402
from diffusers_attribution.evaluation.outputs import LossSpec, QueryLosses  # noqa: E402
from diffusers_attribution.evaluation.retrain import DigitsTrainingRecipe, RetrainHarness  # noqa: E402

DATA = ROOT / "benchmarks" / "data" / "lds_digits"
PLOT = ROOT / "docs" / "lds_digits.png"
N_TRAIN = 500
N_REAL = 64
N_VALIDATION, N_EVALUATION = 32, 64
QUERY_SEED = 1234
NUM_SUBSETS, ALPHA, MASK_SEED = 64, 0.5, 0
TRAINING_SEED = 0
LDS_RECIPE = DigitsRecipe(num_steps=600, batch_size=64, lr_warmup_steps=30)
LOSS_SPEC = LossSpec(timesteps=100, noise_draws=2, seed=0)
NOISE_SEEDS = (0, 1, 2)
PROJECTION_DIM = 2048


def default_workdir() -> Path:
    return Path(os.environ.get("LDS_DIGITS_WORKDIR", "~/.cache/diffusers_attribution/lds_digits")).expanduser()


# ---------------------------------------------------------------------------------------------- data


def training_images() -> torch.Tensor:
    return load_digits_images(N_TRAIN, seed=0)


def real_queries() -> torch.Tensor:
    return load_digits_images(N_TRAIN + N_REAL, seed=0)[N_TRAIN:]


def full_model(workdir: Path, progress: bool = True):
    """The attributed model: LDS_RECIPE on all N_TRAIN digits (trained once, cached under workdir)."""
    return load_or_train_digits_ddpm(workdir / "models", recipe=replace(LDS_RECIPE, seed=TRAINING_SEED),
                                     n_train=N_TRAIN, progress=progress)


def fingerprint(pipe) -> str:
    from diffusers_attribution.fingerprint import model_fingerprint

    return model_fingerprint(pipe.unet, dict(pipe.unet.named_parameters()))["denoiser"]


def load_ground_truth(directory: Path | None = None, seeds: tuple[int, ...] = (TRAINING_SEED,)) -> dict:
    """The committed ground truth in `directory` (default DATA). `seeds`: the training seeds whose outputs are
    averaged: the committed ones (TRAINING_SEED) and further seeds' outputs_seed<S>.safetensors of the same subsets
    (benchmarks/ground_truth_noise.py --save); info["training_seeds"] says which."""
    from safetensors.torch import load_file

    directory = DATA if directory is None else directory
    info = json.loads((directory / "ground_truth.json").read_text())
    masks = load_file(str(directory / "masks.safetensors"))["masks"].bool()
    outputs = load_file(str(directory / "outputs.safetensors"))
    queries = load_file(str(directory / "queries.safetensors"))
    if TRAINING_SEED not in seeds or len(set(seeds)) != len(seeds):
        raise SystemExit(f"--ground-truth-seeds must hold the committed seed {TRAINING_SEED} once, got {list(seeds)}")
    runs = [outputs] + [load_file(str(directory / f"outputs_seed{s}.safetensors")) for s in seeds if s != TRAINING_SEED]
    for run in runs[1:]:
        if {k: v.shape for k, v in run.items()} != {k: v.shape for k, v in outputs.items()}:
            raise SystemExit(f"{directory}: another seed's outputs do not match the committed ones' splits and shapes")
    if len(runs) > 1:
        outputs = {name: torch.stack([run[name].double() for run in runs]).mean(0) for name in outputs}
    info = {**info, "training_seeds": list(seeds)}
    return {"info": info, "masks": masks, "outputs": outputs, "queries": queries}


def ground_truth_seeds(text: str) -> tuple[int, ...]:
    """`--ground-truth-seeds` "0,1" → (0, 1)."""
    return tuple(int(part) for part in text.split(","))


# ---------------------------------------------------------------------------------------------- phase 1


def build_ground_truth(args) -> None:
    workdir = Path(args.workdir)
    DATA.mkdir(parents=True, exist_ok=True)
    images = training_images()
    start = time.time()
    pipe = full_model(workdir, progress=args.rank in (None, 0))
    generated = generate_digits(pipe, N_VALIDATION + N_EVALUATION, seed=QUERY_SEED)
    real = real_queries()
    queries = {"validation": generated[:N_VALIDATION], "generated": generated[N_VALIDATION:], "real": real}
    masks = subset_masks(N_TRAIN, args.subsets, ALPHA, MASK_SEED)
    measure = QueryLosses(queries, LOSS_SPEC)
    harness = RetrainHarness(DigitsTrainingRecipe(LDS_RECIPE), images, masks, workdir / "retrain", measure,
                             seeds=(TRAINING_SEED,), rank=args.rank, world_size=args.world_size,
                             metadata={"benchmark": "lds_digits"})
    seconds = write_ground_truth(DATA, harness, harness.run(), queries)
    if seconds is None:
        return
    info = {
        "n_train": N_TRAIN, "training_set": f"load_digits_images({N_TRAIN}, seed=0)",
        "real_queries": f"load_digits_images({N_TRAIN + N_REAL}, seed=0)[{N_TRAIN}:]",
        "generated_queries": f"generate_digits(full model, {N_VALIDATION + N_EVALUATION}, seed={QUERY_SEED}): "
                             f"first {N_VALIDATION} = validation, rest = generated",
        "num_subsets": args.subsets, "alpha": ALPHA, "mask_seed": MASK_SEED, "training_seeds": [TRAINING_SEED],
        "recipe": asdict(LDS_RECIPE), "loss_spec": LOSS_SPEC.to_dict(), "full_model_fingerprint": fingerprint(pipe),
        "retrain_seconds": seconds, "wall_seconds_this_run": time.time() - start,
        "torch": torch.__version__, "machine": platform.platform(), "cpus": os.cpu_count(),
    }
    (DATA / "ground_truth.json").write_text(json.dumps(info, indent=2, sort_keys=True))
    print(f"ground truth written to {DATA} ({args.subsets} subsets; training {seconds['train_mean']:.1f}s and "
          f"measuring {seconds['measure_mean']:.1f}s per model)")


def write_ground_truth(directory: Path, harness, results, queries: dict) -> dict | None:
    """Once every retraining has finished, on rank 0: the masks, each query set's outputs and the queries as
    safetensors in `directory`; returns the retraining seconds (None where there is nothing to write yet)."""
    from safetensors.torch import save_file

    if not results.complete:
        missing = int((~results.done).sum())
        print(f"ground truth: {missing} of {results.done.numel()} retrainings still missing (other processes?); "
              "rerun without --rank to assemble once they finish")
        return None
    if harness.rank != 0:
        return None
    save_file({"masks": harness.masks.to(torch.uint8)}, str(directory / "masks.safetensors"))
    save_file({name: results.outputs(name).contiguous() for name in queries}, str(directory / "outputs.safetensors"))
    save_file({name: value.contiguous() for name, value in queries.items()}, str(directory / "queries.safetensors"))
    return results.seconds()


# ---------------------------------------------------------------------------------------------- phase 2


def method_rows(quick: bool) -> list[dict]:
    """The rows of the table: name, config fields, whether they depend on the noise seed."""
    rows = [{"name": "pixel cosine", "config": {"method": "pixel-cosine"}, "seeded": False}]
    for method, label in (("trak", "TRAK"), ("d-trak", "D-TRAK")):
        # K = 30: D-TRAK's default since the validation run ("Choosing the defaults" in docs/benchmarks.md)
        for K in ((10,) if quick else (10, 30, 100) if method == "d-trak" else (10, 100)):
            rows.append({"name": f"{label} K={K} factored", "config": {"method": method, "num_timesteps": K,
                                                                        "projector": "factored"}, "seeded": True})
    if not quick:  # a float16 store (issue 23: half the bytes) beside the float32 default of the same row
        rows.append({"name": "D-TRAK K=30 factored float16", "config": {"method": "d-trak", "num_timesteps": 30,
                     "projector": "factored", "feature_dtype": "float16"}, "seeded": True})
    for projector in projector_names():
        if projector == "factored":
            continue
        if quick and projector != "identity":
            continue
        for method, label in (("trak", "TRAK"), ("d-trak", "D-TRAK")):
            if projector != "identity" and method == "trak":
                continue  # dense projections cost ~10x the factored one: D-TRAK only
            rows.append({"name": f"{label} K=10 {projector}", "config": {"method": method, "num_timesteps": 10,
                                                                          "projector": projector}, "seeded": True})
    try:
        import diffusers_attribution.methods.tracin  # noqa: F401

        if not quick:
            for method, label in (("tracin", "TracIn"), ("retrac", "ReTrac")):
                rows.append({"name": f"{label} (1 ckpt)", "config": {"method": method, "query_timesteps": 100,
                                                                      "query_noise_draws": 1}, "seeded": True})
    except ImportError as error:
        print(f"note: TracIn/ReTrac skipped: diffusers_attribution.methods.tracin is not available ({error})")
    return rows + influence_rows()


# Influence with pair-level curvature and DAS (docs/methods.md): λ chosen on the validation queries from the same
# ratio grid as the kernel methods, each row's own scale (Fisher: tr(F)/k; EK-FAC: mean Λ; DAS: the kernel's).
INFLUENCE_ROWS = (
    ("EK-FAC K=10 (MC Fisher)", "ekfac", {}),
    # issue 24: the queries' gradients from the training pairs alone (the default before 3·K query samples)
    ("EK-FAC K=10 (MC Fisher), training pairs as query samples", "ekfac", {"query_samples": 10}),
    ("EK-FAC K=10 (empirical Fisher)", "ekfac-empirical", {}),
    ("EK-FAC K=10 (MC Fisher) ratio 0.1", "ekfac", {"damping_ratio": 0.1}),  # issue 24: the old default ratio
    ("EK-FAC K=10 (MC Fisher) k=4096", "ekfac", {"projection_dim": 4096}),  # issue 24: what the projection costs
    ("EK-FAC K=10 (MC Fisher) k=8192", "ekfac", {"projection_dim": 8192}),
    # issue 24: the paper's sampling recipe (S = 50 random (t, ε) per example, 100 per query: its 50 first)
    ("EK-FAC S=50 random (t, ε) per example", "ekfac", {"num_timesteps": 50, "timestep_schedule": "random",
                                                         "noise_mode": "per-example", "query_samples": 100}),
    ("projected Fisher K=10", "fisher", {}),
    ("projected Fisher K=20", "fisher", {"num_timesteps": 20}),
    ("projected Fisher K=10 k=4096", "fisher", {"projection_dim": 4096}),
    ("DAS K=10", "das", {}),
    ("DAS K=10, loss output", "das", {"output": "loss"}),  # issue 24: the output that helped DAS on the LoRA benchmark
    ("DAS K=10 float16", "das", {"feature_dtype": "float16"}),
    # issue 24: DAS's score with the pair-level curvature (methods/das_fisher.py)
    ("DAS-Fisher K=10", "das-fisher", {}),
    ("DAS-Fisher K=10 k=4096", "das-fisher", {"projection_dim": 4096}),
    # session 9: the default before the timestep fraction (every timestep, at the ratio chosen for it)
    ("DAS-Fisher K=10, every timestep (f = 1)", "das-fisher", {"timestep_fraction": 1.0, "damping_ratio": 0.0018}),
)


def influence_rows() -> list[dict]:
    return [{"name": name, "influence": method, "seeded": True,
             "config": {"method": method, "num_timesteps": 10, "projector": "factored", **fields}}
            for name, method, fields in INFLUENCE_ROWS]


def evaluate_influence_row(pipe, row: dict, seed: int, gt: dict, images: torch.Tensor) -> dict:
    """One seed of an influence row: featurize, then LDS at the validation-chosen and at the default λ ratio."""
    from diffusers_attribution.api import make_featurizer

    config = AttributionConfig(**{"batch_size": 32, "projection_dim": PROJECTION_DIM, "noise_seed": seed, **row["config"]})
    masks, outputs, queries = gt["masks"], gt["outputs"], gt["queries"]
    names = ("validation", "generated", "real")
    featurizer = make_featurizer(pipe, config)
    with PeakMemory(interval=0.005) as memory:
        t0 = time.perf_counter()
        store = featurizer.featurize_dataset(images, progress=False)
        t1 = time.perf_counter()
        scores_at, scale = damping_path(featurizer, store, {name: queries[name] for name in names})
        t2 = time.perf_counter()
        record: dict = {"seed": seed, "dim": int(store.dim)}
        lds_at_validation_damping(record, scores_at, scale, masks, outputs, seed, config.damping_ratio)
        t3 = time.perf_counter()
    record["seconds"] = {"train_features": t1 - t0, "query_features": t2 - t1, "scoring": t3 - t2, "total": t3 - t0}
    record["peak_memory_mib"] = memory.mib
    return record


def damping_path(featurizer, store, queries: dict, prompts: dict | None = None):
    """(scores_at(name, ratio) → scores [n_name, N], scale): the scores of each named query set at λ = ratio · scale
    for every ratio from one featurization (`query_path`); `prompts`: {name: prompts} for text-conditioned queries."""
    prompts = prompts or {}
    query_features, scores, scale = query_path(featurizer, store)
    features = {name: query_features(images, prompts.get(name)) for name, images in queries.items()}
    return (lambda name, ratio: scores(features[name], ratio)), scale


def query_path(featurizer, store):
    """(query_features(images, prompts=None), scores(query features, ratio) → [n, N], scale) of the featurizer's
    method at λ = ratio · scale, for any ratio from one featurization: EK-FAC's queries are its rotated sketches,
    preconditioned at each ratio (scale mean Λ); every other method's are its query features, scored through its
    declared parts (`declared_path`)."""
    method = featurizer.method
    if method.name.startswith("ekfac"):
        phi, projector = store.features.double(), featurizer.projector
        scale = projector.mean_eigenvalue
        return (lambda images, prompts=None: method.query_sketch(featurizer, images, prompts).double(),
                lambda sketch, ratio: projector.precondition(sketch, ratio * scale) @ phi.T, scale)
    scores, scale = declared_path(method, store)
    return featurizer.featurize_queries, scores, scale


def declared_path(method, store):
    """(scores(query features, ratio) → [n, N], scale) of a kernel or curvature method at λ = ratio · scale, from
    one decomposition: its declared curvature C (the Fisher's, DAS-Fisher's F; scale tr(C)/k) or the kernel ΦᵀΦ
    (scale its mean eigenvalue), times its declared row weights (DAS's residuals) or 1."""
    weights = 1.0 if method.row_weights is None else store.method_state[method.row_weights].double()[None]
    if method.curvature is not None:
        curvature = store.method_state[method.curvature].double()
        eigenvalues, vectors = torch.linalg.eigh(curvature)
        scale, right = float(curvature.trace()) / len(curvature), vectors.T @ store.features.double().T

        def scores(features, ratio):
            return ((features.double() @ vectors) / (eigenvalues.clamp_min(0) + ratio * scale)) @ right * weights
        return scores, scale
    path = KernelPath(store.features)
    return (lambda features, ratio: path.scores(features, ratio * path.mean_eigenvalue) * weights), path.mean_eigenvalue


def lds_at_validation_damping(record: dict, scores_at, scale: float, masks: torch.Tensor, outputs: dict, seed: int,
                              default_ratio: float, ratios=None) -> None:
    """record[generated / real] at the λ ratio of `ratios` (default DEFAULT_RATIOS) with the best validation LDS
    (ties → the larger λ), and record[*_default_damping] at `default_ratio`; record["damping"]: the choice and the
    validation curve."""
    import numpy as np

    from diffusers_attribution.evaluation.damping import DEFAULT_RATIOS

    ratios = DEFAULT_RATIOS if ratios is None else tuple(ratios)
    curve = validation_curve(None, None, masks, outputs["validation"], lambda r: scores_at("validation", r), ratios)
    best = max(i for i, v in enumerate(curve) if v == np.nanmax(curve))
    for name in ("generated", "real"):
        record[name] = lds(scores_at(name, ratios[best]), masks, outputs[name], seed=seed).to_dict()
        record[f"{name}_default_damping"] = lds(scores_at(name, default_ratio), masks, outputs[name],
                                                seed=seed).to_dict()
    record["damping"] = {"ratio": ratios[best], "damping": ratios[best] * scale,
                         "default_ratio": default_ratio, "validation_curve": dict(zip(map(str, ratios), curve))}


def evaluate_row(pipe, row: dict, seed: int, gt: dict, images: torch.Tensor) -> dict:
    from diffusers_attribution.api import make_featurizer, make_scorer
    from diffusers_attribution.methods.base import get_method

    if "influence" in row:
        return evaluate_influence_row(pipe, row, seed, gt, images)

    fields = {"batch_size": 32, "projection_dim": PROJECTION_DIM, "noise_seed": seed, **row["config"]}
    config = AttributionConfig(**fields)
    masks, outputs, queries = gt["masks"], gt["outputs"], gt["queries"]
    names = ("validation", "generated", "real")
    featurizer = make_featurizer(pipe, config)
    with PeakMemory(interval=0.005) as memory:
        t0 = time.perf_counter()
        store = featurizer.featurize_dataset(images, progress=False)
        t1 = time.perf_counter()
        kernel = get_method(config.method).kernel  # only kernel methods have a λ to choose on validation queries
        features = {name: featurizer.featurize_queries(queries[name]) for name in names
                    if kernel or name != "validation"}
        t2 = time.perf_counter()
        record: dict = {"seed": seed, "dim": int(store.dim)}
        if kernel:
            path = KernelPath(store.features)
            default_damping = config.damping_ratio * path.mean_eigenvalue
            selection = select_damping(path.phi, features["validation"], masks, outputs["validation"])
            for name in ("generated", "real"):
                default = lds(path.scores(features[name], default_damping), masks, outputs[name], seed=seed)
                chosen = lds(path.scores(features[name], selection.damping), masks, outputs[name], seed=seed)
                record[name] = chosen.to_dict()
                record[f"{name}_default_damping"] = default.to_dict()
            record["damping"] = {"ratio": selection.ratio, "damping": selection.damping,
                                 "default_ratio": config.damping_ratio,
                                 "validation_curve": dict(zip(map(str, selection.ratios), selection.validation_lds))}
        else:
            scorer = make_scorer(store)
            for name in ("generated", "real"):
                record[name] = lds(scorer.scores(features[name]), masks, outputs[name], seed=seed).to_dict()
        t3 = time.perf_counter()
    record["seconds"] = {"train_features": t1 - t0, "query_features": t2 - t1, "scoring": t3 - t2, "total": t3 - t0}
    record["peak_memory_mib"] = memory.mib
    return record


def summarize(row: dict, records: list[dict]) -> dict:
    class _R:  # summarize_seeds reads .mean and .ci
        def __init__(self, d):
            self.mean, self.ci = d["mean"], tuple(d["ci"])

    out = {"name": row["name"], "config": row["config"], "seeds": [r["seed"] for r in records]}
    for key in ("generated", "real", "generated_default_damping", "real_default_damping"):
        if key in records[0]:
            out[key] = summarize_seeds([_R(r[key]) for r in records]).to_dict()
    out["seconds"] = sum(r["seconds"]["total"] for r in records) / len(records)
    out["train_seconds"] = sum(r["seconds"]["train_features"] for r in records) / len(records)
    out["peak_memory_mib"] = max(r["peak_memory_mib"] for r in records)
    if "damping" in records[0]:
        out["damping_ratios"] = [r["damping"]["ratio"] for r in records]
    return out


def run_table(args) -> None:
    if not (DATA / "ground_truth.json").is_file():
        raise SystemExit(f"no ground truth in {DATA}: run with --build-ground-truth first")
    gt = load_ground_truth(seeds=ground_truth_seeds(args.ground_truth_seeds))
    info = gt["info"]
    pipe = enable_attribution(full_model(Path(args.workdir)))
    if fingerprint(pipe) != info["full_model_fingerprint"]:
        warnings.warn("the full model retrained here differs from the one the ground truth was built with "
                      "(another torch version or CPU?): scores are of a slightly different model")
    images = training_images()
    rows = method_rows(args.quick)
    rows = only_rows(rows, args.only)
    out_path = Path(args.results)
    previous = json.loads(out_path.read_text()) if out_path.is_file() else {}
    table = {row["name"]: row for row in previous.get("rows", [])} if args.only else {}
    started = time.time()
    for row in rows:
        seeds = NOISE_SEEDS if row["seeded"] else (0,)
        records = []
        for seed in seeds:
            record = evaluate_row(pipe, row, seed, gt, images)
            records.append(record)
            print(f"{row['name']:<26} seed {seed}: LDS generated {record['generated']['mean']:.3f} "
                  f"real {record['real']['mean']:.3f} ({record['seconds']['total']:.1f}s, "
                  f"{record['peak_memory_mib']:.0f} MiB)", flush=True)
        summary = summarize(row, records)
        summary["per_seed"] = records
        table[row["name"]] = summary
    result = {
        "rows": list(table.values()),
        "ground_truth": {k: info[k] for k in ("n_train", "num_subsets", "alpha", "loss_spec", "training_seeds")},
        "projection_dim": PROJECTION_DIM, "noise_seeds": list(NOISE_SEEDS), "table_seconds": time.time() - started,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.platform(),
        "loadavg_at_end": open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else None,
    }
    out_path.write_text(json.dumps(result, indent=2))
    print()
    print(markdown_table(result))
    # the committed figure is the default table's; another --results (e.g. an --only run) gets its own beside it
    figure = PLOT if out_path == DATA / "results.json" else out_path.with_suffix(".png")
    plot(result, figure)
    print(f"\nwrote {out_path} and {figure}")


def only_rows(rows: list[dict], only: str | None) -> list[dict]:
    """The rows `--only` names: comma-separated substrings of row names (any case), or "=NAME" for that row alone."""
    if not only:
        return rows
    return [row for row in rows if any(row["name"] == part[1:] if part.startswith("=") else
                                       part.lower() in row["name"].lower() for part in only.split(","))]


def markdown_table(result: dict, reference_name: str = "D-TRAK K=10 factored") -> str:
    lines = ["| method | LDS generated (λ from validation) | LDS generated (default λ) | LDS real held-out | "
             "time / seed (s) | training featurization / D-TRAK K=10 | peak memory (MiB) |",
             "|---|---|---|---|---|---|---|"]
    reference = next((row.get("train_seconds") for row in result["rows"] if row["name"] == reference_name), None)
    for row in result["rows"]:
        def cell(key):
            if key not in row:
                return "–"
            value = row[key]
            return f"{value['mean']:.3f} ± {value['std']:.3f} [{value['ci'][0]:.3f}, {value['ci'][1]:.3f}]"

        lines.append(f"| {row['name']} | {cell('generated')} | {cell('generated_default_damping')} | {cell('real')} | "
                     f"{row['seconds']:.0f} | {relative(row.get('train_seconds'), reference)} | {row['peak_memory_mib']:.0f} |")
    return "\n".join(lines)


def relative(seconds: float | None, reference: float | None) -> str:
    """A row's training featurization time over D-TRAK K=10's, when both were measured (rows of one run)."""
    return "–" if seconds is None or not reference else f"{seconds / reference:.2f}×"


def plot(result: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    rows = result["rows"]
    figure = Figure(figsize=(10, 4.2))
    ax, curve_ax = figure.subplots(1, 2, gridspec_kw={"width_ratios": [2.2, 1]})
    names = [row["name"] for row in rows]
    x = range(len(rows))
    for offset, key, label in ((-0.2, "generated", "generated queries"), (0.2, "real", "held-out real images")):
        means = [row[key]["mean"] for row in rows]
        stds = [row[key]["std"] for row in rows]
        ax.bar([i + offset for i in x], means, width=0.4, yerr=stds, capsize=2, label=label)
    ax.set_xticks(list(x))
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel(f"LDS (Spearman), mean ± std over {len(result['noise_seeds'])} seeds")
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_title(f"LDS on digits (N={result['ground_truth']['n_train']}, "
                 f"{result['ground_truth']['num_subsets']} subsets)", fontsize=9)
    ax.legend(fontsize=7)
    for row in rows:
        curves = [r["damping"]["validation_curve"] for r in row.get("per_seed", []) if "damping" in r]
        if curves and "factored" in row["name"]:
            ratios = [float(r) for r in curves[0]]
            mean = [sum(c[k] for c in curves) / len(curves) for k in curves[0]]
            curve_ax.plot(ratios, mean, label=row["name"])
    curve_ax.set_xscale("log")
    curve_ax.set_xlabel("λ / mean eigenvalue of the kernel")
    curve_ax.set_ylabel("validation LDS")
    curve_ax.set_title("choosing λ on validation queries", fontsize=9)
    curve_ax.legend(fontsize=6)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


# ---------------------------------------------------------------------------------------------- choosing defaults

# The settings compared on the validation queries: fields on top of the base (K = 10, one noise draw, k = 2048),
# and the comparison group(s) each belongs to. "ensemble" rows average the scores of 3 base featurizations.
CHOICE_BASE = "K=10 ×1 draw, k=2048"
CHOICE_ENSEMBLE = "ensemble of 3 × (K=10, k=2048)"
CHOICE_SETTINGS = (
    (CHOICE_BASE, {}, ("noise draws", "projection size", "ensembling")),
    ("K=10 ×4 draws", {"noise_draws": 4}, ("noise draws",)),
    ("K=40 ×1 draw", {"num_timesteps": 40}, ("noise draws",)),
    ("k=512", {"projection_dim": 512}, ("projection size",)),
    ("k=8192", {"projection_dim": 8192}, ("projection size",)),
    ("K=30 ×1 draw", {"num_timesteps": 30}, ("ensembling",)),
    (CHOICE_ENSEMBLE, None, ("ensembling",)),
)


def validation_curve(path: KernelPath, query_features: torch.Tensor, masks: torch.Tensor, losses: torch.Tensor,
                     scores_at=None, ratios=None) -> list[float]:
    """Mean validation LDS at every ratio of the damping grid (`scores_at(ratio)` → scores, for ensembles;
    `ratios`: another grid for `scores_at`, default DEFAULT_RATIOS)."""
    from diffusers_attribution.evaluation.damping import DEFAULT_RATIOS
    from diffusers_attribution.evaluation.lds import spearman_rows

    if scores_at is None:
        return select_damping(path.phi, query_features, masks, losses, path=path).validation_lds
    actual = (-losses.double().T).numpy()
    curve = []
    for ratio in DEFAULT_RATIOS if ratios is None else ratios:
        predicted = scores_at(ratio) @ masks.double().T  # [n_v, M]: Σ_{i∈s} τ_i(q)
        curve.append(float(spearman_rows(predicted.numpy(), actual).mean()))
    return curve


def choose_by_rule(candidates: dict[str, dict]) -> str:
    """The cheapest candidate whose mean is within one std of the best mean (the larger of the two stds).

    Cost: `timing_seconds` (all settings timed back to back in one quiet process, `--choose-timing`) when
    present, else the mean wall time of the replicates (noisy on shared cores)."""
    best = max(candidates, key=lambda name: candidates[name]["mean"])
    close = [name for name, c in candidates.items()
             if c["mean"] >= candidates[best]["mean"] - max(c["std"], candidates[best]["std"])]
    return min(close, key=lambda name: candidates[name].get("timing_seconds", candidates[name]["seconds"]))


def run_choose_method(args) -> None:
    """The default method from the LDS table run (results.json), on its validation queries only: per row the λ
    ratio with the best validation LDS averaged over seeds, then `choose_by_rule` (cost: the row's training
    featurization time in that run) among the rows whose featurization costs at most 2× D-TRAK K=10's."""
    import numpy as np

    result = json.loads(Path(args.results).read_text())
    rows = {row["name"]: row for row in result["rows"]}
    reference = rows.get("D-TRAK K=10 factored", {}).get("train_seconds")
    if reference is None:
        raise SystemExit(f"{args.results} has no 'D-TRAK K=10 factored' row with train_seconds: rerun the table with it")
    timing = time_rows(args, rows, reference_name="D-TRAK K=10 factored") if args.time_rounds else {}
    if timing:
        reference = timing["D-TRAK K=10 factored"]
    candidates, table = {}, []
    for name, row in rows.items():
        curves = [r["damping"]["validation_curve"] for r in row.get("per_seed", []) if "damping" in r]
        if not curves or "train_seconds" not in row:
            continue  # no λ to choose (similarity, TracIn) or not measured in this run
        ratios = list(curves[0])
        matrix = np.array([[c[r] for r in ratios] for c in curves], dtype=float)
        mean = matrix.mean(0)
        best = max(i for i, v in enumerate(mean) if v == np.nanmax(mean))
        seconds = timing.get(name, row["train_seconds"])
        entry = {"mean": float(mean[best]), "std": float(matrix[:, best].std(ddof=1)) if len(curves) > 1 else 0.0,
                 "ratio": float(ratios[best]), "seconds": seconds, "cost": seconds / reference,
                 "timed": name in timing, "method": row["config"]["method"]}
        table.append((name, entry))
        if entry["cost"] <= 2.0:
            candidates[name] = entry
    choice = choose_by_rule(candidates)
    out = {"rule": "among rows with training featurization <= 2x D-TRAK K=10 (same run): the cheapest whose mean "
                   "validation LDS is within one std of the best", "results": args.results,
           "cost": f"min over {args.time_rounds} interleaved rounds of timing (seed 0)" if timing else "the table run",
           "timing_seconds": timing, "rows": dict(table), "choice": choice}
    # beside its table: results.json → choose_method.json, results_X.json → choose_method_X.json
    path = Path(args.results).with_name(Path(args.results).name.replace("results", "choose_method", 1))
    path.write_text(json.dumps(out, indent=2))
    print("| row | validation LDS (best ratio, mean ± std over seeds) | ratio | featurization / D-TRAK K=10 |")
    print("|---|---|---|---|")
    for name, entry in sorted(table, key=lambda item: -item[1]["mean"]):
        mark = " **(chosen)**" if name == choice else "" if name in candidates else " (over 2×)"
        print(f"| {name}{mark} | {entry['mean']:.3f} ± {entry['std']:.3f} | {entry['ratio']:.3g} | {entry['cost']:.2f}× |")
    print(f"\nchoice: {choice} (method {candidates[choice]['method']!r}); wrote {path}")


def time_rows(args, rows: dict, reference_name: str) -> dict[str, float]:
    """Training featurization seconds (seed 0) of the reference row and of every row whose validation LDS is within
    two stds of the best: the minimum over `args.time_rounds` rounds, rows interleaved within each round (the
    minimum is the least disturbed by other jobs on shared cores)."""
    import numpy as np

    from diffusers_attribution.api import make_featurizer

    def validation(row):
        curves = [r["damping"]["validation_curve"] for r in row.get("per_seed", []) if "damping" in r]
        matrix = np.array([[c[k] for k in curves[0]] for c in curves], dtype=float) if curves else None
        if matrix is None:
            return None
        best = int(np.nanargmax(matrix.mean(0)))
        return float(matrix.mean(0)[best]), float(matrix[:, best].std(ddof=1)) if len(matrix) > 1 else 0.0

    scored = {name: validation(row) for name, row in rows.items() if "train_seconds" in row}
    scored = {name: v for name, v in scored.items() if v is not None}
    top = max(mean for mean, _ in scored.values())
    names = [reference_name] + [name for name, (mean, std) in scored.items()
                                if name != reference_name and mean >= top - 2 * max(std, 1e-12)]
    pipe = enable_attribution(full_model(Path(args.workdir)))
    images = training_images()
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(args.time_rounds):
        for name in names:
            config = AttributionConfig(**{"batch_size": 32, "projection_dim": PROJECTION_DIM, **rows[name]["config"]})
            featurizer = make_featurizer(pipe, config)
            t0 = time.perf_counter()
            featurizer.featurize_dataset(images, progress=False)
            seconds[name].append(time.perf_counter() - t0)
            print(f"timing round {round_}: {name} {seconds[name][-1]:.1f}s", flush=True)
    return {name: min(values) for name, values in seconds.items()}


def apply_rule(result: dict) -> None:
    """Per method: the choice within each comparison group and over all settings (`choose_by_rule`)."""
    summary = result["settings"]
    choices = {}
    for group in ("noise draws", "projection size", "ensembling"):
        candidates = {name: row for name, row in summary.items() if group in row["groups"]}
        if len(candidates) > 1:
            choices[group] = choose_by_rule(candidates)
    choices["all settings"] = choose_by_rule(summary)
    result["choices"] = choices


def run_choose_timing(args) -> None:
    """Time every setting of choose_defaults.json once, back to back (seed 0), and apply the rule again."""
    from diffusers_attribution.api import make_featurizer

    path = Path(args.choose_results or DATA / ("choose_defaults.json" if args.projector == "factored"
                                               else f"choose_defaults_{args.projector}.json"))
    out = json.loads(path.read_text())
    queries = load_ground_truth()["queries"]["validation"]
    pipe = enable_attribution(full_model(Path(args.workdir)))
    images = training_images()
    for method, result in out["methods"].items():
        for name, row in result["settings"].items():
            fields = row["fields"]
            members = 3 if fields is None else 1
            config = AttributionConfig(**{"method": method, "num_timesteps": 10, "projection_dim": PROJECTION_DIM,
                                          "projector": out["projector"], "batch_size": 32, **(fields or {})})
            t0 = time.perf_counter()
            for _ in range(members):
                featurizer = make_featurizer(pipe, config)
                featurizer.featurize_dataset(images, progress=False)
                featurizer.featurize_queries(queries)
            row["timing_seconds"] = time.perf_counter() - t0
            print(f"{method} {name}: {row['timing_seconds']:.1f}s", flush=True)
        apply_rule(result)
    out["timing"] = {"torch_threads": torch.get_num_threads(), "git": git_state(),
                     "loadavg_at_end": open("/proc/loadavg").read().split()[:3]}
    path.write_text(json.dumps(out, indent=2))
    print(choice_table(out))


def run_choose_defaults(args) -> None:
    """Defaults from the 32 validation queries only: λ ratio, noise draws, projection size, ensembling."""
    import numpy as np

    from diffusers_attribution.evaluation.damping import DEFAULT_RATIOS
    from diffusers_attribution.api import make_featurizer

    gt = load_ground_truth()
    masks, losses, queries = gt["masks"], gt["outputs"]["validation"], gt["queries"]["validation"]
    del gt  # the evaluation and real queries are never read here
    pipe = enable_attribution(full_model(Path(args.workdir)))
    images = training_images()
    seeds = list(range(args.choose_seeds))
    settings = [s for s in CHOICE_SETTINGS
                if not args.only or any(part.lower() in s[0].lower() for part in args.only.split(","))]
    names = [s[0] for s in settings]
    if CHOICE_ENSEMBLE in names and CHOICE_BASE not in names:
        settings.insert(0, CHOICE_SETTINGS[0])
    out: dict = {"projector": args.projector, "seeds": seeds, "ratios": list(DEFAULT_RATIOS),
                 "num_validation": int(losses.shape[1]), "methods": {}}
    started = time.time()
    for method in args.choose_methods.split(","):
        runs: dict[str, list[dict]] = {}
        members: dict[int, tuple] = {}  # base featurizations kept for the ensembles
        for name, fields, _ in settings:
            if fields is None:
                continue
            wanted = range(3 * len(seeds)) if name == CHOICE_BASE and CHOICE_ENSEMBLE in names else seeds
            runs[name] = []
            for seed in wanted:  # replicate `seed`: noise and projection both drawn from it
                config = AttributionConfig(**{"method": method, "num_timesteps": 10, "projection_dim": PROJECTION_DIM,
                                              "projector": args.projector, "batch_size": 32, "noise_seed": seed,
                                              "projection_seed": seed, **fields})
                featurizer = make_featurizer(pipe, config)
                t0 = time.perf_counter()
                store = featurizer.featurize_dataset(images, progress=False)
                features = featurizer.featurize_queries(queries)
                seconds = time.perf_counter() - t0
                path = KernelPath(store.features)
                if name == CHOICE_BASE:
                    members[seed] = (path, features, seconds)
                if seed in seeds:
                    runs[name].append({"seed": seed, "seconds": seconds,
                                       "curve": validation_curve(path, features, masks, losses)})
                best = f"best validation LDS {max(runs[name][-1]['curve']):.3f}" if seed in seeds else "ensemble member"
                print(f"{method} {name} seed {seed}: {best} ({seconds:.1f}s)", flush=True)
        if CHOICE_ENSEMBLE in names:
            runs[CHOICE_ENSEMBLE] = []
            for seed in seeds:
                group = [members[seed + j * len(seeds)] for j in range(3)]

                def scores_at(ratio, group=group):
                    return sum(p.scores(q, ratio * p.mean_eigenvalue) for p, q, _ in group) / len(group)

                runs[CHOICE_ENSEMBLE].append({"seed": seed, "members": [seed + j * len(seeds) for j in range(3)],
                                              "seconds": sum(s for _, _, s in group),
                                              "curve": validation_curve(None, None, masks, losses, scores_at)})
        # λ: the grid ratio with the best validation LDS averaged over seeds (base setting; ties → larger λ).
        base_curve = np.mean([r["curve"] for r in runs[CHOICE_BASE]], axis=0)
        best_index = max(i for i, v in enumerate(base_curve) if v == base_curve.max())
        summary = {}
        for name, fields, groups in settings:
            values = [r["curve"][best_index] for r in runs[name]]
            mean_curve = np.mean([r["curve"] for r in runs[name]], axis=0)
            own = max(i for i, v in enumerate(mean_curve) if v == mean_curve.max())
            summary[name] = {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
                             "seconds": float(np.mean([r["seconds"] for r in runs[name]])), "groups": list(groups),
                             "best_ratio": DEFAULT_RATIOS[own], "best_mean": float(mean_curve[own]),
                             "fields": fields, "runs": runs[name]}
        out["methods"][method] = {"damping_ratio": DEFAULT_RATIOS[best_index],
                                  "base_curve": [float(v) for v in base_curve], "settings": summary}
        apply_rule(out["methods"][method])
    out["seconds"] = time.time() - started
    out["torch"], out["machine"] = torch.__version__, platform.platform()
    out["base_config"] = AttributionConfig(method="d-trak", num_timesteps=10, projection_dim=PROJECTION_DIM,
                                           projector=args.projector).to_dict()  # what "factored" meant in this run
    out["git"] = git_state()
    path = Path(args.choose_results or DATA / ("choose_defaults.json" if args.projector == "factored"
                                               else f"choose_defaults_{args.projector}.json"))
    path.write_text(json.dumps(out, indent=2))
    print()
    print(choice_table(out))
    print(f"\nwrote {path}")


def ekfac_at_ratio(full, train_sketch: torch.Tensor, ratio: float, dim: int, sketch_dim: int):
    """The EK-FAC projector that featurizing at λ_f = ratio · mean Λ would fit, derived from a featurization at
    every coordinate (`full`: its PreconditionedProjector; same Λ, bases and calibration examples), with the
    indices of its kept coordinates in `full`'s sketch: ekfac_calibrate's own truncation (`keep_top` of the
    preconditioned energy of the calibration examples) and mix, so that `projector.precondition(H[:, index], ...)`
    are the features of that featurization (checked against one in `run_choose_ekfac`)."""
    from diffusers_attribution.curvature import PreconditionedProjector
    from diffusers_attribution.projection.calibrated import coordinate_blocks, keep_top

    damping = ratio * full.mean_eigenvalue
    calibration = full.fit_examples(len(train_sketch))
    energy = train_sketch[calibration].double().pow(2).mean(0)
    bases = keep_top(full.sketch, full.bases, energy / (full.sketch_eigenvalues.double() + damping), sketch_dim)
    source = {b.name: b for b in coordinate_blocks(full.sketch)}
    eigenvalues, index = {}, []
    for name, sides in bases.items():
        block = source[name]
        values = full.sketch_eigenvalues[block.offset : block.offset + block.k]
        if block.role == "weight":
            rows, cols = sides["out"].shape[1], sides["in"].shape[1]
            grid = torch.arange(block.k).view(block.k_out, block.k_in)[:rows, :cols]
        else:
            grid = torch.arange(sides["dense"].shape[1])
        eigenvalues[name] = values[grid].contiguous()
    projector = PreconditionedProjector(full.denoiser, full.parameters, dim, full.seed,
                                        {"bases": bases, "eigenvalues": eigenvalues,
                                         "mean_eigenvalue": full.mean_eigenvalue, "feature_damping": damping},
                                        fisher=full.fisher)
    for block in coordinate_blocks(projector.sketch):
        origin = source[block.name]
        if block.role == "weight":
            grid = torch.arange(origin.k).view(origin.k_out, origin.k_in)[: block.k_out, : block.k_in]
        else:
            grid = torch.arange(block.k)
        index.append(origin.offset + grid.flatten())
    return projector, torch.cat(index)


def training_sketch(featurizer, images: torch.Tensor) -> torch.Tensor:
    """H(z) [N, k_mid] of the training images: the EK-FAC featurizer's training path (training keys, the core task)
    with its rotated coordinates (`projector.sketch`) before weighting and mix."""
    own, featurizer.projector = featurizer.projector, featurizer.projector.sketch
    try:
        size = featurizer.config.batch_size
        return torch.cat([featurizer.features(images[start : start + size], [None] * len(images[start : start + size]),
                                              list(range(start, min(start + size, len(images)))), reduction="mean")
                          for start in range(0, len(images), size)])
    finally:
        featurizer.projector = own


def run_choose_ekfac(args) -> None:
    """EK-FAC's damping ratio from the 32 validation queries only: for each seed one featurization at every
    coordinate, then for each grid ratio the library's default projection at λ_f = λ = ratio · mean Λ
    (`ekfac_at_ratio`), its validation LDS; the rule: the best mean over seeds (ties → the larger λ)."""
    import numpy as np

    from diffusers_attribution.api import make_featurizer
    from diffusers_attribution.evaluation.damping import DEFAULT_RATIOS
    from diffusers_attribution.evaluation.lds import spearman_rows

    gt = load_ground_truth()
    masks, losses, queries = gt["masks"], gt["outputs"]["validation"], gt["queries"]["validation"]
    del gt  # the evaluation and real queries are never read here
    pipe = enable_attribution(full_model(Path(args.workdir)))
    images = training_images()
    total = sum(p.numel() for p in pipe.unet.parameters())
    seeds = list(range(args.choose_seeds))
    actual = (-losses.double().T).numpy()
    out: dict = {"seeds": seeds, "ratios": list(DEFAULT_RATIOS), "num_validation": int(losses.shape[1]), "methods": {}}
    for method in args.choose_methods.split(","):
        runs = []
        for seed in seeds:
            config = AttributionConfig(method=method, num_timesteps=10, projector="factored", batch_size=32,
                                       noise_seed=seed, projection_seed=seed, projection_dim=total, sketch_dim=total)
            featurizer = make_featurizer(pipe, config)
            t0 = time.perf_counter()
            featurizer.featurize_dataset(images, progress=False)
            full = featurizer.projector
            train = training_sketch(featurizer, images).double()
            sketch = featurizer.method.query_sketch(featurizer, queries).double()
            seconds = time.perf_counter() - t0
            curve, kept = [], []
            for ratio in DEFAULT_RATIOS:
                projector, index = ekfac_at_ratio(full, train, ratio, PROJECTION_DIM, 2 * PROJECTION_DIM)
                damping = ratio * full.mean_eigenvalue
                scores = projector.precondition(sketch[:, index], damping) @ projector.precondition(train[:, index], None).T
                curve.append(float(spearman_rows((scores @ masks.double().T).numpy(), actual).mean()))
                kept.append(len(index))
            if seed == seeds[0]:  # the derivation is the featurization: check one ratio against a real one
                ratio = DEFAULT_RATIOS[int(np.argmax(curve))]
                real = make_featurizer(pipe, AttributionConfig(method=method, num_timesteps=10, projector="factored",
                                                               batch_size=32, noise_seed=seed, projection_seed=seed,
                                                               projection_dim=PROJECTION_DIM, damping_ratio=ratio))
                store = real.featurize_dataset(images, progress=False)
                projector, index = ekfac_at_ratio(full, train, ratio, PROJECTION_DIM, 2 * PROJECTION_DIM)
                derived = projector.precondition(train[:, index], None)
                error = float((derived - store.features.double()).norm() / store.features.double().norm())
                print(f"{method}: derived vs featurized at ratio {ratio:g}: relative error {error:.2e} "
                      f"({len(index)} vs {real.projector.sketch.dim} coordinates)", flush=True)
                out.setdefault("checks", {})[method] = {"ratio": ratio, "relative_error": error,
                                                        "kept": [len(index), real.projector.sketch.dim]}
            runs.append({"seed": seed, "curve": curve, "kept": kept, "seconds": seconds,
                         "mean_eigenvalue": full.mean_eigenvalue})
            print(f"{method} seed {seed}: " + " ".join(f"{r:.3g}:{v:.3f}" for r, v in zip(DEFAULT_RATIOS, curve)), flush=True)
        mean_curve = np.mean([r["curve"] for r in runs], axis=0)
        best = max(i for i, v in enumerate(mean_curve) if v == mean_curve.max())  # ties → the larger λ
        at_best = [r["curve"][best] for r in runs]
        out["methods"][method] = {"damping_ratio": DEFAULT_RATIOS[best], "mean_curve": [float(v) for v in mean_curve],
                                  "mean": float(np.mean(at_best)),
                                  "std": float(np.std(at_best, ddof=1)) if len(at_best) > 1 else 0.0, "runs": runs}
        print(f"{method}: damping_ratio {DEFAULT_RATIOS[best]:.2g}, validation LDS {np.mean(at_best):.3f}", flush=True)
    out["torch"], out["machine"], out["git"] = torch.__version__, platform.platform(), git_state()
    path = Path(args.choose_results or DATA / "choose_ekfac.json")
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path}")


TIMESTEP_FRACTIONS = (1.0, 0.8, 0.6, 0.5, 0.4, 0.3, 0.2)


def run_choose_fraction(args) -> None:
    """A method's timestep fraction f (`timestep_fraction`: K = 10 timesteps in the lowest f of T) and its λ ratio,
    from the 32 validation queries only: per f and seed one featurization, the validation curve over the ratio grid;
    per f the ratio with the best mean curve (ties → the larger), and f with the best mean there (ties → the larger
    f), with the seeds' std beside it. `--ground-truth-seeds 0,1`: the validation outputs of both training seeds."""
    import numpy as np

    from diffusers_attribution.api import make_featurizer
    from diffusers_attribution.evaluation.damping import DEFAULT_RATIOS

    gt = load_ground_truth(seeds=ground_truth_seeds(args.ground_truth_seeds))
    masks, losses, queries = gt["masks"], gt["outputs"]["validation"], gt["queries"]["validation"]
    del gt  # the evaluation and real queries are never read here
    pipe = enable_attribution(full_model(Path(args.workdir)))
    images = training_images()
    out: dict = {"ratios": list(DEFAULT_RATIOS), "ground_truth_seeds": args.ground_truth_seeds, "methods": {}}
    for method in args.choose_methods.split(","):
        fractions = {}
        for fraction in TIMESTEP_FRACTIONS:
            curves = []
            for seed in range(args.choose_seeds):
                config = AttributionConfig(method=method, num_timesteps=10, batch_size=32, noise_seed=seed,
                                           projection_dim=PROJECTION_DIM, timestep_fraction=fraction)
                featurizer = make_featurizer(pipe, config)
                query_features, scores, _ = query_path(featurizer, featurizer.featurize_dataset(images, progress=False))
                features = query_features(queries)
                curves.append(validation_curve(None, None, masks, losses, lambda r: scores(features, r)))
            mean = np.mean(curves, axis=0)
            best = max(i for i, v in enumerate(mean) if v == mean.max())
            at = [curve[best] for curve in curves]
            fractions[fraction] = {"damping_ratio": DEFAULT_RATIOS[best], "mean": float(np.mean(at)),
                                   "std": float(np.std(at, ddof=1)), "curves": curves}
            print(f"{method} f={fraction}: validation {np.mean(at):.3f} ± {np.std(at, ddof=1):.3f} at ratio "
                  f"{DEFAULT_RATIOS[best]:.2g}", flush=True)
        top = max(fractions.values(), key=lambda r: r["mean"])["mean"]
        chosen = max(f for f, r in fractions.items() if r["mean"] == top)
        out["methods"][method] = {"timestep_fraction": chosen, "fractions": fractions}
        print(f"{method}: timestep_fraction {chosen} (ratio {fractions[chosen]['damping_ratio']:.2g})", flush=True)
    out["torch"], out["machine"], out["git"] = torch.__version__, platform.platform(), git_state()
    path = Path(args.choose_results or DATA / "choose_timestep_fraction.json")
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path}")


def git_state() -> str:
    """The checkout's commit, with "+dirty" if the library has uncommitted changes (numbers depend on them)."""
    import subprocess

    def git(*argv):
        return subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return git("rev-parse", "--short", "HEAD") + ("+dirty" if git("status", "--porcelain", "diffusers_attribution") else "")


def choice_table(out: dict) -> str:
    lines = ["| method | setting | validation LDS at the chosen λ ratio | best on the λ grid (ratio) | "
             "wall time / replicate (s) | timed back to back (s) |", "|---|---|---|---|---|---|"]
    decisions = []
    for method, result in out["methods"].items():
        for name, row in result["settings"].items():
            timed = f"{row['timing_seconds']:.0f}" if "timing_seconds" in row else "–"
            lines.append(f"| {method} | {name} | {row['mean']:.3f} ± {row['std']:.3f} | {row['best_mean']:.3f} "
                         f"({row['best_ratio']:.2g}) | {row['seconds']:.0f} | {timed} |")
        decisions.append(f"- {method}: λ ratio {result['damping_ratio']:.2g} (validation LDS "
                         f"{max(result['base_curve']):.3f}); "
                         + "; ".join(f"{group}: {choice}" for group, choice in result["choices"].items()))
    return "\n".join(lines + ["", f"Rule applied ({out['projector']} projector, seeds {out['seeds']}):"] + decisions)


# ---------------------------------------------------------------------------------------------- counterfactual


def run_counterfactual(args) -> None:
    from diffusers_attribution.api import make_featurizer, make_scorer
    from diffusers_attribution.evaluation.counterfactual import counterfactual
    from diffusers_attribution.methods.base import get_method

    workdir = Path(args.workdir)
    pipe = enable_attribution(full_model(workdir))
    images = training_images()
    # One image per seed, from seeds other than those of the LDS queries.
    query_seeds = [QUERY_SEED + 1000 + i for i in range(args.counterfactual_queries)]
    original = torch.cat([generate_digits(pipe, 1, seed=s) for s in query_seeds])
    results_path = DATA / "counterfactual.json"
    summary = json.loads(results_path.read_text()) if results_path.is_file() else {}
    previous = json.loads(Path(args.results).read_text()) if Path(args.results).is_file() else {"rows": []}
    ratios = {row["name"]: row.get("damping_ratios", [None])[0] for row in previous["rows"]}
    shared_random: Path | None = None  # the random-removal control is the same for every method: train it once
    labels = {"d-trak": "D-TRAK K=10 factored", "trak": "TRAK K=10 factored", "fisher": "projected Fisher K=10",
              "das": "DAS K=10", "das-fisher": "DAS-Fisher K=10", "ekfac": "EK-FAC K=10 (MC Fisher)",
              "ekfac-empirical": "EK-FAC K=10 (empirical Fisher)"}
    for method in args.counterfactual_methods.split(","):
        label = labels[method]
        output_dir = workdir / f"counterfactual-{method}-k{args.counterfactual_k}"
        if shared_random is not None:
            reuse_random_removals(shared_random, output_dir, len(query_seeds))
        config = AttributionConfig(method=method, num_timesteps=10, projection_dim=PROJECTION_DIM, batch_size=32,
                                   damping_ratio=ratios.get(label))  # None: the method default
        featurizer = make_featurizer(pipe, config)
        store = featurizer.featurize_dataset(images, progress=False)
        if get_method(method).kernel and method != "das":
            path = KernelPath(store.features)
            scores = path.scores(featurizer.featurize_queries(original), config.damping_ratio * path.mean_eigenvalue)
        else:  # the method's own scorer, at the ratio the table chose on validation queries
            scores = make_scorer(store).scores(featurizer.featurize_queries(original))
        result = counterfactual(DigitsTrainingRecipe(LDS_RECIPE), images, scores,
                                query_seeds, args.counterfactual_k,
                                output_dir, original=original,
                                generate=lambda p, s: generate_digits(p, 1, seed=s), training_seed=TRAINING_SEED)
        shared_random = output_dir
        summary[label] = {**result.summary(), "l2_std": float(result.l2.std()),
                          "l2_random_std": float(result.l2_random.std()), "l2": result.l2.tolist(),
                          "l2_random": result.l2_random.tolist(), "damping_ratio": config.damping_ratio,
                          "query_seeds": query_seeds, "seconds": result.extra["seconds"]}
        print(label, result.summary(), flush=True)
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(summary, indent=2))


def reuse_random_removals(source: Path, target: Path, num_queries: int) -> None:
    """Copy the finished random-removal retrainings (jobs n_q .. 2 n_q - 1) of one counterfactual run to another.

    `counterfactual` draws the random removals from (random_seed, query) only, so they are the same for every
    method; the harness accepts the copies because their run key and per-subset mask digest match (it checks both).
    """
    import shutil

    target.mkdir(parents=True, exist_ok=True)
    for subset in range(num_queries, 2 * num_queries):
        name = f"subset-{subset:05d}-seed-{TRAINING_SEED}.safetensors"
        if (source / name).is_file() and not (target / name).is_file():
            shutil.copy2(source / name, target / name)


def apply_smoke(args) -> None:
    """Shrink everything so that each phase runs in well under a minute (outputs under <workdir>/smoke)."""
    global DATA, PLOT, N_TRAIN, N_REAL, N_VALIDATION, N_EVALUATION, LDS_RECIPE, LOSS_SPEC, NOISE_SEEDS, PROJECTION_DIM
    root = Path(args.workdir) / "smoke"
    DATA, PLOT = root / "data", root / "lds_digits.png"
    N_TRAIN, N_REAL, N_VALIDATION, N_EVALUATION = 40, 6, 6, 6
    LDS_RECIPE = replace(LDS_RECIPE, num_steps=4, batch_size=8, lr_warmup_steps=1)
    LOSS_SPEC = replace(LOSS_SPEC, timesteps=5, noise_draws=1)
    NOISE_SEEDS, PROJECTION_DIM = (0, 1), 256
    args.workdir = str(root)
    args.subsets = min(args.subsets, 5)
    args.results = str(DATA / "results.json")
    args.counterfactual_queries, args.counterfactual_k = 2, 5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build-ground-truth", action="store_true", help="retrain on the subsets (long, resumable)")
    parser.add_argument("--counterfactual", action="store_true", help="the counterfactual experiment (retrains)")
    parser.add_argument("--choose-defaults", action="store_true",
                        help="compare λ, noise draws, k and ensembling on the validation queries only")
    parser.add_argument("--choose-method", action="store_true",
                        help="the default method from the table's validation curves (results.json; no featurization)")
    parser.add_argument("--time-rounds", type=int, default=0,
                        help="--choose-method: time the contending rows again, interleaved, this many rounds (min)")
    parser.add_argument("--choose-timing", action="store_true",
                        help="time each --choose-defaults setting once, back to back, and apply the rule again")
    parser.add_argument("--choose-ekfac", action="store_true",
                        help="EK-FAC's damping ratio on the validation queries only (--choose-methods ekfac,...)")
    parser.add_argument("--choose-fraction", action="store_true",
                        help="a method's timestep_fraction and λ ratio on the validation queries only (--choose-methods)")
    parser.add_argument("--choose-methods", default=None,
                        help="--choose-defaults: methods to compare (default trak,d-trak; --choose-ekfac: ekfac,ekfac-empirical; "
                             "--choose-fraction: das-fisher)")
    parser.add_argument("--choose-seeds", type=int, default=len(NOISE_SEEDS), help="--choose-defaults: replicates")
    parser.add_argument("--projector", default="factored", choices=projector_names(), help="--choose-defaults: projector")
    parser.add_argument("--choose-results", default=None,
                        help="--choose-defaults output (default benchmarks/data/lds_digits/choose_defaults.json)")
    parser.add_argument("--subsets", type=int, default=NUM_SUBSETS)
    parser.add_argument("--workdir", default=str(default_workdir()), help="models and per-subset results (not committed)")
    parser.add_argument("--rank", type=int, default=None, help="this process's rank (ground truth in several processes)")
    parser.add_argument("--world-size", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="table: pixel, K=10 factored and identity rows only")
    parser.add_argument("--only", default=None, help="table / --choose-defaults: comma-separated substrings of row "
                        "or setting names to (re)run ('=NAME': that table row only)")
    parser.add_argument("--results", default=str(DATA / "results.json"))
    parser.add_argument("--ground-truth-seeds", default=str(TRAINING_SEED),
                        help="table: average the outputs of these training seeds (0: the committed ones; others from "
                             "benchmarks/ground_truth_noise.py --save)")
    parser.add_argument("--counterfactual-queries", type=int, default=8)
    parser.add_argument("--counterfactual-k", type=int, default=100)
    parser.add_argument("--counterfactual-methods", default="d-trak,trak",
                        help="comma-separated methods (d-trak, trak, fisher, das, ekfac, ekfac-empirical)")
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny end-to-end run of every phase into <workdir>/smoke (checks the script, not LDS)")
    args = parser.parse_args()
    if args.choose_methods is None:
        args.choose_methods = ("ekfac,ekfac-empirical" if args.choose_ekfac else "das-fisher" if args.choose_fraction
                               else "trak,d-trak")
    if args.smoke:
        apply_smoke(args)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    if args.build_ground_truth:
        build_ground_truth(args)
    elif args.counterfactual:
        run_counterfactual(args)
    elif args.choose_defaults:
        run_choose_defaults(args)
    elif args.choose_ekfac:
        run_choose_ekfac(args)
    elif args.choose_fraction:
        run_choose_fraction(args)
    elif args.choose_method:
        run_choose_method(args)
    elif args.choose_timing:
        run_choose_timing(args)
    else:
        run_table(args)


if __name__ == "__main__":
    main()
