"""Query samples on the digits LDS benchmark (issue 24): each query's gradient from S (t, ε) samples of its own.

The setting is benchmarks/lds_digits.py's (committed ground truth, N = 500, 32 validation / 64 generated / 64 real
queries, k = 2048 factored, batch 32). For each method (its library defaults) and noise seed the training set is
featurized once; then the queries are featurized under each query setting (`query_samples`, `query_noise`, with
the store's fitted projection, as `attribute` does) and scored at every ratio of the damping grid:

    validation   the best mean validation LDS over the grid (λ chosen there: ties → the larger)
    generated / real   the evaluation LDS at that validation-chosen λ, and at the method's default ratio
    query seconds      featurizing the 160 queries

    python benchmarks/query_samples.py [--methods d-trak,das,fisher,trak,ekfac] [--seeds 0,1,2] [--device cuda]
        [--noise-mode per-example] [--settings "training pairs,fresh-noise"] [--ground-truth-seeds 0,1]
        [--out FILE.json] [--table]

The choice, on validation only (docs/benchmarks.md, "The rule"): per method, the cheapest setting (query seconds)
whose mean validation LDS over the seeds is within one std of the best mean (`lds_digits.choose_by_rule`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

import lds_digits as bench  # benchmarks/, beside this script (it puts the checkout on sys.path)
from diffusers_attribution import AttributionConfig, enable_attribution  # noqa: E402
from diffusers_attribution.api import make_featurizer  # noqa: E402
from diffusers_attribution.evaluation.damping import DEFAULT_RATIOS  # noqa: E402
from diffusers_attribution.evaluation.lds import lds, summarize_seeds  # noqa: E402

NAMES = ("validation", "generated", "real")


def settings(pairs: int) -> list[tuple[str, int | None, str | None]]:
    """(label, query_samples, query_noise): the training set's K·D pairs (S = K·D shared-then-fresh: the same
    features as query_samples=None, whatever the method's default), then more samples."""
    out = [(f"S={pairs} (the training pairs)", pairs, "shared-then-fresh"),
           (f"S={pairs} fresh", pairs, "fresh"),  # the same count without the coupling
           (f"S={pairs} fresh-noise", pairs, "fresh-noise")]  # ... with the training timesteps
    for S in (30, 100):
        if S > pairs:
            out.append((f"S={S} shared-then-fresh", S, "shared-then-fresh"))
            out.append((f"S={S} fresh", S, "fresh"))
    out.append(("S=100 fresh-noise", 100, "fresh-noise"))
    return out


def only(labels: str | None, rows: list) -> list:
    """The settings whose label contains one of the comma-separated `labels` (all with None)."""
    return rows if not labels else [row for row in rows if any(part in row[0] for part in labels.split(","))]


def evaluate(pipe, method: str, seed: int, gt: dict, images, device: str | None,
             noise_mode: str = "shared", labels: str | None = None) -> list[dict]:
    import numpy as np

    config = AttributionConfig(method=method, batch_size=32, projection_dim=bench.PROJECTION_DIM, noise_seed=seed,
                               device=device, noise_mode=noise_mode)
    t0 = time.perf_counter()
    store = make_featurizer(pipe, config).featurize_dataset(images, progress=False)
    train_seconds = time.perf_counter() - t0
    masks, outputs, queries = gt["masks"], gt["outputs"], gt["queries"]
    records = []
    for label, samples, noise in only(labels, settings(config.num_timesteps * (config.noise_draws or 1))):
        qconfig = dataclasses.replace(config, query_samples=samples, query_noise=noise)
        featurizer = make_featurizer(pipe, qconfig, store=store)
        query_features, scores_at, _ = bench.query_path(featurizer, store)
        _sync()
        t1 = time.perf_counter()
        features = {name: query_features(queries[name]) for name in NAMES}
        _sync()
        seconds = time.perf_counter() - t1
        curve = bench.validation_curve(None, None, masks, outputs["validation"],
                                       lambda r: scores_at(features["validation"], r))
        best = max(i for i, v in enumerate(curve) if v == np.nanmax(curve))
        record = {"method": method if noise_mode == "shared" else f"{method} ({noise_mode} noise)", "setting": label, "query_samples": samples, "query_noise": noise, "seed": seed,
                  "validation": float(curve[best]), "ratio": DEFAULT_RATIOS[best], "query_seconds": seconds,
                  "train_seconds": train_seconds, "validation_curve": dict(zip(map(str, DEFAULT_RATIOS), curve))}
        for name in ("generated", "real"):
            record[name] = lds(scores_at(features[name], DEFAULT_RATIOS[best]), masks, outputs[name],
                               seed=seed).to_dict()
            record[f"{name}_default_damping"] = lds(scores_at(features[name], config.damping_ratio), masks,
                                                    outputs[name], seed=seed).to_dict()
        print(f"{record['method']:<7} seed {seed} {label:<40} validation {record['validation']:.3f}  generated "
              f"{record['generated']['mean']:.3f}  real {record['real']['mean']:.3f}  (default λ: "
              f"{record['generated_default_damping']['mean']:.3f} / {record['real_default_damping']['mean']:.3f})  "
              f"queries {seconds:.1f}s  train {train_seconds:.1f}s", flush=True)
        records.append(record)
    return records


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def summary(records: list[dict]) -> list[dict]:
    """Per (method, setting): mean ± std over seeds, and the validation-only choice per method."""

    class _R:
        def __init__(self, d):
            self.mean, self.ci = d["mean"], tuple(d["ci"])

    rows = {}
    for r in records:
        rows.setdefault((r["method"], r["setting"]), []).append(r)
    out = []
    for (method, setting), group in rows.items():
        validation = torch.tensor([g["validation"] for g in group], dtype=torch.float64)
        row = {"method": method, "setting": setting, "seeds": [g["seed"] for g in group],
               "validation": {"mean": float(validation.mean()),
                              "std": float(validation.std()) if len(group) > 1 else 0.0},
               "query_seconds": sum(g["query_seconds"] for g in group) / len(group)}
        for key in ("generated", "real", "generated_default_damping", "real_default_damping"):
            row[key] = summarize_seeds([_R(g[key]) for g in group]).to_dict()
        out.append(row)
    for method in sorted({row["method"] for row in out}):
        candidates = {row["setting"]: {"mean": row["validation"]["mean"], "std": row["validation"]["std"],
                                       "seconds": row["query_seconds"]} for row in out if row["method"] == method}
        chosen = bench.choose_by_rule(candidates)
        for row in out:
            if row["method"] == method:
                row["chosen"] = row["setting"] == chosen
    return out


def table(rows: list[dict]) -> str:
    lines = ["| method | query samples | validation LDS | generated | real | generated / real at default λ | "
             "query seconds |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        mark = " **(chosen)**" if r.get("chosen") else ""
        lines.append(f"| {r['method']} | {r['setting']}{mark} | {r['validation']['mean']:.3f} ± "
                     f"{r['validation']['std']:.3f} | {r['generated']['mean']:.3f} ± {r['generated']['std']:.3f} | "
                     f"{r['real']['mean']:.3f} ± {r['real']['std']:.3f} | {r['generated_default_damping']['mean']:.3f}"
                     f" / {r['real_default_damping']['mean']:.3f} | {r['query_seconds']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="d-trak,das,fisher")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--device", default=None, help="e.g. cuda (default: the CPU)")
    parser.add_argument("--workdir", default=str(bench.default_workdir()))
    parser.add_argument("--out", default=str(bench.DATA / "query_samples.json"))
    parser.add_argument("--smoke", action="store_true", help="4 queries per split: checks the script, not the method")
    parser.add_argument("--noise-mode", default="shared", choices=("shared", "per-example"),
                        help="the training features' noise (per-example: no coupling with any query)")
    parser.add_argument("--settings", default=None, help="comma-separated substrings of the settings to run")
    parser.add_argument("--table", action="store_true", help="print the table of --out, computing nothing")
    parser.add_argument("--ground-truth-seeds", default="0",
                        help="training seeds of the ground truth, averaged (lds_digits.py's option), e.g. 0,1")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(Path(args.out).read_text())["rows"]))
        return
    gt = bench.load_ground_truth(seeds=bench.ground_truth_seeds(args.ground_truth_seeds))
    if args.smoke:
        gt["queries"] = {name: q[:4] for name, q in gt["queries"].items()}
        gt["outputs"] = {name: o[:, :4] for name, o in gt["outputs"].items()}
    pipe = enable_attribution(bench.full_model(Path(args.workdir), progress=False))
    if bench.fingerprint(pipe) != gt["info"]["full_model_fingerprint"]:
        print("warning: the full model differs from the ground truth's")
    images = bench.training_images()
    records = []
    for seed in [int(s) for s in args.seeds.split(",")]:  # seed-major: a cut-short run has every method's seed 0
        for method in args.methods.split(","):
            records.extend(evaluate(pipe, method, seed, gt, images, args.device, args.noise_mode, args.settings))
            rows = summary(records)
            Path(args.out).write_text(json.dumps({"rows": rows, "records": records, "device": args.device,
                                                  "ground_truth_seeds": args.ground_truth_seeds,
                                                  "torch": torch.__version__}, indent=2))
    print()
    print(table(summary(records)))


if __name__ == "__main__":
    main()
