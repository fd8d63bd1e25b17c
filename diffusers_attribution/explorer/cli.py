"""`explore` command: the attribution explorer in the browser, or a Hugging Face Space that serves it.

    diffusers-attribution explore --store STORE [--store STORE2] --dataset DATASET [--pipeline PIPELINE]
    diffusers-attribution explore --store USER/STORE --dataset USER/DATA --export-space DIR [--space-id USER/SPACE]

STORE: a store directory or Hub dataset repo id; DATASET: a folder of images, a datasets.save_to_disk
directory, or a Hub dataset id; PIPELINE (default: the model the store was featurized from): a directory
or Hub model id. Serves on 127.0.0.1:7860 by default; --share asks gradio for a public link.
"""

from __future__ import annotations

import argparse


def add_explore_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `explore` subcommand to an argparse `subparsers` object; returns its parser."""
    parser = subparsers.add_parser(
        "explore", help="browse attributions in a Gradio app (or export it as a Hugging Face Space)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--store", action="append", required=True,
                        help="feature store directory or Hub dataset repo id; repeat for side-by-side stores")
    parser.add_argument("--dataset", required=True,
                        help="training set: a folder of images, a datasets.save_to_disk directory, or a Hub dataset id")
    parser.add_argument("--split", default="train", help="dataset split (default: train)")
    parser.add_argument("--pipeline", help="diffusers pipeline directory or Hub model id (default: the store's base model)")
    parser.add_argument("--k", type=int, default=5, help="top-k shown at first (default: 5)")
    parser.add_argument("--no-check-dataset", action="store_true",
                        help="do not check the dataset's examples against the store's content hashes")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default: gradio's, 7860 or the next free one)")
    parser.add_argument("--store-root", "--allow-store-paths", dest="store_root", metavar="DIR",
                        help="visitors may add stores from folders under DIR (default: none, as in an exported Space; "
                             "Hub dataset repo ids always)")
    parser.add_argument("--max-upload", default="10mb", help="largest upload accepted (default: 10mb)")
    parser.add_argument("--share", action="store_true", help="ask gradio for a public *.gradio.live link (off by default)")
    parser.add_argument("--export-space", metavar="DIR", help="write a Space (app.py, requirements.txt, README.md) to DIR "
                                                             "instead of serving; --store, --dataset, --pipeline are Hub ids")
    parser.add_argument("--space-id", help="with --export-space: the Space's repo id, linked from the store's card "
                                           "(written to DIR/store-README.md)")
    parser.add_argument("--requirement", help="with --export-space: pip requirement of this package in requirements.txt")
    parser.set_defaults(func=run_explore)
    return parser


def run_explore(args: argparse.Namespace) -> int:
    if args.export_space:
        from .space import export_space

        paths = export_space(args.export_space, args.store, args.dataset, args.pipeline, split=args.split,
                             space_id=args.space_id, requirement=args.requirement)
        print("wrote " + ", ".join(str(path) for path in paths))
        return 0
    from .app import launch_explorer
    from .session import load_dataset

    launch_explorer(args.store, load_dataset(args.dataset, args.split), args.pipeline, host=args.host, port=args.port,
                    share=args.share, k=args.k, check_dataset=not args.no_check_dataset, store_root=args.store_root,
                    max_file_size=args.max_upload)
    return 0
