"""ShirgLavidaForDiffusionLM: LaViDa (SigLIP -> mlp2x_gelu projector -> LLaDA) with SHIRG token selection.

Every vision mode of the registry (`visual_tokens.py`) feeds the same projector and backbone; this module attaches
the torch halves of the built-in modes:
- `shirg`: high-res patches (672 px -> 48x48 = 2,304) -> ShirgSelector keeps K in raster order + 1 summary token.
- `full`: all high-res patches. `lowres`: the tower's native view (LaViDa's 4-D tensor path: no pooling).
- `lavida-hd`: LaViDa's anyres assembly (base view + grid crops, projector, 2x2 pooling, unpadding,
  `image_newline` after every row), so converted LaViDa checkpoints reproduce the original.
Selection happens once per image, before diffusion starts, so the prefix KV cache stays exact.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel, SiglipVisionModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .configuration_shirg_lavida import ShirgLavidaConfig
from .generation_diffusion import DiffusionGenerationConfig, diffusion_generate
from .modeling_llada import LladaForMaskedDiffusion, masked_diffusion_loss, prefix_dlm_attention_mask
from .selection_shirg import ShirgSelector, capture_received_attention
from .visual_tokens import (
    anyres_grid_shape,
    get_vision_mode,
    num_image_tokens,
    vision_front_end,
    unpadded_grid_size,
)


@dataclass
class ShirgLavidaOutput(ModelOutput):
    """`loss` (masked-diffusion NLL, when labels are given), `logits` [B, T, V], `cache`, `hidden_states`,
    plus what the vision front end produced: `image_token_counts` [B] and, for `shirg`, `kept_indices` [B, K]
    ([B, K_max] padded with -1 when images have different K: adaptive K)."""

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    cache: object | None = None
    hidden_states: tuple | None = None
    image_token_counts: torch.LongTensor | None = None
    kept_indices: torch.LongTensor | None = None


class ShirgProjector(nn.Module):
    """LaViDa's `mlp2x_gelu`: Linear(vision hidden -> text hidden) -> GELU (exact erf) -> Linear(text -> text)."""

    def __init__(self, config):
        super().__init__()
        self.linear_1 = nn.Linear(config.vision_config.hidden_size, config.text_config.hidden_size, bias=True)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(config.text_config.hidden_size, config.text_config.hidden_size, bias=True)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(image_features)))


def check_pixel_values(pixel_values, mode) -> None:
    """Raise `ValueError` unless `pixel_values` is what the processor returns for `mode`, with finite values.

    Anyres modes take [B, V, 3, S, S] or a list of [V_i, 3, S, S] tensors, the other modes [B, 3, S, S].
    """
    if mode.anyres and isinstance(pixel_values, (list, tuple)):
        views, expected, dims = list(pixel_values), "a list of [V_i, 3, S, S]", 4
    elif mode.anyres:
        views, expected, dims = [pixel_values], "[B, V, 3, S, S] or a list of [V_i, 3, S, S]", 5
    else:
        views, expected, dims = [pixel_values], "[B, 3, S, S]", 4
    for tensor in views:
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"pixel_values must be a torch tensor {expected} for vision_mode='{mode.name}', got "
                             f"{type(tensor).__name__}; call the processor with return_tensors='pt' (or use "
                             "torch.from_numpy).")
        if tensor.dim() != dims:
            raise ValueError(f"pixel_values must be {expected} for vision_mode='{mode.name}', got shape "
                             f"{tuple(tensor.shape)}; a single image needs a batch dimension (pixel_values[None]).")
        if not tensor.is_floating_point():
            raise ValueError(f"pixel_values must be floating point, got {tensor.dtype}; preprocess the images with "
                             "the processor.")
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"pixel_values contain NaN or infinite values (vision_mode='{mode.name}'); preprocess "
                             "the images with the processor, which only produces finite values.")


def lavida_unpad(feature_map: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """Remove the rows or columns of `feature_map` [C, H, W] covering the anyres canvas padding (LaViDa's
    `unpad_image`; the arithmetic is `visual_tokens.unpadded_grid_size`)."""
    map_height, map_width = feature_map.shape[1:]
    rows, cols = unpadded_grid_size((map_height, map_width), image_size)
    top, left = (map_height - rows) // 2, (map_width - cols) // 2
    return feature_map[:, top : top + rows, left : left + cols]


# LaViDa's `get_2dPool` per pool mode: [V, H, G, G] -> [V, H, g, g] with g = geometry.pooled_side.
_POOLING = {
    "bilinear": lambda grid, side: F.interpolate(grid, size=(side, side), mode="bilinear", align_corners=False),
    "average": lambda grid, side: F.avg_pool2d(grid, 2),
    "max": lambda grid, side: F.max_pool2d(grid, 2),
}


class ShirgLavidaPreTrainedModel(PreTrainedModel):
    config: ShirgLavidaConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["LladaDecoderLayer", "SiglipEncoderLayer", "SiglipVisionEmbeddings"]
    _supports_sdpa = True
    _supports_attention_backend = True

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, ShirgLavidaForDiffusionLM):
            init.normal_(module.image_newline, mean=0.0, std=self.config.text_config.initializer_range)


class ShirgLavidaForDiffusionLM(ShirgLavidaPreTrainedModel, GenerationMixin):
    """SigLIP tower + SHIRG selector + projector + LLaDA masked-diffusion backbone and LM head."""

    accepts_loss_kwargs = False
    generation_config_class = DiffusionGenerationConfig

    def __init__(self, config: ShirgLavidaConfig):
        super().__init__(config)
        self.vision_tower = SiglipVisionModel(config.vision_config)
        self.selector = ShirgSelector.from_config(config)
        self.multi_modal_projector = ShirgProjector(config)
        self.image_newline = nn.Parameter(torch.empty(config.text_config.hidden_size))
        self.language_model = LladaForMaskedDiffusion(config.text_config)
        self.post_init()

    @classmethod
    def from_pretrained(cls, *args, allow_missing_weights: bool = False, output_loading_info: bool = False,
                        **kwargs):
        """`PreTrainedModel.from_pretrained` that refuses a checkpoint lacking some weights.

        transformers would initialise missing tensors randomly and only log a notice, so the model would answer
        nonsense. Pass `allow_missing_weights=True` to accept that (e.g. to train the missing parts).
        """
        model, loading_info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        missing = sorted(loading_info["missing_keys"])
        if missing and not allow_missing_weights:
            shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            raise ValueError(
                f"the checkpoint lacks {len(missing)} weight tensor(s) ({shown}), which would be randomly "
                "initialised; restore the complete model.safetensors (re-convert or re-save the model), or pass "
                "allow_missing_weights=True to load it anyway"
            )
        return (model, loading_info) if output_loading_info else model

    def add_task_auto_map(self) -> None:
        """For a remote-code save: map `AutoModelForImageTextToText` (the `image-text-to-text` pipeline's class)
        to this class in `config.auto_map`, next to `AutoModel` (`register_for_auto_class` keeps one)."""
        if self._auto_class is not None:
            auto_map = dict(getattr(self.config, "auto_map", None) or {})
            module = type(self).__module__.rpartition(".")[2]
            auto_map.setdefault("AutoModelForImageTextToText", f"{module}.{type(self).__name__}")
            self.config.auto_map = auto_map

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained` with `add_task_auto_map`."""
        self.add_task_auto_map()
        return super().save_pretrained(save_directory, *args, **kwargs)

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    # ---- vision ------------------------------------------------------------------------------------------
    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Raw output of the tower's last kept layer (no post_layernorm): [V, 3, S, S] -> [V, (S/patch)^2, Dv].

        Position embeddings are interpolated whenever S differs from the tower's native size (672 -> 48x48).
        """
        tower = self.vision_tower
        pixel_values = pixel_values.to(dtype=tower.embeddings.patch_embedding.weight.dtype)
        interpolate = pixel_values.shape[-1] != self.config.vision_config.image_size
        embeddings = tower.embeddings(pixel_values, interpolate_pos_encoding=interpolate)  # [V, N, Dv]
        return tower.encoder(inputs_embeds=embeddings).last_hidden_state  # [V, N, Dv]

    def _check_pixel_size(self, pixel_values: torch.Tensor, mode: str) -> None:
        side = self.config.geometry.side(get_vision_mode(mode).view_side)
        if pixel_values.shape[-2:] != (side, side) or pixel_values.shape[-3] != 3:
            raise ValueError(
                f"vision_mode='{mode}' expects pixel_values of shape [..., 3, {side}, {side}], got "
                f"{tuple(pixel_values.shape)}. Preprocess with the processor saved with this model "
                f"(ShirgLavidaProcessor.from_model_config(config, tokenizer)) for this mode."
            )

    def get_image_features(
        self,
        pixel_values: torch.Tensor | list,
        vision_mode: str | None = None,
        image_sizes: torch.Tensor | None = None,
        shirg_budget: int | None = None,
        selection_method: str | None = None,
        selection_inputs: dict | None = None,
    ) -> tuple[list[torch.Tensor], torch.LongTensor | None]:
        """Visual token embeddings per image (list of [n_i, H]) and, for selecting modes, the kept indices [B, K]."""
        mode = get_vision_mode(vision_mode or self.config.vision_mode)
        if mode.features is None:
            raise ValueError(f"vision mode {mode.name!r} has no torch front end: register one with "
                             f"@register_vision_mode({mode.name!r}, ...) on a function (model, pixel_values, ...)")
        if mode.selects:
            shirg_budget = self.config.selection["budget"] if shirg_budget is None else shirg_budget
            selection_method = selection_method or self.config.selection["method"]
        elif shirg_budget is not None or selection_method is not None:
            raise ValueError(f"shirg_budget and selection_method only apply to selecting vision modes; "
                             f"vision_mode={mode.name!r} does not select.")
        check_pixel_values(pixel_values, mode)
        return mode.features(self, pixel_values, image_sizes=image_sizes, method=selection_method,
                             budget=shirg_budget, selection_inputs=selection_inputs)

    def pool_views(self, projected: torch.Tensor) -> torch.Tensor:
        """LaViDa's `get_2dPool` on projected view tokens: [V, G*G, H] -> [V, g*g, H] (27 -> 14 bilinear)."""
        views, num_tokens, hidden = projected.shape
        side = round(num_tokens**0.5)
        grid = projected.view(views, side, side, hidden).permute(0, 3, 1, 2)  # [V, H, G, G]
        pooled = _POOLING[self.config.anyres_pool_mode](grid, self.config.geometry.pooled_side)
        return pooled.flatten(2).transpose(1, 2)  # [V, g*g, H]

    def split_anyres_views(self, pixel_values, image_sizes) -> list[torch.Tensor]:
        """Per-image view tensors [V_i, 3, S, S] from a list or from the processor's zero-padded [B, V_max, 3, S, S]."""
        if image_sizes is None:
            raise ValueError("anyres vision modes need image_sizes [B, 2] as (width, height) per image, as "
                             "ShirgLavidaProcessor returns them for these modes.")
        sizes = image_sizes.tolist() if isinstance(image_sizes, torch.Tensor) else image_sizes
        if not all(isinstance(size, (list, tuple)) and len(size) == 2 and all(
                isinstance(side, int) and not isinstance(side, bool) and side > 0 for side in size) for size in sizes):
            raise ValueError(f"image_sizes must hold one (width, height) pair of positive integers per image, got "
                             f"{sizes!r}; use the image_sizes the processor returns.")
        if isinstance(pixel_values, torch.Tensor) and pixel_values.dim() == 5:
            views_per_image = []
            for views, image_size in zip(pixel_values, image_sizes):
                columns, rows = anyres_grid_shape(image_size.tolist(), self.config.geometry)
                if 1 + rows * columns > views.shape[0]:
                    raise ValueError(f"image of size {tuple(image_size.tolist())} needs {1 + rows * columns} "
                                     f"anyres views but pixel_values holds {views.shape[0]}")
                views_per_image.append(views[: 1 + rows * columns])
        elif isinstance(pixel_values, (list, tuple)):
            views_per_image = list(pixel_values)
        else:
            raise ValueError(
                "anyres vision modes need pixel_values as a list of per-image view tensors [V_i, 3, S, S] or a "
                "zero-padded tensor [B, V_max, 3, S, S] (base view first, then the grid crops in row-major order), "
                f"got {type(pixel_values).__name__} of shape {tuple(getattr(pixel_values, 'shape', ()))}."
            )
        if len(image_sizes) != len(views_per_image):
            raise ValueError(f"got {len(views_per_image)} images but {len(image_sizes)} image_sizes")
        return views_per_image

    # ---- prompt assembly ---------------------------------------------------------------------------------
    def embed_multimodal(
        self,
        input_ids: torch.LongTensor,
        pixel_values=None,
        image_sizes=None,
        shirg_budget: int | None = None,
        vision_mode: str | None = None,
        image_rows: torch.LongTensor | None = None,
        selection_method: str | None = None,
        selection_inputs: dict | None = None,
    ) -> tuple[torch.Tensor, torch.LongTensor | None]:
        """Token embeddings with the visual tokens scattered (out of place) into the `<image>` positions.

        `vision_mode`, `selection_method` and `shirg_budget` are those the processor expanded the prompt for (it
        returns them with the batch); defaults: the config's. Every row's placeholder count is checked against
        `visual_tokens.num_image_tokens`. `image_rows` [B] maps each row to one of the given images, so rows that
        share an image (LaViDa's complementary-masking copies) run the tower and the selector once; default: row
        b uses image b.
        """
        image_token_id = self.config.image_token_id
        vocab_size = self.config.text_config.vocab_size
        if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2 and input_ids.shape[1] == 0:
            raise ValueError("input_ids is empty: every row needs a prompt (e.g. processor(text=[build_prompt("
                             "question)], images=[image])); an empty text gives no tokens.")
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point() \
                or input_ids.dtype == torch.bool or input_ids.is_complex():
            raise ValueError(
                f"input_ids must be an integer torch tensor [B, T] (torch.long), got "
                f"{type(input_ids).__name__} {getattr(input_ids, 'dtype', '')} of shape "
                f"{tuple(getattr(input_ids, 'shape', ()))}; use the processor's output (or .long())."
            )
        if input_ids.min() < 0 or input_ids.max() >= vocab_size:
            raise ValueError(f"input_ids must lie in [0, {vocab_size - 1}]; got values in "
                             f"[{int(input_ids.min())}, {int(input_ids.max())}]")
        inputs_embeds = self.get_input_embeddings()(input_ids)  # [B, T, H]
        image_positions = input_ids == image_token_id  # [B, T]
        if pixel_values is None:
            if image_positions.any():
                raise ValueError(f"input_ids contain {int(image_positions.sum())} image tokens (id {image_token_id}) "
                                 "but no pixel_values were given.")
            return inputs_embeds, None
        vision_mode, selection_method = (
            _batch_setting(name, value) for name, value in (
                ("vision_mode", vision_mode), ("selection_method", selection_method)))
        mode = get_vision_mode(vision_mode or self.config.vision_mode)
        num_images = len(pixel_values)
        budgets = [None] * num_images
        if mode.selects:
            shirg_budget = self.config.selection["budget"] if shirg_budget is None else shirg_budget
            budgets = _per_image_budgets(shirg_budget, num_images)
            shirg_budget = budgets[0] if len(set(budgets)) == 1 else budgets
            selection_method = selection_method or self.config.selection["method"]
        rows = list(range(input_ids.shape[0])) if image_rows is None else image_rows.tolist()
        if len(rows) != input_ids.shape[0] or not all(0 <= index < num_images for index in rows):
            raise ValueError(f"image_rows must be [B] = [{input_ids.shape[0]}] indices into the {num_images} images, "
                             f"got {rows}" if image_rows is not None else
                             f"Got {num_images} images for a batch of {input_ids.shape[0]} rows; this model takes "
                             "exactly one image per row.")
        if mode.anyres and image_sizes is None:
            raise ValueError(f"vision_mode={mode.name!r} needs image_sizes [B, 2] as (width, height) per image, as "
                             "ShirgLavidaProcessor returns them for this mode.")
        expected = [num_image_tokens(mode.name, self.config.geometry, self.config.selection, budget=budgets[index],
                                     method=selection_method,
                                     image_size=tuple(int(x) for x in image_sizes[index]) if mode.anyres else None)
                    for index in range(num_images)]
        for row, (positions, index) in enumerate(zip(image_positions, rows)):
            if int(positions.sum()) != expected[index]:
                settings = f"vision_mode={mode.name!r}" + (
                    f", selection_method={selection_method!r}, shirg_budget={shirg_budget}" if mode.selects else "")
                raise ValueError(
                    f"Row {row}: the prompt has {int(positions.sum())} image placeholder tokens but {settings} gives "
                    f"{expected[index]} visual tokens per image. Pass the processor's output unchanged: it carries "
                    "the vision_mode, selection_method and shirg_budget the prompt was expanded for."
                )
        image_embeds, kept_indices = self.get_image_features(
            pixel_values, mode.name, image_sizes, shirg_budget, selection_method, selection_inputs)
        for index, embeds in enumerate(image_embeds):
            if embeds.shape[0] != expected[index]:
                raise ValueError(f"the front end of vision_mode={mode.name!r} gave {embeds.shape[0]} tokens for image "
                                 f"{index}, but its registered count is {expected[index]}")
        image_embeds = [image_embeds[index] for index in rows]
        kept_indices = None if kept_indices is None else kept_indices[torch.as_tensor(rows)]
        image_embeds = torch.cat(image_embeds).to(inputs_embeds.dtype)  # [sum n_i, H]
        inputs_embeds = inputs_embeds.masked_scatter(image_positions[..., None], image_embeds)
        return inputs_embeds, kept_indices

    # ---- training / scoring forward ----------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | list | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        image_sizes: torch.Tensor | None = None,
        prefix_lengths: torch.LongTensor | None = None,
        p_mask: torch.Tensor | None = None,
        shirg_budget: int | None = None,
        image_rows: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache=None,
        output_hidden_states: bool = False,
        vision_mode: str | None = None,
        selection_method: str | None = None,
        selection_inputs: dict | None = None,
        position_ids: torch.LongTensor | None = None,
    ) -> ShirgLavidaOutput:
        """Masked-diffusion forward.

        With `labels` (-100 everywhere except the masked answer positions, as the collator builds them) the
        loss is LaViDa's mean cross-entropy over masked tokens, or LLaDA's 1/p-weighted estimator when `p_mask`
        [B] is given. Attention follows `config.training_attention`: `prefix_dlm` (default) lets prompt tokens
        (the first `prefix_lengths[b]` positions, image tokens included) attend only to the prompt, so training
        matches cached inference exactly; `full` is the original's bidirectional attention. `image_rows` [B]
        lets rows share images; `vision_mode`, `selection_method`, `shirg_budget` and `selection_inputs` choose
        the front end as the processor / collator expanded the prompt (see `embed_multimodal`). `position_ids`
        [B, T] replaces the rotary positions (default: real tokens counted from 0, left padding skipped).
        """
        image_token_counts, kept_indices = None, None
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("Pass input_ids (with pixel_values for images) or inputs_embeds.")
            inputs_embeds, kept_indices = self.embed_multimodal(
                input_ids, pixel_values, image_sizes, shirg_budget, vision_mode, image_rows, selection_method,
                selection_inputs)
            image_token_counts = (input_ids == self.config.image_token_id).sum(-1)
        elif pixel_values is not None:
            raise ValueError("Pass either inputs_embeds or pixel_values, not both.")
        if attention_mask is None:
            attention_mask = torch.ones(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device)
        num_answer_tokens = None
        if prefix_lengths is not None:
            prefix_lengths = torch.as_tensor(prefix_lengths, device=inputs_embeds.device)
            positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)  # [T]
            is_answer = attention_mask.bool() & (positions[None, :] >= prefix_lengths[:, None])  # [B, T]
            num_answer_tokens = is_answer.sum(-1)  # [B], EOS padding of the answers included
        if prefix_lengths is not None and self.config.training_attention == "prefix_dlm":
            # A 4-D mask carries no padding information for positions: count real tokens (left padding).
            if position_ids is None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # [B, T]
            attention_mask = prefix_dlm_attention_mask(attention_mask, prefix_lengths)
        elif labels is not None and self.config.training_attention == "prefix_dlm":
            raise ValueError(
                "labels were given without prefix_lengths [B]: the prefix-DLM training mask needs the prompt "
                "length of each row (ShirgDiffusionCollator provides it), or set config.training_attention='full'."
            )
        outputs = self.language_model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
            output_hidden_states=output_hidden_states,
        )
        loss = None
        if labels is not None:
            if p_mask is not None and num_answer_tokens is None:
                raise ValueError("p_mask (LLaDA's 1/p loss) needs prefix_lengths to count each row's answer tokens.")
            loss = masked_diffusion_loss(outputs.logits, labels, p_mask=p_mask, num_answer_tokens=num_answer_tokens)
        return ShirgLavidaOutput(
            loss=loss, logits=outputs.logits, cache=outputs.cache, hidden_states=outputs.hidden_states,
            image_token_counts=image_token_counts, kept_indices=kept_indices,
        )

    # ---- generation --------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | list | None = None,
        attention_mask: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        shirg_budget: int | None = None,
        vision_mode: str | None = None,
        selection_method: str | None = None,
        selection_inputs: dict | None = None,
        generation_config=None,
        streamer=None,
        **kwargs,
    ):
        """Answer ids [B, max_new_tokens] for processor outputs (image + prompt, left-padded batches welcome).

        The image is encoded and selected ONCE, the prefix (system + image tokens + question + assistant header)
        is cached once, and every diffusion step runs only the answer tokens against that read-only cache.
        `kwargs` override `self.generation_config` (a `DiffusionGenerationConfig`: `max_new_tokens`,
        `block_length`, `steps` / `step_ratio`, `schedule`, `remasking`, `temperature`, `stop_at_eos`, ...).
        `vision_mode`, `selection_method` and `shirg_budget` come with the processor's output. `streamer` (a
        transformers `TextStreamer` / `TextIteratorStreamer`, batch of one) gets the prompt ids, then the answer's
        stable prefix as diffusion decodes it, then `end()`.
        """
        if input_ids is None:
            raise ValueError("generate() needs input_ids (the processor's output) and, for images, pixel_values.")
        inputs_embeds, _ = self.embed_multimodal(input_ids, pixel_values, image_sizes, shirg_budget, vision_mode,
                                                 selection_method=selection_method, selection_inputs=selection_inputs)
        return diffusion_generate(
            self.language_model, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
            generation_config=generation_config if generation_config is not None else self.generation_config,
            streamer=streamer, prompt_ids=input_ids, **kwargs,
        )


def _per_image_budgets(budget, num_images: int) -> list[int]:
    """K of every image: one K for all, or one per image (adaptive K: the processor's list, or per-row copies)."""
    if isinstance(budget, torch.Tensor):
        budget = budget.tolist()
    if isinstance(budget, str):
        raise ValueError(f"shirg_budget={budget!r}: the processor chooses adaptive K per image and returns it; pass "
                         "the processor's output (its shirg_budget) to the model")
    if not isinstance(budget, (list, tuple)):
        return [int(budget)] * num_images
    if len(budget) != num_images:
        raise ValueError(f"shirg_budget holds {len(budget)} values for {num_images} images; pass one K, or one K per "
                         "image as the processor returns them for shirg_budget='adaptive'")
    return [int(value) for value in budget]


def _batch_setting(name: str, value):
    """One value of a per-batch setting; a list of per-row copies (batches collated from single processor
    outputs, as pipelines build them) must hold one value."""
    if not isinstance(value, (list, tuple)):
        return value
    values = set(value)
    if len(values) != 1:
        raise ValueError(f"{name} differs between the rows of the batch ({sorted(map(str, values))}); one batch "
                         "runs one setting: process rows with different settings in separate calls.")
    return value[0]


# ---- torch halves of the built-in vision modes ------------------------------------------------------------
def _high_res_features(model, pixel_values, mode):
    model._check_pixel_size(pixel_values, mode)
    return model.vision_features(pixel_values)  # [B, N, Dv]


@vision_front_end("shirg")
def shirg_front_end(model, pixel_values, image_sizes=None, method=None, budget=None, selection_inputs=None):
    """High-res patches -> K selected tokens (+ summary) -> projector.

    When the selection settings read a tower layer's attention (`selection.importance`), that layer's received
    attention is recorded during the same tower forward and passed to the selector as input "attention"."""
    selector, inputs = model.selector, dict(selection_inputs or {})
    if inputs.get("attention") is None and selector.needs_attention(method):
        with capture_received_attention(model.vision_tower.encoder, selector.settings["attention_layer"]) as seen:
            features = _high_res_features(model, pixel_values, "shirg")
        inputs["attention"] = seen["attention"]
    else:
        features = _high_res_features(model, pixel_values, "shirg")
    if not isinstance(budget, (list, tuple)):
        selection = selector(features, grid_size=model.config.highres_grid, budget=budget, method=method,
                             inputs=inputs)  # tokens [B, K+1, Dv], kept [B, K]
        return list(model.multi_modal_projector(selection.tokens).unbind(0)), selection.kept_indices
    # one K per image (adaptive K): each image is selected and projected as it would be alone; kept indices are
    # padded with -1 to the largest K
    embeds, kept = [], torch.full((len(budget), max(budget)), -1, dtype=torch.long, device=features.device)
    for row, row_budget in enumerate(budget):
        row_inputs = {name: value[row:row + 1] for name, value in inputs.items() if value is not None}
        selection = selector(features[row:row + 1], grid_size=model.config.highres_grid, budget=row_budget,
                             method=method, inputs=row_inputs)
        embeds.append(model.multi_modal_projector(selection.tokens)[0])
        kept[row, :row_budget] = selection.kept_indices[0]
    return embeds, kept


@vision_front_end("full")
def full_front_end(model, pixel_values, **unused):
    """Every high-res patch -> projector."""
    return list(model.multi_modal_projector(_high_res_features(model, pixel_values, "full")).unbind(0)), None


@vision_front_end("lowres")
def lowres_front_end(model, pixel_values, **unused):
    """The tower's native view -> projector (LaViDa's 4-D tensor path: no pooling, no newline)."""
    model._check_pixel_size(pixel_values, "lowres")
    return list(model.multi_modal_projector(model.vision_features(pixel_values)).unbind(0)), None


@vision_front_end("lavida-hd")
def lavida_hd_front_end(model, pixel_values, image_sizes=None, **unused):
    """LaViDa's anyres assembly: [pooled base view] + unpadded grid rows, each followed by `image_newline`."""
    views_per_image = model.split_anyres_views(pixel_values, image_sizes)
    for views in views_per_image:
        model._check_pixel_size(views, "lavida-hd")
    projected = model.multi_modal_projector(model.vision_features(torch.cat(views_per_image)))  # [sum V, N, H]
    pooled = model.pool_views(projected)  # [sum V, g*g, H]
    side = model.config.geometry.pooled_side
    hidden = pooled.shape[-1]
    image_embeds = []
    for views, image_size in zip(pooled.split([len(v) for v in views_per_image]), image_sizes):
        width, height = (int(x) for x in image_size)
        base, tiles = views[0], views[1:]  # [g*g, H], [V-1, g*g, H]
        if len(tiles) == 0:
            image_embeds.append(torch.cat([base, model.image_newline[None].to(base.dtype)]))
            continue
        columns, rows = anyres_grid_shape((width, height), model.config.geometry)
        if rows * columns != len(tiles):
            raise ValueError(f"image of size {(width, height)} needs a {columns}x{rows} anyres grid ({rows * columns} "
                             f"crops) plus the base view, but got {len(views)} views")
        grid = tiles.view(rows, columns, side, side, hidden).permute(4, 0, 2, 1, 3)  # [H, rows, g, cols, g]
        feature_map = lavida_unpad(grid.reshape(hidden, rows * side, columns * side), (width, height))
        newline = model.image_newline.to(feature_map.dtype)[:, None, None].expand(-1, feature_map.shape[1], 1)
        feature_map = torch.cat([feature_map, newline], dim=-1)  # [H, h', w'+1]
        image_embeds.append(torch.cat([base, feature_map.flatten(1).transpose(0, 1)]))
    return image_embeds, None


__all__ = ["ShirgLavidaForDiffusionLM", "ShirgLavidaPreTrainedModel", "ShirgProjector", "ShirgLavidaOutput"]
