"""The attribution explorer: a Gradio app over feature stores (`launch_explorer`, `build_explorer`), its
browser-free core (`Explorer`), a Hugging Face Space export (`export_space`) and the `explore` command
(`add_explore_parser`, `run_explore`). gradio is imported only when an app is built (extra `explore`)."""

from .app import build_explorer, launch_explorer
from .cli import add_explore_parser, run_explore
from .session import Explorer, load_dataset, load_pipeline
from .space import export_space

__all__ = ["Explorer", "add_explore_parser", "build_explorer", "export_space", "launch_explorer", "load_dataset",
           "load_pipeline", "run_explore"]
