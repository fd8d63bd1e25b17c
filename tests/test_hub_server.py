"""End-to-end checks of ``tests/hub_server.LocalHub`` against the real ``huggingface_hub`` client.

Uploads go through ``HfApi`` in this process; downloads run in a fresh interpreter (as a
separate training/eval job would), with ``endpoint=`` passed explicitly and an isolated HF_HOME.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hub_server import LocalHub, git_blob_sha1  # noqa: E402

hf = pytest.importorskip("huggingface_hub")
from huggingface_hub import HfApi  # noqa: E402
from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError  # noqa: E402

REPO = "tester/attribution-data"

_DOWNLOAD_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from huggingface_hub import hf_hub_download, snapshot_download
    paths = []
    for job in json.loads(sys.argv[1]):
        filename = job.pop("filename", None)
        if filename:
            paths.append(hf_hub_download(filename=filename, token="test", **job))
        else:
            paths.append(snapshot_download(token="test", **job))
    print(json.dumps(paths))
    """
)


def download_in_subprocess(hub: LocalHub, tmp: Path, *jobs: dict) -> list[Path]:
    """Run one ``snapshot_download`` per job (``hf_hub_download`` if it has a ``filename``) in a
    single fresh interpreter; jobs default to ``REPO`` (dataset) at ``main``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(tmp / "hf_home"), HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
    defaults = dict(repo_id=REPO, repo_type="dataset", endpoint=hub.endpoint, cache_dir=str(tmp / "cache"))
    payload = json.dumps([{**defaults, **job} for job in jobs])
    proc = subprocess.run([sys.executable, "-c", _DOWNLOAD_SCRIPT, payload],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [Path(p) for p in json.loads(proc.stdout.strip().splitlines()[-1])]


@pytest.fixture(scope="module")
def hub():
    with LocalHub() as server:
        yield server


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A small JSON, a README with YAML front matter and a ~1 MiB safetensors file."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("upload")
    (root / "meta.json").write_text(json.dumps({"version": 1, "items": [1, 2, 3]}))
    (root / "README.md").write_text("---\nlicense: mit\ntags:\n- attribution\n---\n# Test dataset\n")
    (root / "weights").mkdir()
    save_file({"w": torch.randn(512, 512, generator=torch.Generator().manual_seed(0))},
              str(root / "weights" / "model.safetensors"))
    return root


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_upload_and_download_revisions(hub, folder, tmp_path):
    api = HfApi(endpoint=hub.endpoint, token="test")
    url = api.create_repo(REPO, repo_type="dataset", private=True, exist_ok=True)
    assert url.repo_id == REPO and url.repo_type == "dataset"
    assert api.create_repo(REPO, repo_type="dataset", exist_ok=True).repo_id == REPO  # 409 + exist_ok

    first = api.upload_folder(repo_id=REPO, repo_type="dataset", folder_path=folder, commit_message="v1")
    expected = _files(folder)
    assert len(expected["weights/model.safetensors"]) > 1_000_000
    info = api.dataset_info(REPO)
    assert info.sha == first.oid and info.private
    assert sorted(s.rfilename for s in info.siblings) == sorted(expected)
    tree = {f.path: f for f in api.list_repo_tree(REPO, repo_type="dataset", recursive=True)}
    assert tree["meta.json"].blob_id == git_blob_sha1(expected["meta.json"]) and "weights" in tree

    # Re-uploading unchanged files is a no-op (the client compares preupload "oid"s).
    assert api.upload_folder(repo_id=REPO, repo_type="dataset", folder_path=folder).oid == first.oid

    # Second commit (legacy `create_commit` path) changing one file.
    new_meta = json.dumps({"version": 2}).encode()
    second = api.upload_file(path_or_fileobj=new_meta, path_in_repo="meta.json", repo_id=REPO, repo_type="dataset")
    assert second.oid != first.oid
    assert [c.commit_id for c in api.list_repo_commits(REPO, repo_type="dataset")][:2] == [second.oid, first.oid]

    snap1, snap2, one = download_in_subprocess(
        hub, tmp_path, {"revision": first.oid}, {}, {"revision": first.oid[:10], "filename": "meta.json"}
    )
    assert snap1.name == first.oid
    assert _files(snap1) == expected
    assert snap2.name == second.oid
    assert _files(snap2) == {**expected, "meta.json": new_meta}
    assert one.read_bytes() == expected["meta.json"]


def test_model_repo_and_errors(hub, tmp_path):
    api = HfApi(endpoint=hub.endpoint, token="test")
    api.create_repo("tester/model", exist_ok=True)
    api.upload_file(path_or_fileobj=b"{}", path_in_repo="config.json", repo_id="tester/model")
    path = hf.hf_hub_download("tester/model", "config.json", endpoint=hub.endpoint, cache_dir=tmp_path, token="test")
    assert Path(path).read_bytes() == b"{}" and "models--tester--model" in path
    assert api.file_exists("tester/model", "config.json") and not api.file_exists("tester/model", "x.json")
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("tester/missing")
    with pytest.raises(RevisionNotFoundError):
        api.model_info("tester/model", revision="no-such-branch")
    with pytest.raises(EntryNotFoundError):
        hf.hf_hub_download("tester/model", "x.json", endpoint=hub.endpoint, cache_dir=tmp_path, token="test")
