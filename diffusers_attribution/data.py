"""Training data and query images in, image tensors in [-1, 1] out, each example with a stable id.

Accepted inputs: a `datasets.Dataset` (image column, optional caption column), a torch `Dataset` or a list
whose items are PIL images, numpy arrays, tensors, `(image, caption)` tuples or dicts, or one tensor
[N, C, H, W] already in [-1, 1]. Numbers become tensors through diffusers' `VaeImageProcessor`.

Training sets that do not fit in memory are streamed (`StreamedTrainingData`): a `datasets.IterableDataset`
(`streaming=True`), an `ImageFolder`, or any other iterable of such items (a generator), read in order, one batch
at a time. Example ids are positions in both cases, and an example's tensor and hash do not depend on the form.
"""

from __future__ import annotations

import collections.abc
import contextlib
import hashlib
import json
import numbers
import os
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import PIL.Image
import torch
from diffusers.image_processor import VaeImageProcessor

IMAGE_COLUMNS = ("image", "img", "pixel_values", "images")
CAPTION_COLUMNS = ("text", "caption", "prompt", "captions")


class InvalidImageError(ValueError):
    """An image that cannot be attributed: wrong shape, channels, size, range, or non-finite values."""


def to_image_tensor(image: Any) -> torch.Tensor:
    """One image (PIL, numpy HWC/HW in [0, 1] or uint8, tensor CHW in [-1, 1]) → float32 tensor [C, H, W] in [-1, 1]."""
    if isinstance(image, PIL.Image.Image):
        array = pil_to_array(image)[None]  # [1, H, W(, C)] in [0, 1]
        return VaeImageProcessor.normalize(VaeImageProcessor.numpy_to_pt(array))[0]
    if isinstance(image, np.ndarray):
        array = image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image.astype(np.float32)
        if array.ndim not in (2, 3):
            raise InvalidImageError(f"a numpy image must be HW or HWC, got shape {image.shape}")
        tensor = VaeImageProcessor.numpy_to_pt(array[None])[0]
        _check_range(tensor * 2 - 1, "numpy image (expected values in [0, 1] or uint8)")
        return VaeImageProcessor.normalize(tensor)
    if isinstance(image, torch.Tensor):
        tensor = image.detach().to(torch.float32, copy=True).cpu()
        if tensor.ndim == 2:
            tensor = tensor[None]
        if tensor.ndim != 3:
            raise InvalidImageError(f"an image tensor must be [C, H, W], got shape {tuple(image.shape)}")
        _check_range(tensor, "image tensor (expected values in [-1, 1])")
        return tensor
    raise InvalidImageError(f"cannot read an image from a {type(image).__name__}")


MAX_IMAGE_PIXELS = 4096 * 4096  # an image file from outside (a CLI query, an explorer upload): checked before decoding
HIGH_DEPTH_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")  # 16/32-bit: 8-bit conversion would clip them


def open_image_file(path: Any, mode: str | None = None, max_pixels: int = MAX_IMAGE_PIXELS) -> PIL.Image.Image:
    """An image file from outside, decoded only once its header has passed: at most `max_pixels` pixels (PIL reads
    only the header on open; its own decompression-bomb limit is an error too). Converted to `mode` ("L", "RGB")
    when given, except that a conversion never clips: a one-channel 16-bit (I;16) or float (F) image is returned as
    it is, for `to_image_tensor` to scale as the Python API does (16 bits / 65535); 32-bit integer images (I), or
    16-bit ones where 3 channels are wanted, are refused. Failures are an `InvalidImageError`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
            with PIL.Image.open(path) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise InvalidImageError(f"the image {path} is {width}×{height} pixels, more than the {max_pixels} "
                                            "an image may have here: refused before decoding it")
                if image.mode in HIGH_DEPTH_MODES:
                    if image.mode == "I" or mode not in (None, "L"):
                        raise InvalidImageError(
                            f"the image {path} has {image.mode!r} pixels (16 or 32 bits) and cannot be read here "
                            f"without clipping{' as ' + mode if mode else ''}: save it as an 8-bit image, or pass it "
                            "to the Python API as an array in [0, 1]")
                    image.load()
                    pil_to_array(image)  # its range is checked now (F must lie in [0, 1]), not later
                    return image.copy()  # to_image_tensor scales it by its bit depth
                image.load()
                return image.convert(mode) if mode and image.mode != mode else image.copy()
    except (PIL.Image.DecompressionBombError, PIL.Image.DecompressionBombWarning) as error:
        raise InvalidImageError(f"the image {path} is refused: {error}") from None
    except (PIL.UnidentifiedImageError, OSError, SyntaxError) as error:
        raise InvalidImageError(f"cannot read the image {path}: {error}") from None


# PIL modes by what their numbers mean: scaled by the mode's bit depth to [0, 1].
_PIL_SCALE = {"L": 255, "LA": 255, "RGB": 255, "RGBA": 255, "RGBX": 255, "RGBa": 255, "La": 255,
              "I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "F": 1}
_PIL_TO_RGB = {"P": "RGB", "PA": "RGBA", "CMYK": "RGB", "YCbCr": "RGB"}  # converted by PIL first


def pil_to_array(image: PIL.Image.Image) -> np.ndarray:
    """A PIL image → float32 [H, W] or [H, W, C] in [0, 1], by its mode's bit depth: 8-bit modes / 255, 16-bit
    (`I;16*`) / 65535, `1` as 0 / 1, `F` as is (it must lie in [0, 1]); palette, CMYK and YCbCr images are converted
    to RGB(A) by PIL. Modes without a fixed range (`I`: 32-bit integers) or colour meaning are an InvalidImageError."""
    mode = image.mode
    if mode in _PIL_TO_RGB:
        image, mode = image.convert(_PIL_TO_RGB[mode]), _PIL_TO_RGB[mode]
    if mode == "1":
        return np.asarray(image, dtype=bool).astype(np.float32)
    if mode not in _PIL_SCALE:
        raise InvalidImageError(f"cannot interpret a PIL image of mode {mode!r} (no fixed value range or colour "
                                "meaning): convert it first, e.g. image.convert('RGB'), or pass an array in [0, 1]")
    array = np.asarray(image).astype(np.float32) / _PIL_SCALE[mode]
    _check_range(torch.from_numpy(array) * 2 - 1, f"PIL image of mode {mode!r} (expected values in [0, 1])")
    return array


def to_image_batch(images: Any) -> torch.Tensor:
    """Query images (tensor [n, C, H, W], one image, or a list) → float32 tensor [n, C, H, W] in [-1, 1]."""
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        return torch.stack([to_image_tensor(image) for image in images]) if len(images) else images.float()
    if isinstance(images, np.ndarray) and images.ndim == 4:
        images = list(images)
    if not isinstance(images, (list, tuple)):
        images = [images]
    if len(images) == 0:
        raise InvalidImageError("no query images were given")
    tensors = [to_image_tensor(image) for image in images]
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) != 1:
        raise InvalidImageError(f"query images have different shapes: {sorted(shapes)}")
    return torch.stack(tensors)


def _check_range(tensor: torch.Tensor, what: str) -> None:
    if not torch.isfinite(tensor).all():
        raise InvalidImageError(f"{what} contains NaN or infinite values")
    low, high = tensor.min().item(), tensor.max().item()
    if low < -1.0 - 1e-3 or high > 1.0 + 1e-3:
        raise InvalidImageError(f"{what} has values in [{low:.3g}, {high:.3g}]")


class TrainingData:
    """A read-only view of a training set: `data[i]` → (image tensor [C, H, W] in [-1, 1], caption or None).

    Example ids are the positions 0..N-1 of the underlying dataset; they seed per-example noise and name
    rows of the feature store.
    """

    def __init__(self, dataset: Any, image_column: str | None = None, caption_column: str | None = None):
        self.dataset = dataset
        self.image_column = image_column
        self.caption_column = caption_column
        if _is_hf_dataset(dataset):
            columns = dataset.column_names
            self.image_column = image_column or _find_image_column(columns)
            if self.image_column not in columns:
                raise ValueError(f"image column {self.image_column!r} is not in the dataset columns {columns}")
            self.caption_column = caption_column or next((c for c in CAPTION_COLUMNS if c in columns), None)
        if len(self) == 0:
            raise ValueError("the training dataset is empty")

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str | None]:
        return self._example(self.dataset[int(index)], index)

    def _example(self, item: Any, index: int) -> tuple[torch.Tensor, str | None]:
        """One raw item (a row, a dict, a tuple, an image) at position `index` → (image tensor, caption)."""
        caption = None
        if _is_hf_dataset(self.dataset) and self.image_column is not None and isinstance(item, dict):
            image = item[self.image_column]
            caption = item[self.caption_column] if self.caption_column else None
        elif isinstance(item, dict):
            try:
                image = item[self.image_column or _find_image_column(list(item))]
            except (KeyError, ValueError) as error:
                raise InvalidImageError(f"training example {index}: {error}") from None
            caption_key = self.caption_column or next((c for c in CAPTION_COLUMNS if c in item), None)
            caption = item[caption_key] if caption_key else None
        elif isinstance(item, (tuple, list)):
            image = item[0] if item else None
            # a caption, or an integer class label for class-conditional pipelines (DiT)
            caption = item[1] if len(item) > 1 and isinstance(item[1], (str, numbers.Integral)) else None
        else:
            image = item
        try:
            return to_image_tensor(image), caption
        except InvalidImageError as error:
            raise InvalidImageError(f"training example {index}: {error}") from None

    def batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, list[str | None]]:
        items = [self[i] for i in indices]
        images = [image for image, _ in items]
        shapes = {tuple(image.shape) for image in images}
        if len(shapes) != 1:
            raise InvalidImageError(f"training examples {list(indices)} have different shapes: {sorted(shapes)}")
        return torch.stack(images), [caption for _, caption in items]

    def example_hash(self, index: int) -> str:
        return content_hash(*self[index])

    streamed = False  # random access
    one_shot = False

    def pinned(self, indices: Sequence[int]):
        """Rows read more than once in a row (a projection's fit examples): random access keeps nothing."""
        return contextlib.nullcontext(self)

    def check_end(self) -> None:
        """After the last row was read: a stream checks it has no more (`StreamedTrainingData`)."""


class StreamError(ValueError):
    """A streamed training set that cannot be read as asked: its length is unknown or wrong, or an example
    already read would have to be read again from a one-time iterator, or the stream changed between passes."""


class ImageFolder:
    """A folder of image files, read as a stream: `ImageFolder("train/")`.

    The images are the files with an image extension (`IMAGE_EXTENSIONS`, any case) in the folder and its
    subfolders, in the order of their relative POSIX paths (sorted as strings); hidden files and folders (a name
    starting with ".") are left out. A symbolic link that leads outside the folder, or to a folder, is refused.
    Captions, as in `datasets`' imagefolder, come from an optional `metadata.jsonl` in the folder: one JSON
    object per line with `file_name` (the relative path) and a caption column (`text`, `caption`, `prompt`,
    `captions`, or `caption_column=`); with it, every image needs its line. Each image is opened when it is read
    (`PIL.Image.open`, fully loaded, the file closed); an example skipped by position is never opened.

    What is held: the sorted relative paths (and the captions), about 100 bytes per file, not the images.
    """

    IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
    METADATA = "metadata.jsonl"

    def __init__(self, path: str | os.PathLike, caption_column: str | None = None):
        self.root = Path(path)
        if not self.root.is_dir():
            raise FileNotFoundError(f"ImageFolder: {self.root} is not a folder")
        real_root = os.path.realpath(self.root)
        files = []
        for directory, folders, names in os.walk(self.root, followlinks=False):
            folders[:] = sorted(f for f in folders if not f.startswith("."))
            for name in folders:
                if os.path.islink(os.path.join(directory, name)):
                    raise ValueError(f"ImageFolder: {os.path.join(directory, name)} is a symbolic link to a folder: "
                                     "refused (it could repeat or leave the folder); copy or move the images instead")
            for name in names:
                if name.startswith(".") or not name.lower().endswith(self.IMAGE_EXTENSIONS):
                    continue
                full = os.path.join(directory, name)
                if os.path.islink(full):
                    target = os.path.realpath(full)
                    if os.path.commonpath([real_root, target]) != real_root:
                        raise ValueError(f"ImageFolder: {full} is a symbolic link to {target}, outside {self.root}: "
                                         "refused")
                files.append(Path(os.path.relpath(full, self.root)).as_posix())
        files.sort()
        self.files = files
        self.captions = self._read_captions(caption_column)

    def _read_captions(self, caption_column: str | None) -> list | None:
        path = self.root / self.METADATA
        if not path.is_file():
            return None
        by_file: dict[str, Any] = {}
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    name = Path(row["file_name"]).as_posix()
                except (ValueError, KeyError, TypeError) as error:
                    raise ValueError(f"{path}, line {number}: not a JSON object with a file_name ({error})") from None
                key = caption_column or next((c for c in CAPTION_COLUMNS if c in row), None)
                if key is None or key not in row:
                    raise ValueError(f"{path}, line {number}: no caption column among {sorted(row)}; "
                                     "pass caption_column=")
                by_file[name] = row[key]
        missing = [name for name in self.files if name not in by_file]
        if missing:
            raise ValueError(f"{path} has no line for {missing[0]} (and {len(missing) - 1} more images): every image "
                             "of a folder with a metadata.jsonl needs its caption")
        extra = sorted(set(by_file) - set(self.files))
        if extra:
            raise ValueError(f"{path} names {extra[0]}, which is not an image file of {self.root}")
        return [by_file[name] for name in self.files]

    def __len__(self) -> int:
        return len(self.files)

    def __repr__(self) -> str:
        return f"ImageFolder({str(self.root)!r}, {len(self)} images)"

    @property
    def dataset_name(self) -> str:
        return self.root.resolve().name

    def load(self, index: int) -> Any:
        """Image `index` (a loaded PIL image), or (image, caption) with a metadata.jsonl."""
        with PIL.Image.open(self.root / self.files[index]) as image:
            image.load()
        return image if self.captions is None else (image, self.captions[index])

    def lazy_items(self, start: int = 0) -> Iterator["_Lazy"]:
        """From position `start` on: items read only when asked (`StreamedTrainingData` skips without reading)."""
        for index in range(start, len(self.files)):
            yield _Lazy(self, index)

    def __iter__(self) -> Iterator[Any]:
        for index in range(len(self.files)):
            yield self.load(index)


class _Lazy:
    """An item of an `ImageFolder`, read when `load`ed."""

    __slots__ = ("folder", "index")

    def __init__(self, folder: ImageFolder, index: int):
        self.folder, self.index = folder, index

    def load(self) -> Any:
        return self.folder.load(self.index)


class StreamedTrainingData(TrainingData):
    """A training set read in order, as a stream: a `datasets.IterableDataset`, an `ImageFolder`, or any iterable
    of the items `TrainingData` takes (a generator). Example ids are positions, as for `TrainingData`.

    `batch(indices)` reads forward to them; only the rows of the last batch (and the `pinned` rows a projection
    is fitted on, while it is) are held. Reading a row already passed restarts the stream from its beginning
    (a one-time iterator, such as a generator, cannot: `StreamError`); a restarted stream must give the same
    examples again (checked on the rows whose hashes were kept: the pinned ones).

    `num_examples`: its length if given, else `len(source)` (an `ImageFolder`), else a `datasets.IterableDataset`'s
    `info.splits[split].num_examples`, else unknown (None) until the stream has been read to its end. A stream
    that ends before `num_examples`, or goes on past it, is a `StreamError`.
    """

    streamed = True

    def __init__(self, source: Any, image_column: str | None = None, caption_column: str | None = None,
                 num_examples: int | None = None):
        if isinstance(source, (str, bytes)) or not isinstance(source, collections.abc.Iterable):
            raise TypeError(f"cannot stream training examples from a {type(source).__name__}")
        self.dataset = source
        self.image_column, self.caption_column = image_column, caption_column
        if _is_hf_dataset(source) and source.column_names is not None:
            columns = list(source.column_names)
            self.image_column = image_column or _find_image_column(columns)
            if self.image_column not in columns:
                raise ValueError(f"image column {self.image_column!r} is not in the dataset columns {columns}")
            self.caption_column = caption_column or next((c for c in CAPTION_COLUMNS if c in columns), None)
        self.one_shot = isinstance(source, collections.abc.Iterator)
        if num_examples is not None and (isinstance(num_examples, bool) or not isinstance(num_examples, int)
                                         or num_examples < 0):
            raise ValueError(f"num_examples must be a whole number >= 0, got {num_examples!r}")
        self.num_examples, self.length_from = num_examples, "num_examples="
        said, where = _stream_length(source)
        if num_examples is None:
            self.num_examples, self.length_from = said, where
        elif isinstance(source, ImageFolder) and said != num_examples:  # a folder's count is not an estimate
            raise StreamError(f"num_examples={num_examples}, but {source} has {said}")
        self._iterator: Iterator | None = None
        self._position = 0  # the position of the next item the iterator gives
        self._cache: dict[int, tuple[torch.Tensor, str | None]] = {}  # the last batch's rows and the pinned rows
        self._pinned: set[int] = set()
        self._kept_hashes: dict[int, str] = {}  # pinned rows' hashes: a restarted stream must give them again
        if self.num_examples == 0 or not self._read_to(0):
            raise ValueError("the training dataset is empty")

    def __len__(self) -> int:
        if self.num_examples is None:
            raise StreamError("the number of examples of this stream is unknown until it has been read to its end: "
                              "pass num_examples= (featurize(..., num_examples=N))")
        return self.num_examples

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str | None]:
        return self.batch([int(index)], single=True)

    def batch(self, indices: Sequence[int], to_end: bool = False, single: bool = False):
        """(images [B, C, H, W], captions) of `indices`, read in their order. `to_end`: rows past the end of the
        stream are left out (the batch may be empty: (None, [])) instead of being a `StreamError`."""
        rows = {}
        for index in indices:
            if not self._read_to(index):
                if to_end:
                    break
                raise StreamError(f"training example {index} is past the end of the stream ({self.num_examples} "
                                  "examples)")
            rows[index] = self._cache[index]
        self._cache = {**{i: self._cache[i] for i in self._pinned if i in self._cache}, **rows}
        if single:
            return rows[indices[0]]
        items = [rows[i] for i in indices if i in rows]
        if not items:
            return None, []
        shapes = {tuple(image.shape) for image, _ in items}
        if len(shapes) != 1:
            raise InvalidImageError(f"training examples {list(indices)} have different shapes: {sorted(shapes)}")
        return torch.stack([image for image, _ in items]), [caption for _, caption in items]

    def example_hash(self, index: int) -> str:
        return content_hash(*self[index])

    @contextlib.contextmanager
    def pinned(self, indices: Sequence[int]):
        """Keep rows `indices` once read (a projection's fit examples, read by its identity and by its fit), and
        their hashes after: a later pass over the stream must give the same examples there."""
        self._pinned = set(int(i) for i in indices)
        try:
            yield self
        finally:
            for index in self._pinned:
                if index in self._cache:
                    self._kept_hashes[index] = content_hash(*self._cache[index])
                    self._cache.pop(index)
            self._pinned = set()

    def _read_to(self, index: int) -> bool:
        """Advance to row `index` and convert it into the cache; False if the stream ends before it."""
        if index in self._cache:
            return True
        if self.num_examples is not None and index >= self.num_examples:
            return False
        if index < self._position or self._iterator is None:
            self._restart(index)
        while self._position <= index:
            try:
                item = next(self._iterator)
            except StopIteration:
                self._ended(self._position)
                return False
            position = self._position
            self._position += 1
            if position == index or position in self._pinned:
                self._cache[position] = self._convert(item, position)
        return True

    def _convert(self, item: Any, position: int) -> tuple[torch.Tensor, str | None]:
        if isinstance(item, _Lazy):
            item = item.load()
        example = self._example(item, position)
        kept = self._kept_hashes.get(position)
        if kept is not None and content_hash(*example) != kept:
            raise StreamError(f"training example {position} differs from the one read there before: a stream must "
                              "give the same examples in the same order each time it is read (a shuffled "
                              "IterableDataset does not; shuffle it with a fixed seed, or not at all)")
        return example

    def _restart(self, index: int) -> None:
        if self._iterator is not None and self.one_shot:
            raise StreamError(
                f"training example {index} was already read from a one-time iterator ({type(self.dataset).__name__}),"
                " which cannot be read again. This featurization reads the training set more than once (a projection"
                " fitted on data reads its fit examples first; TracIn reads each range once per checkpoint): pass "
                "something that can be iterated again: a list, an ImageFolder, a datasets (Iterable)Dataset")
        lazy = getattr(self.dataset, "lazy_items", None)
        if lazy is not None:  # an ImageFolder: starts where asked, nothing before is read
            self._iterator, self._position = lazy(index), index
        else:
            self._iterator, self._position = iter(self.dataset), 0

    def _ended(self, count: int) -> None:
        if self.num_examples is None:
            self.num_examples, self.length_from = count, "its end"
        elif count < self.num_examples:
            raise StreamError(f"the training stream ended after {count} examples, but {self.length_from} says "
                              f"{self.num_examples}" + _length_advice(self.length_from))

    def check_end(self) -> None:
        """After its last row was read: a `StreamError` if the stream goes on past `num_examples`."""
        if self.num_examples is None or self._position != self.num_examples or self._iterator is None:
            return
        try:
            next(self._iterator)
        except StopIteration:
            return
        raise StreamError(f"the training stream has more than the {self.num_examples} examples {self.length_from} "
                          "says" + _length_advice(self.length_from))


def _length_advice(source: str) -> str:
    if source == "the store":
        return ""
    if source == "num_examples=":
        return ": pass its true length as num_examples="
    return ": pass its true length as num_examples= (a filtered or truncated stream keeps its source's info)"


def _stream_length(source: Any) -> tuple[int | None, str]:
    """(the length a stream says it has, where it says it), or (None, "") when it does not."""
    if isinstance(source, ImageFolder):
        return len(source), "the folder"
    if _is_hf_dataset(source):
        splits, split = getattr(getattr(source, "info", None), "splits", None), getattr(source, "split", None)
        if splits and split is not None and str(split) in splits:
            count = splits[str(split)].num_examples
            if count:
                return int(count), f"the dataset's info.splits[{str(split)!r}].num_examples"
        return None, ""
    if hasattr(source, "__len__") and not isinstance(source, collections.abc.Iterator):
        try:
            return len(source), "len()"
        except TypeError:
            return None, ""
    return None, ""


def is_streamed(dataset: Any) -> bool:
    """Whether `dataset` is read as a stream: an `ImageFolder`, a `datasets.IterableDataset`, an iterator or
    any iterable without random access (`len` and `[i]`)."""
    if isinstance(dataset, TrainingData):
        return getattr(dataset, "streamed", False)
    if isinstance(dataset, ImageFolder) or isinstance(dataset, collections.abc.Iterator):
        return True
    if _is_hf_dataset(dataset):
        return not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__")
    if isinstance(dataset, (torch.Tensor, np.ndarray, list, tuple, PIL.Image.Image)):
        return False
    return isinstance(dataset, collections.abc.Iterable) and not (
        hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__"))


def as_training_data(dataset: Any, image_column: str | None = None, caption_column: str | None = None,
                     num_examples: int | None = None) -> TrainingData:
    """`dataset` itself if it is a `TrainingData`, else a `TrainingData` view of it with those columns: a
    `StreamedTrainingData` for streams (`is_streamed`), with `num_examples` if given."""
    if isinstance(dataset, TrainingData):
        known = dataset.num_examples if dataset.streamed else len(dataset)
        if num_examples is not None and known is not None and known != num_examples:
            raise ValueError(f"num_examples={num_examples} differs from the training data's {known}")
        if num_examples is not None and known is None:
            dataset.num_examples, dataset.length_from = num_examples, "num_examples="
        return dataset
    if isinstance(dataset, (str, os.PathLike)):
        raise TypeError(f"{str(dataset)!r} is a path: pass ImageFolder({str(dataset)!r}) for a folder of images, or "
                        "a dataset loaded with datasets.load_dataset")
    if is_streamed(dataset):
        return StreamedTrainingData(dataset, image_column, caption_column, num_examples)
    data = TrainingData(dataset, image_column, caption_column)
    if num_examples is not None and num_examples != len(data):
        raise ValueError(f"num_examples={num_examples}, but the training dataset has {len(data)} examples")
    return data


def training_batches(data: TrainingData, start: int, stop: int | None, batch_size: int, validate=None):
    """Batches of examples [start, stop), counted from `start`: (indices, images [B, C, H, W], captions, hashes).

    The one loop every featurizer reads training data with: `validate(images, what)` (an adapter's
    `validate_images`) checks each batch before anything is computed; `hashes` are the examples' content hashes.
    `stop=None`: to the end of a stream whose length is unknown (a `StreamedTrainingData`).
    """
    first = start
    while stop is None or first < stop:
        indices = list(range(first, first + batch_size if stop is None else min(first + batch_size, stop)))
        if stop is None:
            images, captions = data.batch(indices, to_end=True)
            indices = indices[: len(captions)]
            if not indices:
                return
        else:
            images, captions = data.batch(indices)
        if validate is not None:
            validate(images, f"training examples {indices[0]}..{indices[-1]}")
        yield indices, images, captions, [content_hash(image, caption) for image, caption in zip(images, captions)]
        first += len(indices)


def query_batch(images: Any, prompts: Sequence[str | None] | str | None, validate=None) -> tuple[torch.Tensor, list]:
    """Query images [n, C, H, W] in [-1, 1], checked by `validate(images, what)`, and one prompt per image
    (a single prompt, or None, is repeated)."""
    batch = to_image_batch(images)
    if validate is not None:
        validate(batch, "query images")
    if isinstance(prompts, str) or prompts is None:
        prompts = [prompts] * len(batch)
    prompts = list(prompts)
    if len(prompts) != len(batch):
        raise ValueError(f"got {len(prompts)} prompts for {len(batch)} query images")
    return batch, prompts


def content_hash(image: torch.Tensor, caption: str | None = None) -> str:
    """sha256 of an example's image tensor [C, H, W] and caption: identifies its content, not its position."""
    digest = hashlib.sha256(image.contiguous().numpy().tobytes())
    digest.update(str(tuple(image.shape)).encode())
    digest.update(("" if caption is None else str(caption)).encode())  # str, or an int class label
    return digest.hexdigest()[:16]


def _is_hf_dataset(dataset: Any) -> bool:
    return type(dataset).__module__.startswith("datasets.") and hasattr(dataset, "column_names")


def _find_image_column(columns: list[str]) -> str:
    for name in IMAGE_COLUMNS:
        if name in columns:
            return name
    raise ValueError(f"no image column found among {columns}; pass image_column=")
