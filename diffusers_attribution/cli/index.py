"""`index`: build the approximate top-k index of a store's rows on this machine (FAISS; `pip install
"diffusers-attribution[index]"`), so that `attribute --topk` and the explorer answer from it.

    diffusers-attribution index STORE                 # IVF above 50k rows, exact Flat below (search.choose_kind)
    diffusers-attribution index STORE --kind hnsw

The index is built from the store's verified features and kept in this machine's cache, keyed by the shards'
sha256: it is never read from the store's folder or the Hub (an index file is untrusted input to C++ code).
`attribute ... --exact` answers without it.
"""

from __future__ import annotations

import argparse
import json

from .options import add_subparser, step


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = add_subparser(subparsers, "index", "build the approximate top-k index of a store on this machine",
                           __doc__)
    parser.add_argument("store", metavar="STORE", help="the store directory")
    parser.add_argument("--kind", choices=("flat", "ivf", "hnsw"), help="the index (default: by the number of rows)")
    parser.add_argument("--target-recall", type=float, default=0.95,
                        help="recall@10 the search parameter is tuned to reach (default: 0.95)")
    parser.add_argument("--json", action="store_true", help="print the index's description as JSON")
    return parser


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..methods.base import get_method
    from ..store import FeatureStore

    if not Path(args.store).is_dir():
        raise SystemExit(f"error: {args.store} is not a directory")
    if not 0 < args.target_recall <= 1:
        raise SystemExit(f"error: --target-recall must be in (0, 1], got {args.target_recall}")
    with step(f"checking every file of {args.store}"):
        store = FeatureStore.from_pretrained(args.store, verify=True)
    scorer = get_method(store.config.method).scorer(store)
    if not hasattr(scorer, "index"):
        raise SystemExit(f"error: method {store.config.method!r} is not scored through a kernel: no index to build")
    with step(f"building the index of {store}"):
        index = scorer.index(build=True, kind=args.kind, target_recall=args.target_recall)
    if index is None:
        raise SystemExit("error: this store has no more rows than features (it is scored in its dual form): "
                         "an exact pass is already cheap")
    description = index.describe()
    print(json.dumps(description, indent=2) if args.json else
          f"index of {store}: {description['kind']} {description['params']}, recall@10 "
          f"{description['recall_at_10']:.3f}, built in {description['build_seconds']:.1f} s")
    return 0
