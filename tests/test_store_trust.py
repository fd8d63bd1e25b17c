"""Stores you can trust (issue 13): crafted stores, local and pulled from the test Hub, are refused with the project's
own errors and never make us read (or upload) a file outside the store; a seeded fuzz of a real store either scores
exactly as the original or is refused; one writer per folder; the same data gives the same store.

Every read is watched: Python's `open` through an audit hook, safetensors' own reads by wrapping `safe_open` in
store/files.py. "Outside" means outside the store's folder (for a Hub snapshot: outside the repository's cache folder).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

import diffusers_attribution.store.files as store_files
from diffusers_attribution import AttributionConfig, FeatureStore, InvalidImageError, StoreMismatchError, enable_attribution
from diffusers_attribution.api import make_scorer
from diffusers_attribution.featurize import NonFiniteFeaturesError
from diffusers_attribution.projection.calibrated import canonical_eigenvectors
from diffusers_attribution.scoring import KernelScorer
from diffusers_attribution.store.errors import CorruptStoreError, UntrustedReferenceError
from diffusers_attribution.store.files import file_digest, save_safetensors
from tiny_pipelines import tiny_ddpm_pipeline

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hub_server import LocalHub  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
N, SHARD_ROWS, K = 13, 4, 8


def config(**kwargs):
    base = dict(method="d-trak", num_timesteps=2, projection_dim=K, batch_size=3, calibration_examples=4,
                parameters=["conv_in.*", "conv_out.*"])
    return AttributionConfig(**{**base, **kwargs})


# ---------------------------------------------------------------------------------------------- reads


_READS: list[str] | None = None


def _audit(event, args):
    if _READS is not None and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        _READS.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)


@contextlib.contextmanager
def watched_reads(monkeypatch):
    """Every path opened inside (Python `open` / `os.open`, and safetensors' `safe_open`), resolved."""
    global _READS
    _READS = []
    original = store_files.safe_open

    def spy(path, *args, **kwargs):
        _READS.append(os.fsdecode(path))
        return original(path, *args, **kwargs)

    monkeypatch.setattr(store_files, "safe_open", spy)
    try:
        yield _READS
    finally:
        _READS = None
        monkeypatch.setattr(store_files, "safe_open", original)


def assert_inside(reads: list[str], root: Path, secret: Path | None = None, server: Path | None = None) -> None:
    """No path in `reads` resolves outside `root` (`server`: the test Hub's own storage, read by its thread)."""
    root = Path(os.path.realpath(root))
    package = Path(os.path.realpath(ROOT))
    for path in reads:
        real = Path(os.path.realpath(path))
        if secret is not None:
            assert real != Path(os.path.realpath(secret)), f"read the file outside the store: {path}"
        # Python's own imports (the package, site-packages) and the test server are not store reads.
        if real.suffix in (".py", ".pyc", ".so") or package in real.parents and root not in real.parents \
                or server is not None and Path(os.path.realpath(server)) in real.parents:
            continue
        assert root == real or root in real.parents, f"read {path} ({real}) outside {root}"


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def images():
    return torch.rand(N, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1


@pytest.fixture(scope="module")
def pipe():
    return enable_attribution(tiny_ddpm_pipeline())


@pytest.fixture(scope="module")
def reference(tmp_path_factory, pipe, images):
    """A real calibrated D-TRAK store: 4 shards, primal kernel, projection.safetensors."""
    return pipe.featurize(images, config(), progress=False, output_dir=tmp_path_factory.mktemp("ref") / "store",
                          shard_rows=SHARD_ROWS)


@pytest.fixture(scope="module")
def queries(reference):
    return torch.randn(3, reference.dim, generator=torch.Generator().manual_seed(1))


def copy_store(reference, where: Path) -> Path:
    return Path(shutil.copytree(reference.directory, where, symlinks=True))


def edit_config(directory: Path, change) -> dict:
    header = json.loads((directory / "config.json").read_text())
    change(header)
    (directory / "config.json").write_text(json.dumps(header))
    return header


def rehash(directory: Path, header: dict, entry: dict) -> None:
    """Record a file's new size and sha256 in config.json, as an attacker who rewrites both would."""
    entry["bytes"], entry["sha256"] = file_digest(directory / entry["file"])
    (directory / "config.json").write_text(json.dumps(header))


def load_and_score(directory, queries, **options):
    store = FeatureStore.from_pretrained(directory, **options)
    store.projection_state
    return make_scorer(store, damping=1.0).scores(queries)


# ---------------------------------------------------------------------------------------------- files outside


@pytest.mark.parametrize("name", ["../elsewhere/features.safetensors", "/tmp/features.safetensors", "..", ".",
                                  ".features-00000-of-00004.safetensors", "sub/features-00000-of-00004.safetensors",
                                  "features-00003-of-00004.safetensors"])
def test_shard_names_must_be_the_stores_own(reference, tmp_path, monkeypatch, queries, name):
    directory = copy_store(reference, tmp_path / "store")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(directory / reference.shards[0]["file"], outside / "features.safetensors")
    edit_config(directory, lambda h: h["shards"][0].update(file=name))
    with watched_reads(monkeypatch) as reads, pytest.raises(CorruptStoreError, match=r"shards\[0\]\.file"):
        load_and_score(directory, queries)
    assert_inside(reads, directory, outside / "features.safetensors")


def test_symlinked_files_are_refused(reference, tmp_path, monkeypatch, queries):
    for name in [reference.shards[1]["file"], "kernel.safetensors", "projection.safetensors", "config.json"]:
        directory = copy_store(reference, tmp_path / f"store-{name}")
        secret = tmp_path / f"secret-{name}"
        shutil.move(directory / name, secret)  # the same bytes: only the link gives it away
        os.symlink(secret, directory / name)
        with watched_reads(monkeypatch) as reads, pytest.raises(CorruptStoreError, match="symbolic link"):
            load_and_score(directory, queries, verify=True)
        assert_inside(reads, directory, secret)


def test_sizes_and_checksums_are_required(reference, tmp_path, monkeypatch, queries):
    for entry, key in [("kernel", "sha256"), ("kernel", "bytes"), ("fitted", "sha256"), ("shards", "bytes")]:
        directory = copy_store(reference, tmp_path / f"store-{entry}-{key}")

        def drop(header):
            {"shards": lambda: header["shards"][0], "fitted": lambda: header["fitted"]["projection"]}.get(
                entry, lambda: header[entry])().pop(key)

        edit_config(directory, drop)
        with watched_reads(monkeypatch) as reads, pytest.raises(CorruptStoreError, match=key):
            load_and_score(directory, queries)
        assert_inside(reads, directory)


def test_kernel_name_with_dots_and_a_symlinked_secret(reference, tmp_path, monkeypatch, queries):
    directory = copy_store(reference, tmp_path / "store")
    secret = tmp_path / "secret.safetensors"
    secret.write_bytes(b"the secret")
    os.symlink(secret, directory / "secret-link")
    for name in ["../secret.safetensors", "secret-link", str(secret)]:
        edit_config(directory, lambda h: h["kernel"].update(file=name))
        with watched_reads(monkeypatch) as reads, pytest.raises(CorruptStoreError, match=r"kernel\.file"):
            load_and_score(directory, queries)
        assert_inside(reads, directory, secret)


def test_rows_must_tile_the_examples(reference, tmp_path, queries):
    cases = {
        "num_examples": lambda h: h.update(num_examples=h["num_examples"] + 5),
        "overlap": lambda h: h["shards"][1].update(start=3),
        "gap": lambda h: h["shards"][1].update(start=5),
        "stop": lambda h: h["shards"][-1].update(stop=20),
        "missing shard": lambda h: h["shards"].pop(2),
        "shard_rows": lambda h: h.update(shard_rows=5),
    }
    for label, change in cases.items():
        directory = copy_store(reference, tmp_path / label.replace(" ", "-"))
        edit_config(directory, change)
        with pytest.raises(CorruptStoreError, match="shards|num_examples|shard_rows"):
            load_and_score(directory, queries)


def test_declared_shapes_are_checked_against_the_file_headers(reference, tmp_path, queries):
    directory = copy_store(reference, tmp_path / "store")
    header = edit_config(directory, lambda h: None)
    shard = directory / header["shards"][0]["file"]
    save_safetensors({"features": torch.zeros(4, K + 1), "example_hashes": torch.zeros(4, 8, dtype=torch.uint8)},
                     shard, {"start": "0", "stop": "4", "run": "{}"})
    rehash(directory, header, header["shards"][0])
    with pytest.raises(CorruptStoreError, match=r"features is F32 \[4, 9\], config.json says F32 \[4, 8\]"):
        FeatureStore.from_pretrained(directory)
    # A kernel of the wrong shape is refused from its header, before it is read.
    directory = copy_store(reference, tmp_path / "kernel")
    header = edit_config(directory, lambda h: None)
    save_safetensors({"gram": torch.eye(K + 1, dtype=torch.float64)}, directory / "kernel.safetensors", {"form": "primal"})
    rehash(directory, header, header["kernel"])
    with pytest.raises(CorruptStoreError, match=r"gram is F64 \[9, 9\]"):
        load_and_score(directory, queries)


def test_non_finite_features_and_kernels_are_refused_naming_the_file(reference, tmp_path, queries):
    directory = copy_store(reference, tmp_path / "nan")
    header = edit_config(directory, lambda h: None)
    entry = header["shards"][2]
    shard = directory / entry["file"]
    from safetensors import safe_open

    with safe_open(str(shard), "pt") as handle:
        tensors, meta = {k: handle.get_tensor(k).clone() for k in handle.keys()}, handle.metadata()
    tensors["features"][1, 3] = float("nan")
    save_safetensors(tensors, shard, meta)
    rehash(directory, header, entry)
    with pytest.raises(CorruptStoreError, match=f"{entry['file']}: the features of rows 8..11 contain NaN"):
        load_and_score(directory, queries, verify=True)
    # A kernel that is not the features' Gram matrix (sha256 recomputed): scaled, or with an Inf.
    for label, change in {"scaled": lambda g: g * 2, "inf": lambda g: g.index_put_((torch.tensor([0]),) * 2,
                                                                                   torch.tensor(float("inf"), dtype=g.dtype))}.items():
        directory = copy_store(reference, tmp_path / label)
        header = edit_config(directory, lambda h: None)
        save_safetensors({"gram": change(reference.kernel.clone())}, directory / "kernel.safetensors", {"form": "primal"})
        rehash(directory, header, header["kernel"])
        with pytest.raises(CorruptStoreError, match="kernel"):
            load_and_score(directory, queries, verify=True)


def test_shards_of_another_run_are_refused(reference, pipe, images, tmp_path, queries):
    other = pipe.featurize(images, config(noise_seed=1), progress=False, output_dir=tmp_path / "other",
                           shard_rows=SHARD_ROWS)
    directory = copy_store(reference, tmp_path / "store")
    header = edit_config(directory, lambda h: None)
    entry = header["shards"][1]
    shutil.copy(other.directory / entry["file"], directory / entry["file"])
    rehash(directory, header, entry)
    with pytest.raises(CorruptStoreError, match="belongs to another run than config.json"):
        load_and_score(directory, queries)


@pytest.mark.parametrize("text,match", [
    ("null", "expected a JSON object"), ("[]", "expected a JSON object"), ('"x"', "expected a JSON object"),
    ("{not json", "not valid JSON"), ('{"format_version": NaN}', "NaN"),
])
def test_config_json_that_is_not_an_object(reference, tmp_path, text, match):
    directory = copy_store(reference, tmp_path / "store")
    (directory / "config.json").write_text(text)
    with pytest.raises(CorruptStoreError, match=match):
        FeatureStore.from_pretrained(directory)


@pytest.mark.parametrize("change,key", [
    (lambda h: h["config"].update(method=5), "config.method"),
    (lambda h: h["config"].update(method="nope"), "config"),
    (lambda h: h["config"].pop("num_timesteps"), "config.num_timesteps"),
    (lambda h: h["config"].update(num_timesteps=True), "config.num_timesteps"),
    (lambda h: h["config"].update(damping=float("1e400")), "config.damping"),
    (lambda h: h["config"].update(damping=-1.0), "config"),
    (lambda h: h.pop("model_fingerprint"), "model_fingerprint"),
    (lambda h: h["model_fingerprint"].update(denoiser=None, attributed=None), "model_fingerprint"),
    (lambda h: h.pop("dim"), "dim"),
    (lambda h: h.update(dim="8"), "dim"),
    (lambda h: h.update(dtype="float64"), "dtype"),
    (lambda h: h.update(format_version=3), "unsupported store format"),
    (lambda h: h.update(shards={}), "shards"),
    (lambda h: h["kernel"].update(form="dual"), "kernel.form"),
    (lambda h: h["fitted"].update(projection=None), "fitted.projection"),
    (lambda h: h["fitted"].update(version=2), "fitted.version"),
    (lambda h: h.update(projection_file=None), "fitted"),
    (lambda h: h["projection"].update(calibrated="yes"), "projection.calibrated"),
    (lambda h: h.update(lora_adapters="x"), "lora_adapters"),
])
def test_config_json_schema_names_the_key(reference, tmp_path, change, key):
    directory = copy_store(reference, tmp_path / "store")
    header = json.loads((directory / "config.json").read_text())
    change(header)
    (directory / "config.json").write_text(json.dumps(header).replace("Infinity", "1e400"))
    with pytest.raises(CorruptStoreError, match=key):
        FeatureStore.from_pretrained(directory)


def test_a_loaded_store_never_loads_what_it_names(reference, tmp_path, pipe, monkeypatch):
    """A TracIn store naming a Hub checkpoint, an embedding store naming an encoder: nothing is loaded unless the
    caller passes it or opts in."""
    from diffusers_attribution.checkpoints import CheckpointSet
    import diffusers_attribution.image_features as similarity

    loaded = []
    monkeypatch.setattr(CheckpointSet, "state_dict", lambda self, spec: loaded.append(spec) or {})
    monkeypatch.setattr(similarity, "load_image_encoder", lambda name: loaded.append(name) or (_ for _ in ()).throw(
        AssertionError("loaded")))
    queries = torch.zeros(1, 1, 8, 8)
    tracin = config(method="tracin", calibration_examples=0, checkpoints=[{"path": "attacker/evil-unet"}])
    store = FeatureStore(torch.zeros(N, K), tracin, {**reference.metadata, "projection": {"kind": "factored"},
                                                     "checkpoints": tracin.checkpoints,
                                                     "model_fingerprint": {"checkpoints": [reference.metadata["model_fingerprint"]]}})
    store.save_pretrained(tmp_path / "tracin")
    with pytest.raises(UntrustedReferenceError, match="names checkpoints .*attacker/evil-unet"):
        pipe.attribute(queries, str(tmp_path / "tracin"), progress=False)
    embedding = AttributionConfig(method="embedding-cosine", encoder="attacker/evil-encoder")
    store = FeatureStore(torch.zeros(N, K), embedding, {"example_hashes": reference.example_hashes,
                                                        "projection": {"kind": "embedding", "encoder": "x",
                                                                       "encoder_fingerprint": "0123456789abcdef"}})
    store.save_pretrained(tmp_path / "embedding")
    with pytest.raises(UntrustedReferenceError, match="names encoder .*attacker/evil-encoder"):
        pipe.attribute(queries, str(tmp_path / "embedding"), progress=False)
    assert loaded == []


# ---------------------------------------------------------------------------------------------- the Hub


def test_pulled_store_links_into_its_own_blobs_only(reference, tmp_path, monkeypatch, queries):
    expected = load_and_score(reference.directory, queries)
    repo, other_repo = "tester/trusted-store", "tester/other-store"
    with LocalHub() as hub:
        options = dict(endpoint=hub.endpoint, token="test", cache_dir=tmp_path / "cache")
        (reference.directory / "stray.bin").write_bytes(b"not listed")  # a file the store does not list
        try:
            reference.push_to_hub(repo, endpoint=hub.endpoint, token="test")
        finally:
            (reference.directory / "stray.bin").unlink()
        from huggingface_hub import HfApi

        api = HfApi(endpoint=hub.endpoint, token="test")
        assert sorted(api.list_repo_files(repo, repo_type="dataset")) == sorted(
            ["README.md", "config.json", "kernel.safetensors", "projection.safetensors"]
            + [s["file"] for s in reference.shards])
        api.upload_file(path_or_fileobj=b"x" * 1000, path_in_repo="huge.bin", repo_id=repo, repo_type="dataset")
        reference.push_to_hub(other_repo, endpoint=hub.endpoint, token="test")

        # The normal layout: snapshot entries are links into the repository's blobs/; accepted, same scores.
        with watched_reads(monkeypatch) as reads:
            store = FeatureStore.from_pretrained(repo, verify=True, **options)
            scores = make_scorer(store, damping=1.0).scores(queries)
        snapshot = store.directory
        repo_folder = snapshot.parent.parent
        assert torch.equal(scores, expected)
        assert all((snapshot / s["file"]).is_symlink() for s in reference.shards)
        assert not (snapshot / "huge.bin").exists()  # only the listed files are downloaded
        assert_inside(reads, tmp_path / "cache", server=hub.root)  # the client's own files (CACHEDIR.TAG, .locks)

        # A snapshot entry re-pointed outside the repository's cache folder (same bytes) is refused …
        shard = snapshot / reference.shards[0]["file"]
        secret = tmp_path / "outside.safetensors"
        shutil.copy(shard, secret)
        os.remove(shard)
        os.symlink(secret, shard)
        with watched_reads(monkeypatch) as reads, pytest.raises(CorruptStoreError, match="symbolic link"):
            FeatureStore.from_pretrained(snapshot, verify=True)
        assert_inside(reads, repo_folder, secret, server=hub.root)
        # … as is one into another repository's blobs.
        other = FeatureStore.from_pretrained(other_repo, **options).directory
        os.remove(shard)
        os.symlink(os.path.realpath(other / reference.shards[0]["file"]), shard)
        with pytest.raises(CorruptStoreError, match="symbolic link"):
            FeatureStore.from_pretrained(snapshot, verify=True)

        # A repository whose config.json names a file outside: refused before anything else is downloaded.
        bad = json.loads((reference.directory / "config.json").read_text())
        bad["shards"][0]["file"] = "../../../../outside.safetensors"
        api.create_repo("tester/escaping", repo_type="dataset")
        api.upload_file(path_or_fileobj=json.dumps(bad).encode(), path_in_repo="config.json",
                        repo_id="tester/escaping", repo_type="dataset")
        with pytest.raises(CorruptStoreError, match=r"shards\[0\]\.file"):
            FeatureStore.from_pretrained("tester/escaping", **options)
        pulled = [p.name for p in (tmp_path / "cache").rglob("*") if "escaping" in str(p) and p.is_file()]
        assert pulled == ["config.json"] or all(name != "outside.safetensors" for name in pulled)


def test_push_uploads_only_checked_regular_files(reference, tmp_path):
    """A store whose listed file is swapped for a link to a secret after loading, or whose bytes changed: nothing
    is uploaded."""
    directory = copy_store(reference, tmp_path / "store")
    store = FeatureStore.from_pretrained(directory)
    secret = tmp_path / "secret"
    shutil.copy(directory / "kernel.safetensors", secret)
    os.remove(directory / "kernel.safetensors")
    os.symlink(secret, directory / "kernel.safetensors")
    with LocalHub() as hub:
        from huggingface_hub import HfApi

        api = HfApi(endpoint=hub.endpoint, token="test")
        with pytest.raises(CorruptStoreError, match="symbolic link"):
            store.push_to_hub("tester/leak", endpoint=hub.endpoint, token="test")
        os.remove(directory / "kernel.safetensors")
        shutil.copy(secret, directory / "kernel.safetensors")
        with open(directory / "kernel.safetensors", "r+b") as handle:
            handle.seek(-1, 2)
            handle.write(b"\x01")
        with pytest.raises(CorruptStoreError, match="kernel.safetensors does not match"):
            store.push_to_hub("tester/leak", endpoint=hub.endpoint, token="test")
        assert not api.repo_exists("tester/leak", repo_type="dataset")


# ---------------------------------------------------------------------------------------------- writers


def test_writers_touch_only_their_own_files(reference, pipe, images, tmp_path):
    directory = tmp_path / "store"
    directory.mkdir()
    (directory / ".notes.tmp").write_text("mine")  # hidden, .tmp, but not a temporary of the store's
    (directory / "README.md").write_text("# my own notes")
    with pytest.raises(FileExistsError, match="README.md was not written by diffusers-attribution"):
        pipe.featurize(images, config(), progress=False, output_dir=directory, shard_rows=SHARD_ROWS)
    assert (directory / "README.md").read_text() == "# my own notes"
    (directory / "README.md").unlink()
    (directory / "config.json").write_text('{"_class_name": "UNet2DModel"}')  # a model folder, say
    with pytest.raises(FileExistsError, match="not a feature store's config.json"):
        pipe.featurize(images, config(), progress=False, output_dir=directory, shard_rows=SHARD_ROWS)
    (directory / "config.json").unlink()
    secret = tmp_path / "secret"
    secret.write_bytes(b"secret")
    os.symlink(secret, directory / "features-00000-of-00004.safetensors")  # a link where a shard would be
    with pytest.raises(StoreMismatchError, match="not a regular file the store wrote"):
        pipe.featurize(images, config(), progress=False, output_dir=directory, shard_rows=SHARD_ROWS)
    assert secret.read_bytes() == b"secret"
    (directory / "features-00000-of-00004.safetensors").unlink()
    store = pipe.featurize(images, config(), progress=False, output_dir=directory, shard_rows=SHARD_ROWS)
    assert (directory / ".notes.tmp").read_text() == "mine"
    # save_pretrained into a folder that holds a store: an error unless overwrite=True.
    with pytest.raises(FileExistsError, match="already holds a feature store"):
        reference.save_pretrained(directory, shard_rows=SHARD_ROWS)
    in_memory = FeatureStore(store.features, store.config, store.metadata, projection_state=store.projection_state)
    in_memory.save_pretrained(directory, shard_rows=6, overwrite=True)
    assert len(FeatureStore.from_pretrained(directory, verify=True).shards) == 3
    assert sorted(p.name for p in directory.iterdir()) == sorted(
        [".diffusers-attribution.lock", ".notes.tmp", "README.md", "config.json", "kernel.safetensors",
         "projection.safetensors"] + [f"features-0000{i}-of-00003.safetensors" for i in range(3)])
    # A store written before cards carried their marker (the 0.1.0 fixture) is still recognised as a store's.
    old = Path(shutil.copytree(ROOT / "tests" / "fixtures" / "store_v0_1_0", tmp_path / "old"))
    FeatureStore.from_pretrained(old).save_pretrained(old, overwrite=True)  # the same folder: nothing to do
    in_memory.save_pretrained(old, shard_rows=SHARD_ROWS, overwrite=True)
    assert len(FeatureStore.from_pretrained(old, verify=True)) == N and not (old / "features-00002-of-00003.safetensors").exists()


def test_same_data_same_bytes_and_the_umask(pipe, images, tmp_path, reference):
    old = os.umask(0o027)
    try:
        again = pipe.featurize(images, config(), progress=False, output_dir=tmp_path / "again", shard_rows=SHARD_ROWS)
    finally:
        os.umask(old)
    for name in ["config.json", "kernel.safetensors", "projection.safetensors"] + [s["file"] for s in reference.shards]:
        assert (again.directory / name).read_bytes() == (reference.directory / name).read_bytes(), name
        assert stat.S_IMODE(os.stat(again.directory / name).st_mode) == 0o640, name


_WRITER = textwrap.dedent("""
    import sys, time, torch
    torch.set_num_threads(1)
    sys.path.insert(0, sys.argv[3])
    import diffusers_attribution.store.writer as writer
    from tiny_pipelines import tiny_ddpm_pipeline
    from diffusers_attribution import AttributionConfig, enable_attribution
    from diffusers_attribution.store.errors import StoreBusyError
    seed, out = int(sys.argv[1]), sys.argv[2]
    if seed == 0:  # the first writer holds the lock until the test says go (after the second has tried)
        import os
        original = writer.write_shard
        def slow(*args, **kwargs):
            deadline = time.monotonic() + 120
            while not os.path.exists(out + ".go") and time.monotonic() < deadline:
                time.sleep(0.05)
            return original(*args, **kwargs)
        writer.write_shard = slow
    pipe = enable_attribution(tiny_ddpm_pipeline())
    images = torch.rand(13, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    config = AttributionConfig(method="d-trak", num_timesteps=2, projection_dim=8, batch_size=3, calibration_examples=4,
                               parameters=["conv_in.*", "conv_out.*"], noise_seed=seed)
    try:
        pipe.featurize(images, config, progress=False, output_dir=out, shard_rows=4)
    except StoreBusyError as error:
        print("BUSY", error)
        sys.exit(7)
    print("DONE", config.feature_hash())
""")


def test_two_concurrent_writers_one_fails_clearly(tmp_path):
    out = tmp_path / "shared"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    run = lambda seed: subprocess.Popen([sys.executable, "-c", _WRITER, str(seed), str(out), str(ROOT / "tests")],  # noqa
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    first = run(0)
    deadline = time.monotonic() + 120
    while not (out / ".diffusers-attribution.writer.json").exists():  # the first holds the lock
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.05)
    second = run(1)
    second_out, second_err = second.communicate(timeout=120)
    Path(f"{out}.go").touch()
    first_out, first_err = first.communicate(timeout=120)
    assert second.returncode == 7, second_err[-3000:]
    assert f"{out} is being written by another featurization" in second_out and "feature_hash" in second_out
    assert first.returncode == 0, first_err[-3000:]
    store = FeatureStore.from_pretrained(out, verify=True)
    assert store.config.noise_seed == 0 and first_out.split()[-1] == store.config.feature_hash()
    listed = {"config.json", "README.md", "kernel.safetensors", "projection.safetensors", ".diffusers-attribution.lock"}
    assert {p.name for p in out.iterdir()} == listed | {s["file"] for s in store.shards}


# ---------------------------------------------------------------------------------------------- the same store


def test_canonical_eigenvectors_do_not_depend_on_summation_order():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(40, 6, generator=generator, dtype=torch.float64)
    one = a @ a.T  # rank 6: a 34-dimensional null space, whose eigh basis is arbitrary
    other = sum(a[:, i : i + 1] @ a[:, i : i + 1].T for i in reversed(range(6)))  # other rounding
    raw = [torch.linalg.eigh(m)[1].flip(1) for m in (one, other)]
    canonical = [canonical_eigenvectors(m) for m in (one, other)]
    assert (raw[0] - raw[1]).abs().max() > 0.1  # eigh alone: another basis for another summation order
    torch.testing.assert_close(canonical[0], canonical[1], rtol=0, atol=1e-9)
    torch.testing.assert_close(canonical[0].T @ canonical[0], torch.eye(40, dtype=torch.float64), rtol=0, atol=1e-12)
    signs = canonical_eigenvectors(one * 3)  # a function of the matrix: the sign does not flip with scale
    torch.testing.assert_close(signs[:, :6], canonical[0][:, :6], rtol=0, atol=1e-9)


def test_one_or_two_processes_threads_and_batch_sizes_give_the_same_store(tmp_path, pipe, images):
    """N = 13 > calibration_examples = 4: the bases are fitted on a subset, the rest only projected."""
    from test_distributed import free_port

    torch.save(images, tmp_path / "images.pt")
    stores = {"1 process, 1 thread, batch 3": pipe.featurize(images, config(), progress=False,
                                                             output_dir=tmp_path / "one", shard_rows=SHARD_ROWS)}
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        stores["1 process, 2 threads, batch 5"] = pipe.featurize(images, config(batch_size=5), progress=False,
                                                                 output_dir=tmp_path / "threads", shard_rows=SHARD_ROWS)
    finally:
        torch.set_num_threads(threads)
    script = textwrap.dedent("""
        import sys, torch
        sys.path.insert(0, sys.argv[2])
        from tiny_pipelines import tiny_ddpm_pipeline
        from diffusers_attribution import AttributionConfig, enable_attribution
        config = AttributionConfig(method="d-trak", num_timesteps=2, projection_dim=8, batch_size=2,
                                   calibration_examples=4, parameters=["conv_in.*", "conv_out.*"])
        images = torch.load(sys.argv[1] + "/images.pt")
        enable_attribution(tiny_ddpm_pipeline()).featurize(images, config, progress=False,
                                                           output_dir=sys.argv[1] + "/two", shard_rows=4)
    """)
    (tmp_path / "two.py").write_text(script)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "2", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), str(tmp_path / "two.py"), str(tmp_path), str(ROOT / "tests")]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    stores["2 processes, 2 threads, batch 2"] = FeatureStore.from_pretrained(tmp_path / "two", verify=True)
    first = stores["1 process, 1 thread, batch 3"]
    for label, store in stores.items():
        assert store.config.feature_hash() == first.config.feature_hash(), label
        assert sorted(store.projection_state) == sorted(first.projection_state), label
        for key, basis in first.projection_state.items():
            torch.testing.assert_close(store.projection_state[key], basis, rtol=1e-4, atol=1e-5, msg=f"{label}: {key}")
        torch.testing.assert_close(store.features, first.features, rtol=1e-4, atol=1e-5, msg=label)
        torch.testing.assert_close(store.kernel, first.kernel, rtol=1e-4, atol=1e-6, msg=label)


# ---------------------------------------------------------------------------------------------- numbers, images


def test_damping_must_be_finite_and_positive(reference, queries):
    for bad in [float("nan"), float("inf"), 0.0, -1.0]:
        with pytest.raises(ValueError, match="damping must be a finite number > 0"):
            AttributionConfig(damping=bad)
        with pytest.raises(ValueError, match="damping must be a finite number > 0"):
            make_scorer(reference, damping=bad)
        with pytest.raises(ValueError, match="damping"):
            KernelScorer(torch.randn(4, 2), damping=bad)
    with pytest.raises(ValueError, match="damping_ratio must be a finite number > 0"):
        make_scorer(reference, damping_ratio=float("nan"))
    rank_one = torch.ones(20, 1) @ torch.randn(1, 5, generator=torch.Generator().manual_seed(0))  # rank 1 of 5
    with pytest.raises(ValueError, match=r"singular or ill-conditioned .*use a damping of at least"):
        KernelScorer(rank_one, damping=1e-300)
    assert torch.isfinite(KernelScorer(rank_one, damping_ratio=0.1).scores(torch.randn(2, 5))).all()


def test_pil_images_by_bit_depth():
    from diffusers_attribution.data import to_image_tensor

    values = np.array([[0, 65535], [32768, 1000]], dtype=np.uint16)
    sixteen = to_image_tensor(PIL.Image.fromarray(values))
    torch.testing.assert_close(sixteen, torch.from_numpy(values / 65535 * 2 - 1).float()[None])
    binary = to_image_tensor(PIL.Image.fromarray(np.array([[True, False]])))
    assert binary.tolist() == [[[1.0, -1.0]]]
    eight = to_image_tensor(PIL.Image.fromarray(np.array([[0, 255]], dtype=np.uint8)))
    assert eight.tolist() == [[[-1.0, 1.0]]]
    with pytest.raises(InvalidImageError, match="mode 'I'"):
        to_image_tensor(PIL.Image.fromarray(np.array([[0, 70000]], dtype=np.int32)))
    with pytest.raises(InvalidImageError, match="mode 'F'"):
        to_image_tensor(PIL.Image.fromarray(np.array([[0, 3.5]], dtype=np.float32)))


def test_image_grid_checks_the_dataset(reference, pipe, images):
    result = pipe.attribute(images[:2], reference, progress=False)
    assert result.to_image_grid(images, k=2).size[0] > 0
    other = images.clone()
    other[result.topk(1).indices[0, 0]] *= -1
    with pytest.raises(StoreMismatchError, match="is not the one that was scored"):
        result.to_image_grid(other, k=2)


def test_non_finite_features_name_the_example_and_parameter(images):
    broken = enable_attribution(tiny_ddpm_pipeline())
    with torch.no_grad():
        broken.unet.conv_out.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteFeaturesError, match="weight conv_out.weight is not finite"):
        broken.featurize(images, config(), progress=False)
    with pytest.raises(NonFiniteFeaturesError, match="example 0 has NaN .*weight conv_out.weight is not finite"):
        broken.featurize(images[:4], config(method="tracin", calibration_examples=0), progress=False)
    overflowing = enable_attribution(tiny_ddpm_pipeline())
    with torch.no_grad():
        overflowing.unet.conv_in.weight.mul_(1e37)
    with pytest.raises(NonFiniteFeaturesError, match="example 0 has NaN or infinite features: the gradient of "
                                                     "parameter conv_in.weight is not finite"):
        overflowing.featurize(images, config(calibration_examples=0), progress=False)


# ---------------------------------------------------------------------------------------------- fuzz


WRONG_VALUES = [None, 0, -1, 1, 5, 1.5, 10**12, True, "", "x", "../x", "/etc/passwd", [], {}, [1], {"a": 1},
                "features-00000-of-00004.safetensors", "kernel.safetensors", "0" * 64, "0123456789abcdef"]


def _nodes(value, path=()):
    yield path, value
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _nodes(item, path + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _nodes(item, path + (index,))


def _parent(header, path):
    for part in path[:-1]:
        header = header[part]
    return header


def _mutate(directory: Path, rng: random.Random, outside: Path) -> str:
    """One seeded mutation of the store in `directory`; returns what it did."""
    files = sorted(p.name for p in directory.iterdir() if not p.name.startswith("."))
    try:
        header = json.loads((directory / "config.json").read_text())
        assert isinstance(header, dict) and header
    except (OSError, ValueError, AssertionError):  # an earlier mutation broke it: mutate the files
        header = None
    kind = rng.choice(["delete", "retype", "nudge", "swap-values", "unknown-key", "rename", "swap-files", "truncate",
                       "append", "flip", "symlink", "replace-config", "reorder-shards"])
    if header is None or "shards" not in header or not isinstance(header["shards"], list):
        kind = rng.choice(["rename", "swap-files", "truncate", "append", "flip", "symlink"])
    nodes = [(path, value) for path, value in _nodes(header) if path]
    if kind in ("delete", "retype", "nudge", "swap-values"):
        path, value = rng.choice(nodes)
        parent = _parent(header, path)
        if kind == "delete":
            del parent[path[-1]]
        elif kind == "retype":
            parent[path[-1]] = rng.choice(WRONG_VALUES)
        elif kind == "nudge":
            ints = [(p, v) for p, v in nodes if type(v) is int] or nodes
            path, value = rng.choice(ints)
            value = value if type(value) is int else 0
            _parent(header, path)[path[-1]] = value + rng.choice([-1, 1])
        else:
            other, other_value = rng.choice(nodes)
            parent[path[-1]] = other_value
            if other[:-1] != path[:len(other) - 1] or len(other) <= len(path):
                with contextlib.suppress(KeyError, IndexError, TypeError):
                    _parent(header, other)[other[-1]] = value
        (directory / "config.json").write_text(json.dumps(header))
        return f"{kind} {'.'.join(map(str, path))}"
    if kind == "unknown-key":
        header[f"extra_{rng.randrange(100)}"] = rng.choice(WRONG_VALUES)
        (directory / "config.json").write_text(json.dumps(header))
        return kind
    if kind == "reorder-shards":
        rng.shuffle(header["shards"])
        (directory / "config.json").write_text(json.dumps(header))
        return kind
    if kind == "replace-config":
        (directory / "config.json").write_text(rng.choice(["null", "[]", "1", '"x"', "{}", "", "{", "\xff\xfe"]))
        return kind
    name = rng.choice(files)
    path = directory / name
    if kind == "rename":
        target = rng.choice([n for n in files if n != name] + ["renamed.safetensors"])
        os.replace(path, directory / target)
        return f"rename {name} -> {target}"
    if kind == "swap-files":
        other = directory / rng.choice([n for n in files if n != name])
        os.replace(path, directory / ".swap")
        os.replace(other, path)
        os.replace(directory / ".swap", other)
        return f"swap {name} {other.name}"
    data = path.read_bytes()
    if kind == "truncate":
        path.write_bytes(data[: rng.randrange(len(data))])
    elif kind == "append":
        path.write_bytes(data + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 16))))
    elif kind == "flip":
        flipped = bytearray(data)
        flipped[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(flipped))
    else:  # a symlink to an outside copy with the very same bytes
        copy = outside / f"{rng.randrange(10**9)}-{name}"
        copy.write_bytes(data)
        path.unlink()
        os.symlink(copy, path)
    return f"{kind} {name}"


def test_fuzzed_stores_score_exactly_or_are_refused(reference, queries, tmp_path, monkeypatch):
    """300 seeded mutations of a real store: each load + score gives exactly the original scores or raises
    `CorruptStoreError` / `StoreMismatchError`, never another error, never other scores, never a read outside.
    Scores use an explicit damping λ = 1: the store's damping fields only choose a default λ (score-role, not features)."""
    expected = load_and_score(reference.directory, queries)
    rng = random.Random(13)
    outside = tmp_path / "outside"
    outside.mkdir()
    outcomes: dict[str, int] = {"refused": 0, "identical": 0}
    for trial in range(300):
        directory = copy_store(reference, tmp_path / f"m{trial}")
        what = [_mutate(directory, rng, outside) for _ in range(rng.choice([1, 1, 1, 2]))]
        with watched_reads(monkeypatch) as reads:
            try:
                scores = load_and_score(directory, queries)
            except (CorruptStoreError, StoreMismatchError):
                outcomes["refused"] += 1
            else:
                assert torch.equal(scores, expected), f"trial {trial} ({what}) scored differently"
                outcomes["identical"] += 1
        assert_inside(reads, directory, outside)
        shutil.rmtree(directory)
    print(f"fuzz: {sum(outcomes.values())} mutations tried: {outcomes['refused']} refused, "
          f"{outcomes['identical']} scored exactly as the original")
    assert outcomes["refused"] > 200 and outcomes["identical"] > 5


# ---------------------------------------------------------------------------------------------- issue 25.5


@pytest.mark.parametrize("payload", ['x"); __import__("os").system("id"); ("', "x'); __import__('os').system('id'); ('",
                                     'x\\"); __import__("os").system("id")  # \n```\n<script>', "a\"'``` b"])
def test_store_card_snippets_hold_names_as_literals(reference, payload):
    """Issue 25.5: base_model and the repo id went into the card's copy-paste code as "...": a crafted base_model
    gave `from_pretrained("x"); __import__("os").system("id"); ("")`. Every Python block of the card must parse,
    call nothing but the card's own functions, and pass the names as string constants equal to them."""
    import ast
    import re

    from diffusers_attribution.store.hub import store_card

    header = json.loads((reference.directory / "config.json").read_text())
    header["base_model"] = payload
    for card in (str(store_card(header, location=payload)), str(store_card(header, repo_id="me/store"))):
        blocks = re.findall(r"^(`{3,})python\n(.*?)^\1$", card, flags=re.S | re.M)
        assert len(blocks) == 2, card
        calls, constants = set(), []
        for _, code in blocks:
            tree = ast.parse(code.replace("\n    ...", "\n    pass"))
            for node in ast.walk(tree):
                if isinstance(node, ast.Call):
                    function = node.func
                    calls.add(function.attr if isinstance(function, ast.Attribute) else function.id)
                    constants += [arg.value for arg in node.args if isinstance(arg, ast.Constant)]
        assert calls == {"enable_attribution", "from_pretrained", "attribute", "topk", "blocks"}, calls
        assert payload in constants
        assert "<script>" not in card.split("## Use")[1].split("## Files")[0].replace(repr(payload), "")
