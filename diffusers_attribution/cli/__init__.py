"""`diffusers-attribution` / `python -m diffusers_attribution`: the command line.

    diffusers-attribution demo                                   # the digits DDPM, attributed with D-TRAK
    diffusers-attribution featurize --pipeline P --dataset D --out STORE [--method trak --num-timesteps 10 ...]
    diffusers-attribution attribute IMAGE_OR_FOLDER... --store STORE [--json] [--grid grid.png]
    diffusers-attribution info STORE
    diffusers-attribution push STORE user/name [--private] [--endpoint URL]
    diffusers-attribution explore --store STORE --dataset TRAIN  # a Gradio app (pip install ".[explore]")

Each subcommand is one module of this package with `add_parser(subparsers)` (which returns its parser) and
`run(args)`. Modules import only argparse-level code at import time: torch and diffusers are imported inside
`run`, so `--help` and `--version` answer without them. The commands only parse arguments and call the same
functions as the Python API.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# (module, function adding the subparser, function running it), in the order `--help` lists them. A subcommand
# defined elsewhere is one more row (the explorer's); no module here may import torch or gradio at import time
# (tests/test_cli.py checks `--help` of every subcommand in a fresh interpreter).
SUBCOMMANDS: list[tuple[str, str, str]] = [
    ("diffusers_attribution.cli.demo", "add_parser", "run"),
    ("diffusers_attribution.cli.featurize", "add_parser", "run"),
    ("diffusers_attribution.cli.attribute", "add_parser", "run"),
    ("diffusers_attribution.cli.info", "add_parser", "run"),
    ("diffusers_attribution.cli.push", "add_parser", "run"),
    ("diffusers_attribution.cli.index", "add_parser", "run"),
    ("diffusers_attribution.explorer.cli", "add_explore_parser", "run_explore"),
]


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(prog="diffusers-attribution", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"diffusers-attribution {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name, add_name, run_name in SUBCOMMANDS:
        module = importlib.import_module(module_name)
        subparser = getattr(module, add_name)(subparsers)
        if subparser is None:  # an add function that does not return its parser: the one it just added
            subparser = list(subparsers.choices.values())[-1]
        subparser.set_defaults(_run=getattr(module, run_name))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except (ValueError, FileNotFoundError) as error:  # bad input: the package's errors name the problem
        print(f"error: {type(error).__name__}: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
