"""Feature stores on disk and on the Hub: sharded format, resumable featurization, corruption and mismatch
errors, and streaming scores whose memory stays below the n × N score matrix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import diffusers_attribution.store.writer as featurize_module
from diffusers_attribution.featurize import Featurizer
from diffusers_attribution import AttributionConfig, FeatureStore, StoreMismatchError, enable_attribution
from diffusers_attribution.scoring import KernelScorer, merge_topk
from diffusers_attribution.store import CorruptStoreError
from tiny_pipelines import tiny_ddpm_pipeline

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hub_server import LocalHub  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
N, SHARD_ROWS = 13, 4  # 4 shards: 4, 4, 4, 1 rows; batches of 3 inside each: 3 + 1


def config(**kwargs):
    base = dict(method="d-trak", num_timesteps=2, projector="factored", projection_dim=8, batch_size=3,
                parameters=["conv_in.*", "conv_out.*"])
    return AttributionConfig(**{**base, **kwargs})



@pytest.fixture(scope="module")
def images():
    return torch.rand(N, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1


@pytest.fixture(scope="module")
def pipe():
    return enable_attribution(tiny_ddpm_pipeline())


@pytest.fixture(scope="module")
def reference(tmp_path_factory, pipe, images):
    """An uninterrupted featurization into a directory."""
    return pipe.featurize(images, config(), progress=False, output_dir=tmp_path_factory.mktemp("ref") / "store",
                          shard_rows=SHARD_ROWS)


def test_layout_and_round_trip(reference, pipe, images):
    directory = reference.directory
    header = json.loads((directory / "config.json").read_text())
    assert [s["file"] for s in header["shards"]] == [f"features-0000{i}-of-00004.safetensors" for i in range(4)]
    assert [(s["start"], s["stop"]) for s in header["shards"]] == [(0, 4), (4, 8), (8, 12), (12, 13)]
    assert header["num_examples"] == N and header["dim"] == 8 and header["kernel"]["form"] == "primal"
    assert header["config"] == config().to_dict() and header["model_fingerprint"]["lora"] is None
    assert all(len(s["sha256"]) == 64 for s in header["shards"])
    assert [p.name for p in directory.glob(".*")] == [".diffusers-attribution.lock"]  # no temporaries left
    in_memory = pipe.featurize(images, config(), progress=False)
    torch.testing.assert_close(reference.features, in_memory.features, rtol=1e-5, atol=1e-7)
    assert reference.example_hashes == in_memory.metadata["example_hashes"]
    phi = reference.features.double()
    torch.testing.assert_close(reference.kernel, phi.T @ phi, rtol=1e-12, atol=1e-12)
    card = (directory / "README.md").read_text()
    assert "D-TRAK" in card and "park2023trak" in card and "zheng2024intriguing" in card and "viewer: false" in card


def test_push_to_hub_and_pull_in_a_fresh_process(reference, pipe, images, tmp_path):
    queries = images[:3] * 0.5
    expected = pipe.attribute(queries, reference).scores
    pipe.save_pretrained(tmp_path / "pipe")
    save_file({"queries": queries}, str(tmp_path / "queries.safetensors"))
    repo = "tester/tiny-ddpm-dtrak"
    with LocalHub() as hub:
        commit = reference.push_to_hub(repo, private=True, token="test", endpoint=hub.endpoint)
        from huggingface_hub import DatasetCard, HfApi

        api = HfApi(endpoint=hub.endpoint, token="test")
        files = sorted(api.list_repo_files(repo, repo_type="dataset"))
        assert files == sorted(["README.md", "config.json", "kernel.safetensors", "projection.safetensors"]
                               + [s["file"] for s in reference.shards]), files
        assert api.dataset_info(repo).sha == commit.oid
        readme = api.hf_hub_download(repo, "README.md", repo_type="dataset", cache_dir=tmp_path / "cache")
        card = DatasetCard.load(readme)
        assert card.data.viewer is False and f'"{repo}"' in card.text  # the snippet names the repository
        with pytest.raises(FileNotFoundError, match="no Hub dataset repository"):
            FeatureStore.from_pretrained("tester/missing", endpoint=hub.endpoint, token="test", cache_dir=tmp_path / "c")

        script = textwrap.dedent("""
            import sys
            from safetensors.torch import load_file, save_file
            from diffusers import DDPMPipeline
            from diffusers_attribution import FeatureStore, enable_attribution
            endpoint, repo, tmp = sys.argv[1:]
            pipe = enable_attribution(DDPMPipeline.from_pretrained(tmp + "/pipe"))
            queries = load_file(tmp + "/queries.safetensors")["queries"]
            store = FeatureStore.from_pretrained(repo, endpoint=endpoint, token="test", verify=True)
            by_store = pipe.attribute(queries, store, progress=False).scores
            by_repo_id = pipe.attribute(queries, repo, progress=False).scores  # HF_ENDPOINT, read at import
            save_file({"by_store": by_store, "by_repo_id": by_repo_id, "features": store.features, "kernel": store.kernel},
                      tmp + "/scores.safetensors")
            print(store)
        """)
        env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
        env.update(HF_HOME=str(tmp_path / "hf_home"), HF_ENDPOINT=hub.endpoint, HF_TOKEN="test",
                   HF_HUB_DISABLE_PROGRESS_BARS="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
        proc = subprocess.run([sys.executable, "-c", script, hub.endpoint, repo, str(tmp_path)],
                              capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "4 shards" in proc.stdout
    pulled = load_file(str(tmp_path / "scores.safetensors"))
    assert torch.equal(pulled["features"], reference.features) and torch.equal(pulled["kernel"], reference.kernel)
    assert torch.equal(pulled["by_store"], pulled["by_repo_id"])
    # The queries are featurized again over there (other thread count): equal up to float32 rounding.
    torch.testing.assert_close(pulled["by_store"], expected, rtol=1e-5, atol=1e-6)


def test_killed_run_resumes_without_recomputing(reference, pipe, images, tmp_path, monkeypatch):
    directory = tmp_path / "store"
    original, written = featurize_module.write_shard, []

    def dies_after_two(*args, **kwargs):
        if len(written) == 2:
            raise KeyboardInterrupt("killed")
        original(*args, **kwargs)
        written.append(args[1]["file"])

    monkeypatch.setattr(featurize_module, "write_shard", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        pipe.featurize(images, config(), progress=False, output_dir=directory, shard_rows=SHARD_ROWS)
    monkeypatch.setattr(featurize_module, "write_shard", original)
    finished = {name: (directory / name).stat().st_mtime_ns for name in written}
    assert len(finished) == 2 and not (directory / "config.json").exists()
    with pytest.raises(FileNotFoundError, match="unfinished featurization"):
        FeatureStore.from_pretrained(directory)

    computed = []
    rows = Featurizer.rows

    def spy(self, data, start, stop, bar=None):
        computed.append((start, stop))
        return rows(self, data, start, stop, bar)

    monkeypatch.setattr(Featurizer, "rows", spy)
    # Another config or another dataset in the same directory is refused, naming the difference.
    with pytest.raises(StoreMismatchError, match="feature_hash"):
        pipe.featurize(images, config(noise_seed=1), progress=False, output_dir=directory, shard_rows=SHARD_ROWS)
    changed = images.clone()
    changed[5] = -changed[5]
    with pytest.raises(StoreMismatchError, match="training example 5 differs"):
        pipe.featurize(changed, config(), progress=False, output_dir=directory, shard_rows=SHARD_ROWS)
    assert computed == []

    resumed = pipe.featurize(images, config(), progress=False, output_dir=directory, shard_rows=SHARD_ROWS)
    assert computed == [(8, 12), (12, 13)]  # only the two missing shards
    assert {name: (directory / name).stat().st_mtime_ns for name in written} == finished
    assert torch.equal(resumed.features, reference.features)  # bitwise: same batches, same order
    assert torch.equal(resumed.kernel, reference.kernel)
    assert resumed.example_hashes == reference.example_hashes
    again = pipe.featurize(images, config(), progress=False, output_dir=directory, shard_rows=SHARD_ROWS)
    assert computed == [(8, 12), (12, 13)] and torch.equal(again.features, reference.features)


def test_corrupt_shards_are_named(reference, tmp_path):
    import shutil

    directory = Path(shutil.copytree(reference.directory, tmp_path / "store"))
    shard = directory / reference.shards[1]["file"]
    data = shard.read_bytes()
    shard.write_bytes(data[:-7])  # truncated
    with pytest.raises(CorruptStoreError, match=f"{shard.name} is truncated"):
        FeatureStore.from_pretrained(directory)
    header_size = int.from_bytes(data[:8], "little")
    begin, end = json.loads(data[8 : 8 + header_size])["features"]["data_offsets"]
    flipped = bytearray(data)
    flipped[8 + header_size + (begin + end) // 2] ^= 0xFF  # same size, one feature changed
    shard.write_bytes(bytes(flipped))
    FeatureStore.from_pretrained(directory)  # sizes and headers are fine: only the sha256 tells
    with pytest.raises(CorruptStoreError, match=f"{shard.name} is corrupt"):
        FeatureStore.from_pretrained(directory, verify=True)
    store = FeatureStore.from_pretrained(directory)
    shard.write_bytes(data[:100])  # broken after loading: reading names the file
    with pytest.raises(CorruptStoreError, match=shard.name):
        store.features
    (directory / "config.json").write_text("{not json")
    with pytest.raises(CorruptStoreError, match="config.json"):
        FeatureStore.from_pretrained(directory)
    with pytest.raises(FileNotFoundError, match="not a directory, and not a Hub repo id"):
        FeatureStore.from_pretrained(str(tmp_path / "missing"))


def test_mismatched_model_adapter_and_config(reference, pipe, images):
    queries = images[:2]
    other = enable_attribution(tiny_ddpm_pipeline(seed=1))
    with pytest.raises(StoreMismatchError, match=r"model_fingerprint differs .*\(attributed, denoiser differ\)"):
        other.attribute(queries, reference, progress=False)
    with pytest.raises(StoreMismatchError, match="num_timesteps"):
        pipe.attribute(queries, reference, config(num_timesteps=3), progress=False)
    from peft import LoraConfig, inject_adapter_in_model

    with_lora = enable_attribution(tiny_ddpm_pipeline())
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["to_q", "to_v"], init_lora_weights=False), with_lora.unet)
    with pytest.raises(StoreMismatchError, match="denoiser, lora differ"):
        with_lora.attribute(queries, reference, progress=False)
    scores = other.attribute(queries, reference, progress=False, check_compatibility=False).scores
    assert scores.shape == (2, N) and torch.isfinite(scores).all()
    reference.check_dataset(images)
    with pytest.raises(StoreMismatchError, match="training example 3 differs"):
        reference.check_dataset(torch.cat([images[:3], images[4:5], images[4:]]))
    with pytest.raises(StoreMismatchError, match="13 examples, the dataset 12"):
        reference.check_dataset(images[:12])


class PeakTensorMemory(TorchDispatchMode):
    """Peak bytes of live tensor storages created by torch ops inside the context (CPU, by storage)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, list] = {}
        self.current = self.peak = self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self._track(tensor)
        return out

    def _track(self, tensor):
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in self.live:
            self.live[key] = [storage.nbytes(), 0]
            self.current += storage.nbytes()
            self.peak, self.largest = max(self.peak, self.current), max(self.largest, storage.nbytes())
        self.live[key][1] += 1
        weakref.finalize(tensor, self._release, key)

    def _release(self, key):
        entry = self.live.get(key)
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                self.current -= entry[0]
                del self.live[key]


def test_streaming_topk_matches_dense_under_a_memory_cap(tmp_path):
    n_train, k, n_queries, top = 20_000, 32, 100, 10
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(n_train, k, generator=generator) * torch.linspace(0.2, 2, k)
    queries = torch.randn(n_queries, k, generator=generator)
    hashes = [f"{i:016x}" for i in range(n_train)]
    made_by = {"projection": {"kind": "random"}, "model_fingerprint": {"attributed": "0123456789abcdef"}}
    in_memory = FeatureStore(features, config(projection_dim=k), {"num_examples": n_train, "example_hashes": hashes,
                                                                  **made_by})
    in_memory.save_pretrained(tmp_path / "store", shard_rows=3000, kernel=False)
    store = FeatureStore.from_pretrained(tmp_path / "store")
    assert len(store.shards) == 7 and store.kernel is None

    dense = KernelScorer(features, damping_ratio=store.config.damping_ratio)  # the method's default ratio
    expected = dense.scores(queries)
    best = expected.topk(top, dim=1)
    block_rows = 500
    scorer = KernelScorer(store, block_rows=block_rows)
    assert scorer.damping == pytest.approx(dense.damping, rel=1e-9)
    torch.testing.assert_close(scorer.scores(queries), expected, rtol=1e-5, atol=1e-6)

    with PeakTensorMemory() as meter:
        streamed = scorer.topk(queries, top)
    assert torch.equal(streamed.indices, best.indices)
    torch.testing.assert_close(streamed.scores, best.values, rtol=1e-5, atol=1e-6)
    full_matrix = n_queries * n_train * 4
    # By construction: one block of rows in float64 plus its scores, far below the n × N score matrix.
    assert meter.peak < 3 * block_rows * (n_queries + k) * 8 < full_matrix / 5, (meter.peak, full_matrix)
    print(f"streaming top-k peak tensor memory {meter.peak / 1e6:.2f} MB; the dense score matrix {full_matrix / 1e6:.1f} MB")

    # Processes can each score some shards; merging their top-k gives the same answer.
    parts = [scorer.topk(queries, top, shards=list(range(rank, 7, 3))) for rank in range(3)]
    merged = merge_topk(parts, top)
    assert torch.equal(merged.indices, best.indices)
    # The dual form (N ≤ k) streams too.
    wide = FeatureStore(features[:20].repeat(1, 2), config(projection_dim=2 * k),
                        {"num_examples": 20, "example_hashes": hashes[:20], **made_by})
    wide.save_pretrained(tmp_path / "wide", shard_rows=6)
    wide = FeatureStore.from_pretrained(tmp_path / "wide")
    assert wide.kernel.shape == (20, 20)
    torch.testing.assert_close(KernelScorer(wide, block_rows=4).scores(queries.repeat(1, 2)),
                               KernelScorer(features[:20].repeat(1, 2), damping_ratio=wide.config.damping_ratio
                                            ).scores(queries.repeat(1, 2)), rtol=1e-4, atol=1e-5)
