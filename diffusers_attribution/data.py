"""Training data and query images in, image tensors in [-1, 1] out, each example with a stable id.

Accepted inputs: a `datasets.Dataset` (image column, optional caption column), a torch `Dataset` or a list
whose items are PIL images, numpy arrays, tensors, `(image, caption)` tuples or dicts, or one tensor
[N, C, H, W] already in [-1, 1]. Numbers become tensors through diffusers' `VaeImageProcessor`.
"""

from __future__ import annotations

import hashlib
import numbers
import warnings
from typing import Any, Sequence

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
    only the header on open; its own decompression-bomb limit is an error too), and an 8-bit mode: 16- and 32-bit
    images (modes I;16, I, F) are refused rather than clipped by a conversion to 8 bits (pass them to the Python
    API as arrays in [0, 1]). Converted to `mode` ("L", "RGB") when given. Failures are an `InvalidImageError`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
            with PIL.Image.open(path) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise InvalidImageError(f"the image {path} is {width}×{height} pixels, more than the {max_pixels} "
                                            "an image may have here: refused before decoding it")
                if image.mode in HIGH_DEPTH_MODES:
                    raise InvalidImageError(f"the image {path} has {image.mode!r} pixels (16 or 32 bits), which "
                                            "converting to 8 bits would clip: save it as an 8-bit image, or pass it to "
                                            "the Python API as an array in [0, 1]")
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
        item = self.dataset[int(index)]
        caption = None
        if _is_hf_dataset(self.dataset):
            image = item[self.image_column]
            caption = item[self.caption_column] if self.caption_column else None
        elif isinstance(item, dict):
            image = item[self.image_column or _find_image_column(list(item))]
            caption_key = self.caption_column or next((c for c in CAPTION_COLUMNS if c in item), None)
            caption = item[caption_key] if caption_key else None
        elif isinstance(item, (tuple, list)):
            image = item[0]
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


def as_training_data(dataset: Any, image_column: str | None = None, caption_column: str | None = None) -> TrainingData:
    """`dataset` itself if it is a `TrainingData`, else a `TrainingData` view of it with those columns."""
    if isinstance(dataset, TrainingData):
        return dataset
    return TrainingData(dataset, image_column, caption_column)


def training_batches(data: TrainingData, start: int, stop: int, batch_size: int, validate=None):
    """Batches of examples [start, stop), counted from `start`: (indices, images [B, C, H, W], captions, hashes).

    The one loop every featurizer reads training data with: `validate(images, what)` (an adapter's
    `validate_images`) checks each batch before anything is computed; `hashes` are the examples' content hashes.
    """
    for first in range(start, stop, batch_size):
        indices = list(range(first, min(first + batch_size, stop)))
        images, captions = data.batch(indices)
        if validate is not None:
            validate(images, f"training examples {indices[0]}..{indices[-1]}")
        yield indices, images, captions, [content_hash(image, caption) for image, caption in zip(images, captions)]


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
