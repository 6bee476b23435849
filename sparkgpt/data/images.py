"""Images in: files or PIL images to the pixel tensors a vision Transformer reads, as transformers' ViT and CLIP
image processors (`ViTImageProcessor`, `CLIPImageProcessor`, their PIL backend) make them:

    RGB (transparency composited onto white)
    -> resize with PIL's filter: to height × width, or the shortest edge to s (the other ⌊s · long / short⌋)
    -> centre crop (top = ⌊(H - h) / 2⌋, left likewise)
    -> x · rescale (1/255)  -> (x - mean) / std,  channels first: [3, h, w] float32
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from sparkgpt.errors import SparkGPTError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Modes of 8-bit channels, which PIL converts to RGB as transformers does; 16-bit and float images are refused
# rather than clipped to 8 bits without a word.
EIGHT_BIT_MODES = ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")
MAX_PIXELS = 100_000_000  # a larger image is refused before it is decoded (a small file can claim any size)
MAX_IMAGE_BYTES = 20 << 20  # an image sent in a message (OpenAI's limit for one image is 20 MB)


@dataclass(frozen=True)
class ImagePreprocessing:
    """One image processor's settings (transformers' preprocessor_config.json). `size` is (height, width), or an
    int: the shortest edge, keeping the aspect ratio; None skips each step."""

    size: tuple[int, int] | int | None = (224, 224)
    resample: int = Image.Resampling.BILINEAR
    crop: tuple[int, int] | None = None
    rescale: float | None = 1 / 255
    mean: tuple[float, ...] | None = (0.5, 0.5, 0.5)
    std: tuple[float, ...] | None = (0.5, 0.5, 0.5)

    @classmethod
    def from_hf(cls, values: dict[str, Any], source: str, defaults: ImagePreprocessing) -> ImagePreprocessing:
        """From a preprocessor_config.json's fields over a family's `defaults` (VIT_PREPROCESSING,
        CLIP_PREPROCESSING), which also say what an int `size` means: a square (ViT) or the shortest edge (CLIP).
        Steps turned off (do_resize false, ...) become None."""
        known = {"do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
                 "do_normalize", "image_mean", "image_std", "do_convert_rgb", "image_processor_type",
                 "feature_extractor_type", "processor_class"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise SparkGPTError(f"{source}: unsupported image processor field(s) {', '.join(unknown)}")
        resample = values.get("resample", defaults.resample)
        if resample not in tuple(Image.Resampling):
            raise SparkGPTError(f"{source}: field 'resample' is {resample!r}; expected a PIL filter number 0-5")
        square = not isinstance(defaults.size, int)
        size = _size(values["size"], source, "size", square) if "size" in values else defaults.size
        crop = _size(values["crop_size"], source, "crop_size", True) if "crop_size" in values else defaults.crop
        if values.get("do_center_crop", defaults.crop is not None) and crop is None:
            raise SparkGPTError(f"{source}: do_center_crop is true but no crop_size is given")
        rescale = float(values.get("rescale_factor", defaults.rescale or 1 / 255))
        normalise = values.get("do_normalize", defaults.mean is not None)
        return cls(
            size=size if values.get("do_resize", defaults.size is not None) else None,
            resample=int(resample),
            crop=crop if values.get("do_center_crop", defaults.crop is not None) else None,
            rescale=rescale if values.get("do_rescale", defaults.rescale is not None) else None,
            mean=_triple(values.get("image_mean", defaults.mean), source, "image_mean") if normalise else None,
            std=_triple(values.get("image_std", defaults.std), source, "image_std") if normalise else None,
        )


# transformers' defaults for each family, for checkpoints saved without a preprocessor_config.json.
VIT_PREPROCESSING = ImagePreprocessing()
CLIP_PREPROCESSING = ImagePreprocessing(size=224, resample=Image.Resampling.BICUBIC, crop=(224, 224),
                                        mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD)


def vit_preprocessing(size: int) -> ImagePreprocessing:
    """ViT's image processor defaults at size × size: what an image-to-text model reads unless its checkpoint says
    otherwise (the trainer, the model and its checkpoints agree through this)."""
    return ImagePreprocessing(size=(size, size))


def _size(value: Any, source: str, name: str, square: bool) -> tuple[int, int] | int:
    if isinstance(value, dict) and set(value) == {"height", "width"}:
        value = (value["height"], value["width"])
    elif isinstance(value, dict) and set(value) == {"shortest_edge"}:
        value = value["shortest_edge"]
    elif isinstance(value, int) and not isinstance(value, bool) and square:
        value = (value, value)
    sizes = value if isinstance(value, tuple) else (value,)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in sizes):
        raise SparkGPTError(f"{source}: field {name!r} is {value!r}; expected {{'height', 'width'}} or "
                            "{'shortest_edge'} of positive integers")
    return value


def _triple(value: Any, source: str, name: str) -> tuple[float, ...]:
    if not isinstance(value, (list, tuple)) or len(value) != 3 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise SparkGPTError(f"{source}: field {name!r} is {value!r}; expected three numbers (R, G, B)")
    if name == "image_std" and any(v <= 0 for v in value):
        raise SparkGPTError(f"{source}: field {name!r} is {value!r}; each must be positive")
    return tuple(float(v) for v in value)


def _image_file_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise SparkGPTError(f"{path}: no such image file")
    try:
        return path.read_bytes()
    except OSError as error:
        raise SparkGPTError(f"{path}: not readable ({error})") from None


def open_image(path: str | Path) -> Image.Image:
    """An image file (any format Pillow reads), decoded; a missing, unreadable or huge file is a one-line error."""
    return decode_image(_image_file_bytes(Path(path)), str(path))


def decode_image(data: bytes, source: str) -> Image.Image:
    """An image file's bytes, decoded (any format Pillow reads); `source` names it in errors (a file, a field)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > MAX_PIXELS:
                raise SparkGPTError(f"{source}: {image.width} × {image.height} pixels exceed the limit of {MAX_PIXELS}")
            image.load()
            return image.copy()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
        raise SparkGPTError(f"{source}: not a readable image ({error})") from None


def image_from_url(url: str, source: str, max_bytes: int = MAX_IMAGE_BYTES) -> Image.Image:
    """The image of an OpenAI `image_url` content part: a `data:image/...;base64,` URL (nothing is ever fetched
    from the network), at most `max_bytes` decoded."""
    if not isinstance(url, str) or not url.startswith("data:"):
        raise SparkGPTError(f"{source}: expected a data URL (data:image/png;base64,...); images are never fetched "
                            "from a URL")
    header, comma, payload = url.partition(",")
    if not comma or not header.endswith(";base64") or not header[5:].startswith("image/"):
        raise SparkGPTError(f"{source}: expected a base64 image data URL (data:image/png;base64,...), got "
                            f"{header[:40]!r}")
    if len(payload) > (max_bytes + 2) // 3 * 4 + 4:
        raise SparkGPTError(f"{source}: the image is over the limit of {max_bytes} bytes")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise SparkGPTError(f"{source}: the data URL is not valid base64") from None
    return decode_image(data, source)


def image_data_url(path: str | Path, max_bytes: int = MAX_IMAGE_BYTES) -> str:
    """An image file as the data URL an `image_url` content part carries (checked to be a readable image)."""
    path = Path(path)
    data = _image_file_bytes(path)
    if len(data) > max_bytes:
        raise SparkGPTError(f"{path}: {len(data)} bytes exceed the limit of {max_bytes} for an image")
    decode_image(data, str(path))  # a readable image, within the pixel limit
    with Image.open(io.BytesIO(data)) as image:  # its format, which a decoded copy no longer carries
        kind = (image.format or "png").lower()
    return f"data:image/{kind};base64,{base64.b64encode(data).decode('ascii')}"


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto white (what transformers' image processors do)."""
    if image.mode not in EIGHT_BIT_MODES:
        raise SparkGPTError(f"image mode {image.mode!r} is not supported; expected 8-bit channels, one of "
                            f"{', '.join(EIGHT_BIT_MODES)}")
    if "A" in image.getbands() or "a" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def preprocess_image(image: Image.Image | str | Path, settings: ImagePreprocessing) -> torch.Tensor:
    """One image (or image file) -> pixel values [3, h, w] float32."""
    if not isinstance(image, Image.Image):
        image = open_image(image)
    image = to_rgb(image)
    if settings.size is not None:
        image = image.resize(_resized(image.height, image.width, settings.size)[::-1], resample=settings.resample)
    pixels = np.asarray(image, dtype=np.float64).transpose(2, 0, 1)
    if settings.crop is not None:
        pixels = _center_crop(pixels, settings.crop)
    if settings.rescale is not None:
        pixels = pixels * settings.rescale
    if settings.mean is not None:
        pixels = (pixels - np.array(settings.mean)[:, None, None]) / np.array(settings.std)[:, None, None]
    return torch.from_numpy(pixels.astype(np.float32))


def preprocess_images(images: list[Image.Image | str | Path], settings: ImagePreprocessing) -> torch.Tensor:
    """Images (or image files) -> a batch of pixel values [B, 3, h, w] float32; every image must come out the
    same size (a crop, or a resize to height × width, sees to that)."""
    if not images:
        raise SparkGPTError("no images to preprocess")
    pixels = [preprocess_image(image, settings) for image in images]
    shapes = sorted({tuple(p.shape) for p in pixels})
    if len(shapes) > 1:
        raise SparkGPTError(f"preprocessed images differ in size ({shapes}); set a crop or a height × width size")
    return torch.stack(pixels)


def _resized(height: int, width: int, size: tuple[int, int] | int) -> tuple[int, int]:
    """(height, width) after resizing: `size` itself, or the shortest edge to `size` (the long one floored)."""
    if not isinstance(size, int):
        return size
    if width <= height:
        return int(size * height / width), size
    return size, int(size * width / height)


def _center_crop(pixels: np.ndarray, crop: tuple[int, int]) -> np.ndarray:
    """The centre h × w of [C, H, W]; an image smaller than the crop is padded with zeros around it first."""
    (height, width), (crop_h, crop_w) = pixels.shape[1:], crop
    pad_h, pad_w = max(crop_h - height, 0), max(crop_w - width, 0)
    if pad_h or pad_w:
        top_pad, left_pad = (pad_h + 1) // 2, (pad_w + 1) // 2
        pixels = np.pad(pixels, ((0, 0), (top_pad, pad_h - top_pad), (left_pad, pad_w - left_pad)))
        height, width = pixels.shape[1:]
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    return pixels[:, top:top + crop_h, left:left + crop_w]


__all__ = ["CLIP_PREPROCESSING", "VIT_PREPROCESSING", "ImagePreprocessing", "open_image", "preprocess_image",
           "preprocess_images", "to_rgb"]
