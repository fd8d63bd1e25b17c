"""`featurize` and `attribute`: the two calls everything else makes (the mixin, ensembles, Journey-TRAK, the CLI).

    store = featurize(pipe, train_dataset, AttributionConfig(method="d-trak"))     # Φ [N, k] + metadata
    result = attribute(pipe, images, store)                                        # scores [n, N]

Each `AttributionConfig.method` brings its featurizer and scorer (methods/); `attribute` builds the featurizer
once, uses the store's fitted projection for the queries, and checks the store matches the pipeline.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from .config import AttributionConfig
from .data import query_batch
from .methods.base import get_method
from .result import AttributionResult
from .store.errors import UntrustedReferenceError
from .store.format import FeatureStore

# Config fields that name something to load (a checkpoint, an encoder): a store read from a folder or the Hub
# never makes us load them unless the caller passes them or opts in (`trust_remote_references=True`).
REFERENCE_FIELDS = {"checkpoints": "checkpoints", "encoder": "encoder"}  # field: the featurizer option passing it


def is_store(train_data: Any) -> bool:
    """A `FeatureStore`, or a location one is read from (a folder or a Hub repo id), rather than a training set."""
    return isinstance(train_data, (FeatureStore, str, os.PathLike))


def make_featurizer(pipe, config: AttributionConfig, store: FeatureStore | None = None, **options):
    """The featurizer of `config.method` for `pipe` (`options`: `checkpoints=` for TracIn/ReTrac, `encoder=` /
    `processor=` for embedding-cosine); `store`: the store queries will be scored against (what it fitted on
    data: the projection's state and, for a method that fits with it, EK-FAC's Λ)."""
    method = get_method(config.method)
    fitted = None
    if store is not None:
        fitted = {"projection": store.projection_state, "projection_spec": store.metadata.get("projection"),
                  "method": store.method_state if hasattr(method, "load_fit_state") else None}
    return method.featurizer(pipe, config, fitted, **options)


def make_scorer(store: FeatureStore, damping: float | None = None, damping_ratio: float | None = None):
    """The scorer of the store's method; `damping` / `damping_ratio` override the store's (they never change features)."""
    return get_method(store.config.method).scorer(store, damping, damping_ratio)


FEATURIZER_OPTIONS = ("checkpoints", "encoder", "processor")  # taken by a method's featurizer, not by the store


def featurize(pipe, train_dataset: Any, config: AttributionConfig | None = None, *, progress: bool = True,
              output_dir: str | os.PathLike | None = None, accelerator: Any = None, **options) -> FeatureStore:
    """Training features of `train_dataset` under `config` (default `AttributionConfig()`), with their metadata.

    `output_dir`: write safetensors shards there as they finish (a killed run resumes where it stopped); under
    `accelerate launch` or with an `accelerator`, every process takes its share of the shards. `options`: the
    featurizer's (`checkpoints=`, `encoder=`, `processor=`) and the store's (`shard_rows`, `max_shard_size`,
    `compute_kernel`, `dataset_name`; docs/stores.md). `train_dataset` may be a stream (a `datasets.IterableDataset`,
    an `ImageFolder`, a generator), read in order; `num_examples=N` gives its length where it does not say it.
    """
    config = config or AttributionConfig()
    featurizer_options = {key: options.pop(key) for key in FEATURIZER_OPTIONS if key in options}
    return make_featurizer(pipe, config, **featurizer_options).featurize_dataset(
        train_dataset, progress=progress, output_dir=output_dir, accelerator=accelerator, **options)


def check_references(store: FeatureStore, config: AttributionConfig | None, options: dict,
                     trust_remote_references: bool) -> None:
    """Refuse (`UntrustedReferenceError`) a store read from disk or the Hub whose config names checkpoints or an
    encoder to load, unless the caller passes them (`options`, or a `config` naming the same ones) or trusts the
    store's references."""
    if store.directory is None or trust_remote_references:
        return
    for name, option in REFERENCE_FIELDS.items():
        named = getattr(store.config, name)
        given = options.get(option) is not None or config is not None and getattr(config, name) == named
        if named is not None and not given:
            raise UntrustedReferenceError(
                f"the store in {store.directory} names {name} to load ({str(named)[:200]}); loading what a store "
                f"names could download and run anything. Pass {option}= yourself, or "
                "trust_remote_references=True if you trust this store")


def featurize_and_store(pipe, train_data: Any, config: AttributionConfig | None, *, given_config: bool = True,
                        check_compatibility: bool = True, progress: bool = True, trust_remote_references: bool = False,
                        **options):
    """(featurizer for queries, store): `train_data` is a `FeatureStore`, a store's folder or Hub repo id, or a
    training set featurized here with `config`. A store's own config is used; a `config` that differs from it
    in anything that changes features is a `StoreMismatchError` (its query fields, `query_samples` and `query_noise`,
    apply to the queries; `given_config=False`: `config` is only the
    default for a training set), as is a pipeline, LoRA or projection other than the store's. `options`: the
    featurizer's (`checkpoints=`, `encoder=`); a loaded store's references are loaded only as `check_references` allows."""
    if isinstance(train_data, (str, os.PathLike)):
        train_data = FeatureStore.from_pretrained(train_data)
    if not isinstance(train_data, FeatureStore):
        config = config or AttributionConfig()
        featurizer = make_featurizer(pipe, config, **options)
        return featurizer, featurizer.featurize_dataset(train_data, progress=progress)
    store = train_data
    if config is not None and given_config and check_compatibility:
        store.check_compatible(config, {})
    check_references(store, config if given_config else None, options, trust_remote_references)
    # the query-role fields (query samples) of a given config apply to its queries: they never change features
    featurizer = make_featurizer(pipe, store.config.with_query_fields(config if given_config else None), store=store,
                                 **options)
    if check_compatibility:
        store.check_compatible(store.config, featurizer.metadata())
    return featurizer, store


class AttributionSession:
    """What a store determines for its queries, built once and reused for every call: the featurizer (with the
    store's fitted state: its projection is never regenerated), the scorer (the inverse (C + λI)⁻¹ solved once),
    and the compatibility and reference checks. The CLI and the explorer keep one per store.

        session = AttributionSession(pipe, store)             # or pipe.attribution_session(store)
        session.attribute(images, top_k=10)                   # TopK only: one streaming pass, no [n, N] matrix

    `train_data` and the keyword arguments: as `attribute` (a training set is featurized first). `search_device`
    (e.g. "cuda"): the store's rows are read once, verified, and held on that device; every `top_k` query is then
    an exact pass there (docs/scale.md: milliseconds at a million rows on a GPU) instead of on the CPU.
    """

    def __init__(self, pipe, train_data: Any, config: AttributionConfig | None = None, *, progress: bool = True,
                 check_compatibility: bool = True, trust_remote_references: bool = False, use_index: bool = True,
                 search_device: str | None = None, **options):
        self.featurizer, self.store = featurize_and_store(
            pipe, train_data, config, check_compatibility=check_compatibility, progress=progress,
            trust_remote_references=trust_remote_references, **options)
        score_fields = {}  # the query config's score-role fields override the store's: they never change features
        if config is not None and is_store(train_data):
            score_fields = {name: getattr(config, name) for name in config.fields_with_role("score")}
        self.scorer = make_scorer(self.store, **score_fields)
        self.index = None  # an approximate index of the store's rows, if one was built on this machine
        if use_index and hasattr(self.scorer, "index"):
            try:
                self.index = self.scorer.index(build=False, latest=True)  # built here, of any kind
            except ImportError:  # faiss is not installed: no index can have been built here
                self.index = None
        self.resident = None  # the store's rows held on `search_device` (a GPU): exact top-k there
        if search_device is not None:
            if not hasattr(self.scorer, "resident"):
                raise ValueError(f"method {self.store.config.method!r} is not scored through a kernel: "
                                 "search_device needs a kernel method")
            self.resident = self.scorer.resident(search_device)

    def build_index(self, **options):
        """Build (or find in this machine's cache) the FAISS index of the store's rows; later `top_k` queries use it
        unless `exact=True` (`KernelScorer.index` for the options). Returns the `search.SearchIndex`."""
        if not hasattr(self.scorer, "index"):
            raise ValueError(f"method {self.store.config.method!r} is not scored through a kernel: no index")
        self.index = self.scorer.index(build=True, **options)
        if self.index is None:
            raise ValueError("an index needs a store saved in a folder with more rows than features (the primal form)")
        return self.index

    def attribute(self, images: Any, prompts: Sequence[str] | str | None = None, *,
                  top_k: int | None = None, exact: bool = False, accelerator: Any = None) -> AttributionResult:
        """Scores of `images` [n, N] (`top_k=None`), or only the best `top_k` per query (`result.top`; for large
        stores: one streaming pass over the rows, memory independent of N; with an index built on this machine,
        its approximate top-k, unless `exact=True`). Under `accelerate launch` (or with an `accelerator`) a top-k
        is split by shards over the processes and their top-k merged: every process gets the whole answer."""
        n = len(self.store)
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= n):
            raise ValueError(f"top_k must be an integer from 1 to the store's {n} examples, got {top_k!r}")
        batch, prompts = query_batch(images, prompts)  # converted once, here
        query_features = self.featurizer.featurize_queries(batch, prompts)
        metadata = {**self.scorer.metadata, "example_hashes": self.store.example_hashes, "num_examples": n}
        if top_k is None:
            return AttributionResult(scores=self.scorer.scores(query_features), config=self.store.config,
                                     query_images=batch, metadata=metadata)
        # rows resident on a device: exact, so they serve exact=True too, before any approximate index
        index = self.resident if self.resident is not None else (None if exact else self.index)
        if index is not None:
            metadata["search"] = index.describe()
            return AttributionResult(scores=None, config=self.store.config, query_images=batch, metadata=metadata,
                                     top=self.scorer.topk(query_features, top_k, index=index))
        from .distributed import ProcessGroup, launched_with_several_processes

        if accelerator is not None or launched_with_several_processes():
            from .scoring import distributed_topk

            best = distributed_topk(self.scorer, query_features, top_k, ProcessGroup(accelerator))
        else:
            best = self.scorer.topk(query_features, top_k)
        return AttributionResult(scores=None, config=self.store.config, query_images=batch, metadata=metadata,
                                 top=best)


def attribute(pipe, images: Any, train_data: Any, config: AttributionConfig | None = None, *,
              prompts: Sequence[str] | str | None = None, progress: bool = True,
              check_compatibility: bool = True, trust_remote_references: bool = False,
              top_k: int | None = None, exact: bool = False, accelerator: Any = None, **options) -> AttributionResult:
    """Score `images` against a store (or its folder / Hub repo id) or a training set (featurized first): the one
    entry point (an `AttributionSession` used once).

    With a store, the store's config is used except for the score-only fields (`config.damping`,
    `config.damping_ratio`) and the query fields (`config.query_samples`, `config.query_noise`); anything else that
    differs is a `StoreMismatchError` unless `check_compatibility=False`. A store read from disk or the Hub that names checkpoints or an encoder needs
    them passed (`checkpoints=`, `encoder=`) or `trust_remote_references=True`: nothing it names is loaded otherwise.
    `top_k`: return only the best `top_k` training examples per query (`result.top`), no [n, N] matrix; the store's
    index, if one was built on this machine (`diffusers-attribution index STORE`), answers it unless `exact=True`;
    under `accelerate launch` (or with an `accelerator`) the store's shards are split over the processes.
    """
    session = AttributionSession(pipe, train_data, config, progress=progress, check_compatibility=check_compatibility,
                                 trust_remote_references=trust_remote_references, use_index=not exact, **options)
    return session.attribute(images, prompts, top_k=top_k, exact=exact, accelerator=accelerator)


# ---------------------------------------------------------------------------------------------- shortcuts
# Each builds a config and calls `attribute`, the one entry point.


def tracin_scores(pipe, train_dataset: Any, images: Any, checkpoints: Sequence | None = None,
                  learning_rates: Sequence[float] | None = None, config=None, *,
                  prompts: Sequence[str] | str | None = None, progress: bool = True):
    """Diffusion-TracIn (or ReTrac with `config.method="retrac"`) scores [n_queries, N] of `images`: `attribute`
    with `checkpoints` and `learning_rates` set in the config.

    `train_dataset`: a training set, or a `FeatureStore` featurized by the same method and checkpoints.
    `checkpoints`: state dicts, modules, paths or dicts (checkpoints.py); None = `config.checkpoints`,
    else the pipeline's current weights. `learning_rates`: η_c (None = `config.learning_rates`, else all 1).
    """
    import dataclasses

    from .checkpoints import describe
    from .methods.tracin import TRACIN_METHODS

    config = config or AttributionConfig(method=TRACIN_METHODS[0])
    if config.method not in TRACIN_METHODS:
        raise ValueError(f"tracin_scores needs method 'tracin' or 'retrac', not {config.method!r}")
    specs = list(checkpoints) if checkpoints is not None else config.checkpoints
    rates = list(learning_rates) if learning_rates is not None else config.learning_rates
    if checkpoints is not None:
        config = dataclasses.replace(config, checkpoints=[describe(spec) for spec in specs], learning_rates=rates)
    elif learning_rates is not None:
        config = dataclasses.replace(config, learning_rates=rates)
    return attribute(pipe, images, train_dataset, config, prompts=prompts, progress=progress, checkpoints=specs)


def retrac_scores(pipe, train_dataset, images, checkpoints=None, learning_rates=None, config=None, **kwargs):
    """`tracin_scores` with `method="retrac"` (normalized per-timestep gradients)."""
    import dataclasses

    from .methods.tracin import TRACIN_METHODS

    retrac = TRACIN_METHODS[1]
    config = dataclasses.replace(config, method=retrac) if config else AttributionConfig(method=retrac)
    return tracin_scores(pipe, train_dataset, images, checkpoints, learning_rates, config, **kwargs)


def similarity_scores(train_dataset: Any, images: Any, method: str | None = None, *, encoder=None,
                      processor=None, config=None, pipe=None):
    """Scores [n_queries, N] of a similarity baseline, without a pipeline (pass `pipe` to check image shapes):
    `attribute` with the baseline's config."""
    from .methods.similarity import SIMILARITY_METHODS

    config = config or AttributionConfig(method=method or SIMILARITY_METHODS[1])  # pixel cosine by default
    if config.method not in SIMILARITY_METHODS:
        raise ValueError(f"{config.method!r} is not a similarity method {SIMILARITY_METHODS}")
    options = {"encoder": encoder, "processor": processor} if get_method(config.method).embedding else {}
    return attribute(pipe, images, train_dataset, config, progress=False, check_compatibility=pipe is not None,
                     **options)
