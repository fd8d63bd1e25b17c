"""The attribution explorer: a Gradio app over feature stores (`launch_explorer`, `build_explorer`), its
browser-free core (`Explorer`), a Hugging Face Space export (`export_space`) and the `explore` command
(`add_explore_parser`, `run_explore`).

The names are imported on first use (PEP 562), like the package's own: `explorer.cli` (the command's
parser) imports neither torch nor gradio, and gradio is imported only when an app is built (extra `explore`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_getattr

_PUBLIC = {
    "Explorer": ".session",
    "add_explore_parser": ".cli",
    "build_explorer": ".app",
    "export_space": ".space",
    "launch_explorer": ".app",
    "load_dataset": ".session",
    "load_pipeline": ".session",
    "run_explore": ".cli",
}

__all__ = sorted(_PUBLIC)

if TYPE_CHECKING:
    from .app import build_explorer, launch_explorer
    from .cli import add_explore_parser, run_explore
    from .session import Explorer, load_dataset, load_pipeline
    from .space import export_space


__getattr__ = lazy_getattr(__name__, _PUBLIC)


def __dir__():
    return __all__
