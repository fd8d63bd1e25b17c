"""Minimal in-process Hugging Face Hub server for tests (stdlib only).

``LocalHub`` speaks just enough of the Hub HTTP protocol for the real ``huggingface_hub``
client (checked against 2.4.0) to run ``create_repo``/``delete_repo``, ``upload_folder`` (both the
hf_xet pipeline and the ``HF_HUB_DISABLE_XET=1`` path), ``upload_file``/``create_commit``/
``delete_file``, ``repo_info``, ``list_repo_tree``, ``get_paths_info``, ``file_exists``,
``list_repo_refs``, ``list_repo_commits``, ``create_branch``/``create_tag``, ``hf_hub_download``
and ``snapshot_download`` (``datasets.load_dataset`` also works in a process started with
``HF_ENDPOINT=<endpoint>``)::

    with LocalHub() as hub:
        api = HfApi(endpoint=hub.endpoint, token="test")
        api.create_repo("user/data", repo_type="dataset")
        api.upload_folder(repo_id="user/data", repo_type="dataset", folder_path=...)
        snapshot_download("user/data", repo_type="dataset", endpoint=hub.endpoint, ...)

Always pass ``endpoint=`` explicitly: ``HF_ENDPOINT`` is read when ``huggingface_hub`` is
imported. No environment variable is needed: every file is declared "regular" at preupload
(base64 inside the commit NDJSON), so the client never starts an LFS or Xet transfer, and
``/resolve`` responses carry no ``X-Xet-Hash`` header, so downloads are plain HTTP GETs.

Storage, under ``root`` (a temp dir by default), one folder per repo
``{root}/{repo_type}s/{namespace}/{name}/``: ``blobs/<git-sha1>`` (file contents),
``commits/<oid>.json`` (parent, title, date and the full ``{path: blob}`` map) and
``refs.json`` (private flag, branches, tags). ``create_repo`` makes an empty initial commit on
``main`` (the real Hub adds a ``.gitattributes`` file there; this server does not).
Not supported: LFS/Xet uploads (``lfsFile`` lines are rejected), pull requests, auth
(any token is accepted), pagination, repo ids without a namespace in API paths.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}


def git_blob_sha1(data: bytes) -> str:
    """Git blob id of ``data`` (what the Hub reports as ``oid``/``blobId``/ETag of regular files)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class HubError(Exception):
    """An HTTP error answered with the Hub's ``X-Error-Code`` / ``X-Error-Message`` headers."""

    def __init__(self, status: int, message: str, code: str | None = None, commit: str | None = None, **extra):
        super().__init__(message)
        self.status, self.message, self.code, self.commit, self.extra = status, message, code, commit, extra


class LocalHub:
    """A Hub-protocol HTTP server on ``127.0.0.1:<free port>`` running in a daemon thread.

    Use as a context manager, or call ``start()`` / ``stop()``. ``endpoint`` is the base URL to
    pass as ``endpoint=`` to ``HfApi``/``hf_hub_download``/``snapshot_download``. ``root`` is a
    directory to keep repos in (default: a temp dir removed by ``stop()``).
    """

    def __init__(self, root: str | os.PathLike | None = None, user: str = "user"):
        self._own_root = root is None
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="localhub-"))
        self.user = user
        self.lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        assert self._server is not None, "LocalHub not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> "LocalHub":
        handler = type("Handler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="LocalHub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = self._thread = None
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "LocalHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- storage ----------------------------------------------------------------------------
    def repo_dir(self, repo_type: str, repo_id: str) -> Path:
        return self.root / f"{repo_type}s" / repo_id

    def _load_refs(self, repo: Path) -> dict:
        if not (repo / "refs.json").is_file():
            raise HubError(404, "Repository not found", "RepoNotFound")
        return json.loads((repo / "refs.json").read_text())

    def _save_refs(self, repo: Path, refs: dict) -> None:
        (repo / "refs.json.tmp").write_text(json.dumps(refs))
        os.replace(repo / "refs.json.tmp", repo / "refs.json")

    def _commit(self, repo: Path, oid: str) -> dict:
        return json.loads((repo / "commits" / f"{oid}.json").read_text())

    def resolve(self, repo: Path, rev: str) -> str:
        """Branch, tag, full or (>= 7 chars) abbreviated commit id -> commit oid, else 404."""
        refs = self._load_refs(repo)
        if rev in refs["branches"] or rev in refs["tags"]:
            return refs["branches"].get(rev) or refs["tags"][rev]
        if re.fullmatch(r"[0-9a-f]{7,40}", rev):
            hits = [p.stem for p in (repo / "commits").glob(f"{rev}*.json")]
            if len(hits) == 1:
                return hits[0]
        raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    def write_commit(self, repo: Path, branch: str, files: dict, title: str, message: str = "") -> str:
        """Store a commit whose full tree is ``files`` ({path: blob sha1}) and move ``branch``."""
        with self.lock:
            refs = self._load_refs(repo)
            parent = refs["branches"].get(branch)
            record = {"parent": parent, "title": title, "message": message, "date": _now(), "files": files}
            oid = hashlib.sha1(json.dumps(record, sort_keys=True).encode()).hexdigest()
            (repo / "commits" / f"{oid}.json").write_text(json.dumps(record))
            refs["branches"][branch] = oid
            self._save_refs(repo, refs)
            return oid

    def create_repo(self, repo_type: str, repo_id: str, private: bool = False) -> bool:
        """Create an empty repo with an initial commit on ``main``; False if it already exists."""
        repo = self.repo_dir(repo_type, repo_id)
        with self.lock:
            if (repo / "refs.json").exists():
                return False
            for sub in ("blobs", "commits"):
                (repo / sub).mkdir(parents=True, exist_ok=True)
            self._save_refs(repo, {"private": private, "created": _now(), "branches": {}, "tags": {}})
            self.write_commit(repo, "main", {}, "initial commit")
            return True


class _Handler(BaseHTTPRequestHandler):
    """Routes Hub API calls (``/api/...``) and file downloads (``.../resolve/<rev>/<path>``)."""

    protocol_version = "HTTP/1.1"
    hub: LocalHub  # set by LocalHub.start()

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    # -- plumbing ---------------------------------------------------------------------------
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                data += self.rfile.read(size)
                self.rfile.readline()
            while self.rfile.readline().strip():  # trailers
                pass
            return data
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj, status: int = 200) -> None:
        self._send(status, json.dumps(obj).encode(), {"Content-Type": "application/json"})

    def do_GET(self) -> None:
        self._dispatch()

    do_HEAD = do_POST = do_GET

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        self.query = parse_qs(url.query)
        seg = [unquote(s) for s in url.path.split("/")[1:]]
        body = self._body() if self.command == "POST" else b""
        try:
            if seg[:1] == ["api"]:
                self._api(seg[1:], body)
            elif "resolve" in seg:
                self._resolve(seg)
            else:
                raise HubError(404, f"Not found: {url.path}")
        except Exception as e:  # HubError -> Hub-style error; anything else -> 500 (a LocalHub bug)
            if not isinstance(e, HubError):
                e = HubError(500, f"LocalHub error: {e!r}")
            headers = {"X-Error-Message": e.message.encode("ascii", "replace").decode()}
            if e.code:
                headers["X-Error-Code"] = e.code
            if e.commit:
                headers["X-Repo-Commit"] = e.commit
            self._send(e.status, json.dumps({"error": e.message, **e.extra}).encode(), headers)

    # -- /api -------------------------------------------------------------------------------
    def _api(self, seg: list[str], body: bytes) -> None:
        hub, cmd = self.hub, self.command
        if seg == ["validate-yaml"]:
            return self._json({"errors": [], "warnings": []})
        if seg == ["whoami-v2"]:
            return self._json({"type": "user", "name": hub.user, "fullname": hub.user, "orgs": [],
                               "auth": {"type": "access_token", "accessToken": {"role": "write"}}})
        if seg[:1] == ["repos"] and cmd == "POST":
            req = json.loads(body or b"{}")
            repo_type = req.get("type") or "model"
            repo_id = f"{req.get('organization') or hub.user}/{req['name']}"
            if seg[1:] == ["delete"]:
                shutil.rmtree(hub.repo_dir(repo_type, repo_id), ignore_errors=True)
                return self._json({})
            private = bool(req.get("private")) or req.get("visibility") == "private"
            url = f"{hub.endpoint}/{URL_PREFIX[repo_type]}{repo_id}"
            if not hub.create_repo(repo_type, repo_id, private):  # the client reads "url" even on 409
                raise HubError(409, "You already created this repo", url=url)
            return self._json({"url": url, "name": repo_id})
        if len(seg) < 3 or seg[0] not in REPO_TYPES:
            raise HubError(404, "Unknown API route")
        repo_type, repo_id = REPO_TYPES[seg[0]], f"{seg[1]}/{seg[2]}"
        repo = hub.repo_dir(repo_type, repo_id)
        refs = hub._load_refs(repo)
        action, rev, rest = (seg[3:4] or [""])[0], (seg[4:5] or ["main"])[0], seg[5:]
        if action in ("", "revision") and cmd == "GET":
            return self._json(self._info(repo, repo_id, refs, rev))
        if action == "refs":
            return self._json({"branches": self._refs(refs, "branches"), "tags": self._refs(refs, "tags"),
                               "converts": [], "pullRequests": []})
        if action == "commits":
            return self._json(self._log(repo, hub.resolve(repo, rev)))
        if action == "tree":
            return self._json(self._tree(repo, hub.resolve(repo, rev), "/".join(rest)))
        if action == "paths-info" and cmd == "POST":
            files = hub._commit(repo, hub.resolve(repo, rev))["files"]
            paths = parse_qs(body.decode()).get("paths", [])
            return self._json([e for p in paths for e in self._entries(repo, files, p.strip("/"), exact=True)])
        if action == "preupload" and cmd == "POST":
            files = hub._commit(repo, hub.resolve(repo, rev))["files"]
            return self._json({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                                          "oid": files.get(f["path"])} for f in json.loads(body)["files"]]})
        if action == "commit" and cmd == "POST":
            return self._json(self._apply_commit(repo, repo_type, repo_id, rev, body))
        if action in ("branch", "tag") and cmd == "POST":
            req = json.loads(body or b"{}")
            with hub.lock:
                target = hub.resolve(repo, req.get("startingPoint") or ("main" if action == "branch" else rev))
                refs = hub._load_refs(repo)
                refs["branches" if action == "branch" else "tags"][rev if action == "branch" else req["tag"]] = target
                hub._save_refs(repo, refs)
            return self._json({})
        raise HubError(404, f"Unsupported API call {cmd} {action}")

    @staticmethod
    def _refs(refs: dict, kind: str) -> list[dict]:
        return [{"name": n, "ref": f"refs/{'heads' if kind == 'branches' else 'tags'}/{n}", "targetCommit": oid}
                for n, oid in refs[kind].items()]

    def _info(self, repo: Path, repo_id: str, refs: dict, rev: str) -> dict:
        oid = self.hub.resolve(repo, rev)
        commit = self.hub._commit(repo, oid)
        siblings = [{"rfilename": p, "blobId": b, "size": (repo / "blobs" / b).stat().st_size}
                    for p, b in sorted(commit["files"].items())]
        return {"id": repo_id, "author": repo_id.split("/")[0], "sha": oid, "private": refs["private"],
                "createdAt": refs["created"], "lastModified": commit["date"], "tags": [], "siblings": siblings,
                "disabled": False, "gated": False, "downloads": 0, "likes": 0}

    def _log(self, repo: Path, oid: str | None) -> list[dict]:
        out = []
        while oid:
            c = self.hub._commit(repo, oid)
            out.append({"id": oid, "title": c["title"], "message": c["message"], "date": c["date"],
                        "authors": [{"user": self.hub.user}]})
            oid = c["parent"]
        return out

    @staticmethod
    def _entries(repo: Path, files: dict, path: str, exact: bool = False, recursive: bool = False) -> list[dict]:
        """Tree entries for ``path`` itself (``exact``) or for the children of folder ``path``."""
        size = lambda b: (repo / "blobs" / b).stat().st_size  # noqa: E731
        folder_oid = lambda d: hashlib.sha1(d.encode()).hexdigest()  # noqa: E731 (not a real git tree id)
        if exact:
            if path in files:
                return [{"type": "file", "path": path, "oid": files[path], "size": size(files[path])}]
            is_dir = any(p.startswith(path + "/") for p in files)
            return [{"type": "directory", "path": path, "oid": folder_oid(path)}] if is_dir else []
        prefix = path + "/" if path else ""
        out, dirs = [], set()
        for p, blob in sorted(files.items()):
            if not p.startswith(prefix):
                continue
            parts = p[len(prefix):].split("/")
            for i in range(1, len(parts) if recursive else min(len(parts), 2)):
                dirs.add(prefix + "/".join(parts[:i]))
            if recursive or len(parts) == 1:
                out.append({"type": "file", "path": p, "oid": blob, "size": size(blob)})
        return [{"type": "directory", "path": d, "oid": folder_oid(d)} for d in sorted(dirs)] + out

    def _tree(self, repo: Path, oid: str, path: str) -> list[dict]:
        files = self.hub._commit(repo, oid)["files"]
        recursive = self.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        if path and not any(p.startswith(path + "/") for p in files):
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", commit=oid)
        return self._entries(repo, files, path, recursive=recursive)

    def _apply_commit(self, repo: Path, repo_type: str, repo_id: str, branch: str, body: bytes) -> dict:
        if self.query.get("create_pr", ["0"])[0] not in ("0", "false"):
            raise HubError(400, "LocalHub does not support pull requests")
        hub = self.hub
        with hub.lock:
            refs = hub._load_refs(repo)
            if branch not in refs["branches"]:
                raise HubError(404, f"Branch not found: {branch}", "RevisionNotFound")
            head = refs["branches"][branch]
            files = dict(hub._commit(repo, head)["files"])
            header = {}
            for line in body.splitlines():
                if not line.strip():
                    continue
                item = json.loads(line)
                key, value = item["key"], item["value"]
                if key == "header":
                    header = value
                    parent = value.get("parentCommit")
                    if parent and not head.startswith(parent):
                        raise HubError(412, f"Parent commit {parent} is not the head of {branch}")
                elif key == "file":
                    raw = value["content"]
                    data = base64.b64decode(raw) if value.get("encoding") == "base64" else raw.encode()
                    blob = git_blob_sha1(data)
                    (repo / "blobs" / blob).write_bytes(data)
                    files[value["path"]] = blob
                elif key == "deletedFile":
                    if files.pop(value["path"], None) is None:
                        raise HubError(404, f"Entry not found: {value['path']}", "EntryNotFound")
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    files = {p: b for p, b in files.items() if not p.startswith(prefix)}
                else:
                    raise HubError(400, f"LocalHub only supports regular uploads, got {key!r}")
            oid = hub.write_commit(repo, branch, files, header.get("summary", ""), header.get("description", ""))
        url = f"{hub.endpoint}/{URL_PREFIX[repo_type]}{repo_id}/commit/{oid}"
        return {"success": True, "commitOid": oid, "commitUrl": url, "pullRequestUrl": None}

    # -- /resolve ---------------------------------------------------------------------------
    def _resolve(self, seg: list[str]) -> None:
        repo_type = "model"
        if seg[0] in ("datasets", "spaces"):
            repo_type, seg = REPO_TYPES[seg[0]], seg[1:]
        if len(seg) < 5 or seg[2] != "resolve":
            raise HubError(404, "Bad resolve URL")
        repo = self.hub.repo_dir(repo_type, f"{seg[0]}/{seg[1]}")
        oid = self.hub.resolve(repo, seg[3])
        path = "/".join(seg[4:])
        blob = self.hub._commit(repo, oid)["files"].get(path)
        if blob is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", commit=oid)
        data = (repo / "blobs" / blob).read_bytes()
        headers = {"X-Repo-Commit": oid, "ETag": f'"{blob}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", ""))
        if match and data:
            start = int(match[1]) if match[1] else max(len(data) - int(match[2] or 0), 0)
            end = int(match[2]) if match[1] and match[2] else len(data) - 1
            end = min(end, len(data) - 1)
            if start > end:
                return self._send(416, b"", {"Content-Range": f"bytes */{len(data)}", **headers})
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            return self._send(206, data[start:end + 1], headers)
        self._send(200, data, headers)
