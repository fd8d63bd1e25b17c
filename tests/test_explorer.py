"""The attribution explorer (Gradio app) on a tiny DDPM and 24 sklearn digits, served on 127.0.0.1 and driven
with gradio's Python client and a headless Chromium: what the page shows is `pipe.attribute`'s top-k (and
`pipe.attribute_trajectory`'s per step), bad input shows the library's message, and the Space export is
complete. No network: gradio's analytics are off and the browser resolves nothing but 127.0.0.1."""

import argparse
import ast
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

gradio_client = pytest.importorskip("gradio_client")
pytest.importorskip("gradio")

from diffusers_attribution import (  # noqa: E402
    AttributionConfig,
    FeatureStore,
    InvalidImageError,
    StoreMismatchError,
    enable_attribution,
)
from diffusers_attribution.demo.digits import load_digits_dataset  # noqa: E402
from diffusers_attribution.evaluation.bias import generally_influential  # noqa: E402
from diffusers_attribution.explorer import (  # noqa: E402
    Explorer,
    add_explore_parser,
    export_space,
    launch_explorer,
    load_dataset,
)
from diffusers_attribution.store.hub import store_card  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from hub_server import LocalHub  # noqa: E402
from tiny_pipelines import tiny_ddpm_pipeline  # noqa: E402

K = 5
N = 24
NAME = "trak"  # the app's name for the store
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
SCREENSHOT = os.environ.get("EXPLORER_SCREENSHOT")  # e.g. docs/images/explorer.png, to refresh the docs picture


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def save_png(image: torch.Tensor, path: Path) -> Path:
    """[1, H, W] in [-1, 1] → an 8-bit grayscale PNG."""
    pixels = ((image[0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    PIL.Image.fromarray(pixels, mode="L").save(path)
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("explorer")


@pytest.fixture(scope="module")
def pipe():
    return enable_attribution(tiny_ddpm_pipeline())


@pytest.fixture(scope="module")
def dataset_dir(workdir):
    """24 digits with a caption column, as a `datasets.save_to_disk` folder (what `explore --dataset` reads)."""
    dataset = load_digits_dataset(N)
    dataset = dataset.add_column("text", [f"a handwritten {label}" for label in dataset["label"]])
    dataset.save_to_disk(str(workdir / "digits"))
    return workdir / "digits"


def featurize_store(pipe, dataset_dir, directory, method="trak"):
    """A store of the 24 digits on disk (sharded writer), k = 64, 2 timesteps."""
    config = AttributionConfig(method=method, num_timesteps=2, projector="gaussian", projection_dim=64, batch_size=N)
    pipe.featurize(load_dataset(dataset_dir), config, progress=False, output_dir=directory,
                   dataset_name="sklearn digits (24)")
    return directory


@pytest.fixture(scope="module")
def store_dir(pipe, dataset_dir, workdir):
    return featurize_store(pipe, dataset_dir, workdir / "store")


@pytest.fixture(scope="module")
def dtrak_dir(pipe, dataset_dir, workdir):
    """A second method's store over the same training set (the app's store B)."""
    return featurize_store(pipe, dataset_dir, workdir / "dtrak", "d-trak")


@pytest.fixture(scope="module")
def other_store_dir(dataset_dir, workdir):
    """The same training set featurized with another model (seed 1): a store that does not match the pipeline."""
    return featurize_store(enable_attribution(tiny_ddpm_pipeline(seed=1)), dataset_dir, workdir / "other-store")


@pytest.fixture(scope="module")
def app(pipe, store_dir, dtrak_dir, dataset_dir):
    port = free_port()
    demo = launch_explorer({NAME: str(store_dir), "d-trak": str(dtrak_dir)}, load_dataset(dataset_dir), pipe, port=port,
                           block=False, k=K, store_root=store_dir.parent)
    yield demo, f"http://127.0.0.1:{port}/"
    demo.close()


@pytest.fixture(scope="module")
def client(app):
    return gradio_client.Client(app[1], verbose=False, download_files=False)


@pytest.fixture(scope="module")
def queries(workdir):
    """Three query PNGs: digits drawn with another seed than the training set's."""
    images = load_digits_dataset(60, seed=1)
    paths = []
    for i in range(3):
        path = workdir / f"query{i}.png"
        images[i]["image"].save(path)
        paths.append(path)
    return paths


def expected_topk(pipe, store_dir, path, k=K):
    result = pipe.attribute(PIL.Image.open(path), str(store_dir), progress=False)
    return result, result.topk(k)


def table_rows(value):
    return value["data"] if isinstance(value, dict) else value


def test_upload_gives_exactly_pipe_attribute_topk(app, client, pipe, store_dir, queries):
    name = NAME
    for path in queries:
        out = client.predict(gradio_client.handle_file(str(path)), K, name, "(none)", api_name="/attribute")
        gallery, table, _, files = out[:4]
        result, best = expected_topk(pipe, store_dir, path)
        rows = table_rows(table)
        assert [row[1] for row in rows] == best.indices[0].tolist()
        np.testing.assert_allclose([row[2] for row in rows], best.scores[0].numpy(), rtol=1e-6)
        assert [row[0] for row in rows] == list(range(1, K + 1))
        data = app[0].explorer.data
        assert [row[3] for row in rows] == [data[i][1] for i in best.indices[0].tolist()]
        # The gallery holds the training images themselves (upscaled tiles, lossless PNG), best first.
        assert len(gallery) == K
        for item, index in zip(gallery, best.indices[0].tolist()):
            shown = np.asarray(PIL.Image.open(item["image"]["path"]).convert("L"))
            expected = np.asarray(app[0].explorer.tile(data[index][0]).convert("L"))
            np.testing.assert_array_equal(shown, expected)
            assert item["caption"].startswith(f"#{index} ")
        # Downloads: every training example's score in the JSON, best first in the CSV, and the grid PNG.
        by_name = {Path(entry["path"] if isinstance(entry, dict) else entry).name: entry for entry in files}
        path_of = {key: Path(value["path"] if isinstance(value, dict) else value) for key, value in by_name.items()}
        payload = json.loads(path_of["result.json"].read_text())
        np.testing.assert_allclose(payload["scores"], result.scores[0].numpy(), rtol=1e-6)
        assert [row["index"] for row in payload["topk"]] == best.indices[0].tolist()
        csv_rows = path_of["scores.csv"].read_text().splitlines()
        assert len(csv_rows) == N + 1
        assert [int(line.split(",")[1]) for line in csv_rows[1:]] == result.scores[0].argsort(descending=True).tolist()
        grid = PIL.Image.open(path_of["grid.png"]).convert("RGB")
        assert np.array_equal(np.asarray(grid), np.asarray(result.to_image_grid(data, k=K)))


def test_bad_input_shows_the_library_message(client, pipe, store_dir, other_store_dir, workdir, queries):
    wrong = save_png(torch.zeros(1, 16, 16), workdir / "wrong-size.png")
    with pytest.raises(InvalidImageError) as library:
        pipe.attribute(PIL.Image.open(wrong), str(store_dir), progress=False)
    with pytest.raises(gradio_client.exceptions.AppError) as shown:
        client.predict(gradio_client.handle_file(str(wrong)), K, NAME, "(none)", api_name="/attribute")
    assert str(library.value) in str(shown.value) and "Traceback" not in str(shown.value)
    with pytest.raises(gradio_client.exceptions.AppError, match="no query image"):
        client.predict(None, K, NAME, "(none)", api_name="/attribute")
    # A store from another model loads (same training set) but scoring with it is the library's mismatch error.
    client.predict(str(other_store_dir), api_name="/add_store")
    with pytest.raises(StoreMismatchError) as library:
        pipe.attribute(PIL.Image.open(queries[0]), str(other_store_dir), progress=False)
    with pytest.raises(gradio_client.exceptions.AppError) as shown:
        client.predict(gradio_client.handle_file(str(queries[0])), K, NAME, str(other_store_dir),
                       api_name="/attribute")
    assert "model_fingerprint" in str(shown.value) and str(library.value) in str(shown.value)
    with pytest.raises(gradio_client.exceptions.AppError, match="NotAStoreError: .*not a feature store"):
        client.predict(str(workdir), api_name="/add_store")


def test_two_stores_side_by_side(client, pipe, store_dir, dtrak_dir, queries):
    """Stores of two methods over one training set: each column is that store's own `pipe.attribute`."""
    out = client.predict(gradio_client.handle_file(str(queries[1])), K, NAME, "d-trak", api_name="/attribute")
    tables = []
    for table, store in ((out[1], store_dir), (out[5], dtrak_dir)):
        _, best = expected_topk(pipe, store, queries[1])
        tables.append(table_rows(table))
        assert [row[1] for row in tables[-1]] == best.indices[0].tolist()
        np.testing.assert_allclose([row[2] for row in tables[-1]], best.scores[0].numpy(), rtol=1e-6)
    assert tables[0] != tables[1]


def test_journey_steps_are_attribute_trajectory(client, pipe, store_dir):
    steps, seed = 4, 3
    out = client.predict("", seed, steps, NAME, K, api_name="/generate")
    journey = pipe.attribute_trajectory(seed, str(store_dir), num_inference_steps=steps, progress=False)
    assert journey.scores.shape == (steps, N)
    for step in range(steps):
        x0, _, table = client.predict(step, K, api_name="/step")
        best = journey.scores[step].topk(K)
        assert [row[1] for row in table_rows(table)] == best.indices.tolist()
        np.testing.assert_allclose([row[2] for row in table_rows(table)], best.values.numpy(), rtol=1e-5)
    # The generated image's own top-k: `pipe.attribute` of the sampler's output.
    final = pipe.attribute(journey.final_image, str(store_dir), progress=False).topk(K)
    assert [row[1] for row in table_rows(out[2])] == final.indices[0].tolist()
    assert "Sampled 4 steps" in out[-1]


def test_generally_influential_over_the_session_queries(app, client, pipe, store_dir, queries):
    name = NAME
    app[0].explorer.history[name].clear()
    for path in queries:
        client.predict(gradio_client.handle_file(str(path)), K, name, "(none)", api_name="/attribute")
    scores = torch.cat([pipe.attribute(PIL.Image.open(path), str(store_dir), progress=False).scores for path in queries])
    expected = generally_influential(scores, k=3, share=0.3)
    _, table, gallery, message = client.predict(name, 3, 0.3, api_name="/influence")
    assert [row[0] for row in table_rows(table)] == expected.indices.tolist()
    np.testing.assert_allclose([row[1] for row in table_rows(table)], expected.frequency[expected.indices].numpy())
    assert len(gallery) == expected.count and f"of the {len(queries)} queries" in message


def test_explorer_checks_the_dataset_and_needs_a_model(pipe, store_dir, dataset_dir):
    shuffled = load_dataset(dataset_dir).select(list(reversed(range(N))))
    with pytest.raises(StoreMismatchError, match="training example 0 differs"):
        Explorer(str(store_dir), shuffled, pipe)
    with pytest.raises(ValueError, match="does not record the model"):  # an in-memory tiny pipe has no name_or_path
        Explorer(str(store_dir), load_dataset(dataset_dir), None)


def test_explore_command(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_explore_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["explore", "--store", "a", "--store", "b", "--dataset", "d"])
    assert args.store == ["a", "b"] and args.host == "127.0.0.1" and args.share is False and args.port is None
    args = parser.parse_args(["explore", "--store", "me/store", "--dataset", "me/data", "--export-space", str(tmp_path)])
    assert args.func(args) == 0 and "wrote" in capsys.readouterr().out
    assert sorted(path.name for path in tmp_path.iterdir()) == ["README.md", "app.py", "requirements.txt"]
    constants = {node.targets[0].id: ast.literal_eval(node.value) for node in ast.parse((tmp_path / "app.py").read_text()).body
                 if isinstance(node, ast.Assign) and node.targets[0].id.isupper()}
    assert (constants["STORES"], constants["DATASET"], constants["PIPELINE"]) == (["me/store"], "me/data", None)


def test_export_space_runs_against_the_hub(pipe, store_dir, dataset_dir, workdir):
    """The exported Space: a card with Gradio metadata, and an app.py that builds the explorer from Hub repo ids
    (here the test Hub server), in a fresh process, as the Space would; the store card links to the Space."""
    from huggingface_hub import HfApi, SpaceCard

    from diffusers_attribution import FeatureStore

    with pytest.raises(ValueError, match="not a Hub repo id"):
        export_space(workdir / "nope", str(store_dir), "tester/digits")
    images = workdir / "imagefolder"
    images.mkdir()
    dataset = load_dataset(dataset_dir)
    lines = ["file_name,text"]
    for i, item in enumerate(dataset):
        item["image"].save(images / f"{i:03d}.png")
        lines.append(f"{i:03d}.png,{item['text']}")
    (images / "metadata.csv").write_text("\n".join(lines) + "\n")
    pipe.save_pretrained(workdir / "pipeline")
    with LocalHub() as hub:
        api = HfApi(endpoint=hub.endpoint, token="test")
        FeatureStore.from_pretrained(store_dir).push_to_hub("tester/store", token="test", endpoint=hub.endpoint)
        api.create_repo("tester/digits", repo_type="dataset")
        api.upload_folder(repo_id="tester/digits", repo_type="dataset", folder_path=images)
        api.create_repo("tester/tiny-ddpm")
        api.upload_folder(repo_id="tester/tiny-ddpm", folder_path=workdir / "pipeline")
        space = workdir / "space"
        paths = export_space(space, "tester/store", "tester/digits", "tester/tiny-ddpm", space_id="tester/explorer",
                             endpoint=hub.endpoint)
        assert sorted(path.name for path in paths) == ["README.md", "app.py", "requirements.txt", "store-README.md"]
        card = SpaceCard.load(space / "README.md").data
        assert card.sdk == "gradio" and card.app_file == "app.py" and card.sdk_version
        assert card.datasets == ["tester/store", "tester/digits"] and card.models == ["tester/tiny-ddpm"]
        assert "gradio==" in (space / "requirements.txt").read_text()
        assert "https://huggingface.co/spaces/tester/explorer" in (space / "store-README.md").read_text()
        ast.parse((space / "app.py").read_text())
        # A fresh process: the explore command's parser imports neither torch nor gradio, the explorer's core no
        # gradio; running app.py builds the app.
        script = ("import runpy, sys; from diffusers_attribution.explorer import add_explore_parser; "
                  "assert 'torch' not in sys.modules and 'gradio' not in sys.modules; "
                  "from diffusers_attribution.explorer import Explorer; assert 'gradio' not in sys.modules; "
                  "ns = runpy.run_path(sys.argv[1]); e = ns['demo'].explorer; "
                  "print(type(ns['demo']).__name__, list(e.stores), len(e.data))")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "HF_ENDPOINT": hub.endpoint, "HF_TOKEN": "test",
               "HF_HOME": str(workdir / "hf_home"), "HF_HUB_DISABLE_TELEMETRY": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
        proc = subprocess.run([sys.executable, "-c", script, str(space / "app.py")], env=env, capture_output=True,
                              text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == f"Blocks ['tester/store'] {N}"


# ---------------------------------------------------------------------------------------------- issue 25.3


def png_header_only(width: int, height: int, path: Path) -> Path:
    """A valid PNG header of width × height 8-bit gray pixels with almost no data (a 'decompression bomb' that
    PIL opens by its header; decoding it in full would allocate width · height bytes)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def test_add_store_takes_hub_ids_and_folders_under_the_store_root_only(app, client, store_dir, workdir, tmp_path,
                                                                      monkeypatch):
    """Issue 25.3: any visitor could load any server path; errors told which folders exist; relative paths resolved
    against the server's working folder."""
    explorer = app[0].explorer
    assert explorer.store_root == Path(os.path.realpath(store_dir.parent))
    outside = tmp_path / "outside-store"
    shutil.copytree(store_dir, outside)
    (store_dir.parent / "link-out").symlink_to(outside)
    messages = []
    for spec in (str(outside), str(tmp_path), str(tmp_path / "missing"), "/etc", "../" * 12 + "etc", "link-out",
                 "../" + tmp_path.name, "/nonexistent/folder"):
        with pytest.raises(gradio_client.exceptions.AppError) as shown:
            client.predict(spec, api_name="/add_store")
        messages.append(str(shown.value).replace(repr(spec), "SPEC"))
    assert len(set(messages)) == 1, messages  # the same error whether the folder exists or not
    assert "no store SPEC to add: enter a Hub dataset repo id (user/name) or a folder under" in messages[0]
    cwd = os.getcwd()
    try:  # a relative name resolves under the store root, never against the server's working folder
        os.chdir(tmp_path)
        shutil.copytree(store_dir, tmp_path / "cwd-store")
        with pytest.raises(gradio_client.exceptions.AppError, match="no store 'cwd-store' to add"):
            client.predict("cwd-store", api_name="/add_store")
        client.predict(store_dir.name, api_name="/add_store")  # the root's own store, by its relative name
    finally:
        os.chdir(cwd)
    # A Hub repo id is downloaded (download_store), never looked up as a folder of the server's working folder.
    import diffusers_attribution.store.hub as hub_module

    asked = []
    monkeypatch.setattr(hub_module, "download_store", lambda repo: asked.append(repo) or store_dir)
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        (tmp_path / "user").mkdir()
        shutil.copytree(store_dir, tmp_path / "user" / "store")
        session = explorer.new_session()
        assert explorer.add_visitor_store("user/store", session) == "user/store"
    finally:
        os.chdir(cwd)
    assert asked == ["user/store"] and session["stores"]["user/store"].directory == store_dir
    without_root = Explorer.__new__(Explorer)
    without_root.store_root = None
    with pytest.raises(FileNotFoundError, match="local folders cannot be added"):
        without_root.resolve_visitor_store(str(store_dir))
    assert without_root.resolve_visitor_store("user/store") == "user/store"


def test_a_store_added_by_one_visitor_is_theirs_only(app, pipe, other_store_dir, queries):
    first = gradio_client.Client(app[1], verbose=False, download_files=False)
    second = gradio_client.Client(app[1], verbose=False, download_files=False)
    first.predict(other_store_dir.name, api_name="/add_store")
    assert other_store_dir.name not in app[0].explorer.stores
    with pytest.raises(ValueError, match="no store named 'other-store' here"):
        app[0].explorer.store(other_store_dir.name, app[0].explorer.new_session())
    # gradio itself refuses the name for the second visitor (their dropdown never listed it); were it let through,
    # Explorer.store would refuse it: "no store named 'other-store' here".
    with pytest.raises(gradio_client.exceptions.AppError, match="other-store.* not in the list of choices|no store named"):
        second.predict(gradio_client.handle_file(str(queries[0])), K, NAME, other_store_dir.name, api_name="/attribute")
    with pytest.raises(gradio_client.exceptions.AppError, match="model_fingerprint"):  # the first visitor has it
        first.predict(gradio_client.handle_file(str(queries[0])), K, NAME, other_store_dir.name, api_name="/attribute")


def test_uploads_are_bounded_before_decoding(app, client, workdir, queries):
    """Issue 25.3: a 140 KB PNG of 12000² pixels was decoded in full (19 s, 3 GB); no max_file_size."""
    import time

    for side, match in ((12000, "is refused: Image size .144000000 pixels. exceeds limit"),  # PIL's own limit
                        (8000, "8000×8000 pixels, more than the 16777216 an image may have here")):
        bomb = png_header_only(side, side, workdir / f"bomb{side}.png")
        assert bomb.stat().st_size < 1000
        start = time.perf_counter()
        with pytest.raises(gradio_client.exceptions.AppError, match=match):
            client.predict(gradio_client.handle_file(str(bomb)), K, NAME, "(none)", api_name="/attribute")
        assert time.perf_counter() - start < 10
        with pytest.raises(InvalidImageError, match=match):
            app[0].explorer.query_image(str(bomb))
    big = workdir / "big.png"  # a valid 8-bit PNG of 11 MB: refused by its size, before the app sees it
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (1700, 1700, 4), dtype=np.uint8)).save(big)
    assert big.stat().st_size > 10 << 20
    with pytest.raises(ValueError, match="exceeds the maximum file size of 10485760 bytes"):  # the client, told
        client.predict(gradio_client.handle_file(str(big)), K, NAME, "(none)", api_name="/attribute")
    import httpx  # gradio's dependency: the server's own upload route, past any client

    response = httpx.post(app[1] + "gradio_api/upload", files={"files": ("big.png", big.read_bytes(), "image/png")})
    assert response.status_code == 413, (response.status_code, response.text[:300])
    out = client.predict(gradio_client.handle_file(str(queries[0])), K, NAME, "(none)", api_name="/attribute")
    assert len(table_rows(out[1])) == K  # the next request is served


def test_sixteen_bit_uploads_are_scaled_as_the_python_api_does(app, client, workdir):
    """Issue 25.3: 16-bit PNGs were clipped to 8 bits by .convert("L"): they are scaled by 65535 as the Python API
    scales them (the same scores as the array in [0, 1]); 32-bit integer images are refused, as the API refuses them."""
    from diffusers_attribution.data import to_image_tensor

    values = np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000
    deep = workdir / "deep.png"
    PIL.Image.fromarray(values).save(deep)
    assert PIL.Image.open(deep).mode == "I;16"
    explorer = app[0].explorer
    torch.testing.assert_close(to_image_tensor(explorer.query_image(str(deep))),
                               to_image_tensor(values.astype(np.float32) / 65535))
    out = client.predict(gradio_client.handle_file(str(deep)), K, NAME, "(none)", api_name="/attribute")
    assert len(table_rows(out[1])) == K
    wide = workdir / "wide.tif"
    PIL.Image.fromarray(values.astype(np.int32) * 1000).save(wide)
    with pytest.raises(gradio_client.exceptions.AppError, match="16 or 32 bits"):
        client.predict(gradio_client.handle_file(str(wide)), K, NAME, "(none)", api_name="/attribute")


def test_store_metadata_is_escaped_in_markdown(app, store_dir):
    store = FeatureStore.from_pretrained(store_dir)
    payload = 'x` <img src="http://attacker.example/p.png"> **bold** [link](http://attacker.example)'
    store.metadata.update(dataset_name=payload, base_model=payload)
    text = app[0].explorer.describe("evil`<b>", {"stores": {"evil`<b>": store}, "history": {}})
    assert "<img" not in text and "<b>" not in text and "](" not in text and "**bold**" not in text
    assert "&lt;img src=&quot;http://attacker\\.example/p\\.png&quot;&gt;" in text


def test_scores_csv_neutralizes_formulas_and_exports_are_cleaned_up(app, client, queries, monkeypatch):
    """Issue 25.3: captions went raw into scores.csv (=HYPERLINK, +cmd|...); every query left an explorer-* folder."""
    import csv
    import tempfile

    import diffusers_attribution.explorer.session as session_module

    explorer = app[0].explorer
    before = sorted(Path(tempfile.gettempdir()).glob("explorer-*"))
    for path in queries:
        client.predict(gradio_client.handle_file(str(path)), K, NAME, "(none)", api_name="/attribute")
    assert sorted(Path(tempfile.gettempdir()).glob("explorer-*")) == before
    monkeypatch.setattr(session_module, "EXPORTS_KEPT", 2)
    hostile = ["=HYPERLINK(\"http://x\")", "+cmd|' /C calc'!A0", "-2+3", "@SUM(1)", "\tx", "\rx", "plain"]
    monkeypatch.setattr(explorer, "caption", lambda index: hostile[index % len(hostile)])
    result = explorer.attribute(PIL.Image.open(queries[0]), NAME)
    written = [explorer.export(result, NAME, K) for _ in range(4)]
    assert [paths[0].parent.exists() for paths in written] == [False, False, True, True]
    assert all(Path(explorer._exports.name) in paths[0].parents for paths in written)
    with open(written[-1][1], newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))[1:]
    captions = {row[3] for row in rows}
    assert captions == {"'" + text for text in hostile[:-1]} | {"plain"}
    assert all(float(row[2]) == float(row[2]) for row in rows)  # scores stay numbers (a minus sign is kept)


def test_store_card_links_the_space():
    header = {"config": AttributionConfig(method="trak").to_dict(), "num_examples": 3, "dim": 8, "shards": [],
              "shard_rows": 3}
    assert "huggingface.co/spaces/me/explorer" in str(store_card(header, "me/store", space="me/explorer"))
    assert "huggingface.co/spaces" not in str(store_card(header, "me/store"))
    # the card and `info` say when the timesteps are a fraction of T (DAS-Fisher's default), and only then
    from diffusers_attribution.cli.info import describe

    low = {**header, "config": AttributionConfig().to_dict()}
    assert "in the lowest 0.3 of T" in str(store_card(low, "me/store")) and "lowest" not in str(store_card(header))
    assert "in the lowest 0.3 of T" in describe(low, None) and "lowest" not in describe(header, None)


# The rendered table's cell texts, row by row: gradio 5-6 draw role=row/gridcell divs, gradio 4 a <table>.
TABLE_CELLS = """
const root = document.getElementById(arguments[0]);
const rows = [...root.querySelectorAll('[role=row]')].filter(row => row.querySelector('[role=gridcell]'));
if (rows.length) return rows.map(row => [...row.querySelectorAll('[role=gridcell]')].map(cell => cell.innerText.trim()));
return [...root.querySelectorAll('tbody:not([aria-hidden]) tr')].map(row => [...row.querySelectorAll('td')].map(
    cell => cell.innerText.trim()));
"""


def test_real_browser_shows_the_topk_images(app, pipe, store_dir, dtrak_dir, queries, workdir):
    """Headless Chromium (Debian's chromium + chromedriver, driven by selenium) uploads a PNG, clicks Attribute,
    and the rendered page holds the top-k training images (the served pixels are those training images) and
    their indices; every host but 127.0.0.1 fails to resolve, so nothing is fetched from the network."""
    if not (shutil.which("chromium") or os.path.exists(CHROMIUM)) or not os.path.exists(CHROMEDRIVER):
        pytest.skip(f"needs Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER}): "
                    "apt-get install -y chromium chromium-driver")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,1700", f"--user-data-dir={workdir / 'chromium'}",
                 "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        driver.set_page_load_timeout(120)
        driver.get(app[1])
        wait = WebDriverWait(driver, 120)
        upload = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#query input[type=file]"))
        upload.send_keys(str(queries[0]))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#query img"))
        driver.find_element(By.ID, "attribute").click()
        columns = {}
        for column in "ab":
            images = wait.until(lambda d: len(found := d.find_elements(By.CSS_SELECTOR, f"#topk-{column} img")) >= K
                                and found)
            columns[column] = ([image.get_attribute("src") for image in images],
                               driver.execute_script(TABLE_CELLS, f"table-{column}"))
        png = driver.get_screenshot_as_png()
    finally:
        driver.quit()
    data = app[0].explorer.data
    for column, store in (("a", store_dir), ("b", dtrak_dir)):
        sources, rows = columns[column]
        _, best = expected_topk(pipe, store, queries[0])
        assert len(sources) == K
        for source, index in zip(sources, best.indices[0].tolist()):
            served = PIL.Image.open(io.BytesIO(urllib.request.urlopen(source, timeout=30).read())).convert("L")
            np.testing.assert_array_equal(np.asarray(served), np.asarray(app[0].explorer.tile(data[index][0]).convert("L")))
        assert [int(row[1]) for row in rows] == best.indices[0].tolist(), rows
    screenshot = PIL.Image.open(io.BytesIO(png))
    assert screenshot.size[0] >= 1000 and len(np.unique(np.asarray(screenshot.convert("L")))) > 10  # a rendered page, not blank
    if SCREENSHOT:
        screenshot.save(SCREENSHOT)
