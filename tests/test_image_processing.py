"""ShirgImageProcessor: SigLIP parity, input conversion, clear errors, LaViDa anyres geometry and views."""

import math

import numpy as np
import PIL.Image
import pytest
import torch
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from shirg_hf import ShirgImageProcessor
from shirg_hf.modeling.visual_tokens import (
    LAVIDA_GEOMETRY,
    Geometry,
    anyres_grid_shape,
    lavida_hd_num_tokens,
    select_best_resolution,
    unpadded_grid_size,
)

LAVIDA_GRID_PINPOINTS = LAVIDA_GEOMETRY.pinpoints

# preprocessor_config.json of google/siglip-so400m-patch14-384 (written out: no download). Without torchvision,
# transformers' `SiglipImageProcessor` is this PIL class.
SO400M_PREPROCESSOR_CONFIG = {
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"height": 384, "width": 384},
}


@pytest.fixture(scope="module")
def siglip_384():
    return SiglipImageProcessorPil(**SO400M_PREPROCESSOR_CONFIG)


@pytest.fixture(scope="module")
def processor():
    return ShirgImageProcessor()


def random_rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def pixels(processor, images, **kwargs) -> torch.Tensor:
    return processor(images, return_tensors="pt", **kwargs)["pixel_values"]


def normalised(value: float) -> float:
    return (value / 255.0 - 0.5) / 0.5


# ---- SigLIP parity ---------------------------------------------------------------------------------------
def test_defaults_are_672_bicubic_rescale_and_half_normalisation(processor):
    assert processor.size == {"height": 672, "width": 672}
    assert processor.resample == PIL.Image.Resampling.BICUBIC
    assert processor.rescale_factor == pytest.approx(1 / 255)
    assert tuple(processor.image_mean) == tuple(processor.image_std) == (0.5, 0.5, 0.5)
    out = pixels(processor, PIL.Image.fromarray(random_rgb(100, 150)))
    assert out.shape == (1, 3, 672, 672) and out.dtype == torch.float32
    assert -1.0 <= out.min() and out.max() <= 1.0


@pytest.mark.parametrize("height, width", [(384, 384), (200, 300), (500, 333), (17, 900), (1000, 1000)])
def test_size_384_equals_siglip_so400m_processor_exactly(processor, siglip_384, height, width):
    image = PIL.Image.fromarray(random_rgb(height, width, seed=height + width))
    ours = pixels(processor, image, size={"height": 384, "width": 384})
    reference = siglip_384(image, return_tensors="pt")["pixel_values"]
    assert ours.shape == reference.shape == (1, 3, 384, 384)
    assert (ours - reference).abs().max().item() == 0.0


def test_size_384_parity_holds_for_rgba_grey_and_batches(processor, siglip_384):
    rgba = np.concatenate([random_rgb(90, 70), np.random.default_rng(5).integers(0, 256, (90, 70, 1), np.uint8)], -1)
    images = [PIL.Image.fromarray(rgba), PIL.Image.fromarray(random_rgb(40, 60)[..., 0]),
              PIL.Image.fromarray(random_rgb(300, 200, seed=3))]
    ours = pixels(processor, images, size={"height": 384, "width": 384})
    reference = siglip_384(images, return_tensors="pt")["pixel_values"]
    assert (ours - reference).abs().max().item() == 0.0


def test_672_equals_siglip_pipeline_at_672(processor):
    image = PIL.Image.fromarray(random_rgb(123, 456))
    reference = SiglipImageProcessorPil(**{**SO400M_PREPROCESSOR_CONFIG, "size": {"height": 672, "width": 672}})
    assert torch.equal(pixels(processor, image), reference(image, return_tensors="pt")["pixel_values"])


# ---- input types ----------------------------------------------------------------------------------------
def test_numpy_torch_float_and_path_inputs_match_the_pil_image(processor, tmp_path):
    array = random_rgb(64, 48, seed=7)  # [H, W, 3] uint8
    expected = pixels(processor, PIL.Image.fromarray(array))
    path = tmp_path / "image.png"
    PIL.Image.fromarray(array).save(path)
    variants = {
        "numpy uint8 HWC": array,
        "numpy float64 HWC in [0, 1]": array / 255.0,
        "numpy float32 HWC in [0, 1]": array.astype(np.float32) / 255.0,
        "numpy int64 HWC": array.astype(np.int64),
        "torch uint8 CHW": torch.from_numpy(array).permute(2, 0, 1),
        "torch float CHW in [0, 1]": torch.from_numpy(array).permute(2, 0, 1).float() / 255.0,
        "torch bfloat16 CHW in [0, 1]": torch.from_numpy(array).permute(2, 0, 1).to(torch.bfloat16) / 255.0,
        "str path": str(path),
        "Path": path,
    }
    for name, image in variants.items():
        out = pixels(processor, image)
        if name.startswith("torch bfloat16"):  # bf16 cannot hold every 8-bit level: allow one level of error
            assert (out - expected).abs().max().item() <= 2 / 255 + 1e-6, name
        else:
            assert torch.equal(out, expected), name


def test_batches_and_nested_lists_flatten_in_order(processor):
    arrays = [random_rgb(32, 32, seed=s) for s in range(3)]
    one_by_one = torch.cat([pixels(processor, a) for a in arrays])
    assert torch.equal(pixels(processor, np.stack(arrays)), one_by_one)  # [B, H, W, C]
    assert torch.equal(pixels(processor, torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)), one_by_one)
    assert torch.equal(pixels(processor, [[arrays[0]], [arrays[1], arrays[2]]]), one_by_one)


def uniform(mode: str, size=(16, 12), color=0) -> PIL.Image.Image:
    return PIL.Image.new(mode, size, color)


@pytest.mark.parametrize(
    "image, rgb",
    [
        pytest.param(uniform("L", color=100), (100, 100, 100), id="L"),
        pytest.param(uniform("1", color=1), (255, 255, 255), id="1"),
        pytest.param(uniform("LA", color=(100, 255)), (100, 100, 100), id="LA-opaque"),
        pytest.param(uniform("LA", color=(100, 0)), (255, 255, 255), id="LA-transparent-on-white"),
        pytest.param(uniform("RGBA", color=(10, 20, 30, 255)), (10, 20, 30), id="RGBA-opaque"),
        pytest.param(uniform("RGBA", color=(10, 20, 30, 0)), (255, 255, 255), id="RGBA-transparent-on-white"),
        pytest.param(uniform("CMYK", color=(0, 0, 0, 0)), (255, 255, 255), id="CMYK-white"),
        pytest.param(uniform("CMYK", color=(255, 0, 0, 0)), (0, 255, 255), id="CMYK-cyan"),
        pytest.param(PIL.Image.fromarray(np.full((12, 16), 257 * 100, np.uint16)), (100, 100, 100), id="I;16"),
        pytest.param(uniform("I", color=65535), (255, 255, 255), id="I-16-bit-range"),
        pytest.param(uniform("F", color=0.2), (51, 51, 51), id="F-in-0-1"),
        pytest.param(np.full((12, 16, 4), (10, 20, 30, 0), np.uint8), (255, 255, 255), id="numpy-RGBA"),
        pytest.param(np.full((12, 16, 1), 77, np.uint8), (77, 77, 77), id="numpy-one-channel"),
        pytest.param(np.full((12, 16), 77, np.uint8), (77, 77, 77), id="numpy-HW"),
        pytest.param(torch.full((1, 12, 16), 77, dtype=torch.uint8), (77, 77, 77), id="torch-one-channel"),
    ],
)
def test_modes_and_channel_counts_convert_to_rgb(processor, image, rgb):
    out = pixels(processor, image, size={"height": 8, "width": 8})
    expected = torch.tensor([normalised(c) for c in rgb]).view(1, 3, 1, 1).expand(1, 3, 8, 8)
    assert torch.allclose(out, expected, atol=1e-6, rtol=0)


def test_palette_images_use_palette_colours_and_transparency():
    processor = ShirgImageProcessor(size={"height": 4, "width": 4})
    palette_image = PIL.Image.new("P", (6, 6), 1)
    palette_image.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    out = pixels(processor, palette_image)
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([normalised(200), normalised(100), normalised(50)]))
    palette_image.info["transparency"] = 1
    assert torch.allclose(pixels(processor, palette_image), torch.ones(1, 3, 4, 4))


# ---- errors ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "bad, message",
    [
        pytest.param(PIL.Image.new("RGB", (0, 5)), "Empty image", id="empty-pil"),
        pytest.param(np.zeros((0, 5, 3), np.uint8), "Empty numpy image", id="empty-numpy"),
        pytest.param(torch.zeros(3, 0, 4), "Empty torch image", id="empty-torch"),
        pytest.param(np.zeros((8, 8, 2), np.uint8), "1, 3 or 4 channels", id="numpy-two-channels"),
        pytest.param(np.zeros((8, 8, 5), np.uint8), "1, 3 or 4 channels", id="numpy-five-channels"),
        pytest.param(np.zeros((3, 8, 8), np.uint8), "1, 3 or 4 channels", id="numpy-channels-first"),
        pytest.param(torch.zeros(8, 8, 3), "1, 3 or 4 channels first", id="torch-channels-last"),
        pytest.param(np.zeros((2, 2, 8, 8, 3), np.uint8), "2 or 3 dimensions", id="numpy-5d"),
        pytest.param(np.zeros(8, np.uint8), "2 or 3 dimensions", id="numpy-1d"),
        pytest.param(np.full((8, 8, 3), 1.5), "must lie in [0, 1]", id="float-above-one"),
        pytest.param(np.full((8, 8, 3), np.nan), "must lie in [0, 1]", id="float-nan"),
        pytest.param(np.full((8, 8, 3), 300, np.int64), "must lie in [0, 255]", id="int-above-255"),
        pytest.param(np.zeros((8, 8, 3), bool), "Unsupported numpy dtype bool", id="bool-array"),
        pytest.param(42, "Unsupported image type int", id="int"),
        pytest.param({"image": 1}, "Unsupported image type dict", id="dict"),
        pytest.param(None, "Unsupported image type NoneType", id="none"),
        pytest.param([], "No images given", id="empty-list"),
    ],
)
def test_bad_inputs_raise_clear_value_errors(processor, bad, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        processor(bad)


def test_missing_and_unreadable_files(processor, tmp_path):
    with pytest.raises(FileNotFoundError, match="Image file not found"):
        processor(str(tmp_path / "missing.png"))
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("this is text, not a PNG")
    with pytest.raises(ValueError, match="Cannot read .*notes.png.* as an image"):
        processor(not_an_image)
    truncated = tmp_path / "truncated.png"
    PIL.Image.fromarray(random_rgb(64, 64)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(ValueError, match="Cannot read .*truncated.png.* as an image"):
        processor(truncated)


# ---- LaViDa anyres geometry ------------------------------------------------------------------------------
# LAVIDA-SPEC.md §3.5, computed by running the original geometry functions:
# image (w, h) -> chosen pinpoint (W, H), grid (nw, nh), unpadded (H', W') at pooled side 14, image tokens.
LAVIDA_TOKEN_TABLE = [
    ((384, 384), (384, 768), (1, 2), (14, 14), 406),
    ((336, 336), (384, 768), (1, 2), (14, 14), 406),
    ((100, 100), (384, 768), (1, 2), (14, 14), 406),
    ((768, 768), (768, 768), (2, 2), (28, 28), 1008),
    ((1024, 1024), (768, 768), (2, 2), (28, 28), 1008),
    ((640, 480), (768, 768), (2, 2), (22, 28), 834),
    ((800, 600), (768, 768), (2, 2), (22, 28), 834),
    ((2200, 1700), (768, 768), (2, 2), (22, 28), 834),
    ((480, 640), (768, 768), (2, 2), (28, 22), 840),
    ((1700, 2200), (768, 768), (2, 2), (28, 22), 840),
    ((700, 500), (768, 768), (2, 2), (20, 28), 776),
    ((500, 700), (768, 768), (2, 2), (28, 20), 784),
    ((1280, 720), (768, 768), (2, 2), (16, 28), 660),
    ((1000, 250), (1152, 384), (3, 1), (10, 42), 626),
    ((250, 1000), (384, 1152), (1, 3), (42, 10), 658),
    ((200, 100), (384, 768), (1, 2), (8, 14), 316),
]


@pytest.mark.parametrize("image_size, pinpoint, grid, unpadded, tokens", LAVIDA_TOKEN_TABLE,
                         ids=[f"{w}x{h}" for (w, h), *_ in LAVIDA_TOKEN_TABLE])
def test_lavida_token_count_table(image_size, pinpoint, grid, unpadded, tokens):
    assert select_best_resolution(image_size, LAVIDA_GRID_PINPOINTS) == pinpoint
    assert anyres_grid_shape(image_size, LAVIDA_GEOMETRY) == grid
    nw, nh = grid
    assert unpadded_grid_size((nh * 14, nw * 14), image_size) == unpadded
    assert lavida_hd_num_tokens(image_size, LAVIDA_GEOMETRY) == tokens


def lavida_select_best_resolution(image_size, pinpoints):
    """LaViDa's rule spelled out in (width, height) order (LAVIDA-SPEC.md §3.3 step 2)."""
    width, height = image_size
    best, best_effective, best_wasted = None, 0, float("inf")
    for target_width, target_height in pinpoints:
        scale = min(target_width / width, target_height / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = target_width * target_height - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (target_width, target_height), effective, wasted
    return best


def test_select_best_resolution_matches_lavida_rule_on_many_sizes():
    rng = np.random.default_rng(0)
    sizes = [tuple(int(s) for s in rng.integers(1, 3000, 2)) for _ in range(2000)]
    sizes += [(s, s) for s in (1, 383, 384, 385, 767, 768, 769)] + [(384, 768), (768, 384), (1152, 384)]
    for size in sizes:
        assert select_best_resolution(size, LAVIDA_GRID_PINPOINTS) == lavida_select_best_resolution(
            size, LAVIDA_GRID_PINPOINTS), size


def test_anyres_geometry_errors():
    with pytest.raises(ValueError, match="image_size must be"):
        lavida_hd_num_tokens((0, 10), LAVIDA_GEOMETRY)
    with pytest.raises(ValueError, match="multiple of the tile size 384"):
        Geometry(**{**LAVIDA_GEOMETRY.to_dict(), "pinpoints": [[384, 700]]})
    with pytest.raises(ValueError, match="non-empty list"):
        Geometry(**{**LAVIDA_GEOMETRY.to_dict(), "pinpoints": []})
    with pytest.raises(ValueError, match="pool_mode"):
        Geometry(**{**LAVIDA_GEOMETRY.to_dict(), "pool_mode": "median"})


# ---- LaViDa anyres views -------------------------------------------------------------------------------
def lavida_reference_views(image: PIL.Image.Image, tile: int, base_side: int) -> list[PIL.Image.Image]:
    """LAVIDA-SPEC.md §3.3 steps 2-6 with PIL defaults, as LaViDa's `process_anyres_image` runs them."""
    width, height = image.size
    target_width, target_height = lavida_select_best_resolution((width, height), LAVIDA_GRID_PINPOINTS)
    scale_w, scale_h = target_width / width, target_height / height
    if scale_w < scale_h:
        new_width, new_height = target_width, min(math.ceil(height * scale_w), target_height)
    else:
        new_width, new_height = min(math.ceil(width * scale_h), target_width), target_height
    canvas = PIL.Image.new("RGB", (target_width, target_height), (0, 0, 0))
    canvas.paste(image.resize((new_width, new_height)),
                 ((target_width - new_width) // 2, (target_height - new_height) // 2))
    tiles = [canvas.crop((x, y, x + tile, y + tile)) for y in range(0, target_height, tile)
             for x in range(0, target_width, tile)]
    return [image.resize((base_side, base_side))] + tiles


@pytest.mark.parametrize("width, height, views", [(700, 500, 5), (500, 700, 5), (200, 100, 3), (1000, 250, 4)])
def test_anyres_views_equal_lavida_preprocessing(processor, siglip_384, width, height, views):
    image = PIL.Image.fromarray(random_rgb(height, width, seed=width))
    out = processor(image, do_anyres=True, size={"height": 384, "width": 384}, return_tensors="pt")
    reference = siglip_384(lavida_reference_views(image, 384, 384), return_tensors="pt")["pixel_values"]
    assert out["pixel_values"].shape == (1, views, 3, 384, 384)
    assert (out["pixel_values"][0] - reference).abs().max().item() == 0.0
    assert out["image_sizes"].tolist() == [[width, height]]


def test_anyres_views_resize_to_a_tower_smaller_than_the_tile(siglip_384):
    """Tiny towers (28 px) keep LaViDa's 384-px geometry: the base view is squashed straight to 28 px."""
    processor = ShirgImageProcessor(size={"height": 28, "width": 28})
    image = PIL.Image.fromarray(random_rgb(500, 700, seed=11))
    reference_siglip = SiglipImageProcessorPil(**{**SO400M_PREPROCESSOR_CONFIG, "size": {"height": 28, "width": 28}})
    reference = reference_siglip(lavida_reference_views(image, 384, 28), return_tensors="pt")["pixel_values"]
    out = processor(image, do_anyres=True, return_tensors="pt")["pixel_values"]
    assert out.shape == (1, 5, 3, 28, 28)
    assert torch.equal(out[0], reference)


def test_anyres_batch_pads_views_with_zeros_and_lists_without_tensors(processor):
    images = [PIL.Image.fromarray(random_rgb(500, 700)), PIL.Image.fromarray(random_rgb(100, 200))]
    size = {"height": 384, "width": 384}
    batch = processor(images, do_anyres=True, size=size, return_tensors="pt")
    assert batch["pixel_values"].shape == (2, 5, 3, 384, 384)
    assert batch["image_sizes"].tolist() == [[700, 500], [200, 100]] and batch["image_sizes"].dtype == torch.int64
    single = processor(images[1], do_anyres=True, size=size, return_tensors="pt")["pixel_values"][0]  # [3 views]
    assert torch.equal(batch["pixel_values"][1, :3], single)
    assert not batch["pixel_values"][1, 3:].any()
    unbatched = processor(images, do_anyres=True, size=size)
    assert [v.shape for v in unbatched["pixel_values"]] == [(5, 3, 384, 384), (3, 3, 384, 384)]
    assert [list(s) for s in unbatched["image_sizes"]] == [[700, 500], [200, 100]]


def test_save_and_load_round_trip(processor, tmp_path):
    custom = ShirgImageProcessor(size={"height": 48, "width": 48}, anyres_tile_size=96,
                                 image_grid_pinpoints=[[96, 192], [192, 96]])
    custom.save_pretrained(tmp_path)
    restored = ShirgImageProcessor.from_pretrained(tmp_path)
    assert restored.to_dict() == custom.to_dict()
    image = PIL.Image.fromarray(random_rgb(50, 120))
    for kwargs in ({}, {"do_anyres": True}):
        assert torch.equal(pixels(restored, image, **kwargs), pixels(custom, image, **kwargs))
    assert pixels(restored, image, do_anyres=True).shape == (1, 3, 3, 48, 48)
