"""Featurization speed and fidelity: a training step, the per-sample-gradient recipe, and the factored hooks.

End to end: D-TRAK's and DAS's default featurization (`featurize_dataset`, calibration included, its time and
share printed) of 1000 digits × K = 10 against training steps over the same pairs with the same rows per step
(the featurizer's batch of 16 examples × K), in interleaved rounds. `--previous REV` adds the package as of
git revision REV (from `git archive`, imported as `diffusers_attribution_previous`) to the end-to-end rounds,
to the fidelity table and to the per-call rows, so that before and after are measured in one run.

Per call, throughput measured side by side on the same (example, timestep) rows (B examples × K timesteps), in
interleaved rounds (one call of each method per round) so that load on a shared machine hits all alike:
  train     forward + backward + AdamW step (what one training step costs; lr = 0 keeps the weights)
  vmap      the published recipe: torch.func vmap per-sample gradients of the attributed parameters (one
            vmap over examples per timestep, attention on the math SDPA kernel), summed over timesteps,
            then a dense Gaussian projection (its matrix cached in memory)
  factored  FactoredProjector: one batched forward/backward with attribution hooks (random per-layer
            matrices), and CalibratedProjector (the default: calibrated bases, then the k_mid × k mix)
  floor     the same forward/backward through the same hooks with nothing computed in them: what any
            hook-based featurizer pays before its projection (`hooks_only`); below the table, the projection's
            cost (calibrated − floor) beside the training step's weight gradients and optimizer (train − floor)
on the digits DDPM (`diffusers_attribution.digits`) and on a Stable-Diffusion-shaped UNet2DConditionModel
with a LoRA (only the LoRA weights attributed / trained). Fidelity on the digits DDPM: Spearman correlation,
per query, between projected scores and exact scores (identity features, dual-form kernel) for `factored`
(random per-layer matrices, and calibrated bases — the default, projection/calibrated.py) and dense `gaussian`
at the same total k, over 3 projection seeds.

    python benchmarks/featurize_speed.py                          # about 7 minutes on 2 CPU cores
    python benchmarks/featurize_speed.py --previous 491d928       # before/after side by side (13 minutes)
    python benchmarks/featurize_speed.py --quick                  # a few minutes
    python benchmarks/featurize_speed.py --only sd --sd-size full --dtype bfloat16 --sd-batch 16   # the GPU check:
        # SD 1.5's UNet dimensions (random weights, no download) with a rank-16 LoRA, bf16 autocast, fast path vs
        # the vmap recipe (in bf16 weights) in the same rounds, and calibration's cost

Peak memory: each method's first call, on its own, caches included (the dense P). On CPU the growth of
the process RSS above its value at the start of the call, sampled every 2 ms (freed memory is handed back
to the OS with malloc_trim before); on CUDA torch.cuda.max_memory_allocated above the start.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import io
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import psutil
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from torch.func import functional_call, grad, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout, installed or not

from diffusers_attribution import AttributionConfig
from diffusers_attribution.adapters import ModelInputs, PipelineAdapter, UnconditionalAdapter
from peak_memory import PeakMemory  # noqa: E402  (benchmarks/, beside this script)
from diffusers_attribution.projection.calibrated import (CALIBRATION_BATCH, CalibratedProjector, calibrate,
                                                         calibration_count, calibration_indices)
from diffusers_attribution.projection.factored import FactoredProjector
from diffusers_attribution.gradients.reference import per_example_gradients
from diffusers_attribution.gradients.hooks import attribution_hooks
from diffusers_attribution.projection.dense import DenseProjector
from diffusers_attribution.featurize import Featurizer
from diffusers_attribution.scoring import KernelScorer
from diffusers_attribution.gradients.task import AttributionTask, gradients_only_for, select_parameters

# ----------------------------------------------------------------------------- models


def digits_model(device, n_train=500):
    """The digits DDPM trained on `load_digits_images(n_train)`, its training images, and held-out digits."""
    from diffusers_attribution.demo.digits import load_digits_images, load_or_train_digits_ddpm

    pipe = load_or_train_digits_ddpm(n_train=n_train, progress=False)  # cached after the first run
    train, everything = load_digits_images(n_train), load_digits_images()
    seen = {bytes(x.numpy()) for x in train}
    held_out = torch.stack([x for x in everything if bytes(x.numpy()) not in seen])
    pipe.unet.to(device).eval()
    return UnconditionalAdapter(pipe), train, held_out


class LatentAdapter(PipelineAdapter):
    """SD-style denoiser on ready-made latents and text embeddings (no VAE / text encoder to time)."""

    family = "sd-latents"

    def __init__(self, unet):
        self.pipe, self.denoiser = None, unet
        self.noise_scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
        self.prediction_type = "epsilon"

    def denoiser_kwargs(self, x_t, t, conditioning):
        return {"sample": x_t, "timestep": t, "encoder_hidden_states": conditioning["encoder_hidden_states"]}


SD_SIZES = {  # UNet2DConditionModel configs: a scaled-down SD 1.x, and SD 1.5's own (random weights, no download)
    "small": {"channels": (32, 64, 128, 128), "cross_attention_dim": 128, "latent": 32, "tokens": 16},
    "full": {"channels": (320, 640, 1280, 1280), "cross_attention_dim": 768, "latent": 64, "tokens": 77},
}


def sd_lora_model(device, quick, size="small"):
    """An SD 1.x-shaped UNet (4 resolutions, cross-attention, 4-channel latents) with a rank-16 LoRA: scaled down
    ("small"), or with SD 1.5's dimensions ("full", 860M parameters, for a GPU)."""
    from peft import LoraConfig

    torch.manual_seed(0)
    shape = SD_SIZES[size]
    channels = shape["channels"]
    unet = UNet2DConditionModel(
        sample_size=shape["latent"], in_channels=4, out_channels=4, block_out_channels=channels,
        layers_per_block=1 if quick else 2, cross_attention_dim=shape["cross_attention_dim"], attention_head_dim=8,
        norm_num_groups=32, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )
    unet.add_adapter(LoraConfig(r=16, lora_alpha=16, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]), adapter_name="lora")
    with torch.no_grad():  # a trained-looking LoRA: B ≠ 0
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    unet.to(device).eval()
    note = (f"SD-shaped UNet2DConditionModel, block_out_channels {channels}, layers_per_block "
            f"{1 if quick else 2}, {sum(p.numel() for p in unet.parameters()) / 1e6:.1f}M params, LoRA rank 16 on "
            "to_q/to_k/to_v/to_out.0")
    return LatentAdapter(unet), note


# ----------------------------------------------------------------------------- methods


def train_step(task, parameters, inputs, keys, optimizer):
    loss = task.outputs(inputs, keys).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


FLOOR = "floor: the same hooks, nothing projected"  # the per-call row of `hooks_only`


def hooks_only(task, projector, inputs, keys):
    """Forward and backward through `projector`'s attribution hooks, nothing done with (a, δ): the featurizer's
    floor, the cost of its hooks' forward and backward passes when the projection is free (the loop of
    `FactoredProjector.features` with a receiver that does nothing)."""
    with attribution_hooks(projector.modules, lambda *received: None) as capture:
        for columns in task.chunks():
            capture.backward(task.outputs(inputs, keys, columns).sum())


def vmap_features(task, parameters, inputs, keys, projector, fallback, low_precision=None):
    """Σ_k per-sample gradients (torch.func, one vmap over examples per timestep), then dense projection.

    `low_precision`: a copy of the denoiser in the config's dtype (--dtype): vmap's batching rules do not go
    through autocast (an autocast run failed with "expected scalar type BFloat16 but found Float"), so the
    recipe runs in that dtype outright, its gradients summed in float32."""
    adapter, K = task.adapter, task.config.num_timesteps
    if fallback:  # ordinary autograd, one example at a time
        return projector.project(per_example_gradients(task, parameters, inputs, keys))
    denoiser = low_precision or adapter.denoiser
    dtype = next(denoiser.parameters()).dtype
    params = {name: p.detach().to(dtype) for name, p in parameters.items()}
    timesteps = task.timesteps(keys)
    total = {name: torch.zeros(len(keys), *p.shape, device=p.device) for name, p in params.items()}

    def row_output(p, x0, noise, t, cond):
        x0, noise, t = x0[None], noise[None], t[None]
        x_t = adapter.add_noise(x0, noise, t).to(dtype)
        call = lambda **kwargs: functional_call(denoiser, p, args=(), kwargs=kwargs)
        prediction = adapter.predict(x_t, t, {k: v[None].to(dtype) for k, v in cond.items()}, denoiser=call).float()
        return task.objective(prediction, adapter.target(x0, noise, t), adapter.timestep_weight(t)).sum() / K

    per_sample = vmap(grad(row_output), in_dims=(None, 0, 0, 0, 0))
    for k in range(K):
        t = timesteps[:, k].to(inputs.x0.device)
        noise = torch.stack([task.noise(key, int(t[i]), inputs.x0.shape[1:]) for i, key in enumerate(keys)])
        with sdpa_kernel(SDPBackend.MATH):  # vmap has no batching rule for the fused attention kernels
            grads = per_sample(params, inputs.x0, noise.to(inputs.x0), t, inputs.conditioning)
        for name in total:
            total[name] += grads[name]
    return projector.project(total)


# ----------------------------------------------------------------------------- measurement


def in_round_order(methods: dict, index: int) -> list:
    """Round `index`'s order: as given on even rounds, reversed on odd ones, so that no method always runs
    right after the same other one (on a loaded CPU the second of two similar calls often ran faster)."""
    items = list(methods.items())
    return items if index % 2 == 0 else items[::-1]


def throughput(name, adapter, inputs, config, steps, device, budget_s=120.0, previous=None):
    """Each method once (warm-up, peak memory growth measured, caches such as the dense P included), then
    `steps` interleaved rounds of one timed call per method (fewer past `budget_s`), so that a busy moment
    on a shared machine hits every method alike; the median seconds per call give pairs per second."""
    task = AttributionTask(adapter, config)
    denoiser = adapter.denoiser
    parameters = select_parameters(denoiser, config)
    keys = list(range(len(inputs.x0)))
    pairs = len(keys) * config.num_timesteps
    with gradients_only_for(denoiser, parameters):
        # lr = 0: the arithmetic of a real step, and the weights stay as they are for the other methods
        optimizer = torch.optim.AdamW(parameters.values(), lr=0.0)
        on_gpu = torch.device(device).type == "cuda"  # SD 1.5's LoRA: P is 3.19M × 2048 floats, 24 GiB
        dense = DenseProjector({n: p.shape for n, p in parameters.items()}, config.projection_dim, 0,
                               cache_bytes=(64 << 30) if on_gpu else (1 << 33))  # P stays in memory, as a fast
        # dense recipe would keep it
        factored = FactoredProjector(denoiser, parameters, config.projection_dim, 0)
        tic = time.perf_counter()  # calibration is once per store; here on the call's own examples
        bases = calibrate(task, denoiser, parameters, [(inputs, keys)], config.sketch_dim, 0)
        calibration_s = time.perf_counter() - tic
        calibrated = CalibratedProjector(denoiser, parameters, config.projection_dim, 0, bases)
        if previous is not None:  # the previous code on the same bases, and its calibration
            tic = time.perf_counter()
            previous.calibration.calibrate(task, denoiser, parameters, [(inputs, keys)], config.sketch_dim, 0)
            previous_calibration_s = time.perf_counter() - tic
            previous_calibrated = previous.calibration.CalibratedProjector(denoiser, parameters, config.projection_dim,
                                                                          0, bases)
        low = None
        if config.dtype != "float32":  # the recipe in the config's dtype (vmap_features)
            low = copy.deepcopy(denoiser).to(getattr(torch, config.dtype))
        methods = {
            "train step": lambda: train_step(task, parameters, inputs, keys, optimizer),
            "vmap + dense Gaussian" + (f" ({config.dtype} weights)" if low is not None else ""):
                lambda: vmap_features(task, parameters, inputs, keys, dense, False, low),
            "factored hooks (random)": lambda: factored.features(task, parameters, inputs, keys),
            "factored hooks (calibrated, default)": lambda: calibrated.features(task, parameters, inputs, keys),
            FLOOR: lambda: hooks_only(task, calibrated.sketch, inputs, keys),
        }
        if previous is not None:
            methods[f"factored hooks (calibrated, previous {previous.revision})"] = (
                lambda: previous_calibrated.features(task, parameters, inputs, keys))
        memory = {}
        for label in list(methods):
            try:
                with PeakMemory(device) as peak:
                    methods[label]()
            except Exception as error:
                if "vmap" not in label:
                    raise
                del methods[label]
                label = f"per-example autograd + dense Gaussian (vmap failed: {type(error).__name__}: {error})"[:160]
                methods[label] = lambda: vmap_features(task, parameters, inputs, keys, dense, True)
                with PeakMemory(device) as peak:
                    methods[label]()
            memory[label] = peak.mib
        times = {label: [] for label in methods}
        start = time.perf_counter()
        while len(times["train step"]) < steps and (not times["train step"] or time.perf_counter() - start < budget_s):
            for label, method in in_round_order(methods, len(times["train step"])):
                tic = time.perf_counter()
                method()
                if torch.device(device).type == "cuda":
                    torch.cuda.synchronize()
                times[label].append(time.perf_counter() - tic)

        if previous is not None:  # the same bases: the same sketch up to float rounding (the mix changed: version 2)
            new, old = calibrated.sketch.features(task, parameters, inputs, keys), previous_calibrated.sketch.features(
                task, parameters, inputs, keys)
            difference = float((new - old).abs().max() / old.abs().max())
    median_ms = {label: statistics.median(seconds) * 1e3 for label, seconds in times.items()}
    rates = {label: pairs / (ms / 1e3) for label, ms in median_ms.items()}
    print(f"\n{name}: {len(parameters)} attributed tensors, {sum(p.numel() for p in parameters.values()):,} values; "
          f"B={len(keys)} examples × K={config.num_timesteps} timesteps per call, k={config.projection_dim}, "
          f"{len(times['train step'])} interleaved rounds")
    print("| method | pairs/s | × training | peak memory growth (MB) |")
    print("|---|---:|---:|---:|")
    for label, rate in rates.items():
        shown = f"{rate:,.0f}" if rate >= 100 else f"{rate:.3g}"
        print(f"| {label} | {shown} | {rate / rates['train step']:.2f} | {memory[label]:,.0f} |")
    floor = median_ms[FLOOR]
    print(f"per call: floor {floor:.1f} ms; the calibrated projection adds "
          f"{median_ms['factored hooks (calibrated, default)'] - floor:.1f} ms to it, where the training step's weight "
          f"gradients and AdamW step add {median_ms['train step'] - floor:.1f} ms to the same pass (its idle hooks "
          "included in the floor)")
    print(f"calibration (once per store; over the call's {len(keys)} examples here): {calibration_s:.1f} s"
          + (f" (previous {previous.revision}: {previous_calibration_s:.1f} s)" if previous is not None else "")
          + f"; calibrated sketch k_mid = {calibrated.sketch.dim:,} coordinates mixed into k. Each call mixes its "
          f"own {len(keys)} rows; the featurization loop mixes {calibrated.finish_rows} rows at a time "
          "(end-to-end section)")
    if previous is not None:
        print(f"calibrated sketch (before the mix) on the same bases, this checkout vs previous: max |difference| / "
              f"max |h| = {difference:.1e}", flush=True)


# ----------------------------------------------------------------------------- before / after


def previous_package(revision):
    """`diffusers_attribution` as of git `revision`, importable as `diffusers_attribution_previous` (its
    imports are relative), so that the previous implementation runs side by side with this one."""
    if revision is None:
        return None
    root = Path(__file__).resolve().parents[1]
    archive = subprocess.run(["git", "-C", str(root), "archive", revision, "diffusers_attribution"],
                             check=True, capture_output=True).stdout
    target = Path(tempfile.mkdtemp(prefix="featurize_speed_previous_"))
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(target, filter="data")
    (target / "diffusers_attribution").rename(target / "diffusers_attribution_previous")
    sys.path.insert(0, str(target))
    package = importlib.import_module("diffusers_attribution_previous")
    importlib.import_module("diffusers_attribution_previous.featurize")
    try:  # the calibrated projector's module, before and after the restructure of issue 12
        package.calibration = importlib.import_module("diffusers_attribution_previous.projection.calibrated")
    except ModuleNotFoundError:
        package.calibration = importlib.import_module("diffusers_attribution_previous.calibration")
    package.revision = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", revision], check=True,
                                      capture_output=True, text=True).stdout.strip()
    return package


def end_to_end(pipe, images, previous, rounds):
    """D-TRAK's featurization (K = 10, k = 2048, calibrated on the default examples; the package's default when
    issue 17 was filed) of `images`, calibration included, against training steps over the same (example, timestep) pairs with the same
    rows per step (batch_size examples × K), the data loading of both included; interleaved rounds."""
    config = AttributionConfig(method="d-trak", num_timesteps=10)  # the default when issue 17 was filed
    adapter = Featurizer(pipe, config).adapter
    task = AttributionTask(adapter, config)
    parameters = select_parameters(adapter.denoiser, config)
    n, batch = len(images), config.batch_size

    def train():
        with gradients_only_for(adapter.denoiser, parameters):
            optimizer = torch.optim.AdamW(parameters.values(), lr=0.0)
            for start in range(0, n, batch):
                keys = list(range(start, min(start + batch, n)))
                inputs = adapter.encode(images[keys], [None] * len(keys), keys, config.noise_seed)
                train_step(task, parameters, inputs, keys, optimizer)

    def featurize(package, method="d-trak"):
        def run():
            config = package.AttributionConfig(method=method, num_timesteps=10)
            if method == "d-trak":
                featurizer = package.featurize.Featurizer(pipe, config)
            else:  # a method with its own featurizer (DAS, the default since issue 14)
                featurizer = importlib.import_module(f"{package.__name__}.methods.base").get_method(method).featurizer(
                    pipe, config)
            name = "fit_projection" if hasattr(featurizer, "fit_projection") else "calibrate"  # before issue 12
            calibrate_method = getattr(featurizer, name)
            spent = {}

            def timed_calibrate(*args, **kwargs):
                tic = time.perf_counter()
                calibrate_method(*args, **kwargs)
                spent["calibration"] = time.perf_counter() - tic

            setattr(featurizer, name, timed_calibrate)
            store = featurizer.featurize_dataset(images, progress=False)
            return store, spent["calibration"], featurizer.projector.sketch.dim
        return run

    this = sys.modules["diffusers_attribution"]
    methods = {"train steps": train, "D-TRAK featurize (this checkout)": featurize(this)}
    if previous is not None:
        methods[f"D-TRAK featurize (previous, {previous.revision})"] = featurize(previous)
    methods["DAS featurize, the default since issue 14 (this checkout)"] = featurize(this, "das")
    if previous is not None and hasattr(previous, "methods"):
        try:
            importlib.import_module(f"{previous.__name__}.methods.das")
            methods[f"DAS featurize (previous, {previous.revision})"] = featurize(previous, "das")
        except ModuleNotFoundError:  # before issue 14
            pass
    times = {label: [] for label in methods}
    extra = {}
    for index in range(rounds):
        for label, method in in_round_order(methods, index):
            tic = time.perf_counter()
            result = method()
            times[label].append(time.perf_counter() - tic)
            if result is not None:
                extra.setdefault(label, []).append(result[1:])
    count = calibration_count(n, config.calibration_examples)
    print(f"\nend to end: {n} digits × K = {config.num_timesteps}, default config of D-TRAK (the default method when "
          f"issue 17 was filed) and of DAS (the default now; it mixes every (example, timestep) pair), "
          f"k = {config.projection_dim}, calibration on {count} examples here, {config.calibration_examples} requested, "
          f"{batch} examples × {config.num_timesteps} timesteps = {batch * config.num_timesteps} rows per step, "
          f"{rounds} interleaved round(s), median")
    print("| path | seconds | × training throughput | calibration (s) | calibration share | × training without "
          "calibration | k_mid |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    train_s = statistics.median(times["train steps"])
    for label, seconds in times.items():
        total = statistics.median(seconds)
        if label in extra:
            calibration = statistics.median(c for c, _ in extra[label])
            print(f"| {label} | {total:.2f} | {train_s / total:.2f} | {calibration:.2f} | {calibration / total:.0%} | "
                  f"{train_s / (total - calibration):.2f} | {extra[label][0][1]:,} |", flush=True)
        else:
            print(f"| {label} | {total:.2f} | 1.00 | – | – | – | – |")


# ----------------------------------------------------------------------------- fidelity


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise Spearman correlation of [n, N] score matrices (ties are negligible for real-valued scores)."""
    ra, rb = (x.argsort(1).argsort(1).double() for x in (a, b))
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    return (ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1))


def fidelity(adapter, images, held_out, n_train, n_query, dims, num_timesteps, device, seeds=(0, 1, 2), previous=None):
    """Spearman of projected vs exact kernel scores per query, for the random and calibrated factored
    projections and a dense Gaussian at the same k, over projection seeds (calibration: the default 64
    training examples, `calibration_indices`; never the queries)."""
    config = AttributionConfig(method="d-trak", num_timesteps=num_timesteps, projector="identity")  # as in issue 17
    task = AttributionTask(adapter, config)
    denoiser = adapter.denoiser
    parameters = select_parameters(denoiser, config)
    train, query = images[:n_train].to(device), held_out[:n_query].to(device)
    sets = {"train": (train, list(range(n_train))), "query": (query, [f"query:{i}" for i in range(n_query)])}

    def batches(name):
        x, keys = sets[name]
        for start in range(0, len(keys), 32):
            yield ModelInputs(x[start : start + 32]), keys[start : start + 32]

    def featurize(projector):
        return {name: torch.cat([projector.features(task, parameters, inputs, keys).cpu() for inputs, keys in batches(name)])
                for name in sets}

    start = time.perf_counter()
    with gradients_only_for(denoiser, parameters):
        exact = {name: [per_example_gradients(task, parameters, inputs, keys) for inputs, keys in batches(name)]
                 for name in sets}
        exact = {name: {p: torch.cat([g[p] for g in grads]) for p in parameters} for name, grads in exact.items()}
        flat = {name: torch.cat([g[p].flatten(1) for p in parameters], 1) for name, g in exact.items()}
        reference = KernelScorer(flat["train"]).scores(flat["query"])
        print(f"\nfidelity on {n_train} training digits, {n_query} held-out query digits, K={num_timesteps}, "
              f"{flat['train'].shape[1]:,} parameters (exact features in {time.perf_counter() - start:.0f} s)")
        del flat
        calibration = calibration_indices(n_train, calibration_count(n_train, 64), 0)  # what Featurizer uses
        calibration_batches = [(ModelInputs(train[calibration[i : i + CALIBRATION_BATCH]]),
                                calibration[i : i + CALIBRATION_BATCH])
                               for i in range(0, len(calibration), CALIBRATION_BATCH)]
        if previous is not None:  # the previous code's default: its own examples and batches
            before = previous.calibration.calibration_indices(n_train, 64, 0)
            step = previous.calibration.CALIBRATION_BATCH
            previous_batches = [(ModelInputs(train[before[i : i + step]]), before[i : i + step])
                                for i in range(0, len(before), step)]
        print(f"Spearman of projected vs exact scores: mean over {n_query} queries, then mean ± sd over projection "
              f"seeds {list(seeds)}; calibrated on {len(calibration)} training examples"
              + (f" (previous, {previous.revision}: {len(before)})" if previous is not None else ""))
        columns = ["factored, random", "factored, calibrated (default)", "dense gaussian"]
        if previous is not None:
            columns.append(f"calibrated, previous ({previous.revision})")
        print("| k | " + " | ".join(columns) + " |")
        print("|---:|" + "---:|" * len(columns))
        for k in dims:
            cells = {"random": [], "calibrated": [], "gaussian": []} | ({"previous": []} if previous else {})
            for seed in seeds:
                dense = DenseProjector({n: p.shape for n, p in parameters.items()}, k, seed)
                phis = {"gaussian": {name: dense.project(exact[name]) for name in sets}}
                del dense
                phis["random"] = featurize(FactoredProjector(denoiser, parameters, k, seed))
                bases = calibrate(task, denoiser, parameters, calibration_batches,
                                  AttributionConfig(projection_dim=k).sketch_dim, seed)  # the default
                phis["calibrated"] = featurize(CalibratedProjector(denoiser, parameters, k, seed, bases))
                if previous is not None:
                    calibration_module = previous.calibration
                    bases = calibration_module.calibrate(task, denoiser, parameters, previous_batches,
                                                         AttributionConfig(projection_dim=k).sketch_dim, seed)
                    phis["previous"] = featurize(calibration_module.CalibratedProjector(denoiser, parameters, k, seed,
                                                                                        bases))
                for label, phi in phis.items():
                    rho = spearman(KernelScorer(phi["train"]).scores(phi["query"]), reference)
                    cells[label].append(float(rho.mean()))
            row = [f"{statistics.mean(v):.3f} ± {statistics.pstdev(v):.3f}" for v in cells.values()]
            print(f"| {k} | " + " | ".join(row) + " |", flush=True)


# ----------------------------------------------------------------------------- main


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller SD model, fewer steps, N=200")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip-fidelity", action="store_true")
    parser.add_argument("--previous", default=None, metavar="REV",
                        help="also run the package as of this git revision, side by side (before/after)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of the end-to-end section")
    parser.add_argument("--only", choices=("all", "digits", "sd"), default="all",
                        help="sd: only the SD-shaped LoRA rows (a GPU check: python benchmarks/featurize_speed.py "
                             "--only sd --sd-size full --dtype bfloat16 --sd-batch 16)")
    parser.add_argument("--sd-size", choices=tuple(SD_SIZES), default="small",
                        help="full: SD 1.5's UNet dimensions, 64×64 latents, 77 tokens of width 768 (for a GPU)")
    parser.add_argument("--sd-batch", type=int, default=4, help="examples per call in the SD section (× K rows)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="autocast dtype of the SD section's forward passes (training step and featurizers alike)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads; default 1 on CPU: on a shared machine OpenMP threads wait on "
                             "each other (a 2-thread forward ran 25× slower than a 1-thread one on 2 busy cores)")
    args = parser.parse_args()
    if args.threads or args.device == "cpu":
        torch.set_num_threads(args.threads or 1)
    device, quick = args.device, args.quick
    steps = 2 if quick else 5
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads, "
          f"{psutil.cpu_count()} CPUs, {platform.processor() or platform.machine()}")

    previous = previous_package(args.previous)
    if args.only in ("all", "digits"):
        adapter, images, held_out = digits_model(device)
        print(f"digits: the digits DDPM (DigitsRecipe) trained on {len(images)} digits")
        from diffusers_attribution.demo.digits import load_digits_images

        end_to_end(adapter.pipe, load_digits_images(200 if quick else 1000), previous, 1 if quick else args.rounds)
        if not args.skip_fidelity:
            n_train, n_query = (200, 8) if quick else (len(images), 16)
            fidelity(adapter, images, held_out, n_train, n_query, (512, 2048), 5 if quick else 10, device,
                     previous=previous)
        batch = images[:16].to(device)
        config = AttributionConfig(num_timesteps=10, projection_dim=2048)
        throughput("digits DDPM (all parameters)", adapter, ModelInputs(batch), config, steps, device,
                   previous=previous)
    if args.only in ("all", "sd"):
        sd, note = sd_lora_model(device, quick, args.sd_size)
        shape = SD_SIZES[args.sd_size]
        size = shape["latent"] // (2 if quick else 1)
        print(f"\nsd-lora: {note}; latents 4×{size}×{size}, {shape['tokens']} text tokens of width "
              f"{shape['cross_attention_dim']}, autocast {args.dtype}")
        generator = torch.Generator().manual_seed(0)
        latents = torch.randn(args.sd_batch, 4, size, size, generator=generator).to(device)
        text = torch.randn(len(latents), shape["tokens"], shape["cross_attention_dim"], generator=generator).to(device)
        config = AttributionConfig(num_timesteps=4 if quick else 10, projection_dim=2048, parameters="lora",
                                   dtype=args.dtype)
        throughput("SD-shaped UNet, LoRA weights", sd, ModelInputs(latents, {"encoder_hidden_states": text}),
                   config, steps, device, previous=previous)


if __name__ == "__main__":
    main()
