"""Configuration of ShirgLavidaForDiffusionLM: SigLIP tower + SHIRG selector + projector + LLaDA backbone."""

from transformers import PreTrainedConfig, SiglipVisionConfig
from transformers.configuration_utils import SubConfigSpec

from .configuration_llada import LladaConfig, _require, drop_legacy_fields
from .visual_tokens import (
    DEFAULT_VISION_MODE,
    LAVIDA_GEOMETRY,
    Geometry,
    check_selection,
    get_vision_mode,
    num_image_tokens,
)


# SigLIP so400m-patch14-384 with LaViDa's truncation: the last of its 27 layers is deleted, so the output of
# the last remaining layer (before post_layernorm) is the penultimate-layer feature LaViDa uses.
SO400M_TRUNCATED = {
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 26,
    "num_attention_heads": 16,
    "num_channels": 3,
    "image_size": LAVIDA_GEOMETRY.native_side,
    "patch_size": LAVIDA_GEOMETRY.patch_size,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
    "attention_dropout": 0.0,
    "vision_use_head": False,
}
# The projector is always LaViDa's mlp2x_gelu (exact GELU).
LEGACY_FIELDS = {"projector_hidden_act": "gelu"}


class ShirgLavidaConfig(PreTrainedConfig):
    r"""
    Args:
        vision_config (`SiglipVisionConfig` or `dict`): the SigLIP tower, already truncated to the layers kept
            (26 for so400m, as LaViDa). Features are its last layer's output without `post_layernorm`.
        text_config (`LladaConfig` or `dict`): the LLaDA backbone.
        highres_image_size (`int`): input side of the high-res modes (672 px: 48 x 48 = 2,304 patches at patch
            14); the tower's position embeddings are interpolated to it.
        vision_mode (`str`): a registered vision mode (`visual_tokens.vision_mode_names()`): `shirg` (K selected
            + 1 summary token), `full` (all high-res patches), `lowres` (the tower's native view) or `lavida-hd`
            (LaViDa's anyres views, 2x2 pooling, unpadding and newline tokens).
        selection (`dict`): selection settings: `method` (a registered selection method), `budget` (K),
            `weights` (importance, magnitude, gradient; sum 1), `coverage_cells` (rows, cols), `summary` (append
            the summary token), `seed` (the `random` baseline's).
        image_token_id (`int`): id of the `<image>` token the processor repeats once per visual token.
        image_grid_pinpoints, anyres_tile_size, anyres_pool_mode: LaViDa's anyres geometry for `lavida-hd`
            (pinpoints are [width, height] in pixels; the grid shape is pinpoint / anyres_tile_size).
        training_attention (`str`): `prefix_dlm` (prompt tokens never attend to answer tokens, so training
            matches the cached inference exactly) or `full` (the original LaViDa training attention).
    """

    model_type = "shirg_lavida"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=SiglipVisionConfig, init_kwargs=dict(SO400M_TRUNCATED)),
        "text_config": SubConfigSpec(config_class=LladaConfig),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    highres_image_size: int = LAVIDA_GEOMETRY.highres_side
    vision_mode: str = DEFAULT_VISION_MODE
    selection: dict | None = None
    image_token_id: int = 126349
    image_grid_pinpoints: list | None = None
    anyres_tile_size: int = LAVIDA_GEOMETRY.tile_size
    anyres_pool_mode: str = LAVIDA_GEOMETRY.pool_mode
    training_attention: str = "prefix_dlm"
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        drop_legacy_fields(kwargs, LEGACY_FIELDS)
        if self.image_grid_pinpoints is None:
            self.image_grid_pinpoints = [list(p) for p in LAVIDA_GEOMETRY.pinpoints]
        super().__post_init__(**kwargs)
        self.validate()

    # ---- the visual-token contract (visual_tokens.py) ------------------------------------------------------
    @property
    def geometry(self) -> Geometry:
        """The front end's sizes as the contract's `Geometry`."""
        return Geometry(
            native_side=self.vision_config.image_size, highres_side=self.highres_image_size,
            patch_size=self.vision_config.patch_size, tile_size=self.anyres_tile_size,
            pinpoints=self.image_grid_pinpoints, pool_mode=self.anyres_pool_mode,
        )

    @property
    def highres_grid(self) -> tuple[int, int]:
        return self.geometry.highres_grid

    @property
    def num_highres_patches(self) -> int:
        return self.geometry.num_highres_patches

    def num_image_tokens(self, budget: int | None = None, image_size=None) -> int:
        """Visual tokens one image occupies in the prompt in `vision_mode` (see `visual_tokens.num_image_tokens`)."""
        return num_image_tokens(self.vision_mode, self.geometry, self.selection, budget=budget,
                                image_size=image_size)

    def validate(self) -> None:
        """Raise `ValueError` naming the offending field when the configuration is inconsistent."""
        vision, text = self.vision_config, self.text_config
        try:
            get_vision_mode(self.vision_mode)
        except ValueError as error:
            raise ValueError(f"Invalid config field `vision_mode`: {error}") from None
        try:
            geometry = self.geometry
        except ValueError as error:
            raise ValueError(f"Invalid config geometry (vision_config.image_size / patch_size, highres_image_size, "
                             f"anyres_tile_size, image_grid_pinpoints, anyres_pool_mode): {error}") from None
        _require(vision.hidden_size % vision.num_attention_heads == 0, "vision_config.num_attention_heads",
                 f"must divide vision_config.hidden_size={vision.hidden_size}, got {vision.num_attention_heads}")
        _require(self.training_attention in ("prefix_dlm", "full"), "training_attention",
                 f"must be 'prefix_dlm' or 'full', got {self.training_attention!r}")
        _require(isinstance(self.image_token_id, int) and 0 <= self.image_token_id < text.vocab_size,
                 "image_token_id", f"must be in [0, {text.vocab_size - 1}], got {self.image_token_id!r}")
        _require(self.image_token_id != text.mask_token_id, "image_token_id",
                 f"must differ from text_config.mask_token_id={text.mask_token_id}")
        self.selection = check_selection(self.selection, geometry.highres_grid)

    # ---- presets ---------------------------------------------------------------------------------------
    @classmethod
    def lavida_llada_8b(cls, **overrides) -> "ShirgLavidaConfig":
        """The real LaViDa-LLaDA-8B sizes: SigLIP so400m (26 layers kept) + mlp2x_gelu + LLaDA-8B."""
        kwargs = dict(vision_config=dict(SO400M_TRUNCATED), text_config=LladaConfig.llada_8b().to_dict())
        kwargs.update(overrides)
        return cls(**kwargs)

    @classmethod
    def tiny(cls, **overrides) -> "ShirgLavidaConfig":
        """A tiny model for tests and demos: 28 px tower (7x7 low-res grid), 48 px high-res (12x12 = 144 patches).

        Uses the tiny LLaDA vocabulary (512 ids: `<image>` 504, eos/pad 510, mask 511).
        """
        vision = dict(SO400M_TRUNCATED, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, image_size=28, patch_size=4)
        kwargs = dict(
            vision_config=vision,
            text_config=LladaConfig.tiny().to_dict(),
            highres_image_size=48,
            image_token_id=504,
            selection={"budget": 32, "coverage_cells": [4, 4]},
        )
        kwargs["selection"] = {**kwargs["selection"], **overrides.pop("selection", {})}
        kwargs.update(overrides)
        return cls(**kwargs)


__all__ = ["ShirgLavidaConfig"]
