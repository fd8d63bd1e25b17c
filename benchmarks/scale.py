"""Attribution at the scale of real training sets: exact top-k against the floor, the FAISS index, memory, by N.

Stores of N rows at k = 2048 are built from real features: 256 digits featurized with D-TRAK (K = 2 timesteps,
projection_dim 2048) on the shipped digits DDPM, tiled to N rows with small seeded noise (row i = φ[i mod 256] +
0.05·rms(φ)·ε_i). Stores up to 1 GiB are written with `FeatureStore(features, config, metadata).save_pretrained`;
larger ones shard by shard (`store.files.write_shard`, then the kernel and `FeatureStore.finalize`, as the sharded
featurization writer does), so that writing never holds more than one 512 MiB shard. Shards of 65,536 rows.

Queries: 64 other digits featurized the same way (and 64 more to tune the index on), q' = φ(q)(C + λI)⁻¹ with the store's kernel C and its default λ
(computed once, outside the timings). Per N, in interleaved rounds (median of --rounds; the first pass over a freshly
opened store, which also verifies every shard's sha256, is reported on its own):
  exact      KernelScorer(store).topk(φ(q), 10): the library's path once a session holds the scorer (q' and one
             streaming pass of search.exact_topk over store.blocks())
  raw        search.exact_topk over the shards' tensors read directly (what exact_topk costs without blocks()'s checks)
  floor      every shard's bytes read once (safe_open, get_tensor) + one float32 GEMM of the queries against all rows
             + a top-10: what the bytes and flops need
  index      search.build_index(store.blocks, ..., tuning_queries=q' of 64 tuning digits) (kind chosen by N, plus
             --index-kinds at N ≥ 50k; its search parameter tuned on 32 of those queries, its build-time recall
             measured on the other 32) and search.search, one query at a time; recall@10 against exact's top-10 for
             the 64 measured queries (not used in tuning)
  peak RSS   VmHWM of a child process that only opens the store and runs exact for 64 queries

    python benchmarks/scale.py --sizes 10000,100000 --rounds 3 --profile --index-kinds auto,hnsw \
        --plot docs/images/scale_latency.png                   # docs/scale.md: 5.6 minutes on 2 shared CPU cores
    python benchmarks/scale.py --sizes 1000000                 # the 1M row (8 GiB of shards in --workdir)
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import io
import json
import os
import platform
import pstats
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout, installed or not

from diffusers_attribution import AttributionConfig  # noqa: E402
from diffusers_attribution.scoring import KernelScorer  # noqa: E402
from diffusers_attribution.search import FLAT_MAX_ROWS, build_index, choose_kind, exact_topk, merge_topk, search  # noqa: E402
from diffusers_attribution.store.files import open_shard  # noqa: E402
from diffusers_attribution.store.format import FeatureStore  # noqa: E402

DIM = 2048
SHARD_ROWS = 65_536
BASE_ROWS = 256
NOISE = 0.05
TOP = 10


# ---------------------------------------------------------------------------------------------- data


def real_features(num_queries: int):
    """(base rows [256, k], query features [num_queries, k], store metadata, config): D-TRAK on the digits DDPM."""
    from diffusers_attribution import enable_attribution
    from diffusers_attribution.demo.digits import load_digits_ddpm, load_digits_images

    pipe = enable_attribution(load_digits_ddpm())
    images = load_digits_images(BASE_ROWS + num_queries)
    config = AttributionConfig(method="d-trak", num_timesteps=2, projection_dim=DIM)
    store = pipe.featurize(images, config, progress=False)
    metadata = {key: value for key, value in store.metadata.items() if key not in ("example_hashes", "num_examples")}
    metadata["projection_state"] = store.projection_state  # the calibrated bases (None for a seeded projection)
    return store.features[:BASE_ROWS].clone(), store.features[BASE_ROWS:].clone(), metadata, config


def tiled_rows(base: torch.Tensor, start: int, stop: int, seed: int = 0) -> torch.Tensor:
    """Rows [start, stop) of the tiled store: base[i mod 256] + noise; the noise of row i depends on (seed, i // 4096)
    only, so any split writes the same rows."""
    scale = NOISE * float(base.pow(2).mean().sqrt())
    parts = []
    for chunk in range(start // 4096, -(-stop // 4096)):
        lo, hi = max(start, chunk * 4096), min(stop, (chunk + 1) * 4096)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + chunk)
        noise = torch.randn(4096, base.shape[1], generator=generator)[lo - chunk * 4096 : hi - chunk * 4096]
        parts.append(base[torch.arange(lo, hi) % len(base)] + scale * noise)
    return torch.cat(parts)


def example_hashes(start: int, stop: int) -> list[str]:
    return [hashlib.sha256(f"tiled-digit-{i}".encode()).hexdigest()[:16] for i in range(start, stop)]


def write_store(directory: Path, base: torch.Tensor, n: int, metadata: dict, config) -> str:
    """Write the tiled store of n rows; returns how."""
    if directory.exists():
        shutil.rmtree(directory)
    meta = {**metadata, "num_examples": n, "example_hashes": example_hashes(0, n), "dataset_name": f"tiled-digits-{n}"}
    projection_state = meta.pop("projection_state")
    if n * base.shape[1] * 4 <= 1 << 30:
        FeatureStore(tiled_rows(base, 0, n), config, meta, projection_state=projection_state).save_pretrained(
            directory, shard_rows=SHARD_ROWS)
        return "save_pretrained"
    from diffusers_attribution.scoring import kernel_matrix
    from diffusers_attribution.store.files import file_digest, run_identity, shard_plan, write_projection, write_shard

    directory.mkdir(parents=True)
    plan = shard_plan(n, SHARD_ROWS)
    run = run_identity(config, meta, n, SHARD_ROWS, base.shape[1])
    hashes = meta["example_hashes"]
    for entry in plan:
        write_shard(directory, entry, tiled_rows(base, entry["start"], entry["stop"]),
                    hashes[entry["start"] : entry["stop"]], run)
    if projection_state is not None:
        write_projection(directory, projection_state)
    staged = FeatureStore(None, config, {**meta, "dim": base.shape[1]}, directory=directory, shards=plan)
    staged.kernel = kernel_matrix(staged)
    staged.finalize(SHARD_ROWS, {entry["file"]: file_digest(directory / entry["file"]) for entry in plan})
    return "shard by shard (write_shard + kernel_matrix + finalize)"


def transformed_queries(store: FeatureStore, query_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """q' = φ(q)(C + λI)⁻¹ with the store's kernel and default λ, (C + λI)⁻¹, and the seconds it took."""
    from diffusers_attribution.scoring import damped_inverse, damping_from_trace

    started = time.perf_counter()
    gram = store.kernel.to(torch.float64)
    damping = damping_from_trace(gram.trace(), len(store), store.dim, store.config.damping_ratio)
    inverse = damped_inverse(gram, damping)
    q = (query_features.double() @ inverse).float()
    return q, inverse, time.perf_counter() - started


# ---------------------------------------------------------------------------------------------- passes


def shard_paths(store: FeatureStore) -> list[tuple[int, Path]]:
    return [(entry["start"], store.directory / entry["file"]) for entry in store.shards]


def floor_pass(paths, q: torch.Tensor):
    """Every shard's bytes once, one float32 GEMM of the queries against all rows, a top-10."""
    parts = []
    for start, path in paths:
        with open_shard(path) as handle:
            rows = handle.get_tensor("features")
        scores = q @ rows.T
        values, where = scores.topk(min(TOP, len(rows)), dim=1)
        parts.append((where + start, values))
    return merge_topk(parts, TOP)


def raw_blocks(paths, block_rows: int = 32_768):
    for start, path in paths:
        with open_shard(path) as handle:
            sliced = handle.get_slice("features")
            rows = sliced.get_shape()[0]
            for offset in range(0, rows, block_rows):
                yield start + offset, sliced[offset : min(offset + block_rows, rows)]


def timed(function):
    started = time.perf_counter()
    result = function()
    return time.perf_counter() - started, result


def vmhwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child_query(directory: str, query_file: str, mode: str) -> None:
    """In a fresh process: open the store, one exact top-10 pass for the saved queries (over store.blocks(), or
    over the shards read directly: mode "raw"); print peak RSS."""
    from safetensors.torch import load_file

    q = load_file(query_file)["q"]
    opened = vmhwm_mib()
    store = FeatureStore.from_pretrained(directory)
    before = vmhwm_mib()
    if mode == "store":  # the library's path: the session's scorer, q' from the saved φ(q), one pass
        KernelScorer(store).topk(load_file(query_file)["phi"], TOP)
    else:
        exact_topk(q, raw_blocks(shard_paths(store)), TOP)
    print(json.dumps({"vmhwm_after_imports_mib": opened, "vmhwm_after_open_mib": before, "vmhwm_mib": vmhwm_mib()}))


def peak_rss(directory: Path, q: torch.Tensor, phi: torch.Tensor, workdir: Path, mode: str = "store") -> dict:
    from safetensors.torch import save_file

    query_file = workdir / "queries.safetensors"
    save_file({"q": q.contiguous(), "phi": phi.contiguous()}, str(query_file))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                                     os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, __file__, "--child-query", str(directory), str(query_file), mode],
                          capture_output=True, text=True, env=env, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- profile


def profile_blocks(directory: Path, q: torch.Tensor, floor_seconds: float) -> None:
    """What store.blocks() costs beyond reading: cProfile of a fresh store's first pass (sha256 included) and of a
    second pass, beside the floor's read + GEMM."""
    print(f"\nstore.blocks() on {directory.name}: where the time goes (cProfile; wall times below without it)")
    store = FeatureStore.from_pretrained(directory)
    first, _ = timed(lambda: sum(1 for _ in store.blocks()))
    second, _ = timed(lambda: sum(1 for _ in store.blocks()))
    fresh = FeatureStore.from_pretrained(directory)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in fresh.blocks():
        pass
    profiler.disable()
    stats = pstats.Stats(profiler)
    groups = {"sha256 of the shards (files.file_digest, first pass only)": ("file_digest",),
              "isfinite per block (format._check_finite)": ("_check_finite",),
              "tensor/header checks (format._check_tensors)": ("_check_tensors",),
              "reading rows (safetensors get_slice [a:b])": ("__getitem__", "get_slice")}
    totals = {name: 0.0 for name in groups}
    for (filename, line, function), (_, _, _, cumulative, _) in stats.stats.items():
        for name, functions in groups.items():
            if function in functions and ("safetensors" in filename or "store" in filename or function.startswith("<")
                                          or filename == "~"):
                totals[name] += cumulative
    total = sum(v[3] for k, v in stats.stats.items() if k[2] == "blocks")
    print(f"  wall: first pass {first:.3f} s, second pass {second:.3f} s (same store object: sha256 done once)")
    print(f"  cProfile, first pass of a freshly opened store: {total:.3f} s in blocks()")
    for name, seconds in totals.items():
        print(f"    {name:60s} {seconds:7.3f} s  ({100 * seconds / max(total, 1e-9):4.1f} %)")
    rest = total - sum(totals.values())
    print(f"    {'other':60s} {rest:7.3f} s  ({100 * rest / max(total, 1e-9):4.1f} %)")
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(8)
    print("  top functions by own time:\n" + "\n".join("    " + line for line in out.getvalue().splitlines()[-14:] if line.strip()))
    paths = shard_paths(store)
    def read_all():
        for _, path in paths:
            with open_shard(path) as handle:
                handle.get_tensor("features")

    read, _ = timed(read_all)
    finite, _ = timed(lambda: [torch.isfinite(b).all() for _, b in raw_blocks(paths)])
    digest, _ = timed(lambda: [hashlib.sha256(p.read_bytes()).hexdigest() for _, p in paths])
    print(f"  separately: read all rows {read:.3f} s; isfinite over all rows {finite:.3f} s; sha256 of all shards "
          f"{digest:.3f} s; floor (read + GEMM + top-10, 64 queries) {floor_seconds:.3f} s")


# ---------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", default="/tmp/diffusers-attribution-scale")
    parser.add_argument("--index-kinds", default="auto", help="auto (choose_kind), plus e.g. hnsw to compare at N ≥ 50k; none: no index")
    parser.add_argument("--profile", action="store_true", help="cProfile store.blocks() on the largest N ≤ 100k")
    parser.add_argument("--plot", default=None, help="write the latency-vs-N plot here (PNG)")
    parser.add_argument("--json", default=None, help="write the measurements here")
    parser.add_argument("--keep", action="store_true", help="keep the stores in --workdir")
    parser.add_argument("--reuse", action="store_true", help="reuse a store of the same N kept in --workdir by --keep")
    parser.add_argument("--search-device", default=None,
                        help="also hold the rows on this device (e.g. cuda: AttributionSession(search_device=...)) "
                             "and time the exact top-k there")
    parser.add_argument("--child-query", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_query:
        child_query(*args.child_query)
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if args.index_kinds == "none":
        faiss_line = "faiss not used"
    else:
        import faiss

        faiss_line = (f"faiss {faiss.__version__} ({faiss.omp_get_max_threads()} threads, {faiss.get_num_gpus()} "
                      "GPUs)")
    device_line = ""
    if args.search_device is not None and torch.device(args.search_device).type == "cuda":
        device_line = f", search device {torch.cuda.get_device_name(torch.device(args.search_device))}"
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch "
          f"{torch.__version__} ({torch.get_num_threads()} threads), {faiss_line}{device_line}")
    started, (base, query_features, metadata, config) = timed(lambda: real_features(128))
    query_features, tuning_features = query_features[:64], query_features[64:]
    print(f"real rows: {BASE_ROWS} digits featurized with D-TRAK (num_timesteps=2, projection_dim={DIM}) on the shipped "
          f"digits DDPM in {started:.1f} s; stores tile them with seeded noise ({NOISE}·rms); queries: 64 other digits "
          "(and 64 more for tuning the index)")
    results = []
    for n in sizes:
        print(f"\n=== N = {n:,} ===")
        directory = workdir / f"store-{n}"
        if args.reuse and (directory / "config.json").is_file():
            write_seconds, how = float("nan"), "reused: not written in this run"
        else:
            write_seconds, how = timed(lambda: write_store(directory, base, n, metadata, config))
        size = sum(p.stat().st_size for p in directory.iterdir())
        print(f"store: {size / 2**30:.3f} GiB, written in {write_seconds:.1f} s ({how}; kernel and sha256 included)")
        store = FeatureStore.from_pretrained(directory)
        q64, inverse, inverse_seconds = transformed_queries(store, query_features)
        tuning = (tuning_features.double() @ inverse).float()
        q1 = q64[:1]
        print(f"q' for 64 queries (kernel read, (C + λI)⁻¹, product): {inverse_seconds:.2f} s, once per session")
        paths = shard_paths(store)
        session_seconds, scorer = timed(lambda: KernelScorer(store))
        print(f"the session's scorer (kernel read, (C + λI)⁻¹ solved): {session_seconds:.2f} s, once per session")
        first, first_topk = timed(lambda: scorer.topk(query_features, TOP))
        first_result = (first_topk.indices, first_topk.scores)
        print(f"exact, first pass over the opened store (verifies each shard's sha256): {first:.3f} s (64 queries)")
        times = {name: [] for name in ("floor-1", "exact-1", "raw-1", "floor-64", "exact-64", "raw-64")}
        answers = {}
        for _ in range(args.rounds):
            for nq, q in ((1, q1), (64, q64)):
                seconds, answers[f"floor-{nq}"] = timed(lambda: floor_pass(paths, q))
                times[f"floor-{nq}"].append(seconds)
                seconds, best = timed(lambda: scorer.topk(query_features[:nq], TOP))  # the library's path: q', a pass
                answers[f"exact-{nq}"] = (best.indices, best.scores)
                times[f"exact-{nq}"].append(seconds)
                seconds, answers[f"raw-{nq}"] = timed(lambda: exact_topk(q, raw_blocks(paths), TOP))
                times[f"raw-{nq}"].append(seconds)
        median = {name: statistics.median(values) for name, values in times.items()}
        exact_indices = answers["exact-64"][0]
        same = torch.equal(exact_indices, answers["floor-64"][0]) and torch.equal(exact_indices, first_result[0])
        for nq in (1, 64):
            print(f"{nq:2d} queries: exact {median[f'exact-{nq}']:.3f} s, raw {median[f'raw-{nq}']:.3f} s, floor "
                  f"{median[f'floor-{nq}']:.3f} s: exact/floor {median[f'exact-{nq}'] / median[f'floor-{nq}']:.2f}×, "
                  f"raw/floor {median[f'raw-{nq}'] / median[f'floor-{nq}']:.2f}× (median of {args.rounds})")
        print(f"exact top-10 indices identical to the floor's: {same}")
        row = {"n": n, "gib": size / 2**30, "write_s": write_seconds, "first_64_s": first, "inverse_s": inverse_seconds,
               **{f"{name}_s": value for name, value in median.items()}, "identical": same, "indexes": []}
        kinds = [choose_kind(n)] + [kind for kind in args.index_kinds.split(",") if kind != "auto" and n >= FLAT_MAX_ROWS]
        kinds = [] if args.index_kinds == "none" else list(dict.fromkeys(kinds))
        for kind in kinds:
            index = build_index(store.blocks, store.dim, len(store), kind=kind, tuning_queries=tuning)
            latencies = []
            found = []
            for i in range(len(q64)):
                seconds, (indices, _) = timed(lambda: search(index, q64[i : i + 1], TOP))
                latencies.append(seconds)
                found.append(indices[0])
            batch, _ = timed(lambda: search(index, q64, TOP))
            found = torch.stack(found)
            recall = sum(len(set(f.tolist()) & set(t.tolist())) for f, t in zip(found, exact_indices)) / exact_indices.numel()
            per_query = statistics.median(latencies)
            print(f"index {kind} {index.params}: built in {index.build_seconds:.1f} s (build-time recall@10 on held-out "
                  f"tuning queries {index.recall:.3f}); {1000 * per_query:.2f} ms per query (one at a time, median), "
                  f"{1000 * batch / 64:.2f} ms per query in a batch of 64; recall@10 against exact for the 64 real "
                  f"queries {recall:.3f}")
            row["indexes"].append({"kind": kind, "params": index.params, "build_s": index.build_seconds,
                                   "build_recall": index.recall, "ms_per_query": 1000 * per_query,
                                   "ms_per_query_batch64": 1000 * batch / 64, "recall": recall})
            del index
        if args.search_device is not None:
            row["resident"] = resident_search(scorer, query_features, exact_indices, args.search_device, args.rounds)
        rss = peak_rss(directory, q64, query_features, workdir)
        raw_rss = peak_rss(directory, q64, query_features, workdir, "raw")
        print(f"peak RSS (VmHWM, mapped shard pages included) of a child that opens the store and runs exact for 64 "
              f"queries: {rss['vmhwm_mib']:.0f} MiB over store.blocks(), {raw_rss['vmhwm_mib']:.0f} MiB over the shards "
              f"read directly (after imports {rss['vmhwm_after_imports_mib']:.0f} MiB, after opening "
              f"{rss['vmhwm_after_open_mib']:.0f} MiB)")
        row["rss_mib"], row["rss_open_mib"], row["rss_raw_mib"] = rss["vmhwm_mib"], rss["vmhwm_after_open_mib"], raw_rss["vmhwm_mib"]
        results.append(row)
        if args.profile and n == max(s for s in sizes if s <= 100_000):
            profile_blocks(directory, q64, median["floor-64"])
        del store
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)
    report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    if args.plot:
        plot(results, args.plot)


def resident_search(scorer, query_features: torch.Tensor, exact_indices: torch.Tensor, device: str, rounds: int):
    """The rows held on `device` (`KernelScorer.resident`, what `AttributionSession(search_device=...)` does):
    load time, then the exact top-10 per query (one at a time, median over the 64 queries and the rounds) and for
    the 64 at once; recall@10 against the CPU pass (1.0 unless float32 GEMM rounding reorders near-ties)."""
    load_seconds, rows = timed(lambda: scorer.resident(device))
    scorer.topk(query_features[:1], TOP, index=rows)  # warm-up: kernels, workspace
    single, batch = [], []
    for _ in range(rounds):
        found = []
        for i in range(len(query_features)):
            seconds, best = timed(lambda: scorer.topk(query_features[i : i + 1], TOP, index=rows))
            single.append(seconds)
            found.append(best.indices[0])
        seconds, best_64 = timed(lambda: scorer.topk(query_features, TOP, index=rows))
        batch.append(seconds)
    found = torch.stack(found)
    recall = sum(len(set(f.tolist()) & set(t.tolist())) for f, t in zip(found, exact_indices)) / exact_indices.numel()
    same = torch.equal(best_64.indices, exact_indices)
    result = {"device": device, "load_s": load_seconds, "ms_per_query": 1000 * statistics.median(single),
              "batch64_s": statistics.median(batch), "recall": recall, "identical": same}
    print(f"rows resident on {device}: loaded in {load_seconds:.1f} s; exact top-10 {result['ms_per_query']:.2f} ms per "
          f"query (one at a time, median; q' on the CPU included), {result['batch64_s']:.4f} s for 64; recall@10 "
          f"against the CPU pass {recall:.3f}, indices identical for the 64: {same}")
    return result  # the resident rows are freed with this frame


def report(results) -> None:
    print("\n| N | store | write | exact 1q | floor 1q | ratio | exact 64q | floor 64q | ratio | raw 64q | index | "
          "build | ms/query | recall@10 | peak RSS (blocks / raw) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|")
    for r in results:
        indexes = r["indexes"] or [{"kind": "-", "build_s": float("nan"), "ms_per_query": float("nan"), "recall": float("nan"),
                                    "params": {}}]
        for j, ix in enumerate(indexes):
            head = (f"| {r['n']:,} | {r['gib']:.2f} GiB | {r['write_s']:.1f} s | {r['exact-1_s']:.3f} s | "
                    f"{r['floor-1_s']:.3f} s | {r['exact-1_s'] / r['floor-1_s']:.2f}× | {r['exact-64_s']:.3f} s | "
                    f"{r['floor-64_s']:.3f} s | {r['exact-64_s'] / r['floor-64_s']:.2f}× | {r['raw-64_s']:.3f} s"
                    if j == 0 else "| | | | | | | | | | ")
            params = ", ".join(f"{k}={v}" for k, v in ix["params"].items() if k in ("nlist", "nprobe", "M", "efSearch"))
            tail = f"| {r['rss_mib']:.0f} / {r['rss_raw_mib']:.0f} MiB |" if j == 0 else "| |"
            print(f"{head} | {ix['kind']} {params} | {ix['build_s']:.1f} s | {ix['ms_per_query']:.2f} | "
                  f"{ix['recall']:.3f} {tail}")
    resident = [r for r in results if "resident" in r]
    if resident:
        print("\n| N | rows resident on | load | exact top-10, 1 query | exact top-10, 64 queries | recall@10 vs the CPU pass |")
        print("|---:|---|---:|---:|---:|---:|")
        for r in resident:
            d = r["resident"]
            print(f"| {r['n']:,} | {d['device']} | {d['load_s']:.1f} s | {d['ms_per_query']:.2f} ms | "
                  f"{1000 * d['batch64_s']:.1f} ms | {d['recall']:.3f} |")
    if len(results) > 1:
        print("\ngrowth from one N to the next (×):")
        for a, b in zip(results, results[1:]):
            nan = {"build_s": float("nan"), "ms_per_query": float("nan")}
            ia, ib = (a["indexes"] or [nan])[0], (b["indexes"] or [nan])[0]
            print(f"  {a['n']:,} → {b['n']:,} (N ×{b['n'] / a['n']:.0f}): store ×{b['gib'] / a['gib']:.1f}, write "
                  f"×{b['write_s'] / a['write_s']:.1f}, exact 1q ×{b['exact-1_s'] / a['exact-1_s']:.1f}, exact 64q "
                  f"×{b['exact-64_s'] / a['exact-64_s']:.1f}, floor 64q ×{b['floor-64_s'] / a['floor-64_s']:.1f}, "
                  f"index build ×{ib['build_s'] / ia['build_s']:.1f}, ms/query ×{ib['ms_per_query'] / ia['ms_per_query']:.1f}, "
                  f"peak RSS ×{b['rss_mib'] / a['rss_mib']:.2f}")


def plot(results, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [r["n"] for r in results]
    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    for key, label, style in (("exact-1_s", "exact, 1 query", "o-"), ("floor-1_s", "floor, 1 query", "o--"),
                              ("raw-1_s", "exact_topk over raw shards, 1 query", "o:"),
                              ("exact-64_s", "exact, 64 queries", "s-"), ("floor-64_s", "floor, 64 queries", "s--"),
                              ("raw-64_s", "exact_topk over raw shards, 64 queries", "s:")):
        axis.plot(ns, [r[key] for r in results], style, label=label)
    if all(r["indexes"] for r in results):
        axis.plot(ns, [r["indexes"][0]["ms_per_query"] / 1000 for r in results], "^-",
                  label="index, 1 query (" + "/".join(sorted({r["indexes"][0]["kind"] for r in results})) + ")")
    if all("resident" in r for r in results):
        axis.plot(ns, [r["resident"]["ms_per_query"] / 1000 for r in results], "v-",
                  label=f"rows resident on {results[0]['resident']['device']}, 1 query")
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("rows N (k = 2048)")
    axis.set_ylabel("seconds")
    axis.set_title("top-10 latency against N (2 shared CPU cores)")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
