"""The command line end to end, each subcommand in its own interpreter, on a tiny DDPM and 12 PNG digits:
featurize a folder of PNGs, attribute a PNG against the store (the printed top-k is `pipe.attribute`'s), info,
push to the test Hub server (tests/hub_server.py) and read it back; `--help` imports no torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hub_server import LocalHub  # noqa: E402
from tiny_pipelines import tiny_ddpm_pipeline  # noqa: E402

from diffusers_attribution import FeatureStore, __version__, enable_attribution  # noqa: E402
from diffusers_attribution.cli import main  # noqa: E402
from diffusers_attribution.demo.digits import load_digits_images  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["--method", "trak", "--num-timesteps", "2", "--projection-dim", "32", "--calibration-examples", "4",
         "--batch-size", "4", "--noise-seed", "3"]


def cli(*args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """`python -m diffusers_attribution ARGS` in a fresh interpreter that imports this checkout."""
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
                   **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "diffusers_attribution", *args], capture_output=True, text=True,
                          env=environment, timeout=300)
    if check:
        assert proc.returncode == 0, f"{args}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return proc


def png(tensor: torch.Tensor, path: Path) -> Path:
    """A [1, 8, 8] image in [-1, 1] as an 8-bit grayscale PNG."""
    pixels = ((tensor[0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    Image.fromarray(pixels, mode="L").save(path)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A saved tiny DDPM, a folder of 12 PNG digits, two query PNGs, and the store the CLI featurized."""
    root = tmp_path_factory.mktemp("cli")
    tiny_ddpm_pipeline(seed=1).save_pretrained(root / "pipe")
    (root / "train").mkdir()
    for index, image in enumerate(load_digits_images(12, seed=5)):
        png(image, root / "train" / f"{index:02d}.png")
    (root / "queries").mkdir()
    queries = [png(image, root / "queries" / f"q{i}.png") for i, image in enumerate(load_digits_images(2, seed=9))]
    env = {"HF_DATASETS_CACHE": str(root / "datasets-cache"), "HF_HOME": str(root / "hf-home")}
    proc = cli("featurize", "--pipeline", str(root / "pipe"), "--dataset", str(root / "train"), "--out",
               str(root / "store"), *FLAGS, env=env)
    return root, queries, env, proc


def test_featurize_folder_of_pngs(setup):
    root, _, _, proc = setup
    assert "wrote FeatureStore(N=12, k=32" in proc.stdout
    assert f"loading pipeline {root / 'pipe'}" in proc.stderr
    assert "calibrating projection (one pass" in proc.stderr  # the energies from the kept coordinates (issue 17)
    store = FeatureStore.from_pretrained(root / "store", verify=True)
    config = store.config
    assert (config.method, config.num_timesteps, config.projection_dim, config.calibration_examples,
            config.batch_size, config.noise_seed) == ("trak", 2, 32, 4, 4, 3)
    assert store.metadata["dataset_name"] == str(root / "train")
    assert store.metadata["base_model"] == str(root / "pipe")


def test_attribute_png_matches_pipe_attribute(setup):
    root, queries, env, _ = setup
    proc = cli("attribute", *map(str, queries), "--store", str(root / "store"), "--topk", "3", "--json",
               "--grid", str(root / "grid.png"), env=env)
    printed = json.loads(proc.stdout)
    assert printed["method"] == "trak" and printed["num_train"] == 12 and printed["pipeline"] == str(root / "pipe")

    from diffusers import DiffusionPipeline

    pipe = enable_attribution(DiffusionPipeline.from_pretrained(root / "pipe"))
    images = [Image.open(path).convert("L") for path in queries]
    expected = pipe.attribute(images, FeatureStore.from_pretrained(root / "store"), progress=False).topk(3)
    for row, path, indices, scores in zip(printed["results"], queries, expected.indices.tolist(),
                                          expected.scores.tolist()):
        assert row["image"] == str(path)
        assert [entry["index"] for entry in row["topk"]] == indices
        assert [entry["rank"] for entry in row["topk"]] == [1, 2, 3]
        torch.testing.assert_close([entry["score"] for entry in row["topk"]], scores, rtol=1e-5, atol=1e-8)
    grid = Image.open(root / "grid.png")
    assert grid.width > 4 * 64 and grid.height > 2 * 64  # 2 queries beside 3 training images each

    # The table form (in this process: same code path after parsing) lists the same indices, rank by rank.
    table = _run_in_process(["attribute", str(root / "queries"), "--store", str(root / "store"), "--topk", "3",
                             "--no-progress"])
    lines = table.strip().splitlines()
    assert lines[0].split() == ["image", "rank", "train_index", "score"]
    listed = [int(line.split()[2]) for line in lines[1:]]
    assert listed == [index for indices in expected.indices.tolist() for index in indices]


def test_info(setup):
    root, _, _, _ = setup
    text = cli("info", str(root / "store")).stdout
    assert "N = 12" in text and "k = 32" in text and "trak" in text and "calibrated on 4 examples" in text
    header = json.loads((root / "store" / "config.json").read_text())
    assert header["dataset_fingerprint"] in text
    on_disk = sum(p.stat().st_size for p in (root / "store").iterdir() if p.is_file())
    assert f"on disk       {on_disk / 1024:.1f} KB" in text
    assert json.loads(cli("info", str(root / "store"), "--json").stdout) == header


def test_push_to_the_test_hub_and_read_it_back(setup):
    root, queries, env, _ = setup
    grid = root / "push-grid.png"
    Image.new("RGB", (32, 16), "white").save(grid)
    with LocalHub() as hub:
        proc = cli("push", str(root / "store"), "tester/tiny-features", "--endpoint", hub.endpoint, "--token", "test",
                   "--private", "--grid", str(grid), "--license", "apache-2.0", env=env)
        assert "pushed" in proc.stdout

        from huggingface_hub import HfApi

        api = HfApi(endpoint=hub.endpoint, token="test")
        files = set(api.list_repo_files("tester/tiny-features", repo_type="dataset"))
        header = json.loads((root / "store" / "config.json").read_text())
        expected = {"config.json", "README.md", "attribution_grid.png", *(s["file"] for s in header["shards"])}
        expected |= {entry["file"] for entry in (header["kernel"], *header["fitted"].values()) if isinstance(entry, dict)}
        assert files == expected
        assert api.repo_info("tester/tiny-features", repo_type="dataset").private
        card = Path(api.hf_hub_download("tester/tiny-features", "README.md", repo_type="dataset",
                                        cache_dir=str(root / "card-cache"))).read_text()
        assert "# Attribution features: tester/tiny-features" in card
        assert 'pipe.attribute(images, "tester/tiny-features")' in card and "path/to/store" not in card
        assert "![Attribution grid](attribution_grid.png)" in card and "license: apache-2.0" in card

        # info and attribute read the store back from the Hub in fresh interpreters.
        info = cli("info", "tester/tiny-features", "--endpoint", hub.endpoint, "--token", "test", env=env).stdout
        assert "N = 12" in info and "(Hub) config.json only" in info
        printed = json.loads(cli("attribute", str(queries[0]), "--store", "tester/tiny-features", "--endpoint",
                                 hub.endpoint, "--token", "test", "--topk", "3", "--json", env=env).stdout)
    local = json.loads(cli("attribute", str(queries[0]), "--store", str(root / "store"), "--topk", "3", "--json",
                           env=env).stdout)
    assert printed["results"][0]["topk"] == local["results"][0]["topk"]


def test_help_and_version_import_no_torch():
    code = ("import sys\nfrom diffusers_attribution.cli import main\n"
            "for argv in (['--help'], ['--version'], *([name, '--help'] for name in "
            "('demo', 'featurize', 'attribute', 'info', 'push', 'explore'))):\n"
            "    try:\n        main(argv)\n    except SystemExit as e:\n        assert e.code == 0, (argv, e.code)\n"
            "heavy = sorted(m for m in ('torch', 'diffusers', 'transformers', 'numpy', 'datasets', 'gradio') "
            "if m in sys.modules)\n"
            "print('HEAVY', heavy)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "HEAVY []"
    assert f"diffusers-attribution {__version__}" in proc.stdout
    for flag in ("--method", "--num-timesteps", "--projection-dim", "--projector", "--device", "--dtype",
                 "--parameters", "--adapter-name", "--batch-size", "--noise-seed", "--config"):
        assert flag in proc.stdout


def test_bad_input_is_named(setup, tmp_path):
    root, queries, env, _ = setup
    proc = cli("featurize", "--pipeline", "p", "--dataset", "d", "--out", "o", "--method", "nope", check=False)
    assert proc.returncode == 1 and "AttributionConfig.method='nope' is not one of" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "Traceback" not in _run_in_process_error(["attribute", str(tmp_path / "missing.png"), "--store",
                                                     str(root / "store")], "no image file or folder")
    proc = cli("attribute", str(queries[0]), "--store", str(root / "store"), "--num-timesteps", "5", env=env,
               check=False)
    assert proc.returncode == 1 and "StoreMismatchError: store config differs" in proc.stderr
    assert "num_timesteps" in proc.stderr and "Traceback" not in proc.stderr
    bad = tmp_path / "bad.json"
    bad.write_text('{"projection_dims": 8}')
    assert "projection_dims" in _run_in_process_error(["featurize", "--pipeline", "p", "--dataset", "d", "--out", "o",
                                                       "--config", str(bad)], "Unknown AttributionConfig fields")


def _run_in_process(argv: list[str]) -> str:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        assert main(argv) == 0
    return out.getvalue()


def _run_in_process_error(argv: list[str], expected: str) -> str:
    """The error message `main(argv)` stops with (exit status 1, no traceback), which must contain `expected`."""
    import contextlib
    import io

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            status = main(argv)
    except SystemExit as error:
        status, message = error.code, str(error.code)
    else:
        message = err.getvalue()
    assert status not in (0, None), f"{argv} did not fail"
    assert expected in message, message
    return message


# ---------------------------------------------------------------------------------------------- issue 25.4


def _copy_store(root: Path, where: Path) -> Path:
    import shutil

    return Path(shutil.copytree(root / "store", where, symlinks=True))


def test_info_checks_the_store_as_loading_does(setup, tmp_path):
    """Issue 25.4: info skipped the schema and symlink checks (a config.json linked to a secret printed it with
    --json); malformed stores gave AttributeError / RecursionError; a bare {"format_version": 2} was a store."""
    root, _, _, _ = setup
    secret = tmp_path / "secret.json"
    secret.write_text('{"format_version": 2, "password": "hunter2", "shards": []}')
    linked = _copy_store(root, tmp_path / "linked")
    (linked / "config.json").unlink()
    (linked / "config.json").symlink_to(secret)
    message = _run_in_process_error(["info", str(linked), "--json"], "symbolic link")
    assert "hunter2" not in message
    proc = cli("info", str(linked), "--json", check=False)
    assert proc.returncode == 1 and "hunter2" not in proc.stdout + proc.stderr and "Traceback" not in proc.stderr
    for name, text, expected in (
            ("bare", '{"format_version": 2}', "config is missing"),
            ("deep", "[" * 100_000 + "]" * 100_000, "nests 100000 levels deep"),
            ("list", "[]", "expected a JSON object"),
            ("typed", json.dumps({**json.loads((root / "store" / "config.json").read_text()), "shards": 5}),
             "shards must be a non-empty list")):
        store = _copy_store(root, tmp_path / name)
        (store / "config.json").write_text(text)
        message = _run_in_process_error(["info", str(store)], expected)
        assert "CorruptStoreError" in message and len(message.strip().splitlines()) == 1
    shard = _copy_store(root, tmp_path / "shard-link")  # a listed file linked out of the folder, as loading refuses
    name = json.loads((shard / "config.json").read_text())["shards"][0]["file"]
    (tmp_path / "elsewhere.safetensors").write_bytes((shard / name).read_bytes())
    (shard / name).unlink()
    (shard / name).symlink_to(tmp_path / "elsewhere.safetensors")
    _run_in_process_error(["info", str(shard)], "symbolic link")
    proc = cli("info", str(tmp_path / "bare"), check=False)
    assert proc.returncode == 1 and "config is missing" in proc.stderr and "Traceback" not in proc.stderr


def test_info_verify_downloads_only_the_listed_files(setup, tmp_path):
    """Issue 25.4: `info REPO --verify` downloaded every file of the repository (a 30 MB blob and a .py)."""
    root, _, env, _ = setup
    from huggingface_hub import HfApi

    extra = tmp_path / "upload"
    _copy_store(root, extra)
    (extra / "blob.bin").write_bytes(os.urandom(2 << 20))
    (extra / "evil.py").write_text("import os; os.system('id')\n")
    with LocalHub() as hub:
        api = HfApi(endpoint=hub.endpoint, token="test")
        api.create_repo("tester/extra", repo_type="dataset")
        api.upload_folder(repo_id="tester/extra", repo_type="dataset", folder_path=extra)
        home = tmp_path / "hf-home"
        proc = cli("info", "tester/extra", "--verify", "--endpoint", hub.endpoint, "--token", "test",
                   env={**env, "HF_HOME": str(home)})
    assert "every sha256 checked" in proc.stdout
    fetched = {path.name for path in home.rglob("*") if "snapshots" in path.parts and not path.is_dir()}
    listed = {"config.json", *(p.name for p in (root / "store").iterdir() if p.name.endswith(".safetensors"))}
    assert listed <= fetched and not {"blob.bin", "evil.py"} & fetched, fetched
    assert sum(p.stat().st_size for p in home.rglob("*") if p.is_file()) < 2 << 20


def test_attribute_refuses_hostile_images_and_escapes_names(setup, tmp_path):
    """Issue 25.4: a decompression-bomb PNG raised an uncaught DecompressionBombError; a symbolic link in a query
    folder pointing outside it was followed; a file name with a newline forged a row of the table; 16-bit PNGs
    were clipped to 8 bits."""
    import struct
    import zlib

    root, queries, _, _ = setup

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    bomb = tmp_path / "bomb.png"  # 100000² gray pixels claimed by a 100-byte file
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 100000, 100000, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    store = ["--store", str(root / "store"), "--no-progress"]
    message = _run_in_process_error(["attribute", str(bomb), *store], "decompression bomb")
    assert "Traceback" not in message
    wide = tmp_path / "wide.tif"  # 32-bit integers: refused, as the Python API refuses them (16-bit ones are scaled)
    Image.fromarray((torch.arange(64).reshape(8, 8) * 100000).numpy().astype("int32")).save(wide)
    _run_in_process_error(["attribute", str(wide), *store], "16 or 32 bits")

    folder = tmp_path / "queries"
    folder.mkdir()
    (folder / "q0.png").write_bytes(queries[0].read_bytes())
    outside = tmp_path / "outside.png"
    outside.write_bytes(queries[1].read_bytes())
    (folder / "link.png").symlink_to(outside)
    _run_in_process_error(["attribute", str(folder), *store], "is a symbolic link out of")
    (folder / "link.png").unlink()

    forged = folder / "z.png\nforged.png     1        99999  1e+09.png"
    forged.write_bytes(queries[1].read_bytes())
    table = _run_in_process(["attribute", str(folder), *store, "--topk", "1"])
    lines = table.strip().splitlines()
    assert len(lines) == 3 and not any(line.startswith("forged") for line in lines)
    assert "z.png\\nforged.png" in lines[2]
