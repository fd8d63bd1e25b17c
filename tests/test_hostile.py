"""Issue 25, "Safe to expose": hostile config.json files, --config files and flags, readers beside a writer.

Each test builds the hostile input the issue describes and checks that it is refused with the library's own error
naming the problem, before anything sized by it is allocated."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import tracemalloc
from pathlib import Path

import pytest
import torch

from diffusers_attribution import AttributionConfig, FeatureStore, enable_attribution
from diffusers_attribution.cli import main
from diffusers_attribution.store.errors import CorruptStoreError
from diffusers_attribution.store.files import MAX_CONFIG_BYTES, load_json_bounded
from diffusers_attribution.store.schema import parse_header, validate_header
from tiny_pipelines import tiny_ddpm_pipeline

N, SHARD_ROWS, K = 6, 2, 8


@pytest.fixture(scope="module")
def pipe():
    return enable_attribution(tiny_ddpm_pipeline())


@pytest.fixture(scope="module")
def images():
    return torch.rand(N, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1


@pytest.fixture(scope="module")
def reference(tmp_path_factory, pipe, images):
    config = AttributionConfig(method="trak", num_timesteps=2, projection_dim=K, batch_size=3, calibration_examples=0,
                               parameters=["conv_in.*", "conv_out.*"])
    return pipe.featurize(images, config, progress=False, output_dir=tmp_path_factory.mktemp("ref") / "store",
                          shard_rows=SHARD_ROWS)


def copy_store(reference, where: Path) -> Path:
    return Path(shutil.copytree(reference.directory, where, symlinks=True))


def header_of(directory: Path) -> dict:
    return json.loads((directory / "config.json").read_text())


def write_header(directory: Path, header: dict) -> None:
    (directory / "config.json").write_text(json.dumps(header))


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


# ---------------------------------------------------------------------------------------------- 1. bounded JSON


@pytest.mark.parametrize("examples,rows", [(10**9, 1), (5 * 10**6, 1), (10**18, 7)])
def test_a_huge_shard_plan_is_refused_without_being_built(reference, tmp_path, examples, rows):
    """Issue 25.1: num_examples = 1e9, shard_rows = 1 ran validate_header to MemoryError (the plan was built)."""
    directory = copy_store(reference, tmp_path / "store")
    header = header_of(directory)
    header.update(num_examples=examples, shard_rows=rows)
    write_header(directory, header)
    tracemalloc.start()
    try:
        with pytest.raises(CorruptStoreError, match=f"shards lists 3 shards; {examples} examples"):
            FeatureStore.from_pretrained(directory)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 << 20, f"validating the header allocated {peak / 2**20:.0f} MB"


def test_a_hub_store_with_a_huge_shard_plan_is_refused_by_download_store(reference, tmp_path):
    """Issue 25.1: `download_store` (the explorer's "add a store" box, an exported Space) ran the same check."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from hub_server import LocalHub
    from huggingface_hub import HfApi

    from diffusers_attribution.store.hub import download_store

    directory = copy_store(reference, tmp_path / "upload")
    header = header_of(directory)
    header.update(num_examples=10**9, shard_rows=1)
    write_header(directory, header)
    with LocalHub() as hub:
        api = HfApi(endpoint=hub.endpoint, token="test")
        api.create_repo("tester/plan", repo_type="dataset")
        api.upload_folder(repo_id="tester/plan", repo_type="dataset", folder_path=directory)
        tracemalloc.start()
        try:
            with pytest.raises(CorruptStoreError, match="shards lists 3 shards; 1000000000 examples"):
                download_store("tester/plan", endpoint=hub.endpoint, token="test", cache_dir=tmp_path / "cache")
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert peak < 50 << 20, f"{peak / 2**20:.0f} MB"
    assert not list((tmp_path / "cache").rglob("*.safetensors"))  # nothing but config.json was fetched


def test_counts_are_checked_against_the_bytes_that_back_them(reference, tmp_path):
    directory = copy_store(reference, tmp_path / "store")
    header = header_of(directory)
    header["dim"] = 10**9  # three shards of 2 rows cannot hold 10⁹ float32 features per row
    with pytest.raises(CorruptStoreError, match=r"shards\[0\]\.bytes is \d+: too small for 2 rows of 1000000000"):
        validate_header(header, "config.json")
    header = header_of(directory)
    header["kernel"]["bytes"] = 8 * N * N - 1  # N ≤ k: the dual N×N kernel
    with pytest.raises(CorruptStoreError, match="kernel.bytes .* too small for a float64 6×6 Gram matrix"):
        validate_header(header, "config.json")


@pytest.mark.parametrize("where", ["top", "config.adapter_options", "model_fingerprint"])
@pytest.mark.parametrize("depth", [500, 100_000])
def test_deep_nesting_is_the_librarys_error_not_recursion(reference, tmp_path, where, depth):
    """Issue 25.1: nesting 500 deep gave a RecursionError (schema._leaves, config.to_dict)."""
    directory = copy_store(reference, tmp_path / "store")
    text = (directory / "config.json").read_text()
    if where == "top":
        text = nested(depth)
    else:
        header = header_of(directory)
        target = header["config"] if where.startswith("config") else header
        target[where.split(".")[-1]] = {"x": "@"}
        text = json.dumps(header).replace('"@"', nested(depth))
    (directory / "config.json").write_text(text)
    outer = {"top": 0, "config.adapter_options": 3, "model_fingerprint": 2}[where]
    with pytest.raises(CorruptStoreError, match=f"nests {depth + outer} levels deep, more than the 32"):
        FeatureStore.from_pretrained(directory)


def test_an_oversized_config_json_is_refused_before_it_is_read(reference, tmp_path, monkeypatch):
    directory = copy_store(reference, tmp_path / "store")
    header = header_of(directory)
    header["padding"] = "x" * MAX_CONFIG_BYTES  # the had 12M keys in 254 MB
    write_header(directory, header)
    reads = []
    original = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: reads.append(self) or original(self, *a, **k))
    with pytest.raises(CorruptStoreError, match=f"more than the {MAX_CONFIG_BYTES} this file may have"):
        FeatureStore.from_pretrained(directory)
    assert not reads


def test_load_json_bounded():
    assert load_json_bounded(b'{"a": [1, {"b": "[[[[[["}]}', 100, 3) == {"a": [1, {"b": "[[[[[["}]}
    with pytest.raises(CorruptStoreError, match="nests 4 levels"):
        load_json_bounded(b'{"a": [1, {"b": [2]}]}', 100, 3)
    with pytest.raises(ValueError, match="more than 10 bytes"):
        load_json_bounded(b'{"a": "0123456789"}', 10, error=ValueError)
    for bad, match in ((b"\xff", "not UTF-8"), (b"NaN", "NaN"), (b"{", "not valid JSON")):
        with pytest.raises(CorruptStoreError, match=match):
            load_json_bounded(bad, 100)
    with pytest.raises(CorruptStoreError, match="expected a JSON object"):
        parse_header(b"[1]", "config.json")


def _cli_error(argv: list[str]) -> str:
    """main(argv) must fail with one line naming the problem, no traceback; returns that line."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            status = main(argv)
            message = err.getvalue()
        except SystemExit as error:
            status, message = error.code, str(error.code)
    assert status not in (0, None), f"{argv} did not fail"
    assert "Traceback" not in message and len(message.strip().splitlines()) == 1, message
    return message


@pytest.mark.parametrize("content,match", [
    ("[1, 2]", "must hold a JSON object of AttributionConfig fields, not list"),
    ("null", "not null"), ("3", "not int"), ('"trak"', "not str"),
    (nested(100_000), "nests 100000 levels deep"),
    ('{"method": "trak", "adapter_options": {"a": ' + nested(200) + "}}", "nests 202 levels deep"),
    ("{", "is not valid JSON"),
    ('{"num_timesteps": 1e12}', "num_timesteps must be an integer <= 10000, got 1000000000000.0"),
    ('{"projection_dim": 1000000000000}', "projection_dim must be an integer <= 1048576"),
])
def test_config_file_of_the_wrong_shape_is_a_clear_error(tmp_path, content, match):
    """Issue 25.4: --config holding a list, null or a number gave a TypeError traceback; 100k-deep nesting a
    RecursionError; 1e12 timesteps tried to allocate terabytes."""
    path = tmp_path / "config.json"
    path.write_text(content)
    assert match in _cli_error(["featurize", "--pipeline", "p", "--dataset", "d", "--out", str(tmp_path / "o"),
                                "--config", str(path)])


@pytest.mark.parametrize("flag,cap", [("--num-timesteps", 10_000), ("--projection-dim", 1 << 20),
                                      ("--batch-size", 1 << 16)])
def test_huge_numeric_flags_are_refused_before_allocation(tmp_path, flag, cap):
    """Issue 25.4: --num-timesteps 1e12 / --projection-dim 1e12 tried to allocate terabytes."""
    message = _cli_error(["featurize", "--pipeline", "p", "--dataset", "d", "--out", str(tmp_path / "o"),
                          flag, str(10**12)])
    assert f"must be an integer <= {cap}, got 1000000000000" in message
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as stopped:  # "1e12" is not an int: argparse
        main(["featurize", "--pipeline", "p", "--dataset", "d", "--out", str(tmp_path / "o"), flag, "1e12"])
    assert stopped.value.code == 2 and "invalid int value: '1e12'" in err.getvalue()


# ---------------------------------------------------------------------------------------------- 2. readers, writer

WRITER = """
import sys, time, torch
from diffusers_attribution import FeatureStore
source, target, seconds, rows = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
reference = FeatureStore.from_pretrained(source)
stores = [FeatureStore(torch.full((len(reference), reference.dim), value), reference.config, reference.metadata)
          for value in (1.0, 2.0)]
print("ready", flush=True)
end, count = time.monotonic() + seconds, 0
while time.monotonic() < end:
    stores[count % 2].save_pretrained(target, shard_rows=rows, overwrite=True)  # the same run, other features
    count += 1
print(count, flush=True)
"""


READER = """
import json, sys, time, torch
from diffusers_attribution import FeatureStore
from diffusers_attribution.scoring import KernelScorer
from diffusers_attribution.store.errors import CorruptStoreError, NotAStoreError, StoreChangedError
target, seconds, k = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
query = torch.ones(1, k)
outcomes, failures, end = {}, [], time.monotonic() + seconds
while time.monotonic() < end:
    try:
        store = FeatureStore.from_pretrained(target)
        features, kernel = store.features, store.kernel
        value = float(features[0, 0])
        scores = KernelScorer(store, damping=1.0).scores(query)  # every row equal: one score, the same each time
        if not (value in (1.0, 2.0) and bool((features == value).all()) and bool((kernel == k * value * value).all())
                and bool((scores == scores[0, 0]).all())):
            failures.append(f"mixed: features {features.unique().tolist()}, kernel {kernel.unique().tolist()}")
        outcome = f"store {value:g}"
    except (StoreChangedError, CorruptStoreError, NotAStoreError) as error:
        outcome = type(error).__name__
    except Exception as error:  # any other error (a raw OS error) is a failure
        failures.append(f"{type(error).__name__}: {error}")
        outcome = type(error).__name__
    outcomes[outcome] = outcomes.get(outcome, 0) + 1
print(json.dumps({"outcomes": outcomes, "failures": failures[:5]}), flush=True)
"""


def test_readers_beside_a_writer_get_one_store_or_a_clear_error(reference, tmp_path):
    """Issue 25.2: a process rewriting a store in a loop (save_pretrained(overwrite=True), same run, other features)
    while two reader processes load and score it for 3 s: every read is one whole store (features, kernel and
    scores of the same store) or the library's error; never a mix, never a raw OS error. Prints the counts. Each
    file is hashed and read through one handle, and config.json is checked to be the same file after every other
    file was opened."""
    import os
    import subprocess
    import sys

    target = tmp_path / "store"
    FeatureStore(torch.full((N, K), 1.0), reference.config, reference.metadata).save_pretrained(
        target, shard_rows=SHARD_ROWS)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(reference.directory), str(target), "5", str(SHARD_ROWS)],
                              stdout=subprocess.PIPE, text=True, env=env)
    assert writer.stdout.readline().strip() == "ready"
    readers = [subprocess.Popen([sys.executable, "-c", READER, str(target), "3", str(K)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    reports = []
    for reader in readers:
        out, err = reader.communicate(timeout=120)
        assert reader.returncode == 0, err[-2000:]
        reports.append(json.loads(out.strip().splitlines()[-1]))
    rewrites = int(writer.stdout.readline())
    assert writer.wait() == 0
    outcomes: dict[str, int] = {}
    for report in reports:
        for outcome, count in report["outcomes"].items():
            outcomes[outcome] = outcomes.get(outcome, 0) + count
    print(f"readers beside a writer: {rewrites} rewrites; reads by outcome: {outcomes}")
    assert not [failure for report in reports for failure in report["failures"]], (reports, outcomes)
    assert rewrites >= 5 and outcomes.get("store 1", 0) + outcomes.get("store 2", 0) >= 10, (rewrites, outcomes)


def test_an_overwrite_is_staged_complete_then_moved_in(reference, tmp_path, monkeypatch):
    """save_pretrained(overwrite=True) writes the whole new store into a hidden folder inside the target first: while
    it writes, the old store stays whole and loadable; then config.json is removed, the files renamed in and
    config.json renamed in last. A killed save's staging folder is removed by the next save."""
    import diffusers_attribution.store.format as store_format

    target = tmp_path / "store"
    old = FeatureStore(torch.full((N, K), 1.0), reference.config, reference.metadata)
    old.save_pretrained(target, shard_rows=SHARD_ROWS)
    (target / (store_format.STAGING_PREFIX + "killed")).mkdir()
    seen = []
    original = store_format.write_shard

    def writing(directory, entry, *args, **kwargs):  # while the new shards are written, the old store loads whole
        seen.append(float(FeatureStore.from_pretrained(target, verify=True).features.unique()))
        assert Path(directory).parent == target and Path(directory).name.startswith(store_format.STAGING_PREFIX)
        return original(directory, entry, *args, **kwargs)

    monkeypatch.setattr(store_format, "write_shard", writing)
    FeatureStore(torch.full((N, K), 2.0), reference.config, reference.metadata).save_pretrained(
        target, shard_rows=SHARD_ROWS, overwrite=True)
    assert seen == [1.0] * (N // SHARD_ROWS)
    new = FeatureStore.from_pretrained(target, verify=True)
    assert bool((new.features == 2.0).all()) and bool((new.kernel == K * 4.0).all())
    assert not [p.name for p in target.iterdir() if p.name.startswith(store_format.STAGING_PREFIX)]
    assert str(target) in (target / "README.md").read_text() and store_format.STAGING_PREFIX not in \
        (target / "README.md").read_text()


# ---------------------------------------------------------------------------------------------- fuzz


def _mutations(header: dict, seed: int, count: int):
    """`count` seeded structural mutations of a valid config.json: a value at a random path replaced by another
    type, a huge or negative count, a deep nesting, a long string, a big list; a key removed or added."""
    import random

    generator = random.Random(seed)
    replacements = [None, True, -1, 0, 1, 2**31, 2**63, 10**30, 1.5, float("1e308"), "", "x" * 10_000, "../../etc",
                    [], [0] * 10_000, {}, {"file": "../x"}, "features-00000-of-00001.safetensors",
                    json.loads("[" * 30 + "]" * 30)]

    def paths(value, prefix=()):
        yield prefix
        if isinstance(value, dict):
            for key, child in value.items():
                yield from paths(child, (*prefix, key))
        elif isinstance(value, list):
            for index, child in enumerate(value[:4]):
                yield from paths(child, (*prefix, index))

    every = [path for path in paths(header) if path]
    for _ in range(count):
        mutated = json.loads(json.dumps(header))
        path = generator.choice(every)
        parent = mutated
        for part in path[:-1]:
            parent = parent[part]
        action = generator.random()
        if action < 0.8:
            parent[path[-1]] = generator.choice(replacements)
        elif action < 0.9 and isinstance(parent, dict):
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[f"extra{generator.randrange(100)}"] = generator.choice(replacements)
        yield path, mutated


def test_a_fuzz_of_config_json_gives_only_the_librarys_errors(reference, tmp_path):
    """Issue 25: a few hundred structural mutations of config.json (types, sizes, depths, counts, missing and added
    keys): loading and scoring give either a store or the library's own error, each case under a second, peak
    Python memory (tracemalloc) under 500 MB. Prints the counts."""
    import time

    from diffusers_attribution.scoring import KernelScorer
    from diffusers_attribution.store.errors import NotAStoreError, StoreChangedError, StoreMismatchError

    directory = copy_store(reference, tmp_path / "store")
    original = header_of(directory)
    queries = torch.randn(2, reference.dim, generator=torch.Generator().manual_seed(0))
    outcomes: dict[str, int] = {}
    slowest, peak = 0.0, 0
    tracemalloc.start()
    try:
        for path, mutated in _mutations(original, seed=25, count=300):
            write_header(directory, mutated)
            tracemalloc.reset_peak()
            started = time.perf_counter()
            try:
                store = FeatureStore.from_pretrained(directory)
                KernelScorer(store).scores(queries)
                outcome = "loaded"
            except (CorruptStoreError, NotAStoreError, StoreMismatchError, StoreChangedError) as error:
                outcome = type(error).__name__
            except Exception as error:  # noqa: BLE001 - anything else is what the test is looking for
                raise AssertionError(f"mutating {'.'.join(map(str, path))} gave {type(error).__name__}: {error}")
            slowest = max(slowest, time.perf_counter() - started)
            peak = max(peak, tracemalloc.get_traced_memory()[1])
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
    finally:
        tracemalloc.stop()
        write_header(directory, original)
    print(f"config.json fuzz: {sum(outcomes.values())} mutations: {outcomes}; slowest {slowest:.3f} s, "
          f"peak traced memory {peak / 2**20:.1f} MiB")
    assert sum(outcomes.values()) == 300 and outcomes.get("CorruptStoreError", 0) > 150
    assert slowest < 1.0 and peak < 500 * 2**20
