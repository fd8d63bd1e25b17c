"""`Explorer`: what the browser app shows, without the browser: stores, training data, a pipeline, and the
results of the queries made so far. Every score comes from `pipe.attribute` / `pipe.attribute_trajectory`
against the loaded `FeatureStore`s; the training features are never recomputed."""

from __future__ import annotations

import collections
import csv
import html
import inspect
import io
import json
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, Mapping, Sequence

import PIL.Image
import torch

from ..adapters import get_adapter
from ..data import InvalidImageError, TrainingData, open_image_file, to_image_tensor
from ..evaluation.bias import GeneralInfluence, generally_influential
from ..mixin import enable_attribution
from ..result import AttributionResult, _to_pil
from ..store import FeatureStore

StoreSpec = FeatureStore | str | os.PathLike
EXPORTS_KEPT = 64  # the downloads of this many recent queries stay on disk (gradio copies them into its cache)
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")  # a spreadsheet cell starting with one of these is a formula


def escape_markdown(value: Any) -> str:
    """Text from outside (store metadata, names a visitor typed, prompts) as literal Markdown text on one line:
    HTML characters as entities, Markdown punctuation backslash-escaped."""
    text = html.escape(" ".join(str(value).split()), quote=True)
    return re.sub(r"([\\`*_{}\[\]()#+\-.!|~<>])", r"\\\1", text)


def csv_cell(value: Any) -> Any:
    """A CSV cell a spreadsheet shows as text: a string starting with = + - @ tab or CR gets a leading quote."""
    return "'" + value if isinstance(value, str) and value.startswith(FORMULA_START) else value


def open_store(spec: StoreSpec) -> FeatureStore:
    """A `FeatureStore`, its directory, or a Hub dataset repo id → the store."""
    return spec if isinstance(spec, FeatureStore) else FeatureStore.from_pretrained(spec)


def store_name(spec: StoreSpec, store: FeatureStore) -> str:
    if not isinstance(spec, FeatureStore):
        return str(spec)
    return str(store.directory) if store.directory is not None else f"{store.config.method} store"


def load_pipeline(pipe: Any, store: FeatureStore) -> Any:
    """The pipeline to score with: `pipe` itself, a directory or Hub model id, or (None) the store's base model."""
    if pipe is None:
        pipe = store.metadata.get("base_model")
        if not pipe:
            raise ValueError("the store does not record the model it was featurized from (its base_model is empty): "
                             "pass the pipeline (--pipeline)")
    if isinstance(pipe, (str, os.PathLike)):
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(str(pipe))
    pipe.set_progress_bar_config(leave=False)
    return enable_attribution(pipe)


def load_dataset(spec: Any, split: str = "train") -> Any:
    """A training set from a folder of images, a `save_to_disk` directory or a Hub dataset id (the `featurize`
    command's loader); anything else (a `datasets.Dataset`, a list, a tensor) is returned as it is."""
    if not isinstance(spec, (str, os.PathLike)):
        return spec
    from ..cli.options import load_training_dataset

    return load_training_dataset(str(spec), split)


class Explorer:
    """Attribution of uploaded or generated images against one or more stores of the same training set.

    `stores`: one store (a `FeatureStore`, a directory or a Hub repo id), a list of them, or a {name: store}
    mapping; `dataset`: the training set the stores were featurized from (checked example by example
    against the stores' content hashes when `check_dataset`); `pipe`: a pipeline, its directory or Hub id,
    or None for the first store's recorded base model.

    Stores a visitor adds (`add_visitor_store`) live in that visitor's session, never in `stores`: a Hub dataset
    repo id, or a folder under `store_root` (None: no local folder may be added).
    """

    def __init__(self, stores: StoreSpec | Sequence[StoreSpec] | Mapping[str, StoreSpec], dataset: Any,
                 pipe: Any = None, *, image_column: str | None = None, caption_column: str | None = None,
                 check_dataset: bool = True, store_root: str | os.PathLike | None = None):
        self.store_root = Path(os.path.realpath(store_root)) if store_root is not None else None
        self._exports = tempfile.TemporaryDirectory(prefix="explorer-")  # removed with the explorer, or at exit
        self._recent: collections.deque[Path] = collections.deque()
        if isinstance(stores, Mapping):
            named = list(stores.items())
        else:
            specs = list(stores) if isinstance(stores, (list, tuple)) else [stores]
            named = [(None, spec) for spec in specs]
        if not named:
            raise ValueError("the explorer needs at least one feature store")
        self.check_dataset = check_dataset
        self.stores: dict[str, FeatureStore] = {}
        first = open_store(named[0][1])
        config = first.config
        self.data = dataset if isinstance(dataset, TrainingData) else TrainingData(
            dataset, image_column or config.image_column, caption_column or config.caption_column
        )
        for name, spec in named:
            self.add_store(spec, name, store=first if spec is named[0][1] else None)
        self.pipe = load_pipeline(pipe, first)
        self.adapter = get_adapter(self.pipe)
        self.history: dict[str, list[torch.Tensor]] = {name: [] for name in self.stores}
        self.lock = threading.Lock()  # gradio serves events on threads; featurizing hooks the one denoiser
        # one AttributionSession per store object: its featurizer and (C + λI)⁻¹ are built once, not per upload
        self._sessions: dict[int, Any] = {}

    # ------------------------------------------------------------------------------------ stores

    def add_store(self, spec: StoreSpec, name: str | None = None, *, store: FeatureStore | None = None) -> str:
        """Load a store, check it was featurized from this training set, and return its name."""
        store = store or open_store(spec)
        if self.check_dataset:
            store.check_dataset(self.data)
        name = name or store_name(spec, store)
        self.stores[name] = store
        if hasattr(self, "history"):
            self.history.setdefault(name, [])
        return name

    def new_session(self) -> dict[str, dict]:
        """What one visitor adds: their stores and the queries attributed against them."""
        return {"stores": {}, "history": {}}

    def store(self, name: str, session: Mapping | None = None) -> FeatureStore:
        """The named store: one of the visitor's own (`session`), else one the explorer was launched with."""
        stores = {**self.stores, **((session or {}).get("stores") or {})}
        if name not in stores:
            raise ValueError(f"no store named {name!r} here: pick one of the list, or add it first")
        return stores[name]

    def _history(self, name: str, session: Mapping | None) -> list[torch.Tensor]:
        if session is not None and name in session.get("stores", {}):
            return session["history"].setdefault(name, [])
        return self.history[name]

    def resolve_visitor_store(self, spec: str) -> str:
        """What a visitor typed → a Hub dataset repo id, or a folder inside `store_root` (resolved, links followed).
        Anything else is one error that says nothing of whether such a path exists on the server."""
        from ..store.hub import is_repo_id

        spec = str(spec).strip()
        if self.store_root is not None and spec and "\0" not in spec:
            candidate = Path(os.path.realpath(self.store_root / spec))
            if (candidate == self.store_root or self.store_root in candidate.parents) and candidate.is_dir():
                return str(candidate)
        if is_repo_id(spec) and spec.count("/") == 1:
            return spec
        where = "a folder under the explorer's store folder" if self.store_root is not None else \
            "local folders cannot be added (the explorer was started without a store folder)"
        raise FileNotFoundError(f"no store {spec!r} to add: enter a Hub dataset repo id (user/name) or {where}")

    def add_visitor_store(self, spec: str, session: dict) -> str:
        """Load a store a visitor asked for (`resolve_visitor_store`) into their `session` only; returns its name."""
        from ..store.hub import download_store

        location = self.resolve_visitor_store(spec)
        local = self.store_root is not None and Path(location).is_absolute()
        store = FeatureStore.from_pretrained(location if local else download_store(location))
        if self.check_dataset:
            store.check_dataset(self.data)
        name = str(spec).strip()
        session["stores"][name] = store
        session["history"].setdefault(name, [])
        return name

    def names(self, session: Mapping | None = None) -> list[str]:
        return list(self.stores) + [n for n in ((session or {}).get("stores") or {}) if n not in self.stores]

    def describe(self, name: str, session: Mapping | None = None) -> str:
        """One Markdown line about a store; its metadata and name escaped (they come from the store's files)."""
        store = self.store(name, session)
        meta = store.metadata
        model = meta.get("base_model") or meta.get("pipeline") or "?"
        return (f"**{escape_markdown(name)}**: {escape_markdown(store.config.method)}, N = {len(store)}, "
                f"k = {store.dim}, model {escape_markdown(model)}, dataset {escape_markdown(meta.get('dataset_name') or '?')}")

    # ------------------------------------------------------------------------------------ queries

    @property
    def image_mode(self) -> str:
        """The PIL mode of the images the pipeline is trained on: "L" for one channel, else "RGB"."""
        return "L" if self.adapter.expected_image_shape()[0] == 1 else "RGB"

    @property
    def takes_prompt(self) -> bool:
        return "prompt" in inspect.signature(self.pipe.__call__).parameters

    @property
    def class_conditional(self) -> bool:
        return "class_labels" in inspect.signature(self.pipe.__call__).parameters

    def query_image(self, image: Any) -> PIL.Image.Image | torch.Tensor:
        """An uploaded file path, PIL image or tensor → what `pipe.attribute` takes; None is an error."""
        if image is None or isinstance(image, str) and not image:
            raise InvalidImageError("no query image: upload an image first")
        if isinstance(image, (str, os.PathLike)):  # an upload: its header checked before it is decoded
            return open_image_file(image, self.image_mode)
        return image

    def query_tensor(self, image: Any) -> torch.Tensor:
        """The query as the pipeline reads it: [C, H, W] in [-1, 1]."""
        return to_image_tensor(self.query_image(image))

    def attribute(self, image: Any, name: str, prompts: str | None = None,
                  session: Mapping | None = None) -> AttributionResult:
        """`pipe.attribute(image, store)` with the named store, through the store's `AttributionSession` (built on
        its first query, reused after); the scores join that store's query history."""
        image = self.query_image(image)
        store = self.store(name, session)
        with self.lock:
            attribution = self._sessions.get(id(store))
            if attribution is None or attribution.store is not store:
                attribution = self._sessions[id(store)] = self.pipe.attribution_session(store, progress=False)
            result = attribution.attribute(image, prompts)
            self._history(name, session).append(result.scores[0])
        return result

    def trajectory(self, prompt_or_seed: str | int, name: str, num_inference_steps: int, *, seed: int = 0,
                   progress: bool = True, session: Mapping | None = None):
        """Journey-TRAK: `pipe.attribute_trajectory` against the named store → `JourneyResult` ([steps, N])."""
        store = self.store(name, session)
        with self.lock:
            return self.pipe.attribute_trajectory(prompt_or_seed, store,
                                                  num_inference_steps=num_inference_steps, seed=seed, progress=progress)

    def general_influence(self, name: str, k: int = 5, share: float = 0.5,
                          session: Mapping | None = None) -> GeneralInfluence:
        """`generally_influential` over every query attributed against the named store so far (by any visitor of a
        store the explorer was launched with; by this visitor for one they added)."""
        self.store(name, session)
        history = self._history(name, session)
        if not history:
            raise ValueError(f"no queries have been attributed against {name} yet: attribute some images first")
        return generally_influential(torch.stack(history), k=k, share=share)

    # ------------------------------------------------------------------------------------ views

    def caption(self, index: int) -> str:
        caption = self.data[index][1]
        return "" if caption is None else str(caption)

    def tile(self, image: torch.Tensor, size: int = 96) -> PIL.Image.Image:
        return _to_pil(image, size)

    def table(self, scores: torch.Tensor, k: int) -> list[list[Any]]:
        """[rank, training index, score, caption] of the k highest scores of one query's [N] row."""
        values, indices = scores.topk(min(k, len(scores)))
        return [[rank + 1, int(i), float(v), self.caption(int(i))]
                for rank, (i, v) in enumerate(zip(indices.tolist(), values.tolist()))]

    def gallery(self, scores: torch.Tensor, k: int) -> list[tuple[PIL.Image.Image, str]]:
        """The top-k training images of one query's [N] score row, labelled with index and score."""
        return [(self.tile(self.data[index][0]), f"#{index}  {score:.4g}" + (f"  {caption}" if caption else ""))
                for _, index, score, caption in self.table(scores, k)]

    def score_plot(self, scores: torch.Tensor, k: int, title: str):
        """Histogram of one query's scores over the whole training set, the top-k marked (a matplotlib Figure)."""
        from matplotlib.figure import Figure

        figure = Figure(figsize=(5, 2.6))
        ax = figure.add_subplot()
        ax.hist(scores.double().numpy(), bins=min(50, max(10, len(scores) // 4)), color="C0")
        for _, index, score, _ in self.table(scores, k):
            ax.axvline(score, color="C3", linewidth=0.8)
        ax.set_xlabel("score")
        ax.set_ylabel("training examples")
        ax.set_title(f"{title}: {len(scores)} scores, top-{k} in red", fontsize=8)
        figure.tight_layout()
        return figure

    def influence_plot(self, influence: GeneralInfluence, name: str, session: Mapping | None = None):
        from ..evaluation.bias import plot_influence_frequency

        return plot_influence_frequency({name: influence},
                                        title=f"{len(self._history(name, session))} queries against {name}")

    # ------------------------------------------------------------------------------------ downloads

    def export(self, result: AttributionResult, name: str, k: int,
               directory: str | os.PathLike | None = None) -> list[Path]:
        """Write result.json (top-k and all N scores), scores.csv (every example, best first; captions that a
        spreadsheet would run as formulas start with a quote) and the grid PNG. Default `directory`: a new folder
        in the explorer's own temporary folder, of which the last EXPORTS_KEPT stay (the rest are removed)."""
        if directory is None:
            directory = Path(tempfile.mkdtemp(prefix="query-", dir=self._exports.name))
            with self.lock:
                self._recent.append(directory)
                while len(self._recent) > EXPORTS_KEPT:
                    shutil.rmtree(self._recent.popleft(), ignore_errors=True)
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        scores = result.scores[0]
        payload = {
            "store": name,
            "method": result.config.method,
            "metadata": {key: value for key, value in result.metadata.items() if _is_json(value)},
            "topk": [dict(zip(("rank", "index", "score", "caption"), row)) for row in self.table(scores, k)],
            "scores": scores.tolist(),
        }
        paths = [directory / "result.json", directory / "scores.csv", directory / "grid.png"]
        paths[0].write_text(json.dumps(payload, indent=1), encoding="utf-8")
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["rank", "index", "score", "caption"])
        writer.writerows([[csv_cell(cell) for cell in row] for row in self.table(scores, len(scores))])
        paths[1].write_text(buffer.getvalue(), encoding="utf-8")
        result.to_image_grid(self.data, k=k).save(paths[2])
        return paths


def _is_json(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True
