"""Image transforms: any PIL image -> proper 8-bit RGB -> crop/resize -> normalised tensor."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, ImageOps
from torchvision import transforms as T

_ORIENTATION = 0x0112  # EXIF tag
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_WIDE_INT_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})


def _composite_on_white(image: Image.Image) -> Image.Image:
    """Flatten transparency onto white, as a viewer shows it (dropping alpha would expose the
    arbitrary, often black, colour under transparent pixels and hide dark line drawings)."""
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _grey_array_to_rgb(values: np.ndarray) -> Image.Image:
    """A float grey array already on the 0..255 scale -> RGB."""
    grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image as an upright 8-bit RGB image.

    - EXIF orientation is applied (phone photos are stored sideways with a rotation tag).
    - 16-bit grey ("I;16*") is scaled by 1/257 to 0..255. 32-bit "I" (how some 16-bit PNG/TIFF
      files open) is scaled the same way when any value exceeds 255, else taken as 8-bit values.
      Float "F" is taken as 0..1 when its maximum is <= 1, else as 0..255; out-of-range values clip.
    - Alpha (RGBA, LA, PA, palette with a transparent colour) is composited onto white.
    - Everything else (L, 1, P, CMYK, YCbCr, HSV) goes through PIL's `convert("RGB")`.
    """
    try:
        orientation = image.getexif().get(_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - malformed EXIF must not make a decodable image unusable
        orientation = 1
    if orientation != 1:
        image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _WIDE_INT_MODES:
        values = np.asarray(image).astype(np.float64)
        if mode != "I" or (values.size and values.max() > 255):
            values = values / 257.0
        return _grey_array_to_rgb(values)
    if mode == "F":
        values = np.asarray(image).astype(np.float64)
        if values.size and np.nanmax(values) <= 1.0:
            values = values * 255.0
        return _grey_array_to_rgb(np.nan_to_num(values))
    if mode in _ALPHA_MODES or (mode in ("P", "L", "RGB") and "transparency" in image.info):
        return _composite_on_white(image)
    return image.convert("RGB")


def build_transform(
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    train: bool,
    hflip: bool = True,
    crop_scale: Sequence[float] = (0.6, 1.0),
) -> Callable:
    """The PIL -> tensor pipeline for training (augmenting) or evaluation (deterministic).

    Train: RandomResizedCrop(image_size, scale=crop_scale), optional horizontal flip. Eval: resize
    the shorter side to image_size, then center-crop. Both resample bicubically (as CLIP and most
    timm models were trained) and end with ToTensor + Normalize(mean, std).
    """
    bicubic = T.InterpolationMode.BICUBIC
    steps: list[Callable] = [to_rgb]
    if train:
        lo, hi = (float(v) for v in crop_scale)
        steps.append(T.RandomResizedCrop(image_size, scale=(lo, hi), interpolation=bicubic))
        if hflip:
            steps.append(T.RandomHorizontalFlip())
    else:
        steps += [T.Resize(image_size, interpolation=bicubic), T.CenterCrop(image_size)]
    steps += [T.ToTensor(), T.Normalize(mean=list(mean), std=list(std))]
    return T.Compose(steps)
