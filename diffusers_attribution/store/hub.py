"""Feature stores on the Hugging Face Hub: dataset repositories, pushed with `upload_folder`, pulled with
`snapshot_download`, described by a dataset card (README.md) generated from the store's config.json."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from huggingface_hub import DatasetCard, DatasetCardData, HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError
from huggingface_hub.utils import HFValidationError, validate_repo_id

from .backends import register_backend
from .errors import CorruptStoreError
from .files import CARD_MARKER, CARD_NAME, CONFIG_NAME, file_digest, store_path
from .schema import listed_entries, listed_files, method_facts, parse_header, timestep_range, validate_header

CITATIONS = """```bibtex
@inproceedings{park2023trak,
  title     = {TRAK: Attributing Model Behavior at Scale},
  author    = {Park, Sung Min and Georgiev, Kristian and Ilyas, Andrew and Leclerc, Guillaume and Madry, Aleksander},
  booktitle = {International Conference on Machine Learning (ICML)},
  year      = {2023}
}

@inproceedings{zheng2024intriguing,
  title     = {Intriguing Properties of Data Attribution on Diffusion Models},
  author    = {Zheng, Xiaosen and Pang, Tianyu and Du, Chao and Jiang, Jing and Lin, Min},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2024}
}
```"""

GRID_NAME = "attribution_grid.png"  # the card's picture, when a grid is pushed with the store


def store_card(header: dict[str, Any], repo_id: str | None = None, space: str | None = None, *,
               location: str | os.PathLike | None = None, image: str | os.PathLike | None = None,
               license: str | None = None) -> DatasetCard:
    """The README.md of a store: what was featurized, how, how to load it, and what to cite.

    `repo_id`: the Hub repository the card is pushed to (its title and usage); else `location`, the store's
    directory. `space`: the Hub id of an explorer Space over it (`diffusers-attribution explore
    --export-space`), linked when given. `image`: an attribution grid shown on the card (pushed next to it as
    `GRID_NAME`). `license`: the card's license metadata.
    """
    config = header["config"]
    name = repo_id or (str(location) if location is not None else None)
    base_model = header.get("base_model")
    dataset = header.get("dataset_name")
    lora = header.get("lora_adapters") or []
    tags = ["diffusers-attribution", "data-attribution", config["method"], "diffusers"]
    data = DatasetCardData(
        pretty_name=f"{config['method'].upper()} features of {dataset or 'a training set'}",
        tags=tags,
        viewer=False,
        **({"base_model": base_model} if _on_hub(base_model) else {}),
        **({"datasets": [dataset]} if _on_hub(dataset) else {}),
        **({"license": license} if license else {}),
    )
    within = timestep_range(config)
    timesteps = f"{config['num_timesteps']} ({config['timestep_schedule']}" + (f", {within}" if within else "") + ")"
    title = method_facts(header, config["method"]).get("title")
    kernel = header.get("kernel")
    rows = [
        ("method", f"`{config['method']}`, output `{config['output']}`"
                   + (f" — {title}" if title else "")),
        ("base model", (_code(base_model) if base_model else "not recorded")
                       + f" ({header.get('pipeline', '?')}, family `{header.get('family', '?')}`)"),
        ("LoRA adapter", ", ".join(_code(a) for a in lora) if lora else "none"),
        ("parameters", f"`{config['parameters']}`"),
        ("dataset", (_code(dataset) if dataset else "name not recorded") + f", {header['num_examples']} examples "
                    f"(fingerprint `{header.get('dataset_fingerprint')}`)"),
        ("features", f"k = {header['dim']}, projector `{config['projector']}` (seed {config['projection_seed']})"),
        ("timesteps", timesteps),
        ("noise", f"`{config['noise_mode']}`, seed {config['noise_seed']}"),
        ("shards", f"{len(header['shards'])} × ≤ {header['shard_rows']} rows, float32 safetensors"),
        ("kernel", f"{kernel['form']} Gram matrix, float64" if kernel else "not stored (computed when scoring)"),
        ("model fingerprint", f"`{json.dumps(header.get('model_fingerprint'))}`"),
        ("package", f"diffusers-attribution {header.get('package_version', '?')}, store format {header.get('format_version')}"),
    ]
    table = "\n".join(f"| {key} | {value} |" for key, value in rows)
    explore = (f"\n\nExplore it in the browser: [{space}](https://huggingface.co/spaces/{space}) (upload an image, "
               "see its top-k training images)." if space else "")
    heading = f"Attribution features: {name}" if name else f"Attribution features of {dataset or 'a training set'}"
    heading = " ".join(heading.split())  # one line, whatever the names hold
    # The copy-paste snippets hold the names as Python literals (repr), so no name can add code to them.
    where = _literal(str(name)) if name else "store_directory"
    if base_model:
        load_pipe = f"pipe = enable_attribution(DiffusionPipeline.from_pretrained({_literal(base_model)}))"
    else:
        load_pipe = "pipe = enable_attribution(pipe)  # the pipeline the store was featurized from (config.json fingerprints)"
    fetch = "downloads this store" if repo_id else "reads this store"
    fence = "`" * max(3, 1 + max((len(run) for run in re.findall("`+", load_pipe + where)), default=0))
    picture = "" if image is None else f"""
![Attribution grid]({GRID_NAME})

Each query image (left, boxed) beside its top-k training images, with their index and score: higher = that
training image made the query more likely.
"""
    body = f"""
# {heading}

Projected per-example gradients Φ [N, k] of a diffusion model's training set, made with
diffusers-attribution. Score any image generated by the model against this training set without
featurizing it again.{explore}
{picture}
| | |
|---|---|
{table}

## Use

{fence}python
from diffusers import DiffusionPipeline
from diffusers_attribution import enable_attribution

{load_pipe}
result = pipe.attribute(images, {where})   # {fetch}, checks it matches the pipeline
result.topk(5)
{fence}

or, without a pipeline:

{fence}python
from diffusers_attribution import FeatureStore

store = FeatureStore.from_pretrained({where})   # memory-mapped shards
for start, block in store.blocks():               # Φ[start:start + len(block)], float32
    ...
{fence}

Scoring refuses a pipeline, LoRA adapter, projection or configuration other than the one recorded in
`config.json` (pass `check_compatibility=False` to override). Nothing here is pickled: the features are
safetensors and the configuration is JSON.

## Files

- `config.json`: the full `AttributionConfig`, projection spec, model and LoRA fingerprints, dataset
  size and fingerprint, and each shard's rows, size and sha256.
- `features-XXXXX-of-YYYYY.safetensors`: `features` (float32 [rows, k]) and `example_hashes`
  (uint8 [rows, 8], the content hash of each training example).
- `kernel.safetensors`: `gram`, ΦᵀΦ (or ΦΦᵀ when N ≤ k) in float64, if present.

## Citation

{CITATIONS}

{CARD_MARKER}
"""
    return DatasetCard(f"---\n{data.to_yaml()}\n---\n{body}")


def _literal(text: str) -> str:
    """`text` as a Python string literal: its repr (a quote or anything else in it is escaped), in double quotes
    when it holds no quote at all."""
    literal = repr(str(text))
    return f'"{literal[1:-1]}"' if "'" not in text and '"' not in text else literal


def _code(value: Any) -> str:
    """A name as inline code in a table cell: one line, `|` escaped, fenced by more backticks than it holds."""
    text = " ".join(str(value).split()).replace("|", "\\|")
    fence = "`" * (1 + max((len(run) for run in re.findall("`+", text)), default=0))
    return f"{fence} {text} {fence}" if "`" in text else f"`{text}`"


def _on_hub(value: str | None) -> bool:
    """A Hub repo id (card metadata links it), not a local path."""
    return bool(value) and is_repo_id(value) and not Path(value).exists()


def is_repo_id(value: str) -> bool:
    """True for `user/name`-style strings that are not local paths."""
    value = str(value)
    if value.startswith((".", "/", "~")) or os.sep != "/" and os.sep in value:
        return False
    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


def download_store(repo_id: str, *, revision: str | None = None, endpoint: str | None = None,
                   token: str | bool | None = None, cache_dir: str | os.PathLike | None = None) -> Path:
    """Download a store from a Hub dataset repository; returns the local snapshot directory.

    config.json first, validated (store/schema.py); then exactly the files it lists (and the card), from the same
    commit: a repository's other files are never downloaded."""
    if not is_repo_id(repo_id):
        raise FileNotFoundError(f"no feature store at {repo_id!r}: not a directory, and not a Hub repo id (user/name)")
    options = dict(repo_type="dataset", endpoint=endpoint, token=token, cache_dir=cache_dir)
    try:
        config_path = Path(hf_hub_download(repo_id, CONFIG_NAME, revision=revision, **options))
    except RepositoryNotFoundError as error:
        raise FileNotFoundError(f"no feature store at {repo_id!r}: not a local directory, and no Hub dataset "
                                f"repository of that name is visible (private? pass token=)") from error
    except EntryNotFoundError as error:
        raise FileNotFoundError(f"the Hub dataset repository {repo_id!r} holds no feature store (no {CONFIG_NAME})") from error
    commit = config_path.parent.name  # snapshots/<commit>/config.json: the rest comes from the same commit
    where = f"{repo_id}@{commit}/{CONFIG_NAME}"
    _, header = validate_header(parse_header(config_path, where), where)
    names = listed_files(header)[1:] + [CARD_NAME]
    return Path(snapshot_download(repo_id, revision=commit, allow_patterns=names, **options))


def push_store(store, repo_id: str, *, private: bool | None = None, token: str | bool | None = None,
               endpoint: str | None = None, revision: str | None = None,
               commit_message: str = "Upload feature store", space: str | None = None,
               image: str | os.PathLike | None = None, license: str | None = None) -> Any:
    """Create the dataset repository `repo_id` if needed and upload the store's files in one commit.

    The card links to the explorer Space `space` when given; `image`: an attribution grid (PNG) uploaded as
    `GRID_NAME` and shown on the card; `license`: the card's license metadata.

    Only the files config.json lists are uploaded, each a regular file of the store (files.store_path), staged
    as a hard link (or a copy) whose size and sha256 are checked against config.json after staging, so the
    bytes uploaded are the bytes checked; the card is generated here.
    """
    api = HfApi(endpoint=endpoint, token=token)
    with tempfile.TemporaryDirectory(prefix="feature-store-") as scratch:
        directory = store.directory if store.directory is not None else store.save_pretrained(Path(scratch) / "store")
        staging = Path(scratch) / "upload"
        staging.mkdir()
        _stage(store_path(directory, CONFIG_NAME), staging / CONFIG_NAME)
        where = str(directory / CONFIG_NAME)
        _, header = validate_header(parse_header(staging / CONFIG_NAME, where), where)
        for entry in listed_entries(header):
            staged = staging / entry["file"]
            _stage(store_path(directory, entry["file"]), staged)
            if file_digest(staged) != (entry["bytes"], entry["sha256"]):
                raise CorruptStoreError(f"{directory / entry['file']} does not match the size and sha256 config.json "
                                        "records: not uploaded")
        if image is not None:
            shutil.copy2(image, staging / GRID_NAME)
        card = store_card(header, repo_id, space, image=image, license=license)
        (staging / CARD_NAME).write_text(str(card), encoding="utf-8")
        api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        return api.upload_folder(repo_id=repo_id, repo_type="dataset", folder_path=staging, revision=revision,
                                 commit_message=commit_message)


def _stage(source: Path, target: Path) -> None:
    """`target` holds `source`'s bytes: a hard link (no copy) where the filesystem allows, else a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


register_backend("hub", claims=is_repo_id, fetch=download_store)
