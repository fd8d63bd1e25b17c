"""How much of an LDS benchmark's ground truth is the training run's own noise, and the LDS ceiling it implies.

The committed ground truths train every subset once, with training seed 0. This retrains the first M subsets
with another training seed (`--seed`, same recipe, data and masks) and measures the same queries. Per query,
r = Spearman over the M subsets of the two seeds' outputs: how reproducible a subset's effect on that query is.
If an output is a subset effect plus independent training noise, the best possible attribution (the subset effect
itself) has correlation sqrt(r) with one seed's outputs: the LDS ceiling of a one-seed ground truth is about
mean_q sqrt(max(r_q, 0)). The library's default method is scored beside it, on the same M subsets, against
seed 0 (the committed outputs), the new seed, and their mean. The bound assumes the attribution knows nothing of
seed 0's own noise; but the attributed model was trained with seed 0 too, so where the LDS against seed 0 is well
above the LDS against the other seed, the attribution also predicts seed 0's noise and the bound does not hold.

    python benchmarks/ground_truth_noise.py --benchmark digits --subsets 16     # ~10 min on 2 CPU cores
    python benchmarks/ground_truth_noise.py --benchmark lora --subsets 16       # ~3 min
    # → benchmarks/data/lds_<benchmark>/ground_truth_noise.json; models are not kept (resumable: rerun)
    # every subset, kept as a second training seed of the ground truth (the tables' --ground-truth-seeds 0,1):
    python benchmarks/ground_truth_noise.py --benchmark digits --subsets 64 --save   # ~25 min; lora ~12 min
    # → also benchmarks/data/lds_<benchmark>/outputs_seed1.safetensors
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lds_digits  # noqa: E402
import lds_lora  # noqa: E402

from diffusers_attribution import AttributionConfig  # noqa: E402
from diffusers_attribution.api import make_featurizer, make_scorer  # noqa: E402
from diffusers_attribution.evaluation.lds import lds, spearman_rows  # noqa: E402
from diffusers_attribution.evaluation.outputs import QueryLosses  # noqa: E402
from diffusers_attribution.evaluation.retrain import DigitsTrainingRecipe, RetrainHarness  # noqa: E402

NAMES = ("validation", "generated", "real")


def setting(benchmark: str) -> dict:
    """The committed ground truth, the recipe, the training data, the attributed pipeline and the config fields."""
    if benchmark == "digits":
        gt = lds_digits.load_ground_truth()
        return {"gt": gt, "recipe": DigitsTrainingRecipe(lds_digits.LDS_RECIPE), "data": lds_digits.training_images(),
                "pipe": lds_digits.enable_attribution(lds_digits.full_model(lds_digits.default_workdir())),
                "loss_spec": lds_digits.LOSS_SPEC, "prompts": None, "fields": {}, "dir": lds_digits.DATA}
    gt = lds_lora.load_ground_truth()
    return {"gt": gt, "recipe": lds_lora.LORA_RECIPE, "data": lds_lora.training_set(),
            "pipe": lds_lora.enable_attribution(lds_lora.full_model()), "loss_spec": lds_lora.LOSS_SPEC,
            "prompts": gt["prompts"], "fields": {"parameters": "lora"}, "dir": lds_lora.DATA}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--benchmark", choices=("digits", "lora"), required=True)
    parser.add_argument("--subsets", type=int, default=16, help="the first M subsets of the committed masks")
    parser.add_argument("--seed", type=int, default=1, help="the other training seed (the committed one is 0)")
    parser.add_argument("--workdir", default=None, help="retrainings (default: the benchmark's workdir)")
    parser.add_argument("--save", action="store_true", help="write the new seed's outputs of every subset beside the "
                        "committed ones (outputs_seed<S>.safetensors; needs --subsets = all of them)")
    args = parser.parse_args()
    s = setting(args.benchmark)
    gt, M = s["gt"], args.subsets
    workdir = Path(args.workdir) if args.workdir else lds_digits.default_workdir()
    masks = gt["masks"][:M]
    measure = QueryLosses(gt["queries"], s["loss_spec"], **({"prompts": s["prompts"]} if s["prompts"] else {}))
    started = time.time()
    harness = RetrainHarness(s["recipe"], s["data"], masks, workdir / f"noise-{args.benchmark}-seed-{args.seed}",
                             measure, seeds=(args.seed,),
                             metadata={"benchmark": f"ground_truth_noise/{args.benchmark}"})
    results = harness.run()
    if not results.complete:
        raise SystemExit("not every retraining finished: rerun to resume")
    if args.save:
        if M != len(gt["masks"]):
            raise SystemExit(f"--save needs every subset (--subsets {len(gt['masks'])}), not {M}")
        from safetensors.torch import save_file

        save_file({name: results.outputs(name).contiguous() for name in NAMES},
                  str(s["dir"] / f"outputs_seed{args.seed}.safetensors"),
                  metadata={"training_seed": str(args.seed), "masks": "masks.safetensors (the same subsets, in order)"})

    config = AttributionConfig(batch_size=32, noise_seed=0, **s["fields"])  # the library default
    featurizer = make_featurizer(s["pipe"], config)
    store = featurizer.featurize_dataset(s["data"], progress=False)
    scorer = make_scorer(store)
    report: dict = {"benchmark": args.benchmark, "subsets": M, "seeds": [0, args.seed], "method": config.method,
                    "damping_ratio": config.damping_ratio, "splits": {}}
    print(f"{args.benchmark}: {M} subsets, training seeds 0 and {args.seed}; LDS of {config.method} at its default λ")
    print("| split | r = Spearman(seed 0, seed 1) per query, mean | ceiling mean sqrt(r) | LDS vs seed 0 | vs seed 1 "
          "| vs their mean |")
    print("|---|---|---|---|---|---|")
    for name in NAMES:
        first, other = gt["outputs"][name][:M].double(), results.outputs(name).double()
        r = spearman_rows(first.T.numpy(), other.T.numpy())
        ceiling = float(np.sqrt(np.clip(r, 0, None)).mean())
        prompts = s["prompts"][name] if s["prompts"] else None
        scores = scorer.scores(featurizer.featurize_queries(gt["queries"][name], prompts))
        sets = (("seed 0", first), (f"seed {args.seed}", other), ("mean", (first + other) / 2))
        versus = {label: lds(scores, masks, outputs).mean for label, outputs in sets}
        report["splits"][name] = {"r_mean": float(np.nanmean(r)), "r_per_query": r.tolist(), "ceiling": ceiling,
                                  "lds": versus}
        values = list(versus.values())
        print(f"| {name} | {np.nanmean(r):.3f} | {ceiling:.3f} | {values[0]:.3f} | {values[1]:.3f} | {values[2]:.3f} |")
    report["seconds"] = time.time() - started
    path = s["dir"] / ("ground_truth_noise.json" if M == 16 else f"ground_truth_noise_{M}.json")
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
