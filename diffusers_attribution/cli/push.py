"""`push`: upload a feature store to a Hub dataset repository (created if needed), with a dataset card.

    diffusers-attribution push STORE user/my-features [--private] [--grid attribution_grid.png]
    diffusers-attribution push STORE user/my-features --endpoint http://127.0.0.1:8000 --token hf_...

Every file's sha256 is checked against config.json first; the card names the repository, the base model
and the dataset, and shows `--grid` when given.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .options import add_hub_arguments, add_subparser, step


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = add_subparser(subparsers, "push", "upload a feature store to a Hub dataset repository", __doc__)
    parser.add_argument("store", metavar="STORE", help="the store directory")
    parser.add_argument("repo_id", metavar="REPO_ID", help="the dataset repository, user/name")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--grid", metavar="PNG", help="an attribution grid (attribute --grid) shown on the card")
    parser.add_argument("--license", help="the card's license metadata, e.g. apache-2.0 (that of the training data)")
    parser.add_argument("--message", default="Upload feature store", help="the commit message")
    add_hub_arguments(parser, revision="the branch to commit to (default: main)")
    return parser


def run(args: argparse.Namespace) -> int:
    from ..store.hub import is_repo_id, push_store
    from ..store import FeatureStore

    if not Path(args.store).is_dir():
        raise SystemExit(f"error: {args.store} is not a directory")
    if not is_repo_id(args.repo_id) or "/" not in args.repo_id:
        raise SystemExit(f"error: {args.repo_id!r} is not a Hub repo id (user/name)")
    if args.grid and not Path(args.grid).is_file():
        raise SystemExit(f"error: no image at --grid {args.grid}")
    with step(f"checking every file of {args.store}"):
        store = FeatureStore.from_pretrained(args.store, verify=True)
    with step(f"uploading {store} to {args.repo_id}"):
        commit = push_store(store, args.repo_id, private=args.private or None, token=args.token,
                            endpoint=args.endpoint, revision=args.revision, commit_message=args.message,
                            image=args.grid, license=args.license)
    print(f"pushed {args.store} to {getattr(commit, 'commit_url', None) or args.repo_id}")
    return 0
