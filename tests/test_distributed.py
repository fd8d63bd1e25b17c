"""Featurization split over two CPU processes (gloo): the same store as one process, each shard computed by
exactly one process, and a run whose process died is finished by running it again."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import diffusers_attribution.store.writer as featurize_module
from diffusers_attribution import AttributionConfig, FeatureStore, enable_attribution
from diffusers_attribution.store.format import read_shard_run
from tiny_pipelines import tiny_ddpm_pipeline

datasets = pytest.importorskip("datasets")

ROOT = Path(__file__).resolve().parents[1]
N, SHARD_ROWS = 13, 4  # 13 examples: not a multiple of 2 processes, of the batch size 3, or of the shard size
CONFIG = AttributionConfig(num_timesteps=2, projector="factored", projection_dim=8, batch_size=3,
                           parameters=["conv_in.*", "conv_out.*"])



@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A saved pipeline, a saved `datasets` training set, a config file, and a one-process store of them."""
    import PIL.Image
    from diffusers import DiffusionPipeline

    root = tmp_path_factory.mktemp("distributed")
    tiny_ddpm_pipeline().save_pretrained(root / "pipe")
    pixels = torch.randint(0, 256, (N, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    datasets.Dataset.from_dict({"image": [PIL.Image.fromarray(a.numpy(), mode="L") for a in pixels]}).save_to_disk(
        str(root / "data"))
    (root / "config.json").write_text(CONFIG.to_json())
    pipe = enable_attribution(DiffusionPipeline.from_pretrained(root / "pipe"))
    data = datasets.load_from_disk(str(root / "data"))
    reference = pipe.featurize(data, CONFIG, progress=False, output_dir=root / "one", shard_rows=SHARD_ROWS)
    return root, reference


def writers(store_dir: Path) -> dict[str, str]:
    return {p.name: read_shard_run(p)["process"] for p in sorted(store_dir.glob("features-*.safetensors"))}


def assert_same_store(store: FeatureStore, reference: FeatureStore) -> None:
    assert len(store) == len(reference) == N and store.config == reference.config
    assert store.example_hashes == reference.example_hashes
    assert store.metadata["model_fingerprint"] == reference.metadata["model_fingerprint"]
    torch.testing.assert_close(store.features, reference.features, rtol=1e-5, atol=1e-7)
    if reference.method_facts["kernel"]:  # the kernel, summed over processes, is the Gram matrix of the features
        phi = store.features.double()
        torch.testing.assert_close(store.kernel, phi.T @ phi, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(store.kernel, reference.kernel, rtol=1e-5, atol=1e-8)
    else:  # the CLI stores no kernel for a method that keeps none, as the API does
        assert store.kernel is None and reference.kernel is None
    # the method state (the default's F and residuals), summed and concatenated over processes and shards
    assert set(store.method_state or {}) == set(reference.method_state or {})
    for name, value in (reference.method_state or {}).items():
        torch.testing.assert_close(store.method_state[name].double(), value.double(), rtol=1e-5,
                                   atol=1e-8 * float(value.double().abs().max().clamp_min(1)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_accelerate_launch_two_processes_equals_one(setup):
    """The real command line: `accelerate launch --multi_gpu --num_processes 2` with ACCELERATE_USE_CPU=1."""
    root, reference = setup
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "HF_DATASETS_CACHE": str(root / "cache")}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), "-m", "diffusers_attribution", "featurize",
               "--pipeline", str(root / "pipe"), "--dataset", str(root / "data"), "--out", str(root / "two"),
               "--config", str(root / "config.json"), "--shard-rows", str(SHARD_ROWS), "--no-progress"]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("wrote FeatureStore(N=13") == 1  # the main process reports, once
    # Whole shards, round-robin: process 0 wrote shards 0 and 2, process 1 shards 1 and 3, none twice.
    assert list(writers(root / "two").values()) == ["0/2", "1/2", "0/2", "1/2"]
    assert_same_store(FeatureStore.from_pretrained(root / "two", verify=True), reference)
    # `accelerate launch -m diffusers_attribution attribute`: shards split, top-k merged, printed once
    import PIL.Image

    query = root / "query.png"
    PIL.Image.fromarray((torch.arange(64, dtype=torch.uint8) * 4).reshape(8, 8).numpy(), mode="L").save(query)
    attribute = command[: command.index("featurize")] + [
        "attribute", str(query), "--store", str(root / "two"), "--pipeline", str(root / "pipe"), "--topk", "3",
        "--json", "--no-progress"]
    proc = subprocess.run(attribute, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count('"results"') == 1, proc.stdout  # one process prints
    printed = json.loads(proc.stdout[proc.stdout.index("{"):])
    alone = subprocess.run([sys.executable, "-m", "diffusers_attribution"] + attribute[attribute.index("attribute"):],
                           capture_output=True, text=True, env=env, timeout=300)
    assert alone.returncode == 0, alone.stderr[-4000:]
    assert [r["index"] for r in printed["results"][0]["topk"]] == \
        [r["index"] for r in json.loads(alone.stdout[alone.stdout.index("{"):])["results"][0]["topk"]]


def _featurize_in_process(root: Path, die_on_rank: int | None) -> None:
    """Runs in each launched process: rank `die_on_rank` exits hard just before writing its second shard."""
    from accelerate import PartialState
    from diffusers import DiffusionPipeline

    state = PartialState(cpu=True)
    if state.process_index == die_on_rank:
        original, count = featurize_module.write_shard, []

        def dies(*args, **kwargs):
            if count:
                os._exit(3)
            count.append(1)
            return original(*args, **kwargs)

        featurize_module.write_shard = dies
    pipe = enable_attribution(DiffusionPipeline.from_pretrained(root / "pipe"))
    data = datasets.load_from_disk(str(root / "data"))
    pipe.featurize(data, CONFIG, progress=False, output_dir=root / "resumed", shard_rows=SHARD_ROWS, accelerator=state)


def launch(function, *args, num_processes: int = 2) -> None:
    """`accelerate.debug_launcher`, on a free port (it always uses 29500): forked CPU processes over gloo."""
    from accelerate.utils import PrepareForLaunch, patch_environment
    from torch.multiprocessing import start_processes

    with tempfile.NamedTemporaryFile() as rendezvous, patch_environment(
        world_size=num_processes, master_addr="127.0.0.1", master_port=str(free_port()),
        accelerate_mixed_precision="no", accelerate_debug_rdv_file=rendezvous.name, accelerate_use_cpu="yes",
        gloo_socket_ifname="lo", omp_num_threads="1",
    ):
        start_processes(PrepareForLaunch(function, debug=True), args=args, nprocs=num_processes, start_method="fork")


def test_a_dead_process_leaves_its_shards_and_the_rerun_finishes(setup):
    root, reference = setup
    with pytest.raises(Exception, match="exit code 3"):  # raised by torch.multiprocessing when process 1 dies
        launch(_featurize_in_process, root, 1)
    directory = root / "resumed"
    before = {p.name: p.stat().st_mtime_ns for p in directory.glob("features-*.safetensors")}
    assert "features-00001-of-00004.safetensors" in before  # process 1 finished its first shard ...
    assert "features-00003-of-00004.safetensors" not in before  # ... and died before its second
    assert not (directory / "config.json").exists()

    launch(_featurize_in_process, root, None)
    after = writers(directory)
    assert len(after) == 4
    for name, mtime in before.items():  # finished shards were kept, not computed again
        assert (directory / name).stat().st_mtime_ns == mtime
    assert after["features-00001-of-00004.safetensors"] == "1/2"
    # The missing shards were shared out again among both processes, in order.
    missing = sorted(set(after) - set(before))
    assert [after[name] for name in missing] == [f"{i % 2}/2" for i in range(len(missing))]
    assert_same_store(FeatureStore.from_pretrained(directory, verify=True), reference)


def _topk_in_process(store_dir: Path, queries: torch.Tensor, out: Path) -> None:
    from accelerate import PartialState
    from safetensors.torch import save_file

    from diffusers_attribution.distributed import ProcessGroup
    from diffusers_attribution.scoring import distributed_topk
    from diffusers_attribution.scoring import KernelScorer

    group = ProcessGroup(PartialState(cpu=True))
    best = distributed_topk(KernelScorer(FeatureStore.from_pretrained(store_dir)), queries, 5, group)
    save_file({"indices": best.indices, "scores": best.scores}, str(out / f"topk-{group.rank}.safetensors"))


def test_processes_score_their_shards_and_merge_topk(setup, tmp_path):
    from safetensors.torch import load_file

    from diffusers_attribution.scoring import KernelScorer

    root, reference = setup
    queries = torch.randn(3, reference.dim, generator=torch.Generator().manual_seed(1))
    launch(_topk_in_process, reference.directory, queries, tmp_path)
    expected = KernelScorer(reference).scores(queries).topk(5, dim=1)
    for rank in range(2):  # every process ends with the merged answer
        best = load_file(str(tmp_path / f"topk-{rank}.safetensors"))
        assert torch.equal(best["indices"], expected.indices)
        torch.testing.assert_close(best["scores"], expected.values)


def _session_topk_in_process(store_dir: Path, queries: torch.Tensor, out: Path) -> None:
    from accelerate import PartialState
    from safetensors.torch import save_file

    pipe = enable_attribution(tiny_ddpm_pipeline())
    state = PartialState(cpu=True)
    result = pipe.attribute(queries, store_dir, progress=False, top_k=5, accelerator=state)
    save_file({"indices": result.top.indices, "scores": result.top.scores},
              str(out / f"session-{state.process_index}.safetensors"))


def test_attribute_top_k_under_two_processes_merges_their_shards(setup, tmp_path):
    """`pipe.attribute(..., top_k=k)` with an accelerator: each process scores its shards, every process ends with
    the one-process answer."""
    from safetensors.torch import load_file

    root, reference = setup
    queries = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1
    launch(_session_topk_in_process, reference.directory, queries, tmp_path)
    expected = enable_attribution(tiny_ddpm_pipeline()).attribute(queries, reference, progress=False, top_k=5).top
    for rank in range(2):
        best = load_file(str(tmp_path / f"session-{rank}.safetensors"))
        assert torch.equal(best["indices"], expected.indices)
        torch.testing.assert_close(best["scores"], expected.scores)
