"""Issue 23, item 5: training sets read as streams (a `datasets.IterableDataset`, an `ImageFolder`, a generator),
read in order, resumable, shared between processes, giving the same store, bit for bit, as a `datasets.Dataset`."""

from __future__ import annotations

import gc
import json
import os
import weakref
from pathlib import Path

import PIL.Image
import pytest
import torch
from tiny_pipelines import tiny_ddpm_pipeline

import diffusers_attribution.featurize as featurize_module
from diffusers_attribution import AttributionConfig, FeatureStore, InvalidImageError, StoreMismatchError, enable_attribution
from diffusers_attribution.data import ImageFolder, StreamError, as_training_data
from diffusers_attribution.featurize import Featurizer
from diffusers_attribution.store.format import read_shard_run

datasets = pytest.importorskip("datasets")

N, SHARD_ROWS = 9, 4  # 3 shards: 4, 4, 1 rows; batches of 3 inside each
BASE = dict(num_timesteps=2, projector="factored", projection_dim=8, batch_size=3, parameters=["conv_in.*", "conv_out.*"])
SEEDED = AttributionConfig(**BASE, calibration_examples=0)  # a function of seeds: no count needed
CALIBRATED = AttributionConfig(**BASE)  # the default: bases calibrated on examples picked out of all N
SUBSET = AttributionConfig(**BASE, calibration_examples=3)  # calibrated on 3 of the 9


@pytest.fixture(scope="module")
def pipe():
    pipe = enable_attribution(tiny_ddpm_pipeline(attention=False))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """N 8×8 grayscale PNGs, named so that their sorted order is their order."""
    root = tmp_path_factory.mktemp("images")
    pixels = torch.randint(0, 256, (N, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    for i, array in enumerate(pixels):
        PIL.Image.fromarray(array.numpy(), mode="L").save(root / f"{i:03d}.png")
    return root


def files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.png"))


def dataset(folder: Path):
    return datasets.Dataset.from_dict({"image": [str(p) for p in files(folder)]}).cast_column("image", datasets.Image())


def forms(folder: Path, with_generator: bool = True) -> dict:
    """The same images as a `datasets.Dataset`, a streamed `IterableDataset` (which does not say its length), a
    folder, and a generator of PIL images; with the keyword arguments each needs."""
    out = {"dataset": (dataset(folder), {}),
           "iterable": (dataset(folder).to_iterable_dataset(), {"num_examples": N}),
           "folder": (ImageFolder(folder), {})}
    if with_generator:
        out["generator"] = ((PIL.Image.open(p) for p in files(folder)), {})
    return out


def comparable(metadata: dict) -> dict:
    return {key: value for key, value in metadata.items() if key != "dataset_name"}


def assert_same_memory_store(store: FeatureStore, reference: FeatureStore) -> None:
    assert torch.equal(store.features, reference.features)
    assert store.example_hashes == reference.example_hashes
    assert comparable(store.metadata) == comparable(reference.metadata)
    assert store.config == reference.config
    state, expected = store.projection_state, reference.projection_state
    assert (state is None) == (expected is None)
    if expected is not None:
        assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)


def assert_same_folder(directory: Path, reference: Path) -> None:
    """Every file the same bytes, but config.json and the card, which differ only in dataset_name."""
    names = sorted(p.name for p in directory.iterdir())
    assert names == sorted(p.name for p in reference.iterdir())
    for name in names:
        if name in ("config.json", "README.md") or (directory / name).is_dir():
            continue
        assert (directory / name).read_bytes() == (reference / name).read_bytes(), name
    ours, theirs = (json.loads((d / "config.json").read_text()) for d in (directory, reference))
    assert comparable(ours) == comparable(theirs)
    store, expected = FeatureStore.from_pretrained(directory, verify=True), FeatureStore.from_pretrained(reference)
    assert torch.equal(store.features, expected.features) and store.example_hashes == expected.example_hashes


# ---------------------------------------------------------------------------------------------- the same store


def test_every_form_gives_the_same_store_in_memory_with_a_seeded_projection(pipe, folder):
    reference = None
    for name, (data, options) in forms(folder).items():
        options = {k: v for k, v in options.items() if k != "num_examples"}  # a seeded projection needs no count
        store = pipe.featurize(data, SEEDED, progress=False, **options)
        assert len(store) == N, name
        if reference is None:
            reference = store
        else:
            assert_same_memory_store(store, reference)
    assert reference.projection_state is None


def test_every_form_gives_the_same_store_in_memory_with_the_calibrated_projection(pipe, folder):
    stores = {name: pipe.featurize(data, CALIBRATED, progress=False, **options)
              for name, (data, options) in forms(folder, with_generator=False).items()}
    assert stores["dataset"].projection_state is not None
    for name, store in stores.items():
        assert_same_memory_store(store, stores["dataset"])


@pytest.mark.parametrize("config", [SEEDED, SUBSET], ids=["seeded", "calibrated"])
def test_every_form_gives_the_same_store_in_a_folder(pipe, folder, tmp_path, config):
    written = {}
    for name, (data, options) in forms(folder, with_generator=config is SEEDED).items():
        if name == "generator":
            options = {"num_examples": N}  # a generator does not say its length; the shard plan needs it
        pipe.featurize(data, config, progress=False, output_dir=tmp_path / name, shard_rows=SHARD_ROWS, **options)
        written[name] = tmp_path / name
    assert len(list(written["dataset"].glob("features-*.safetensors"))) == 3
    for name, directory in written.items():
        assert_same_folder(directory, written["dataset"])
    # ... and a store in memory the same features as one in a folder (up to rounding: shards batch rows otherwise)
    memory = pipe.featurize(ImageFolder(folder), config, progress=False)
    stored = FeatureStore.from_pretrained(written["folder"])
    torch.testing.assert_close(memory.features, stored.features, rtol=1e-5, atol=1e-6)
    assert memory.example_hashes == stored.example_hashes


def test_folder_captions_and_order_are_those_of_a_dataset(tmp_path):
    """A folder's images sorted by relative path, subfolders included, hidden files left out; captions from
    metadata.jsonl: the same examples (tensors, captions, hashes) as a Dataset of those images and captions."""
    pixels = torch.randint(0, 256, (4, 8, 8, 3), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    names = ["a.png", "b/c.png", "b/d.jpeg", "e.png"]
    captions = ["one", "two", "three", "four"]
    for name, array in zip(names, pixels):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        PIL.Image.fromarray(array.numpy()).save(tmp_path / name, **({"quality": 100} if name.endswith("jpeg") else {}))
    (tmp_path / ".hidden.png").write_bytes((tmp_path / "a.png").read_bytes())
    (tmp_path / "notes.txt").write_text("not an image")
    with open(tmp_path / "metadata.jsonl", "w") as handle:
        for name, caption in reversed(list(zip(names, captions))):  # any order: matched by file_name
            handle.write(json.dumps({"file_name": name, "text": caption}) + "\n")
    folder = ImageFolder(tmp_path)
    assert folder.files == names
    reference = datasets.Dataset.from_dict({"image": [str(tmp_path / n) for n in names], "text": captions}).cast_column(
        "image", datasets.Image())
    streamed, expected = as_training_data(folder), as_training_data(reference)
    assert streamed.streamed and not expected.streamed
    for i in range(4):
        image, caption = streamed[i]
        assert caption == captions[i] and torch.equal(image, expected[i][0])
        assert streamed.example_hash(i) == expected.example_hash(i)
    assert as_training_data(reference.to_iterable_dataset()).example_hash(3) == expected.example_hash(3)

    with open(tmp_path / "metadata.jsonl", "a") as handle:  # a caption for a file that is not there
        handle.write(json.dumps({"file_name": "gone.png", "text": "x"}) + "\n")
    with pytest.raises(ValueError, match="gone.png"):
        ImageFolder(tmp_path)


def test_folder_refuses_links_leading_out_and_names_a_missing_caption(tmp_path):
    inside, outside = tmp_path / "in", tmp_path / "out"
    inside.mkdir(), outside.mkdir()
    PIL.Image.new("L", (8, 8)).save(outside / "x.png")
    PIL.Image.new("L", (8, 8)).save(inside / "a.png")
    os.symlink(inside / "a.png", inside / "b.png")  # a link to a file inside: an image like any other
    assert ImageFolder(inside).files == ["a.png", "b.png"]
    os.symlink(outside / "x.png", inside / "c.png")
    with pytest.raises(ValueError, match="outside"):
        ImageFolder(inside)
    os.remove(inside / "c.png")
    os.symlink(outside, inside / "linked")
    with pytest.raises(ValueError, match="symbolic link to a folder"):
        ImageFolder(inside)
    os.remove(inside / "linked")
    (inside / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "a"}) + "\n")
    with pytest.raises(ValueError, match="no line for b.png"):
        ImageFolder(inside)
    with pytest.raises(TypeError, match="ImageFolder"):  # a bare path is not guessed to be a folder of images
        as_training_data(str(inside))


# ---------------------------------------------------------------------------------------------- resuming, processes


def test_a_killed_streamed_run_resumes_computing_only_the_missing_shards(pipe, folder, tmp_path, monkeypatch):
    reference = tmp_path / "reference"
    pipe.featurize(dataset(folder), SUBSET, progress=False, output_dir=reference, shard_rows=SHARD_ROWS)
    directory = tmp_path / "store"
    rows, computed = Featurizer.rows, []

    def killed_after_one_shard(self, data, start, stop, bar=None):
        if computed:
            raise KeyboardInterrupt("killed")
        computed.append((start, stop))
        return rows(self, data, start, stop, bar)

    monkeypatch.setattr(Featurizer, "rows", killed_after_one_shard)
    stream = dataset(folder).to_iterable_dataset()
    with pytest.raises(KeyboardInterrupt):
        pipe.featurize(stream, SUBSET, progress=False, output_dir=directory, shard_rows=SHARD_ROWS, num_examples=N)
    assert [p.name for p in directory.glob("features-*")] == ["features-00000-of-00003.safetensors"]
    assert not (directory / "config.json").exists()
    kept = (directory / "features-00000-of-00003.safetensors").stat().st_mtime_ns

    computed.clear()

    def spy(self, data, start, stop, bar=None):
        computed.append((start, stop))
        return rows(self, data, start, stop, bar)

    monkeypatch.setattr(Featurizer, "fit", lambda *a, **k: pytest.fail("fitted again instead of resuming"))
    monkeypatch.setattr(Featurizer, "rows", spy)
    # A stream whose finished rows changed is refused, naming the example (checked by hash where it is read).
    changed = datasets.Dataset.from_dict({"image": [str(p) for p in files(folder)[::-1]]}).cast_column(
        "image", datasets.Image())
    with pytest.raises(StoreMismatchError, match="training example 0 differs"):
        pipe.featurize(changed.to_iterable_dataset(), SUBSET, progress=False, output_dir=directory,
                       shard_rows=SHARD_ROWS, num_examples=N)
    assert computed == []
    store = pipe.featurize(stream, SUBSET, progress=False, output_dir=directory, shard_rows=SHARD_ROWS, num_examples=N)
    assert computed == [(4, 8), (8, 9)]
    assert (directory / "features-00000-of-00003.safetensors").stat().st_mtime_ns == kept
    assert len(store) == N
    assert_same_folder(directory, reference)


def _featurize_stream_in_process(root: Path, folder: Path, out: Path) -> None:
    from accelerate import PartialState
    from diffusers import DiffusionPipeline

    state = PartialState(cpu=True)
    pipe = enable_attribution(DiffusionPipeline.from_pretrained(root / "pipe"))
    computed = []
    rows = Featurizer.rows

    def spy(self, data, start, stop, bar=None):
        computed.append([start, stop])
        return rows(self, data, start, stop, bar)

    Featurizer.rows = spy
    stream = dataset(folder).to_iterable_dataset()
    pipe.featurize(stream, SUBSET, progress=False, output_dir=out, shard_rows=SHARD_ROWS, num_examples=N,
                   accelerator=state)
    (root / f"computed-{state.process_index}.json").write_text(json.dumps(computed))


def test_two_processes_on_a_stream_write_the_same_store(pipe, folder, tmp_path):
    from test_distributed import launch

    pipe.save_pretrained(tmp_path / "pipe")
    reference = tmp_path / "one"
    pipe.featurize(ImageFolder(folder), SUBSET, progress=False, output_dir=reference, shard_rows=SHARD_ROWS)
    launch(_featurize_stream_in_process, tmp_path, folder, tmp_path / "two")
    # each process featurized its own shards only (round robin), reading past the others' rows
    assert json.loads((tmp_path / "computed-0.json").read_text()) == [[0, 4], [8, 9]]
    assert json.loads((tmp_path / "computed-1.json").read_text()) == [[4, 8]]
    writers = {p.name: read_shard_run(p)["process"] for p in sorted((tmp_path / "two").glob("features-*"))}
    assert list(writers.values()) == ["0/2", "1/2", "0/2"]
    store, expected = FeatureStore.from_pretrained(tmp_path / "two", verify=True), FeatureStore.from_pretrained(reference)
    assert torch.equal(store.features, expected.features) and store.example_hashes == expected.example_hashes
    torch.testing.assert_close(store.kernel, expected.kernel, rtol=1e-12, atol=1e-12)  # summed over processes


# ---------------------------------------------------------------------------------------------- bad input


def test_a_non_image_in_a_stream_is_named_by_its_position_and_nothing_is_finished(pipe, folder, tmp_path):
    def stream():
        for i, path in enumerate(files(folder)):
            yield "not an image" if i == 5 else PIL.Image.open(path)

    with pytest.raises(InvalidImageError, match="training example 5: cannot read an image from a str"):
        pipe.featurize(stream(), SEEDED, progress=False, output_dir=tmp_path / "store", shard_rows=SHARD_ROWS,
                       num_examples=N)
    assert not (tmp_path / "store" / "config.json").exists()
    assert [p.name for p in (tmp_path / "store").glob("features-*")] == ["features-00000-of-00003.safetensors"]
    with pytest.raises(InvalidImageError, match="training example 5"):
        pipe.featurize(stream(), SEEDED, progress=False)


def test_empty_streams_are_refused(pipe, folder, tmp_path):
    with pytest.raises(ValueError, match="the training dataset is empty"):
        pipe.featurize(iter([]), SEEDED, progress=False)
    with pytest.raises(ValueError, match="the training dataset is empty"):
        pipe.featurize(ImageFolder(tmp_path), SEEDED, progress=False, output_dir=tmp_path / "store")
    assert not (tmp_path / "store").exists()
    empty = dataset(folder).to_iterable_dataset().take(0)
    with pytest.raises(ValueError, match="the training dataset is empty"):
        pipe.featurize(empty, SEEDED, progress=False)


def test_what_a_stream_of_unknown_length_cannot_do_is_refused_before_any_work(pipe, folder, tmp_path, monkeypatch):
    monkeypatch.setattr(Featurizer, "rows", lambda *a, **k: pytest.fail("featurized"))
    monkeypatch.setattr(Featurizer, "fit", lambda *a, **k: pytest.fail("fitted"))
    stream = dataset(folder).to_iterable_dataset()
    with pytest.raises(StreamError, match=r"pass num_examples=N, or use a seeded projection"):
        pipe.featurize(stream, CALIBRATED, progress=False)  # the fit examples are picked out of all N
    with pytest.raises(StreamError, match=r"output_dir= plans its shards .* pass num_examples=N"):
        pipe.featurize(stream, SEEDED, progress=False, output_dir=tmp_path / "store")
    generator = (PIL.Image.open(p) for p in files(folder))
    with pytest.raises(StreamError, match="can be read only once"):  # a fit reads the fit examples first
        pipe.featurize(generator, CALIBRATED, progress=False, num_examples=N)
    assert not (tmp_path / "store" / "config.json").exists()


def test_a_stream_of_another_length_than_it_says_is_refused(pipe, folder):
    stream = dataset(folder).to_iterable_dataset()
    with pytest.raises(StreamError, match=f"ended after {N} examples, but num_examples= says {N + 1}"):
        pipe.featurize(stream, SEEDED, progress=False, num_examples=N + 1)
    with pytest.raises(StreamError, match=f"more than the {N - 1} examples num_examples= says"):
        pipe.featurize(stream, SEEDED, progress=False, num_examples=N - 1)


def test_a_stream_is_read_one_batch_ahead_at_most(pipe, folder, monkeypatch):
    """Memory independent of N: when the generator is asked for example k, the featurizer has already been given
    every example but the last batch's (so at most one batch is read and not yet featurized), and at most two of
    the images it made are still alive. Reading the stream into a list first fails both."""
    handed = [0]
    batches = featurize_module.training_batches

    def counted(*args, **kwargs):
        for batch in batches(*args, **kwargs):
            yield batch
            handed[0] += len(batch[0])

    monkeypatch.setattr(featurize_module, "training_batches", counted)
    alive: list = []  # weak references to the images made
    most = [0]

    def stream():
        for k, path in enumerate(files(folder) * 3):  # 27 examples
            if k - handed[0] > SEEDED.batch_size:
                raise AssertionError(f"example {k} asked for when only {handed[0]} were featurized")
            image = PIL.Image.open(path)
            image.load()
            alive.append(weakref.ref(image))
            gc.collect()
            most[0] = max(most[0], sum(ref() is not None for ref in alive))
            yield image

    store = pipe.featurize(stream(), SEEDED, progress=False)
    assert len(store) == 3 * N and handed[0] == 3 * N
    assert most[0] <= 2


def test_tracin_and_a_baseline_read_a_stream_as_a_dataset(pipe, folder, monkeypatch):
    """TracIn reads each range once per checkpoint: a folder or an IterableDataset is read again from the start,
    a one-time generator is refused by name; the pixel baseline learns its width from the first example."""
    other = tiny_ddpm_pipeline(attention=False, seed=1).unet.state_dict()
    config = AttributionConfig(method="tracin", projector="gaussian", projection_dim=8, num_timesteps=1,
                               batch_size=4, checkpoints=None)
    options = dict(progress=False, checkpoints=[pipe.unet.state_dict(), other])
    reference = pipe.featurize(dataset(folder), config, **options)
    for data, extra in [(ImageFolder(folder), {}), (dataset(folder).to_iterable_dataset(), {"num_examples": N})]:
        store = pipe.featurize(data, config, **options, **extra)
        assert torch.equal(store.features, reference.features) and store.example_hashes == reference.example_hashes
    from diffusers_attribution.checkpoint_features import CheckpointFeaturizer

    monkeypatch.setattr(CheckpointFeaturizer, "rows", lambda *a, **k: pytest.fail("featurized before refusing"))
    with pytest.raises(StreamError, match=r"once per checkpoint \(2\); a one-time iterator \(generator\)"):
        pipe.featurize((PIL.Image.open(p) for p in files(folder)), config, **options, num_examples=N)
    pixels = AttributionConfig(method="pixel-cosine")
    expected = pipe.featurize(dataset(folder), pixels, progress=False)
    store = pipe.featurize((PIL.Image.open(p) for p in files(folder)), pixels, progress=False)
    assert torch.equal(store.features, expected.features) and len(store) == N


def test_a_stream_that_changes_between_passes_is_refused(pipe, folder):
    """A fit reads its examples, then the featurization reads the stream again from the start: it must give the
    same examples there (checked by hash on the fit examples), as a shuffled stream does not."""
    class Reshuffled:
        def __init__(self):
            self.passes = 0

        def __iter__(self):
            self.passes += 1
            order = files(folder) if self.passes == 1 else files(folder)[::-1]
            return (PIL.Image.open(p) for p in order)

    with pytest.raises(StreamError, match="differs from the one read there before"):
        pipe.featurize(Reshuffled(), SUBSET, progress=False, num_examples=N)
    steady = pipe.featurize(ImageFolder(folder), SUBSET, progress=False)
    again = type("Steady", (), {"__iter__": lambda self: (PIL.Image.open(p) for p in files(folder))})()
    assert torch.equal(pipe.featurize(again, SUBSET, progress=False, num_examples=N).features, steady.features)


def test_a_folder_opens_only_the_images_it_reads(pipe, folder, monkeypatch):
    """A calibrated projection reads its 3 fit examples, then every example once: a folder opens those files and
    no others (rows passed over by position are not opened)."""
    opened = []
    load = ImageFolder.load

    def counted(self, index):
        opened.append(index)
        return load(self, index)

    monkeypatch.setattr(ImageFolder, "load", counted)
    data = ImageFolder(folder)
    store = pipe.featurize(data, SUBSET, progress=False)
    fit = Featurizer(pipe, SUBSET).projector.fit_examples(N)
    assert len(fit) == 3 and fit != [0, 1, 2]
    # the first image (peeked: is the stream empty?), the fit examples, then every image once
    assert opened == [0, *[i for i in fit if i != 0], *range(N)]
    assert len(store) == N


def test_a_streamed_dataset_that_says_its_length_needs_no_count(pipe, folder):
    """`load_dataset(..., streaming=True)` (here datasets' own imagefolder, offline) gives the folder's store; a
    stream whose `info.splits` has the count (as a Hub dataset's does) needs no num_examples=, and one whose count
    is wrong (a filtered stream keeps its source's info) is refused, saying how to give the true one."""
    streamed = datasets.load_dataset("imagefolder", data_dir=str(folder), split="train", streaming=True)
    assert type(streamed).__name__ == "IterableDataset"
    reference = pipe.featurize(ImageFolder(folder), SUBSET, progress=False)
    assert torch.equal(pipe.featurize(streamed, SUBSET, progress=False, num_examples=N).features, reference.features)

    def stream_saying(count: int):
        stream = dataset(folder).to_iterable_dataset()
        stream.info.splits = datasets.SplitDict({"train": datasets.SplitInfo("train", num_examples=count)})
        stream._split = datasets.NamedSplit("train")  # as load_dataset(..., split="train", streaming=True) sets it
        return stream

    store = pipe.featurize(stream_saying(N), SUBSET, progress=False)
    assert torch.equal(store.features, reference.features)
    with pytest.raises(StreamError, match=r"ended after 9 examples, but the dataset's info.splits\['train'\]"
                                          r".num_examples says 12: pass its true length as num_examples="):
        pipe.featurize(stream_saying(12), SUBSET, progress=False)
    assert torch.equal(pipe.featurize(stream_saying(12), SUBSET, progress=False, num_examples=N).features,
                       reference.features)


def test_a_store_checks_a_stream_against_its_examples(pipe, folder):
    store = pipe.featurize(dataset(folder), SEEDED, progress=False)
    store.check_dataset(ImageFolder(folder))
    store.check_dataset(PIL.Image.open(p) for p in files(folder))  # a generator: taken to have the store's length
    with pytest.raises(StoreMismatchError, match="training example 0 differs"):
        store.check_dataset(PIL.Image.open(p) for p in files(folder)[::-1])
    with pytest.raises(StoreMismatchError, match="more than the 9 examples the store says"):
        store.check_dataset(PIL.Image.open(p) for p in files(folder) + files(folder)[:1])
    with pytest.raises(StoreMismatchError, match="ended after 8 examples"):
        store.check_dataset(PIL.Image.open(p) for p in files(folder)[:8])
    with pytest.raises(StreamError, match="num_examples=8, but ImageFolder"):
        as_training_data(ImageFolder(folder), num_examples=8)
