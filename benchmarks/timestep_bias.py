"""Timestep-induced bias on the digits DDPM: Diffusion-TracIn vs Diffusion-ReTrac (Xie et al., TMLR 2024).

    python benchmarks/timestep_bias.py            # 500 training digits, 100 generated queries, 100 t × 4 noises
    python benchmarks/timestep_bias.py --quick    # the same 500 digits, 24 queries, 20 t × 2 noises

Trains (once, cached) a DDPM on N scikit-learn digits, generates queries from it, and measures:
1. the per-timestep gradient-norm profile ‖∇θ loss(z, t, ε)‖ over t of training examples (the bias);
2. TracIn and ReTrac scores of the generated queries against the N training digits (for 3 noise seeds, which
   draw the training timesteps and all noises), and the number of
   "generally influential" training examples: in the top-k of more than a share of the queries;
3. where TracIn's generally influential examples come from: their sampled training timestep and gradient norm;
4. (unless --no-journey) a Journey-TRAK per-step attribution of one generated digit.
Numbers go to stdout, plots to --out (docs/images by default).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from diffusers_attribution import AttributionConfig, enable_attribution
from diffusers_attribution.demo.digits import generate_digits, load_digits_images, load_or_train_digits_ddpm
from diffusers_attribution.evaluation.bias import (
    generally_influential,
    plot_influence_frequency,
    timestep_gradient_norms,
)
from diffusers_attribution.featurize import Featurizer


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smaller run (minutes on 2 shared CPU cores)")
    parser.add_argument("--n-train", type=int, default=None, help="training digits (500; the model is trained on them)")
    parser.add_argument("--n-queries", type=int, default=None, help="generated queries (default 100; quick 24)")
    parser.add_argument("--query-timesteps", type=int, default=None, help="default 100; quick 20")
    parser.add_argument("--query-noise-draws", type=int, default=None, help="default 4; quick 2")
    parser.add_argument("--profile-examples", type=int, default=None, help="default 100; quick 40")
    parser.add_argument("--profile-timesteps", type=int, default=50)
    parser.add_argument("--projection-dim", type=int, default=2048)
    parser.add_argument("--topk", type=int, default=10)
    parser.add_argument("--shares", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.5])
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="noise seeds of TracIn/ReTrac (training timesteps and noises; default 0 1 2, quick 0)")
    parser.add_argument("--no-journey", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on contended cores)")
    parser.add_argument("--out", default="docs/images")
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args()
    defaults = dict(n_train=(500, 500), n_queries=(24, 100), query_timesteps=(20, 100), query_noise_draws=(2, 4),
                    profile_examples=(40, 100), seeds=([0], [0, 1, 2]))
    for name, (quick, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    return args


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    clock = time.perf_counter()

    def elapsed():
        return f"{time.perf_counter() - clock:.0f} s"

    train, labels = load_digits_images(args.n_train, seed=0, return_labels=True)
    pipe = enable_attribution(load_or_train_digits_ddpm(args.cache_dir, n_train=args.n_train, progress=False))
    queries = generate_digits(pipe, args.n_queries, seed=1)
    print(f"digits DDPM trained on {args.n_train} digits; {args.n_queries} generated queries ({elapsed()})")

    common = dict(projector="factored", projection_dim=args.projection_dim, query_timesteps=args.query_timesteps,
                  query_noise_draws=args.query_noise_draws, batch_size=512)
    report = {"setup": {k: v for k, v in vars(args).items() if k not in ("out", "cache_dir")}}

    # 1. the per-timestep gradient-norm profile
    profile_config = AttributionConfig(method="tracin", noise_mode="per-example", **common)
    profile = timestep_gradient_norms(pipe, train[: args.profile_examples], profile_config,
                                      timesteps=args.profile_timesteps, draws=2, progress=False)
    mean = profile.mean()
    print(f"\n[1] gradient norm ‖∇θ loss(z, t, ε)‖ of {args.profile_examples} training digits, 2 noises each "
          f"({elapsed()})")
    for t, value in zip(profile.timesteps.tolist()[::5], mean.tolist()[::5]):
        print(f"    t = {t:4d}: mean norm {value:9.3f}")
    summary = profile.summary()
    print(f"    max/min of the mean over t: {summary['max_over_min']:.1f} (largest at t = {summary['argmax_timestep']})")
    profile.plot(out / f"timestep_gradient_norms{suffix}.png",
                 title=f"digits DDPM: per-timestep gradient norm ({args.profile_examples} training digits)")
    report["profile"] = summary

    # 2. TracIn vs ReTrac, for each noise seed (it draws the training timesteps and all noises)
    # A proxy for sense, not ground truth: does the top-1 training digit have the label of the query's
    # nearest training digit in pixel space?
    pixel = pipe.attribute(queries, train, AttributionConfig(method="pixel-cosine")).scores
    reference = labels[pixel.argmax(1)]
    rows, first = [], None
    for seed in args.seeds:
        scores, stores = {}, {}
        for method in ("tracin", "retrac"):
            config = AttributionConfig(method=method, noise_seed=seed, **common)
            stores[method] = pipe.featurize(train, config, progress=False)
            scores[method] = pipe.attribute(queries, stores[method]).scores
        row = {"seed": seed}
        for m in scores:
            row[m] = {
                "generally_influential": {str(share): generally_influential(scores[m], args.topk, share).count
                                          for share in args.shares},
                "distinct_in_topk": len(set(scores[m].topk(args.topk, dim=1).indices.flatten().tolist())),
                "top1_label_agreement_with_pixel_nn": float((labels[scores[m].argmax(1)] == reference).float().mean()),
            }
        rows.append(row)
        first = first or (scores, stores)
        print(f"\n[2] noise seed {seed}: TracIn and ReTrac scores {tuple(scores['tracin'].shape)} ({elapsed()})")
    report["tracin_vs_retrac"] = rows

    print(f"\n    generally influential: training digits in the top-{args.topk} of more than a share of "
          f"{args.n_queries} queries (one column per noise seed {args.seeds})")
    print("    share    TracIn            ReTrac")
    for share in args.shares:
        counts = {m: [row[m]["generally_influential"][str(share)] for row in rows] for m in ("tracin", "retrac")}
        print(f"    {share:5.0%}    {_cells(counts['tracin']):16s}  {_cells(counts['retrac'])}")
    for key, what in (("distinct_in_topk", f"distinct training digits in any top-{args.topk}"),
                      ("top1_label_agreement_with_pixel_nn", "top-1 label = label of the pixel nearest neighbour")):
        values = {m: [row[m][key] for row in rows] for m in ("tracin", "retrac")}
        fmt = (lambda v: f"{v:.0%}") if "agreement" in key else str
        print(f"    {what}: TracIn {', '.join(map(fmt, values['tracin']))}; ReTrac {', '.join(map(fmt, values['retrac']))}")

    scores, stores = first
    share = args.shares[1] if len(args.shares) > 1 else args.shares[0]
    influences = {name: generally_influential(scores[m], args.topk, share) for name, m in
                  (("TracIn", "tracin"), ("ReTrac", "retrac"))}
    plot_influence_frequency(influences, out / f"generally_influential{suffix}.png",
                             title=f"top-{args.topk} frequency of each training digit over {args.n_queries} queries "
                                   f"(noise seed {args.seeds[0]})")

    # 3. where TracIn's generally influential digits come from
    featurizer = Featurizer(pipe, stores["tracin"].config)
    sampled_t = featurizer.task.timesteps(list(range(args.n_train)))[:, 0]
    norms = stores["tracin"].features.norm(dim=1)
    chosen = influences["TracIn"].indices
    rank = norms.argsort(descending=True).argsort()
    print(f"\n[3] TracIn's {len(chosen)} generally influential digits (> {share:.0%}): sampled t median "
          f"{int(sampled_t[chosen].median()) if len(chosen) else float('nan')} (all: {int(sampled_t.median())}); "
          f"gradient-norm rank median {int(rank[chosen].median()) if len(chosen) else float('nan')} of {args.n_train}")
    report["tracin_influential"] = {"sampled_t": sampled_t[chosen].tolist(), "norm_rank": rank[chosen].tolist()}
    plot_sampled_timesteps(sampled_t, norms, influences["TracIn"].frequency, args.topk,
                           out / f"tracin_norm_vs_timestep{suffix}.png")

    # 4. Journey-TRAK on one generated digit
    if not args.no_journey:
        config = AttributionConfig(method="journey-trak", projector="factored", projection_dim=args.projection_dim,
                                   batch_size=512)
        store = pipe.featurize(train, config, progress=False)
        journey = pipe.attribute_trajectory(7, store, num_inference_steps=50, progress=False)
        top = journey.top_examples(5).tolist()
        print(f"\n[4] Journey-TRAK, 50 DDPM steps of seed 7 ({elapsed()}): top digits {top} "
              f"(labels {labels[top].tolist()}); final top-1 {int(journey.scores[-1].argmax())}")
        journey.plot(k=5, path=out / f"journey_digits{suffix}.png", train_dataset=train,
                     title="Journey-TRAK on the digits DDPM: per-step scores of the top-5 training digits")
        report["journey_top"] = top

    print(f"\ntotal {elapsed()}; plots in {out}/")
    print("JSON " + json.dumps(report))


def _cells(values) -> str:
    return " ".join(f"{v:4d}" for v in values)


def plot_sampled_timesteps(sampled_t, norms, frequency, k, path):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 3.6))
    ax = figure.add_subplot()
    points = ax.scatter(sampled_t.numpy(), norms.numpy(), c=frequency.numpy(), cmap="viridis", s=10)
    ax.set_yscale("log")
    ax.set_xlabel("the training digit's sampled timestep t")
    ax.set_ylabel("‖φ(z)‖ (TracIn training feature)")
    ax.set_title("TracIn: the training timestep decides the gradient norm, and the influence", fontsize=9)
    figure.colorbar(points, ax=ax, label=f"share of queries with it in top-{k}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
