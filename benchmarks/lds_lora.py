"""LDS benchmark on a text-to-image LoRA fine-tune: a ground truth of LoRA retrainings, then a table of methods.

The setting (D-TRAK's ArtBench protocol on a CPU scale; docs/benchmarks.md, "LoRA fine-tune"):
  base model    `tiny_captioned_sd_pipeline(seed=0, size=8)`: a Stable Diffusion pipeline of random weights built
                from configs (UNet2DConditionModel ~0.8M parameters, 8x8 RGB images, 4x4x4 latents, a 2-layer CLIP text
                encoder over a word-level tokenizer), the same for every retraining; nothing downloaded.
  training set  N = 500 captioned digits: `captioned_digits(500, seed=0, size=8)`, scikit-learn digits coloured
                ("a red digit 3 on a dark background": 6 colours x 2 backgrounds drawn from the seed).
  recipe        `LORA_RECIPE`: diffusers' train_text_to_image_lora.py on the UNet's attention (to_q/k/v/out.0),
                rank 8, AdamW lr 1e-3, 200 steps of batch 16, training seed 0 for every model.
  model         the attributed model = the recipe on all 500; 96 queries generated from it (DDIM 20 steps,
                guidance 3) with captions drawn from QUERY_SEED: the first 32 are the *validation* split (only
                used to choose λ), the other 64 the *evaluation* queries; 64 held-out *real* captioned digits
                (`captioned_digits(64, seed=0, size=8, offset=500)`), never trained on. Every query's loss and
                features condition on its prompt.
  ground truth  64 random half-size subsets (α = 0.5, mask seed 0), one LoRA each; output = the diffusion loss
                on every query (with its prompt) averaged over 50 evenly spaced timesteps x 2 fixed noises.

Two phases:
    # 1. ground truth (64 LoRA retrainings; resumable: rerun the same command):
    OMP_NUM_THREADS=1 nice -n 19 python benchmarks/lds_lora.py --build-ground-truth
    #    in several processes: ... --build-ground-truth --rank R --world-size W (for R in 0..W-1), then once more
    #    without --rank to assemble; writes benchmarks/data/lds_lora/{ground_truth.json, masks.safetensors,
    #    outputs.safetensors, queries.safetensors, prompts.json} (small, committed); models are not kept.
    # 2. the table, from the committed ground truth (every method through the public API, parameters="lora"):
    python benchmarks/lds_lora.py [--quick] [--only das,fisher] [--seeds 0,1,2]
    #    writes benchmarks/data/lds_lora/results.json and prints a markdown table.

Every LDS is the mean ± std over the attribution noise seeds (`noise_seed` 0, 1, 2) with the mean of the per-seed
95 % bootstrap intervals over queries; λ is chosen per seed on the validation queries (as in lds_digits.py, on a
grid extended to 1e4 × the mean eigenvalue: RATIOS).
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
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if not (ROOT / "diffusers_attribution").is_dir():
    raise SystemExit("run from a checkout of diffusers-attribution")
sys.path.insert(0, str(ROOT))

from lds_digits import (  # noqa: E402  (beside this script)
    damping_path,
    ground_truth_seeds,
    write_ground_truth,
    git_state,
    lds_at_validation_damping,
    load_ground_truth as load_digits_ground_truth,
    markdown_table,
    only_rows,
    summarize,
)
from peak_memory import PeakMemory  # noqa: E402
from diffusers_attribution import AttributionConfig, enable_attribution  # noqa: E402
from diffusers_attribution.demo.captioned_digits import (  # noqa: E402
    BACKGROUNDS,
    COLOURS,
    caption_of,
    captioned_digits,
    tiny_captioned_sd_pipeline,
)
from diffusers_attribution.evaluation.lds import lds  # noqa: E402
from diffusers_attribution.evaluation.masks import subset_masks  # noqa: E402
from diffusers_attribution.evaluation.outputs import LossSpec, QueryLosses  # noqa: E402
from diffusers_attribution.evaluation.recipes import LoraTextToImageRecipe  # noqa: E402
from diffusers_attribution.evaluation.retrain import RetrainHarness  # noqa: E402

DATA = ROOT / "benchmarks" / "data" / "lds_lora"
SIZE = 8
N_TRAIN, N_REAL = 500, 64
N_VALIDATION, N_EVALUATION = 32, 64
QUERY_SEED, GENERATION_STEPS, GUIDANCE = 1234, 20, 3.0
NUM_SUBSETS, ALPHA, MASK_SEED = 64, 0.5, 0
TRAINING_SEED = 0
BASE = partial(tiny_captioned_sd_pipeline, seed=0, size=SIZE)
LORA_RECIPE = LoraTextToImageRecipe(base=BASE, rank=8, learning_rate=1e-3, batch_size=16, num_steps=200)
LOSS_SPEC = LossSpec(timesteps=50, noise_draws=2, seed=0)
NOISE_SEEDS = (0, 1, 2)
PROJECTION_DIM = 2048
# λ / the curvature's mean eigenvalue, chosen on the validation queries: lds_digits.py's grid (1e-4 … 1e2, 4 per
# decade) extended to 1e4, because on this setting the kernel methods' best λ lay at 1e2, the old grid's edge.
RATIOS = tuple(float(10 ** (e / 4)) for e in range(-16, 17))
QUERY_SETS = ("validation", "generated", "real")


def default_workdir() -> Path:
    return Path(os.environ.get("LDS_LORA_WORKDIR", "~/.cache/diffusers_attribution/lds_lora")).expanduser()


# ---------------------------------------------------------------------------------------------- data


def training_set() -> list[tuple[torch.Tensor, str]]:
    return captioned_digits(N_TRAIN, seed=0, size=SIZE)


def real_queries() -> tuple[torch.Tensor, list[str]]:
    pairs = captioned_digits(N_REAL, seed=0, size=SIZE, offset=N_TRAIN)
    return torch.stack([image for image, _ in pairs]), [caption for _, caption in pairs]


def query_prompts(n: int, seed: int) -> list[str]:
    """`n` captions of the training distribution (digit, colour, background drawn from `seed`)."""
    generator = torch.Generator().manual_seed(seed)
    digits = torch.randint(0, 10, (n,), generator=generator).tolist()
    colours = torch.randint(0, len(COLOURS), (n,), generator=generator).tolist()
    backgrounds = torch.randint(0, len(BACKGROUNDS), (n,), generator=generator).tolist()
    return [caption_of(d, list(COLOURS)[c], list(BACKGROUNDS)[b]) for d, c, b in zip(digits, colours, backgrounds)]


@torch.no_grad()
def generate(pipe, prompts: list[str], seed: int) -> torch.Tensor:
    """Images [n, 3, SIZE, SIZE] in [-1, 1] for `prompts` (deterministic DDIM, classifier-free guidance)."""
    out = pipe(prompts, num_inference_steps=GENERATION_STEPS, guidance_scale=GUIDANCE, output_type="pt",
               generator=torch.Generator().manual_seed(seed))
    return (out.images.float() * 2 - 1).clamp(-1, 1).cpu()


def full_model():
    """The attributed model: LORA_RECIPE on all N_TRAIN examples (deterministic: trained again in each run)."""
    return LORA_RECIPE.train(training_set(), TRAINING_SEED)


def fingerprint(pipe) -> str:
    from diffusers_attribution.fingerprint import model_fingerprint

    return model_fingerprint(pipe.unet, dict(pipe.unet.named_parameters()))["lora"]


def load_ground_truth(seeds: tuple[int, ...] = (TRAINING_SEED,)) -> dict:
    gt = load_digits_ground_truth(DATA, seeds)
    gt["prompts"] = json.loads((DATA / "prompts.json").read_text())
    return gt


# ---------------------------------------------------------------------------------------------- phase 1


def build_ground_truth(args) -> None:
    workdir = Path(args.workdir)
    DATA.mkdir(parents=True, exist_ok=True)
    data = training_set()
    start = time.time()
    pipe = full_model()
    full_seconds = time.time() - start
    prompts_generated = query_prompts(N_VALIDATION + N_EVALUATION, QUERY_SEED)
    generated = generate(pipe, prompts_generated, QUERY_SEED)
    real, real_prompts = real_queries()
    queries = {"validation": generated[:N_VALIDATION], "generated": generated[N_VALIDATION:], "real": real}
    prompts = {"validation": prompts_generated[:N_VALIDATION], "generated": prompts_generated[N_VALIDATION:],
               "real": real_prompts}
    masks = subset_masks(N_TRAIN, args.subsets, ALPHA, MASK_SEED)
    measure = QueryLosses(queries, LOSS_SPEC, prompts=prompts)
    harness = RetrainHarness(LORA_RECIPE, data, masks, workdir / "retrain", measure, seeds=(TRAINING_SEED,),
                             rank=args.rank, world_size=args.world_size, metadata={"benchmark": "lds_lora"})
    seconds = write_ground_truth(DATA, harness, harness.run(), queries)
    if seconds is None:
        return
    (DATA / "prompts.json").write_text(json.dumps(prompts, indent=1))
    recipe = {k: v for k, v in asdict(LORA_RECIPE).items() if k not in ("base", "progress")}
    info = {
        "n_train": N_TRAIN, "training_set": f"captioned_digits({N_TRAIN}, seed=0, size={SIZE})",
        "base": f"tiny_captioned_sd_pipeline(seed=0, size={SIZE})", "base_weights": LORA_RECIPE.describe()["base_weights"],
        "real_queries": f"captioned_digits({N_REAL}, seed=0, size={SIZE}, offset={N_TRAIN})",
        "generated_queries": f"full model, query_prompts({N_VALIDATION + N_EVALUATION}, seed={QUERY_SEED}), DDIM "
                             f"{GENERATION_STEPS} steps, guidance {GUIDANCE}: first {N_VALIDATION} = validation, "
                             "rest = generated",
        "num_subsets": args.subsets, "alpha": ALPHA, "mask_seed": MASK_SEED, "training_seeds": [TRAINING_SEED],
        "recipe": recipe, "loss_spec": LOSS_SPEC.to_dict(), "full_model_lora_fingerprint": fingerprint(pipe),
        "full_model_seconds": full_seconds, "retrain_seconds": seconds, "wall_seconds_this_run": time.time() - start,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.platform(),
        "cpus": os.cpu_count(),
    }
    (DATA / "ground_truth.json").write_text(json.dumps(info, indent=2, sort_keys=True))
    print(f"ground truth written to {DATA} ({args.subsets} subsets; training {seconds['train_mean']:.1f}s and "
          f"measuring {seconds['measure_mean']:.1f}s per model)")


# ---------------------------------------------------------------------------------------------- phase 2


ROWS = (  # name, config fields (parameters="lora" added), whether it has a λ chosen on validation queries
    ("pixel cosine", {"method": "pixel-cosine"}),
    ("DAS K=10", {"method": "das", "num_timesteps": 10}),
    ("DAS K=10, loss output", {"method": "das", "num_timesteps": 10, "output": "loss"}),
    ("DAS K=10, lora_B only", {"method": "das", "num_timesteps": 10, "parameters": ["*lora_B*"]}),
    ("D-TRAK K=10", {"method": "d-trak", "num_timesteps": 10}),
    ("D-TRAK K=30", {"method": "d-trak", "num_timesteps": 30}),
    ("TRAK K=10", {"method": "trak", "num_timesteps": 10}),
    ("projected Fisher K=10", {"method": "fisher", "num_timesteps": 10}),
    # issue 24: DAS's parts separated (methods/das_fisher.py): the pair-level curvature, pairs not normalized
    ("DAS-Fisher K=10", {"method": "das-fisher", "num_timesteps": 10}),
    # session 9: the digits default's timestep fraction (the LoRA default keeps every timestep)
    ("DAS-Fisher K=10, timesteps below 0.3 T", {"method": "das-fisher", "num_timesteps": 10, "timestep_fraction": 0.3}),
    ("D-TRAK K=10, mean output (DAS's output, pairs not normalized, kernel)",
     {"method": "d-trak", "num_timesteps": 10, "output": "mean"}),
    ("EK-FAC K=10 (MC Fisher)", {"method": "ekfac", "num_timesteps": 10}),
    ("EK-FAC K=10 (empirical Fisher)", {"method": "ekfac-empirical", "num_timesteps": 10}),
    # query samples (issue 24), for every gradient method: the training set's K pairs first, then fresh (t, ε)
    *((f"{label} K=10, {samples} query samples", {"method": method, "num_timesteps": 10, "query_samples": samples})
      for method, label in (("ekfac", "EK-FAC"), ("trak", "TRAK"), ("fisher", "projected Fisher"), ("das", "DAS"),
                            ("d-trak", "D-TRAK"), ("das-fisher", "DAS-Fisher"))
      for samples in (30, 100)),
)
QUICK = ("pixel cosine", "DAS K=10", "D-TRAK K=10", "projected Fisher K=10")


def method_rows(quick: bool) -> list[dict]:
    return [{"name": name, "config": {"parameters": "lora", **fields}, "seeded": fields["method"] != "pixel-cosine"}
            for name, fields in ROWS if not quick or name in QUICK]


def evaluate_row(pipe, row: dict, seed: int, gt: dict, data) -> dict:
    """One seed of a row: featurize the training set and the queries (with their prompts) through the public API,
    then LDS at the λ ratio chosen on the validation queries and at the method's default."""
    from diffusers_attribution.api import make_featurizer, make_scorer

    config = AttributionConfig(**{"batch_size": 32, "projection_dim": PROJECTION_DIM, "noise_seed": seed, **row["config"]})
    masks, outputs, queries, prompts = gt["masks"], gt["outputs"], gt["queries"], gt["prompts"]
    method = config.method
    featurizer = make_featurizer(pipe, config)
    with PeakMemory(interval=0.005) as memory:
        t0 = time.perf_counter()
        store = featurizer.featurize_dataset(data, progress=False)
        t1 = time.perf_counter()
        record: dict = {"seed": seed, "dim": int(store.dim)}
        if method == "pixel-cosine":  # no λ: the method's own scorer
            scorer = make_scorer(store)
            for name in ("generated", "real"):
                scores = scorer.scores(featurizer.featurize_queries(queries[name], prompts[name]))
                record[name] = lds(scores, masks, outputs[name], seed=seed).to_dict()
            t2 = time.perf_counter()
        else:
            scores_at, scale = damping_path(featurizer, store, {name: queries[name] for name in QUERY_SETS}, prompts)
            t2 = time.perf_counter()
            lds_at_validation_damping(record, scores_at, scale, masks, outputs, seed, config.damping_ratio, RATIOS)
        t3 = time.perf_counter()
    record["seconds"] = {"train_features": t1 - t0, "query_features": t2 - t1, "scoring": t3 - t2, "total": t3 - t0}
    record["peak_memory_mib"] = memory.mib
    return record


def run_table(args) -> None:
    if not (DATA / "ground_truth.json").is_file():
        raise SystemExit(f"no ground truth in {DATA}: run with --build-ground-truth first")
    gt = load_ground_truth(ground_truth_seeds(args.ground_truth_seeds))
    info = gt["info"]
    if args.subsets < len(gt["masks"]):  # the first M subsets only (masks are prefix-stable)
        gt["masks"] = gt["masks"][: args.subsets]
        gt["outputs"] = {name: value[: args.subsets] for name, value in gt["outputs"].items()}
    pipe = enable_attribution(full_model())
    if fingerprint(pipe) != info["full_model_lora_fingerprint"]:
        warnings.warn("the full model trained here differs from the one the ground truth was built with "
                      "(another torch version or CPU?): scores are of a slightly different model")
    data = training_set()
    rows = method_rows(args.quick)
    rows = only_rows(rows, args.only)
    seeds = tuple(int(s) for s in args.seeds.split(",")) if args.seeds else NOISE_SEEDS
    out_path = Path(args.results)
    previous = json.loads(out_path.read_text()) if out_path.is_file() else {}
    table = {row["name"]: row for row in previous.get("rows", [])} if args.only else {}
    started = time.time()
    for row in rows:
        records = []
        for seed in seeds if row["seeded"] else (0,):
            record = evaluate_row(pipe, row, seed, gt, data)
            records.append(record)
            print(f"{row['name']:<28} seed {seed}: LDS generated {record['generated']['mean']:.3f} "
                  f"real {record['real']['mean']:.3f} ({record['seconds']['total']:.1f}s)", flush=True)
        table[row["name"]] = {**summarize(row, records), "per_seed": records}
    result = {
        "rows": list(table.values()),
        "ground_truth": {k: info[k] for k in ("n_train", "num_subsets", "alpha", "loss_spec", "training_seeds")},
        "parameters": "lora", "projection_dim": PROJECTION_DIM, "noise_seeds": list(seeds),
        "table_seconds": time.time() - started, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.platform(), "git": git_state(),
        "loadavg_at_end": open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else None,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2))
    print()
    print(markdown_table(result, reference_name="D-TRAK K=10"))
    print(f"\nwrote {out_path}")


def apply_smoke(args) -> None:
    """Shrink everything so that each phase runs in about a minute (outputs under <workdir>/smoke)."""
    global DATA, N_TRAIN, N_REAL, N_VALIDATION, N_EVALUATION, LORA_RECIPE, LOSS_SPEC, NOISE_SEEDS, PROJECTION_DIM
    root = Path(args.workdir) / "smoke"
    DATA = root / "data"
    N_TRAIN, N_REAL, N_VALIDATION, N_EVALUATION = 40, 6, 6, 6
    LORA_RECIPE = replace(LORA_RECIPE, num_steps=4, batch_size=8)
    LOSS_SPEC = replace(LOSS_SPEC, timesteps=5, noise_draws=1)
    NOISE_SEEDS, PROJECTION_DIM = (0,), 256
    args.workdir = str(root)
    args.subsets = min(args.subsets, 5)
    args.results = str(DATA / "results.json")


def apply_variant(args) -> None:
    global DATA, LORA_RECIPE
    if args.steps is not None:
        LORA_RECIPE = replace(LORA_RECIPE, num_steps=args.steps)
    if args.lr_scheduler is not None:
        LORA_RECIPE = replace(LORA_RECIPE, lr_scheduler=args.lr_scheduler)
    if args.data is not None:
        DATA = Path(args.data)
        if args.results == str(ROOT / "benchmarks" / "data" / "lds_lora" / "results.json"):
            args.results = str(DATA / "results.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build-ground-truth", action="store_true", help="retrain on the subsets (long, resumable)")
    parser.add_argument("--subsets", type=int, default=NUM_SUBSETS, help="M (the table: the first M of the ground truth's)")
    parser.add_argument("--workdir", default=str(default_workdir()), help="per-subset results (not committed)")
    parser.add_argument("--rank", type=int, default=None, help="this process's rank (ground truth in several processes)")
    parser.add_argument("--world-size", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="table: " + ", ".join(QUICK) + " only")
    parser.add_argument("--only", default=None, help="table: comma-separated substrings of row names to (re)run ('=NAME': that row only)")
    parser.add_argument("--seeds", default=None, help="table: comma-separated noise seeds (default 0,1,2)")
    parser.add_argument("--results", default=str(DATA / "results.json"))
    parser.add_argument("--ground-truth-seeds", default=str(TRAINING_SEED),
                        help="table: average the outputs of these training seeds (0: the committed ones; others from "
                             "benchmarks/ground_truth_noise.py --save)")
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny end-to-end run of both phases into <workdir>/smoke (checks the script, not LDS)")
    parser.add_argument("--steps", type=int, default=None,
                        help="another recipe length (a variant: give it its own --data and --workdir)")
    parser.add_argument("--lr-scheduler", default=None, help="another learning-rate schedule (a variant, as --steps)")
    parser.add_argument("--data", default=None, help="where the ground truth and results go (default "
                        "benchmarks/data/lds_lora)")
    args = parser.parse_args()
    if args.smoke:
        apply_smoke(args)
    apply_variant(args)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    if args.build_ground_truth:
        build_ground_truth(args)
    else:
        run_table(args)


if __name__ == "__main__":
    main()
