"""ShirgImageProcessor: SigLIP preprocessing at SHIRG's 672 px, robust input conversion, LaViDa's anyres views.

Every view goes through transformers' SigLIP PIL pipeline unchanged: a bicubic squash to `size` (no aspect
preservation, no crop), rescale by 1/255, normalise with mean = std = 0.5. With `size` 384 the output equals
`SiglipImageProcessor` for google/siglip-so400m-patch14-384 exactly.

`do_anyres=True` produces LaViDa-HD's views instead: the base view (the whole image squashed) followed by the
`anyres_tile_size` tiles of the image resized and padded to the best grid pinpoint, in row-major order. The
geometry and the token counts of every mode live in `visual_tokens.py`.
"""

import io
import math
import os
import warnings
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import PILImageResampling
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
from transformers.processing_utils import ImagesKwargs, Unpack

from .visual_tokens import LAVIDA_GEOMETRY, check_pinpoints, select_best_resolution


_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_SUPPORTED_TYPES = (
    "a PIL.Image.Image, a numpy array (H, W, C) or (H, W), a torch tensor (C, H, W) or (H, W), or a path to an "
    "image file"
)


def anyres_views(
    image: PIL.Image.Image, grid_pinpoints, tile_size: int, resample=PILImageResampling.BICUBIC
) -> list[PIL.Image.Image]:
    """LaViDa's anyres views of an RGB image, before the per-view SigLIP resize: [original] + tiles.

    The original is view 0 (the SigLIP resize then squashes it to the tower size, LaViDa's base view). The
    tiles come from an aspect-preserving resize (one side fills the pinpoint, the other is ceil-ed and
    clipped) pasted centred on a black canvas of the chosen pinpoint, cut row-major into tile_size squares.
    """
    width, height = image.size
    target_width, target_height = select_best_resolution((width, height), check_pinpoints(grid_pinpoints, tile_size))
    scale_w, scale_h = target_width / width, target_height / height
    if scale_w < scale_h:
        new_width, new_height = target_width, min(math.ceil(height * scale_w), target_height)
    else:
        new_width, new_height = min(math.ceil(width * scale_h), target_width), target_height
    canvas = PIL.Image.new("RGB", (target_width, target_height), (0, 0, 0))
    canvas.paste(
        image.resize((new_width, new_height), resample=resample),
        ((target_width - new_width) // 2, (target_height - new_height) // 2),
    )
    tiles = [
        canvas.crop((left, top, left + tile_size, top + tile_size))
        for top in range(0, target_height, tile_size)
        for left in range(0, target_width, tile_size)
    ]
    return [image] + tiles


# ---- input conversion ----------------------------------------------------------------------------------------
def _open_image_file(source) -> PIL.Image.Image:
    """Decode a path, an open binary file or `bytes` fully, with Pillow's decompression-bomb limit as an error."""
    name = f"'{source}'" if isinstance(source, (str, os.PathLike)) else "the image data"
    if isinstance(source, (str, os.PathLike)) and not Path(source).is_file():
        raise FileNotFoundError(f"Image file not found: '{source}'. Pass an existing image file or an image object.")
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
            opened = PIL.Image.open(source)
            opened.load()
    except (PIL.Image.DecompressionBombError, PIL.Image.DecompressionBombWarning) as error:
        raise ValueError(f"{name} is too large to decode safely ({error}). If you trust the file, raise "
                         "PIL.Image.MAX_IMAGE_PIXELS before loading it, or downscale it first.") from None
    except (OSError, SyntaxError) as error:
        raise ValueError(f"Cannot read {name} as an image ({error}). Pass a valid PNG/JPEG/... file.") from None
    return opened


def normalize_image(image: PIL.Image.Image) -> PIL.Image.Image:
    """One decoded PIL image as every entry point sees it: a single frame, turned upright by its EXIF tag.

    Multi-frame images (animated GIF/PNG/WebP, multi-page TIFF) are refused rather than silently reduced to their
    first frame; an MPO photo's first frame is its primary picture and is kept.
    """
    if getattr(image, "n_frames", 1) > 1 and image.format != "MPO":
        raise ValueError(
            f"The {image.format or 'PIL'} image has {image.n_frames} frames; pass one frame: "
            "`image.seek(i); frame = image.convert('RGB')` (or save that frame as PNG)."
        )
    return PIL.ImageOps.exif_transpose(image)


def load_image(source) -> PIL.Image.Image:
    """The one image loader of every entry point: an image file path, `bytes`, an open binary file or a PIL image
    -> upright (EXIF) single-frame RGB PIL image (see `to_rgb_image` for the colour conversion)."""
    if isinstance(source, (str, os.PathLike, bytes, bytearray)) or hasattr(source, "read"):
        with _open_image_file(source) as opened:
            return _pil_to_rgb(normalize_image(opened))
    if not isinstance(source, PIL.Image.Image):
        raise ValueError(f"Unsupported image source {type(source).__name__}: expected a file path, bytes, an open "
                         "binary file or a PIL image.")
    return _pil_to_rgb(normalize_image(source))


def _array_to_uint8(array: np.ndarray, source: str) -> np.ndarray:
    """Values as uint8: integers must lie in [0, 255], floats in [0, 1] (rounded to the nearest 8-bit level)."""
    if array.dtype == np.uint8:
        return array
    numeric = np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
    if array.dtype == np.bool_ or not numeric:
        raise ValueError(f"Unsupported {source} dtype {array.dtype}: expected uint8, another integer type in "
                         "[0, 255] or floats in [0, 1].")
    low, high = array.min(), array.max()
    if np.issubdtype(array.dtype, np.integer):
        if low < 0 or high > 255:
            raise ValueError(f"Integer {source} values must lie in [0, 255], got [{low}, {high}]; scale "
                             "16-bit data to 8 bits (e.g. (x / 257).round().astype(np.uint8)) first.")
        return array.astype(np.uint8)
    if not (np.isfinite(low) and np.isfinite(high) and 0.0 <= low and high <= 1.0):
        raise ValueError(f"Floating-point {source} values must lie in [0, 1], got [{low}, {high}]; divide "
                         "0-255 data by 255 or pass it as uint8.")
    # PIL resampling works on 8-bit images, so floats are quantised once here (rounded, not truncated).
    return np.round(array.astype(np.float64) * 255.0).astype(np.uint8)


def _hwc_array_to_rgb(array: np.ndarray, source: str, layout_hint: str) -> PIL.Image.Image:
    """An (H, W) or (H, W, C) array with C in {1, 3, 4} -> RGB PIL image (RGBA composited on white)."""
    if array.ndim not in (2, 3):
        raise ValueError(f"A {source} image must have 2 or 3 dimensions ({layout_hint}), got shape "
                         f"{tuple(array.shape)}.")
    if array.ndim == 3 and array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"A {source} image must have 1, 3 or 4 channels ({layout_hint}), got shape "
                         f"{tuple(array.shape)}.")
    if array.size == 0:
        raise ValueError(f"Empty {source} image: shape {tuple(array.shape)} has a zero-sized dimension.")
    array = _array_to_uint8(array, source)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    # uint8 (H, W) -> mode L, (H, W, 3) -> RGB, (H, W, 4) -> RGBA
    return _pil_to_rgb(PIL.Image.fromarray(np.ascontiguousarray(array)))


def _pil_to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """Any PIL mode -> RGB: transparency is composited on white; 16-bit grey (I;16*) is scaled to 8 bits by
    255/65535; 32-bit integer grey (I) by its actual range: values in [0, 255] are 8-bit data and kept, values up
    to 65535 are 16-bit data and scaled by 255/65535; F (float) must hold values in [0, 1]."""
    if image.width == 0 or image.height == 0:
        raise ValueError(f"Empty image: size {image.size} (width, height) has a zero side.")
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES or image.mode == "I":
        values = np.asarray(image).astype(np.int64)
        if values.min() < 0 or values.max() > 65535:
            raise ValueError(f"Mode '{image.mode}' image values must lie in [0, 65535], got "
                             f"[{values.min()}, {values.max()}]; rescale them to 8 or 16 bits first.")
        if image.mode == "I" and values.max() <= 255:
            return PIL.Image.fromarray(values.astype(np.uint8)).convert("RGB")
        return PIL.Image.fromarray(np.round(values / 257.0).astype(np.uint8)).convert("RGB")
    if image.mode == "F":
        return _hwc_array_to_rgb(np.asarray(image), "mode 'F' PIL", "floats in [0, 1]")
    try:
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return PIL.Image.alpha_composite(white, rgba).convert("RGB")
        return image.convert("RGB")
    except ValueError as error:
        raise ValueError(f"Cannot convert a mode '{image.mode}' image to RGB ({error}).") from error


def to_rgb_image(image) -> PIL.Image.Image:
    """Convert one image (PIL, numpy HWC/HW, torch CHW/HW, a file path, bytes or an open binary file) to an RGB
    PIL image; files and PIL images go through `load_image` (EXIF orientation, one frame)."""
    if isinstance(image, (str, os.PathLike, bytes, bytearray, PIL.Image.Image)) or hasattr(image, "read"):
        return load_image(image)
    if isinstance(image, np.ndarray):
        return _hwc_array_to_rgb(image, "numpy", "channels last: (H, W, C) or (H, W)")
    if isinstance(image, torch.Tensor):
        tensor = image.detach().cpu()
        if tensor.is_floating_point():
            tensor = tensor.float()
        if tensor.ndim == 3:
            if tensor.shape[0] not in (1, 3, 4):
                raise ValueError(f"A torch image must have 1, 3 or 4 channels first (C, H, W), got shape "
                                 f"{tuple(tensor.shape)}.")
            tensor = tensor.permute(1, 2, 0)
        return _hwc_array_to_rgb(tensor.numpy(), "torch", "channels first: (C, H, W) or (H, W)")
    raise ValueError(f"Unsupported image type {type(image).__name__}: expected {_SUPPORTED_TYPES}.")


def flatten_images(images) -> list:
    """Flatten an image, a list, a list of per-sample lists, or a 4-D array/tensor batch into a list of images."""
    if isinstance(images, (list, tuple)):
        flat = [item for element in images for item in flatten_images(element)]
    elif isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        flat = list(images)
    else:
        flat = [images]
    return flat


def busy_patch_count(pixel_values, patch_size: int, threshold: float) -> int:
    """Patches of one preprocessed view [3, S, S] (values in [-1, 1]) whose mean absolute difference between
    neighbouring grey values (horizontal and vertical pairs inside the patch) exceeds `threshold`.

    The pixel-space signal of adaptive K: computed in float32 on the image alone, so it is the same for the image in
    any batch.
    """
    grey = np.ascontiguousarray(np.asarray(pixel_values, dtype=np.float32).mean(axis=0))  # [S, S]
    rows, cols = grey.shape[0] // patch_size, grey.shape[1] // patch_size
    patches = grey[: rows * patch_size, : cols * patch_size].reshape(rows, patch_size, cols, patch_size)
    horizontal = np.abs(np.diff(patches, axis=3)).sum(axis=(1, 3))  # [rows, cols]
    vertical = np.abs(np.diff(patches, axis=1)).sum(axis=(1, 3))
    pairs = 2 * patch_size * (patch_size - 1)
    return int(((horizontal + vertical) / pairs > threshold).sum())


# ---- the image processor ----------------------------------------------------------------------------------
class ShirgImageProcessorKwargs(ImagesKwargs, total=False):
    r"""
    do_anyres (`bool`, *optional*, defaults to `False`):
        Produce LaViDa's anyres views (base view + grid tiles) per image instead of one view.
    image_grid_pinpoints (`list[list[int]]`, *optional*):
        Candidate grid resolutions as [width, height] pairs (LaViDa's order), multiples of `anyres_tile_size`.
    anyres_tile_size (`int`, *optional*, defaults to 384):
        Side of the tiles the padded image is cut into (before each tile is resized to `size`).
    """

    do_anyres: bool
    image_grid_pinpoints: list[list[int]]
    anyres_tile_size: int


class ShirgImageProcessor(SiglipImageProcessorPil):
    r"""
    SigLIP image processor for SHIRG-LaViDa: 672x672 by default (48x48 = 2,304 patches at patch 14), bicubic
    squash, rescale 1/255, normalise with mean = std = 0.5. `size` 384 is the so400m tower's native input.

    Accepts PIL images (any mode: L, LA, P, RGBA and PA composited on white, CMYK, I;16 scaled to 8 bits),
    numpy arrays (H, W, C) / (H, W) as uint8 or floats in [0, 1], torch tensors (C, H, W) / (H, W), 4-D
    batches of those, and file paths. Invalid input raises a `ValueError` naming the problem (a missing file
    raises `FileNotFoundError`).

    With `do_anyres=True` each image becomes V = 1 + nw * nh views (LaViDa-HD); `pixel_values` is then
    [B, V_max, 3, s, s] zero-padded over views (a list of [V, 3, s, s] arrays without `return_tensors`) and
    `image_sizes` holds each original (width, height).
    """

    valid_kwargs = ShirgImageProcessorKwargs
    model_input_names = ["pixel_values", "image_sizes"]

    size = {"height": LAVIDA_GEOMETRY.highres_side, "width": LAVIDA_GEOMETRY.highres_side}
    resample = PILImageResampling.BICUBIC
    image_mean = [0.5, 0.5, 0.5]
    image_std = [0.5, 0.5, 0.5]
    do_anyres = False
    image_grid_pinpoints = [list(p) for p in LAVIDA_GEOMETRY.pinpoints]
    anyres_tile_size = LAVIDA_GEOMETRY.tile_size

    def __init__(self, **kwargs: Unpack[ShirgImageProcessorKwargs]):
        super().__init__(**kwargs)

    def preprocess(self, images, *args, **kwargs: Unpack[ShirgImageProcessorKwargs]) -> BatchFeature:
        """Preprocess an image or a batch of images (see the class docstring for accepted inputs)."""
        return super().preprocess(images, *args, **kwargs)

    def _prepare_images_structure(self, images, expected_ndims: int = 3) -> list[PIL.Image.Image]:
        """Flatten the input and convert every image to RGB PIL with clear errors (replaces `fetch_images`)."""
        flat = flatten_images(images)
        if not flat:
            raise ValueError("No images given: pass at least one image.")
        return [to_rgb_image(image) for image in flat]

    def _preprocess(
        self,
        images: list[np.ndarray],
        do_anyres: bool,
        image_grid_pinpoints: list[list[int]],
        anyres_tile_size: int,
        return_tensors=None,
        **kwargs,
    ) -> BatchFeature:
        if not do_anyres:
            return super()._preprocess(images, return_tensors=return_tensors, **kwargs)
        pixel_values, image_sizes = [], []
        for image in images:  # [3, H, W] uint8 RGB
            pil_image = PIL.Image.fromarray(np.ascontiguousarray(np.moveaxis(image, 0, -1)))
            views = [
                np.moveaxis(np.asarray(view), -1, 0)
                for view in anyres_views(pil_image, image_grid_pinpoints, anyres_tile_size, kwargs["resample"])
            ]
            processed = super()._preprocess(views, return_tensors=None, **kwargs)["pixel_values"]
            pixel_values.append(np.stack(processed))  # [V, 3, s, s]
            image_sizes.append(list(pil_image.size))  # (width, height)
        if return_tensors is not None:
            max_views = max(len(views) for views in pixel_values)
            pixel_values = [
                np.pad(views, ((0, max_views - len(views)), (0, 0), (0, 0), (0, 0))) for views in pixel_values
            ]  # each [V_max, 3, s, s]
            image_sizes = np.asarray(image_sizes, dtype=np.int64)  # [B, 2]
        return BatchFeature(data={"pixel_values": pixel_values, "image_sizes": image_sizes},
                            tensor_type=return_tensors)


__all__ = ["ShirgImageProcessor", "anyres_views", "load_image", "normalize_image", "to_rgb_image"]
