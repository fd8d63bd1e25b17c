"""`export_space`: a ready Hugging Face Space (Gradio SDK) that serves the explorer over stores and a
training set on the Hub.

    DIR/app.py            builds the explorer from the repo ids below and launches it
    DIR/requirements.txt  this package with its `explore` and `datasets` extras
    DIR/README.md         the Space card: YAML front matter (sdk: gradio, app_file: app.py, datasets, models)
    DIR/store-README.md   (with `space_id`) the store's dataset card, now linking to the Space

Upload with `hf upload USER/SPACE DIR . --repo-type space`, and the store card with
`hf upload STORE_REPO DIR/store-README.md README.md --repo-type dataset`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from huggingface_hub import SpaceCard, SpaceCardData

from ..store.files import atomic_write
from ..store.hub import is_repo_id, store_card
from ..version import __version__

APP_TEMPLATE = '''"""Attribution explorer Space, written by `diffusers-attribution explore --export-space`."""

from diffusers_attribution.explorer import build_explorer, load_dataset

STORES = {stores}
DATASET = {dataset}
SPLIT = {split}
PIPELINE = {pipeline}  # None: the model the first store was featurized from (its config.json base_model)

demo = build_explorer(STORES, load_dataset(DATASET, SPLIT), PIPELINE, title={title})

if __name__ == "__main__":
    demo.queue().launch(max_file_size="10mb")
'''


def _require_repo_id(value: str, what: str) -> str:
    if not is_repo_id(value) or Path(value).exists():
        raise ValueError(f"a Space pulls its {what} from the Hub: {value!r} is not a Hub repo id (user/name); "
                         f"push it first (e.g. `featurize --push-to-hub` for a store) and pass the repo id")
    return value


def export_space(directory: str | os.PathLike, stores: str | Sequence[str], dataset: str, pipeline: str | None = None,
                 *, split: str = "train", space_id: str | None = None, title: str | None = None,
                 requirement: str | None = None, endpoint: str | None = None) -> list[Path]:
    """Write the Space's files into `directory` (created; existing files of the same names are replaced).

    `stores`, `dataset`, `pipeline`: Hub repo ids (a store: a dataset repo written by `push_to_hub`);
    `requirement`: the pip requirement of this package (default `diffusers-attribution[explore,datasets]>=`
    this version; pass a `git+https://...` URL if it is not on PyPI); `space_id`: the Space's own repo id,
    also written into the store's card (store-README.md, which needs the store's config.json from the Hub).
    """
    stores = [stores] if isinstance(stores, str) else list(stores)
    if not stores:
        raise ValueError("a Space needs at least one store repo id")
    for store in stores:
        _require_repo_id(store, "feature store")
    _require_repo_id(dataset, "training set")
    if pipeline is not None:
        _require_repo_id(pipeline, "pipeline")
    import gradio

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    title = title or f"Attribution explorer: {stores[0]}"
    app = APP_TEMPLATE.format(stores=repr(stores), dataset=repr(dataset), split=repr(split), pipeline=repr(pipeline),
                              title=repr(title))
    requirements = [requirement or f"diffusers-attribution[explore,datasets]>={__version__}", f"gradio=={gradio.__version__}"]
    card_data = SpaceCardData(
        title=title[:60], sdk="gradio", sdk_version=gradio.__version__, app_file="app.py", license="apache-2.0",
        datasets=[*stores, dataset], models=[pipeline] if pipeline else None,
        tags=["diffusers-attribution", "data-attribution", "diffusers"],
    )
    card_data.emoji, card_data.colorFrom, card_data.colorTo, card_data.pinned = "🔎", "blue", "gray", False
    body = (f"# {title}\n\nUpload an image (or generate one) and see the training images of `{dataset}` that "
            f"made the model generate it, scored with the feature store{'s' if len(stores) > 1 else ''} "
            + ", ".join(f"[`{s}`](https://huggingface.co/datasets/{s})" for s in stores)
            + " by diffusers-attribution (`pipe.attribute`).\n")
    written = {
        "app.py": app,
        "requirements.txt": "\n".join(requirements) + "\n",
        "README.md": str(SpaceCard(f"---\n{card_data.to_yaml()}\n---\n\n{body}")),
    }
    if space_id is not None:
        _require_repo_id(space_id, "Space id")
        from huggingface_hub import hf_hub_download

        from ..store.schema import parse_header, validate_header

        path = Path(hf_hub_download(stores[0], "config.json", repo_type="dataset", endpoint=endpoint))
        where = f"{stores[0]}/config.json"
        _, header = validate_header(parse_header(path, where), where)
        written["store-README.md"] = str(store_card(header, stores[0], space=space_id))
    paths = []
    for name, text in written.items():
        path = directory / name
        atomic_write(path, lambda temporary, text=text: Path(temporary).write_text(text, encoding="utf-8"))
        paths.append(path)
    return paths
