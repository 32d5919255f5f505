"""`shirg-hf train-evidence`: the tiny LaViDa-shaped evidence model, trained from scratch in two stages.

Stage 1 trains tower + projector + LM at the native side (`lowres`) on `shirg-hf synth` images whose glyphs are
drawn large (a mix of glyph scales, so the tower learns scale-tolerant glyph features), with the package's
masked-diffusion loss (complementary masking) and an auxiliary per-patch glyph-class head (not shipped). Stage 2
freezes tower and LM, caches the tower features of both views once, and trains ONE projector LoRA with a view per
batch drawn from {native view, all high-res tokens, K1, K2, K3}. Every image comes from the `train` split.
The experiment, its choices and its results are in docs/EVIDENCE-RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .modeling.configuration_llada import LladaConfig
from .modeling.configuration_shirg_lavida import ShirgLavidaConfig
from .modeling.generation_diffusion import DiffusionGenerationConfig
from .modeling.modeling_shirg_lavida import ShirgLavidaForDiffusionLM
from .modeling.visual_tokens import get_vision_mode, vision_mode_names
from .processing.processing_shirg_lavida import (
    LAVIDA_SYSTEM_PROMPT, LLADA_CHAT_TEMPLATE, ShirgLavidaProcessor, build_prompt,
)
from .synth import (
    ANSWER_ALPHABET, CHART_DIGITS, COLOUR_NAMES, EVIDENCE_GEOMETRY, EVIDENCE_PATCH_SIZE, FAMILIES, FORM_KEYS, PALETTE,
    SHAPES, generate_sample, recording_glyphs,
)
from .training import _seeded_generator, complementary_noising, projector_lora_config

# ---- geometry and sizes (EVIDENCE.md's CPU-scale analogue of LaViDa 384 / 672 px) ------------------------------
EVIDENCE_BUDGETS = (56, 84, 112)  # 22 / 33 / 44 % of the 256 high-res patches
EVIDENCE_MIDDLE_BUDGET = 84
EVIDENCE_LM_HEADS = 4
EVIDENCE_LM_LAYERS = 3
EVIDENCE_LM_HIDDEN = 128
EVIDENCE_LM_MLP_RATIO = 2.75  # SwiGLU width / hidden width (352 at d 128)
NO_SECOND_GLYPH = len(ANSWER_ALPHABET)  # the second-glyph head's class for a patch holding one glyph
EVIDENCE_COLOUR_MIN_PX = 3  # canvas pixels of a palette colour that make a native patch "hold" that colour
STAGE2_TRAINS = ("lora", "lm_lora", "projector")  # projector LoRA | + LoRA on the LM's linears | whole projector
LM_LORA_TARGETS = r"(.*\.)?language_model\.model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)"
EVIDENCE_MAX_POSITION_JITTER = 256  # keeps every stage-1 row far inside the LM's 1,024 positions


def _registered_mode(view_side: str, selects: bool) -> str:
    """The registered single-view vision mode (not anyres) with this view side and selection flag."""
    return next(name for name in vision_mode_names() if (spec := get_vision_mode(name)).view_side == view_side
                and spec.selects == selects and not spec.anyres)


NATIVE_VIEW = _registered_mode("native", False)  # the tower's own 72 px view (81 tokens)
ALL_TOKENS = _registered_mode("highres", False)  # every patch of the 128 px view (256 tokens)
SELECTING = _registered_mode("highres", True)  # SHIRG: K of the 256 patches (+ 1 summary)


def default_views() -> tuple:
    """The views stage 2 draws one of per batch: the native view, all high-res tokens and K1, K2, K3."""
    return (NATIVE_VIEW, ALL_TOKENS) + EVIDENCE_BUDGETS
STAGE1_GLYPH_SCALES = (1.6, 1.9, 2.2)  # glyphs about 6.2 / 7.3 / 8.4 px tall in the 72 px native view
EVIDENCE_MIN_OVERLAP_PX = 2  # a native patch is evidence when an evidence box overlaps it by more than this
FORM_MAX_GLYPH_SCALE = 1.6  # a 128 px form page holds no title + two key:value lines above this
ANSWER_TOKENS = 4  # the generation window: the longest answer (two glyphs) + <|eot_id|> fits
SPECIAL_TOKENS = ("<|startoftext|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<image>",
                  "<|endoftext|>", "<|mdm_mask|>", "<unk>")
PIECE_PATTERN = r"\n+| ?[a-z]+| ?[A-Z0-9]|[^\sA-Za-z0-9]| +"  # words, single capitals / digits, punctuation


# ---- tokenizer ---------------------------------------------------------------------------------------------
def evidence_texts() -> list[str]:
    """Every prompt and answer text the synth families produce (the tokenizer's corpus)."""
    glyphs = list(ANSWER_ALPHABET)
    questions = ["Which bar is the tallest?", "How many big circles are there?"]
    questions += [f"What is in the {c} tag?" for c in COLOUR_NAMES]
    questions += [f"What is the value of the {c} bar?" for c in COLOUR_NAMES]
    questions += [f"Which colour tag holds {g}?" for g in glyphs]
    questions += [f"Is the {a} tag left of the {b} tag?" for a in COLOUR_NAMES for b in COLOUR_NAMES if a != b]
    questions += [f"What colour is the big {s}?" for s in SHAPES]
    questions += [f"What is the {k}?" for k in FORM_KEYS]
    answers = glyphs + list(CHART_DIGITS) + list(COLOUR_NAMES) + ["yes", "no", "0", "1", "2", "3"]
    return [build_prompt(q) for q in questions] + answers + [LAVIDA_SYSTEM_PROMPT]


def build_evidence_tokenizer():
    """A word / glyph-level tokenizer covering the synth prompts and answers (about 150 ids).

    Pieces: runs of newlines, lowercase words with their leading space, single capitals and digits (so a
    two-glyph answer is two tokens), punctuation. Decoding concatenates the pieces, so text round-trips; pieces
    outside the corpus become `<unk>`. Special tokens come first (ids 0-7), then the pieces in sorted order.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    splitter = pre_tokenizers.Split(Regex(PIECE_PATTERN), behavior="isolated")
    pieces = set()
    for text in evidence_texts():
        for chunk in _split_specials(text):
            pieces.update(piece for piece, _ in splitter.pre_tokenize_str(chunk))
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    for piece in sorted(pieces):
        vocab.setdefault(piece, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = splitter
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>",
        mask_token="<|mdm_mask|>", unk_token="<unk>",
        extra_special_tokens=["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<image>"],
        padding_side="left", model_max_length=1024, chat_template=LLADA_CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


def _split_specials(text: str) -> list[str]:
    chunks = [text]
    for token in SPECIAL_TOKENS:
        chunks = [part for chunk in chunks for part in chunk.split(token)]
    return [chunk for chunk in chunks if chunk]


# ---- config ------------------------------------------------------------------------------------------------
def evidence_config(tokenizer=None, vision_mode: str = SELECTING, lm_layers: int = EVIDENCE_LM_LAYERS,
                    lm_hidden: int = EVIDENCE_LM_HIDDEN) -> ShirgLavidaConfig:
    """The evidence model: SigLIP d128 x 4 layers at 72 px (9x9 patches of 8 px; 128 px = 16x16 high-res),
    projector 128 -> `lm_hidden` -> `lm_hidden`, LLaDA d`lm_hidden` x `lm_layers` layers (SwiGLU 2.75 x d: 352 at
    the default d 128), K = 84 of 256 with 4x4 coverage cells."""
    tokenizer = tokenizer or build_evidence_tokenizer()
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("bos", "<|startoftext|>"), ("eos", "<|endoftext|>"), ("mask", "<|mdm_mask|>"), ("eot", "<|eot_id|>"),
        ("image", "<image>"))}
    vocab_size = -(-len(tokenizer) // 8) * 8
    text = LladaConfig(
        vocab_size=vocab_size, hidden_size=lm_hidden, intermediate_size=round(EVIDENCE_LM_MLP_RATIO * lm_hidden),
        num_hidden_layers=lm_layers,
        num_attention_heads=EVIDENCE_LM_HEADS, num_key_value_heads=EVIDENCE_LM_HEADS, max_position_embeddings=1024,
        rope_theta=10000.0, mask_token_id=ids["mask"],
        eos_token_id=ids["eos"], pad_token_id=ids["eos"], bos_token_id=ids["bos"], eot_token_id=ids["eot"],
    )
    vision = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                  image_size=EVIDENCE_GEOMETRY.native_side, patch_size=EVIDENCE_PATCH_SIZE, num_channels=3,
                  hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, attention_dropout=0.0, vision_use_head=False)
    return ShirgLavidaConfig(
        vision_config=vision, text_config=text.to_dict(), highres_image_size=EVIDENCE_GEOMETRY.high_res_side,
        vision_mode=vision_mode, image_token_id=ids["image"],
        selection={"budget": EVIDENCE_MIDDLE_BUDGET, "coverage_cells": [4, 4]},
    )


def evidence_generation_config(config) -> DiffusionGenerationConfig:
    """Greedy, one token per step over the 4-token answer window, stop at the first end token."""
    generation = DiffusionGenerationConfig.from_model_config(config)
    generation.max_new_tokens = ANSWER_TOKENS
    generation.block_length = ANSWER_TOKENS
    generation.steps = ANSWER_TOKENS
    generation.step_ratio = None
    generation.schedule = "linear"
    return generation


def evidence_processor(config, tokenizer, vision_mode: str | None = None) -> ShirgLavidaProcessor:
    kwargs = {} if vision_mode is None else {"vision_mode": vision_mode}
    return ShirgLavidaProcessor.from_model_config(config, tokenizer, **kwargs)


# ---- data --------------------------------------------------------------------------------------------------
@dataclass
class Example:
    """One training row: the image, question, answer and the answer glyphs' native-grid patches and classes."""

    image: object
    question: str
    answer: str
    glyph_patches: list  # [(patch index on the native grid, class index in ANSWER_ALPHABET)]
    evidence_patches: list = field(default_factory=list)  # native-grid patches the answer's evidence boxes cover
    answer_patches: list = field(default_factory=list)  # native-grid patch of each answer glyph, in answer order
    glyph_centres: list = field(default_factory=list)  # [(x, y, class)] canvas centre of every alphabet glyph drawn
    answer_centres: list = field(default_factory=list)  # [(x, y)] canvas centre of each answer glyph, in answer order
    glyph_slots: list = field(default_factory=list)  # [(native patch, first class, second class or NO_SECOND_GLYPH)]
    patch_colours: torch.Tensor | None = None  # [native patches, palette colours] bool: the colours each patch holds


def row_glyph_scale(index: int, scales=STAGE1_GLYPH_SCALES) -> float:
    """Glyph scale of training row `index`: `scales` cycled every 3 rows (independent of the family, which is
    index mod 3), capped for `form` pages."""
    scale = scales[(index // 3) % len(scales)]
    return min(scale, FORM_MAX_GLYPH_SCALE) if FAMILIES[index % len(FAMILIES)] == "form" else scale


def make_example(split: str, seed: int, index: int, glyph_scale: float) -> Example:
    """Row `index` with the native-grid patch and class of every alphabet glyph drawn (answer, other tags, labels,
    titles, decoys): the auxiliary classifier's labels. A patch holding two glyph centres is left unlabelled."""
    with recording_glyphs() as drawn:
        sample = generate_sample(split, seed, index, EVIDENCE_GEOMETRY, glyph_scale=glyph_scale)
    centres = [(*glyph_centre(glyph), ANSWER_ALPHABET.index(glyph.char)) for glyph in drawn
               if glyph.char in ANSWER_ALPHABET]
    answer = sample.row["answers"][0]
    spelled = "".join(glyph.char for glyph in sample.answer_glyphs) == answer
    answer_centres = [glyph_centre(glyph) for glyph in sample.answer_glyphs] if spelled else []
    native = native_grid()
    return Example(sample.image, sample.row["question"], answer, glyph_patches_on_grid(centres, native),
                   native_patches_of_boxes(sample.row["evidence_boxes"]),
                   [patch_on_grid(x, y, native) for x, y in answer_centres], centres, answer_centres,
                   glyph_slots_on_grid(centres, native), colours_on_grid(sample.image, native))


def native_grid() -> int:
    return EVIDENCE_GEOMETRY.native_side // EVIDENCE_PATCH_SIZE


def highres_grid() -> int:
    return EVIDENCE_GEOMETRY.high_res_side // EVIDENCE_PATCH_SIZE


def glyph_centre(glyph) -> tuple[float, float]:
    """(x, y) centre of a drawn glyph's box on the high-res canvas."""
    x0, y0, x1, y1 = glyph.box
    return (x0 + x1) / 2, (y0 + y1) / 2


def patch_on_grid(x: float, y: float, grid: int) -> int:
    """Raster index of the patch of a `grid` x `grid` view of the canvas that holds canvas point (x, y)."""
    scale = grid / EVIDENCE_GEOMETRY.high_res_side
    return min(grid - 1, int(y * scale)) * grid + min(grid - 1, int(x * scale))


def glyph_patches_on_grid(centres: list, grid: int) -> list:
    """[(patch, class)] of the glyph centres [(x, y, class)] on a `grid` view, in patch order; a patch holding two
    glyph centres is left out (its label would be ambiguous)."""
    labels = {}
    for x, y, label in centres:
        patch = patch_on_grid(x, y, grid)
        labels[patch] = None if patch in labels else label
    return [(patch, label) for patch, label in sorted(labels.items()) if label is not None]


def glyph_slots_on_grid(centres: list, grid: int) -> list:
    """[(patch, first class, second class)] of every patch of a `grid` view holding one or two glyph centres
    [(x, y, class)], in patch order: the glyphs in reading order (left to right, then top to bottom), the second
    `NO_SECOND_GLYPH` when the patch holds one. A patch holding three or more is left out."""
    held = {}
    for x, y, label in centres:
        held.setdefault(patch_on_grid(x, y, grid), []).append((x, y, label))
    slots = []
    for patch, glyphs in sorted(held.items()):
        labels = [label for _, _, label in sorted(glyphs)] + [NO_SECOND_GLYPH]
        if len(glyphs) <= 2:
            slots.append((patch, labels[0], labels[1]))
    return slots


def colours_on_grid(image, grid: int, min_pixels: int = EVIDENCE_COLOUR_MIN_PX) -> torch.Tensor:
    """[grid * grid, palette colours] bool: which palette colours (synth's `PALETTE`, in `COLOUR_NAMES` order)
    cover at least `min_pixels` canvas pixels, exactly, in each patch of a `grid` x `grid` view of the canvas."""
    pixels = np.asarray(image.convert("RGB"))  # [H, W, 3]
    rows = ((np.arange(pixels.shape[0]) + 0.5) * grid / pixels.shape[0]).astype(int)  # patch row of each pixel row
    columns = ((np.arange(pixels.shape[1]) + 0.5) * grid / pixels.shape[1]).astype(int)
    cells = (rows[:, None] * grid + columns[None, :]).ravel()  # [H * W] patch of each pixel
    counts = np.stack([np.bincount(cells, (pixels == PALETTE[name]).all(-1).ravel(), minlength=grid * grid)
                       for name in COLOUR_NAMES], axis=-1)  # [grid * grid, colours]
    return torch.from_numpy(counts >= min_pixels)


def native_patches_of_boxes(boxes, min_overlap_px: float = EVIDENCE_MIN_OVERLAP_PX) -> list[int]:
    """Native-grid patches that some box ([x0, y0, x1, y1] on the high-res canvas) overlaps by more than
    `min_overlap_px` canvas pixels in both directions (raster order)."""
    side = EVIDENCE_GEOMETRY.high_res_side
    grid = native_grid()
    cell = side / grid
    covered = set()
    for x0, y0, x1, y1 in boxes:
        for row in range(grid):
            for column in range(grid):
                if (min(x1, (column + 1) * cell) - max(x0, column * cell) > min_overlap_px
                        and min(y1, (row + 1) * cell) - max(y0, row * cell) > min_overlap_px):
                    covered.add(row * grid + column)
    return sorted(covered)


# ---- prompts and noising ---------------------------------------------------------------------------------
class PromptBuilder:
    """Prompt ids for a question and a visual-token count, exactly as the processor builds them (checked by the
    tests), without preprocessing an image: stage 2 reads cached tower features."""

    def __init__(self, processor):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self._cache = {}

    def prompt_ids(self, question: str, image_tokens: int) -> list[int]:
        key = (question, image_tokens)
        if key not in self._cache:
            ids = self.tokenizer(build_prompt(question), add_special_tokens=False)["input_ids"]
            self._cache[key] = self.processor._expand_image_tokens(ids, iter([image_tokens]))
        return self._cache[key]

    def answer_ids(self, answer: str) -> list[int]:
        return self.tokenizer(answer.strip() + "<|eot_id|>", add_special_tokens=False)["input_ids"]


def noised_batch(builder: PromptBuilder, questions, answers, image_tokens: int, mask_token_id: int,
                 generator: torch.Generator) -> dict:
    """[prompt][answer <|eot_id|>][<|endoftext|> ...] rows (answer window >= ANSWER_TOKENS) noised with LaViDa's
    complementary masking: input_ids, labels, prefix_lengths [2B] and image_rows [2B]."""
    pad = builder.tokenizer.pad_token_id
    prompts = [builder.prompt_ids(q, image_tokens) for q in questions]
    targets = [builder.answer_ids(a) for a in answers]
    total = max(len(p) + max(len(t), ANSWER_TOKENS) for p, t in zip(prompts, targets))
    input_ids = torch.full((len(prompts), total), pad, dtype=torch.long)
    answer_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    for row, (prompt, target) in enumerate(zip(prompts, targets)):
        input_ids[row, :len(prompt)] = torch.tensor(prompt)
        input_ids[row, len(prompt):len(prompt) + len(target)] = torch.tensor(target)
        answer_mask[row, len(prompt):] = True
    noised = complementary_noising(input_ids, answer_mask, mask_token_id, generator=generator)
    lengths = torch.tensor([len(p) for p in prompts])
    return {"input_ids": noised["input_ids"], "labels": noised["labels"],
            "prefix_lengths": lengths[noised["source_rows"]], "image_rows": noised["source_rows"]}


def jittered_positions(batch: dict, image_token_id: int, jitter: int, generator: torch.Generator) -> torch.Tensor:
    """Rotary positions [2B, T] of a noised batch with a gap of 0..`jitter` positions (one draw per image) between
    each row's image block and the text after it: the question no longer sits at a fixed distance from the image."""
    input_ids, image_rows = batch["input_ids"], batch["image_rows"]
    gaps = torch.randint(jitter + 1, (int(image_rows.max()) + 1,), generator=generator)[image_rows]  # [2B]
    return shifted_positions(input_ids, image_token_id, gaps)


def shifted_positions(input_ids: torch.Tensor, image_token_id: int, gaps: torch.Tensor) -> torch.Tensor:
    """Rotary positions [B, T]: 0..T-1 with every token after a row's image block moved on by `gaps` [B]."""
    is_image = input_ids == image_token_id  # [B, T]
    after_image = is_image.cumsum(-1).bool() & ~is_image  # [B, T]
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)  # [B, T]
    return positions + gaps[:, None] * after_image


def subset_count(settings: EvidenceSettings, step: int, num_patches: int) -> int | None:
    """How many native tokens each image of stage-1 batch `step` keeps: None (the whole native view) or, for a
    `stage1_subset_batches` fraction of the batches, a count drawn from [ceil(stage1_subset_min * N), N - 1]."""
    generator = _seeded_generator(settings.seed, 6, step)
    use_subset = float(torch.rand((), generator=generator)) < settings.stage1_subset_batches
    lowest = min(num_patches - 1, math.ceil(settings.stage1_subset_min * num_patches))
    count = int(torch.randint(lowest, num_patches, (), generator=generator))
    return count if use_subset else None


def uses_highres_layout(settings: EvidenceSettings, step: int) -> bool:
    """Whether stage-1 batch `step` lays its native tokens out on the high-res grid (a
    `stage1_highres_layout_batches` fraction of the batches)."""
    generator = _seeded_generator(settings.seed, 8, step)
    return float(torch.rand((), generator=generator)) < settings.stage1_highres_layout_batches


def native_tokens_on_grid(grid: int) -> torch.Tensor:
    """[grid * grid] the native patch under the centre of each cell of a `grid` x `grid` layout of the canvas
    (raster order): the native view's tokens, repeated, in the high-res view's layout."""
    native = native_grid()
    index = ((torch.arange(grid) + 0.5) * native / grid).long().clamp(max=native - 1)  # [grid]
    return (index[:, None] * native + index[None, :]).flatten()


def examples_on_grid(examples: list[Example], native_of_cell: torch.Tensor, grid: int) -> list[Example]:
    """`examples` with their native-patch labels moved to a layout whose cell c holds native token
    `native_of_cell[c]` (`native_tokens_on_grid`): every copy of a labelled glyph or evidence patch is labelled,
    and each answer glyph points at the copy nearest its centre."""
    cells_of = {}
    for cell, patch in enumerate(native_of_cell.tolist()):
        cells_of.setdefault(patch, []).append(cell)
    size = EVIDENCE_GEOMETRY.high_res_side / grid

    def nearest(cells, x, y):
        return min(cells, key=lambda c: ((c % grid + 0.5) * size - x) ** 2 + ((c // grid + 0.5) * size - y) ** 2)

    moved = []
    for example in examples:
        answer_patches = [nearest(cells_of[patch], x, y)
                          for patch, (x, y) in zip(example.answer_patches, example.answer_centres)]
        glyph_patches = [(cell, label) for patch, label in example.glyph_patches for cell in cells_of[patch]]
        evidence_patches = sorted(cell for patch in example.evidence_patches for cell in cells_of[patch])
        glyph_slots = [(cell, one, two) for patch, one, two in example.glyph_slots for cell in cells_of[patch]]
        moved.append(replace(example, glyph_patches=glyph_patches, evidence_patches=evidence_patches,
                             answer_patches=answer_patches, glyph_slots=glyph_slots))
    return moved


def native_subset(features: torch.Tensor, examples: list[Example], count: int, generator: torch.Generator):
    """A SHIRG-shaped view of the native grid: per image, `count` patches (raster order) that include every
    labelled glyph, answer-glyph and evidence patch (so the question stays answerable) plus random others, then
    the mean of the dropped patches in the summary slot. features [B, N, D] -> (tokens [B, count' + 1, D], kept
    [B, count']) with count' = max(count, the most patches an image must keep), or (features, None) when that
    leaves nothing to drop."""
    batch, num_patches, dim = features.shape
    scores = torch.rand(batch, num_patches, generator=generator)  # [B, N]
    for row, example in enumerate(examples):
        needed = [patch for patch, _ in example.glyph_patches] + example.evidence_patches + example.answer_patches
        scores[row, needed] += 1.0  # above every random score
    count = max(count, int((scores >= 1.0).sum(-1).max()))
    if count >= num_patches:
        return features, None
    kept = scores.topk(count, dim=-1).indices.sort(dim=-1).values  # [B, count]
    dropped = torch.ones(batch, num_patches, dtype=torch.bool).scatter(1, kept, False)  # [B, N]
    summary = (features * dropped[..., None]).sum(1) / dropped.sum(1, keepdim=True)  # [B, D]
    kept_tokens = features.gather(1, kept[..., None].expand(-1, -1, dim))  # [B, count, D]
    return torch.cat([kept_tokens, summary[:, None]], dim=1), kept


def examples_in_subset(examples: list[Example], kept: torch.Tensor) -> list[Example]:
    """`examples` with their native-grid glyph, evidence and answer patches moved to positions in the kept subset
    `kept` [B, count] (every one of them is kept by `native_subset`)."""
    moved = []
    for row, example in enumerate(examples):
        position = {patch: index for index, patch in enumerate(kept[row].tolist())}
        moved.append(replace(example, glyph_patches=[(position[p], label) for p, label in example.glyph_patches],
                             evidence_patches=[position[p] for p in example.evidence_patches],
                             answer_patches=[position[p] for p in example.answer_patches],
                             glyph_slots=[(position[p], one, two) for p, one, two in example.glyph_slots
                                          if p in position]))
    return moved


def diffusion_forward(model, batch: dict, visual: torch.Tensor):
    """The model's masked-diffusion forward (loss and logits) with `visual` [B, n, H] (projected tokens per image)
    in the prompt (and the batch's `position_ids` when it has them)."""
    input_ids = batch["input_ids"]
    embeds = model.get_input_embeddings()(input_ids)
    positions = input_ids == model.config.image_token_id
    visual = visual[batch["image_rows"]].reshape(-1, visual.shape[-1]).to(embeds.dtype)
    embeds = embeds.masked_scatter(positions[..., None], visual)
    return model(inputs_embeds=embeds, labels=batch["labels"], prefix_lengths=batch["prefix_lengths"],
                 position_ids=batch.get("position_ids"))


def diffusion_loss(model, batch: dict, visual: torch.Tensor) -> torch.Tensor:
    return diffusion_forward(model, batch, visual).loss


def cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


# ---- settings ----------------------------------------------------------------------------------------------
@dataclass
class EvidenceSettings:
    """Everything a run depends on (written to `settings.json`)."""

    seed: int = 0
    stage1_steps: int = 4000
    stage1_batch: int = 24
    stage1_lr: float = 2e-3
    stage1_aux_weight: float = 1.0
    stage1_readout_weight: float = 1.0
    stage1_attention_weight: float = 1.0
    stage1_attention_heads: int = 1
    stage1_pair_weight: float = 0.0
    stage1_second_glyph_weight: float = 0.0
    stage1_colour_weight: float = 0.0
    lm_layers: int = EVIDENCE_LM_LAYERS
    lm_hidden: int = EVIDENCE_LM_HIDDEN
    stage1_copy_weight: float = 1.0
    stage1_copy_start: int = 1500
    stage1_position_jitter: int = 0
    stage1_subset_batches: float = 1.0
    stage1_subset_min: float = 0.4
    stage1_highres_layout_batches: float = 0.0
    stage1_data_seed: int = 1
    stage1_glyph_scales: tuple = STAGE1_GLYPH_SCALES
    stage2_images: int = 3000
    stage2_steps: int = 100
    stage2_batch: int = 24
    stage2_lr: float = 2e-4
    stage2_readout_weight: float = 0.0
    stage2_attention_weight: float = 0.0
    stage2_data_seed: int = 2
    stage2_glyph_scales: tuple = (1.0,)
    stage2_views: tuple = field(default_factory=default_views)
    stage2_train: str = "lora"  # one of STAGE2_TRAINS
    lora_rank: int = 4
    val_questions: int = 300
    val_seed: int = 0
    checkpoint_every: int = 250


# ---- stage 1 -----------------------------------------------------------------------------------------------
class GlyphHead(nn.Module):
    """Auxiliary per-patch glyph classifier on the tower's features (training only; never saved with the model)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.linear = nn.Linear(hidden, len(ANSWER_ALPHABET))

    def loss(self, features: torch.Tensor, examples: list[Example]) -> torch.Tensor | None:
        labelled = glyph_labels(examples)
        if labelled is None:
            return None
        rows, patches, classes = labelled
        return nn.functional.cross_entropy(self.linear(features[rows, patches]), classes)


class SecondGlyphHead(nn.Module):
    """Auxiliary classifier of the second glyph a native patch holds (or none), trained with the glyph head's
    first-glyph class on patches holding two: the tower learns to carry both glyphs of a shared patch in order
    (training only; never saved with the model)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.linear = nn.Linear(hidden, NO_SECOND_GLYPH + 1)

    def loss(self, first: GlyphHead, features: torch.Tensor, examples: list[Example]) -> torch.Tensor | None:
        slots = [(row, patch, one, two) for row, example in enumerate(examples)
                 for patch, one, two in example.glyph_slots]
        if not slots:
            return None
        rows, patches, firsts, seconds = (torch.tensor(column) for column in zip(*slots))
        tokens = features[rows, patches]  # [n, D]
        loss = nn.functional.cross_entropy(self.linear(tokens), seconds)
        shared = seconds != NO_SECOND_GLYPH
        if shared.any():
            loss = loss + nn.functional.cross_entropy(first.linear(tokens[shared]), firsts[shared])
        return loss


class ColourHead(nn.Module):
    """Auxiliary per-patch classifier of the palette colours a native patch holds (multi-label), so the tower
    carries e.g. a tag's frame colour beside its glyph (training only; never saved with the model)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.linear = nn.Linear(hidden, len(COLOUR_NAMES))

    def loss(self, features: torch.Tensor, examples: list[Example]) -> torch.Tensor:
        targets = torch.stack([example.patch_colours for example in examples]).float()  # [B, N, colours]
        return nn.functional.binary_cross_entropy_with_logits(self.linear(features), targets)


def glyph_labels(examples: list[Example]):
    """(rows, native patches, glyph classes) of every labelled glyph in `examples`, or None when there is none."""
    labels = [(row, patch, label) for row, example in enumerate(examples) for patch, label in example.glyph_patches]
    if not labels:
        return None
    return tuple(torch.tensor(column) for column in zip(*labels))


def image_starts(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """[B] index of each row's first image token (every row holds one image)."""
    return (input_ids == image_token_id).int().argmax(-1)


def glyph_readout_loss(logits: torch.Tensor, batch: dict, examples: list[Example], glyph_token_ids: torch.Tensor,
                       image_token_id: int) -> torch.Tensor | None:
    """Cross-entropy of the LM's own output at the image positions of labelled glyph patches against the glyph's
    token (rows 0..B-1; the complementary copies share their prompt): the LM learns to carry each glyph's
    identity in its vocabulary, so answering becomes a copy."""
    labelled = glyph_labels(examples)
    if labelled is None:
        return None
    rows, patches, classes = labelled
    starts = image_starts(batch["input_ids"][:len(examples)], image_token_id)
    return nn.functional.cross_entropy(logits[rows, starts[rows] + patches], glyph_token_ids[classes])


class LastLayerAttention:
    """Recomputes, with gradients, the attention weights of the first `heads` heads of the LM's last layer from
    the inputs that layer received in the latest forward (a forward pre-hook keeps them). Training aid only."""

    def __init__(self, model, heads: int):
        self.attention = model.language_model.model.layers[-1].self_attn
        self.heads = heads
        self.inputs = None
        self.handle = self.attention.register_forward_pre_hook(self._keep, with_kwargs=True)

    def _keep(self, module, args, kwargs):
        self.inputs = (args[0], args[1], kwargs.get("attention_mask"))

    def weights(self) -> torch.Tensor:
        """[B, heads, T, T] softmax attention weights (float32)."""
        from .modeling.modeling_llada import apply_rotary_pos_emb

        hidden, (cos, sin), mask = self.inputs
        head_dim = self.attention.head_dim
        shape = (*hidden.shape[:-1], -1, head_dim)
        query = self.attention.q_proj(hidden).view(shape).transpose(1, 2)[:, :self.heads]  # [B, h, T, hd]
        key = self.attention.k_proj(hidden).view(shape).transpose(1, 2)[:, :self.heads]  # [B, h, T, hd] (MHA)
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        scores = (query @ key.transpose(-1, -2)).float() * self.attention.scaling  # [B, h, T, T]
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        return scores.softmax(-1)

    def written(self, rows: torch.Tensor, positions: torch.Tensor, head: int | None = None) -> torch.Tensor:
        """[n, hidden]: what the supervised heads (or head `head` alone) would add to the residual stream if they
        attended only to position `positions[i]` of row `rows[i]` (values through their slice of the output
        projection)."""
        head_dim = self.attention.head_dim
        columns = slice(0, self.heads * head_dim) if head is None else slice(head * head_dim, (head + 1) * head_dim)
        values = self.attention.v_proj(self.inputs[0][rows, positions])[:, columns]  # [n, heads * hd]
        return values @ self.attention.o_proj.weight[:, columns].T

    def remove(self) -> None:
        self.handle.remove()


def glyph_copy_loss(model, attention: LastLayerAttention, batch: dict, examples: list[Example],
                    glyph_token_ids: torch.Tensor, image_token_id: int) -> torch.Tensor | None:
    """Cross-entropy of the LM head (after the final norm) on what the supervised heads copy from a labelled glyph
    patch, against that glyph's token: trains their value/output path to carry a glyph into the vocabulary, the
    second half of the lookup the attention supervision starts."""
    labelled = glyph_labels(examples)
    if labelled is None:
        return None
    rows, patches, classes = labelled
    starts = image_starts(batch["input_ids"][:len(examples)], image_token_id)
    written = attention.written(rows, starts[rows] + patches)
    return nn.functional.cross_entropy(vocabulary_logits(model, written), glyph_token_ids[classes])


def vocabulary_logits(model, written: torch.Tensor) -> torch.Tensor:
    """[n, vocab]: the LM head (after the final norm) on what a head writes into the residual stream."""
    language_model = model.language_model
    return language_model.lm_head(language_model.model.norm(written))


def evidence_attention_loss(weights: torch.Tensor, batch: dict, examples: list[Example], answer_lengths: list[int],
                            image_token_id: int, sink_shared_seconds: bool = False) -> torch.Tensor | None:
    """Mean over rows of -log(attention mass on the answer's evidence) for the supervised heads `weights`
    [B', h, T, T]: attention supervision of the lookup (question -> evidence patch) that the LM must learn before
    it can read. An answer spelled by glyphs points answer token i at the patch of glyph i (with
    `sink_shared_seconds`, the second glyph of a shared patch at the row's first token instead: another head
    reads it, `second_glyph_loss`); any other answer points every answer token at the patches its evidence boxes
    cover."""
    starts = image_starts(batch["input_ids"], image_token_id)
    losses = []
    for row, source in enumerate(batch["image_rows"].tolist()):
        example, first = examples[source], int(batch["prefix_lengths"][row])
        if example.answer_patches:
            queries = first + torch.arange(len(example.answer_patches))
            keys = starts[row] + torch.tensor(example.answer_patches)
            if sink_shared_seconds:
                keys[shared_seconds(example)] = 0  # the row's first token: an attention sink
            mass = weights[row][:, queries, keys]  # [h, glyphs]
        elif example.evidence_patches:
            keys = starts[row] + torch.tensor(example.evidence_patches)
            mass = weights[row, :, first:first + answer_lengths[source]][..., keys].sum(-1)  # [h, answer tokens]
        else:
            continue
        losses.append(-torch.log(mass + 1e-6).mean())
    return torch.stack(losses).mean() if losses else None


def shared_seconds(example: Example) -> list[int]:
    """Indices i >= 1 of the answer glyphs whose patch is glyph i - 1's (the second glyph of a shared patch)."""
    patches = example.answer_patches
    return [i for i in range(1, len(patches)) if patches[i] == patches[i - 1]]


def second_glyph_loss(reader: LastLayerAttention, model, batch: dict, examples: list[Example],
                      glyph_token_ids: torch.Tensor, image_token_id: int) -> torch.Tensor | None:
    """The LM-side reading of a patch that holds two glyphs, on head 1 of the last layer (`reader` recomputes
    heads 0-1): -log of head 1's attention from the answer token of each shared patch's second glyph to that
    patch, and from every other answer glyph's token to the row's first token (a sink); plus the LM head on what
    head 1 copies from each such patch (its value/output path) against the patch's second glyph."""
    weights = reader.weights()[:, 1]  # [B', T, T]
    starts = image_starts(batch["input_ids"], image_token_id)
    pointers = []
    for row, source in enumerate(batch["image_rows"].tolist()):
        example, first = examples[source], int(batch["prefix_lengths"][row])
        if not example.answer_patches:
            continue
        keys = torch.zeros(len(example.answer_patches), dtype=torch.long)  # the sink
        seconds = shared_seconds(example)
        keys[seconds] = starts[row] + torch.tensor(example.answer_patches)[seconds]
        queries = first + torch.arange(len(keys))
        pointers.append(-torch.log(weights[row, queries, keys] + 1e-6).mean())
    slots = [(row, patch, two) for row, example in enumerate(examples) for patch, _, two in example.glyph_slots
             if two != NO_SECOND_GLYPH]
    terms = [torch.stack(pointers).mean()] if pointers else []
    if slots:
        rows, patches, classes = (torch.tensor(column) for column in zip(*slots))
        written = reader.written(rows, starts[:len(examples)][rows] + patches, head=1)
        terms.append(nn.functional.cross_entropy(vocabulary_logits(model, written), glyph_token_ids[classes]))
    return sum(terms) if terms else None


def copy_weight_at(settings: EvidenceSettings, step: int) -> float:
    """The glyph copy loss's weight at stage-1 step `step` (0-based): off before `stage1_copy_start`, a curriculum
    that lets the attention lookup form before the copy path is trained."""
    return settings.stage1_copy_weight if step >= settings.stage1_copy_start else 0.0


def weighted_sum(terms: dict) -> torch.Tensor:
    """Sum of weight * loss over `terms` {name: (weight, loss or None)}, skipping terms that are off or absent."""
    return sum(weight * value for weight, value in terms.values() if weight and value is not None)


def term_values(terms: dict) -> list[float]:
    return [float("nan") if value is None else value.item() for _, value in terms.values()]


def term_means(running: list[list[float]], terms: dict) -> dict:
    """{name: mean over the logged steps} of every term that had a value at some step."""
    values = np.array(running)
    return {name: round(float(np.mean(column[~np.isnan(column)])), 4)
            for name, column in zip(terms, values.T) if not np.isnan(column).all()}


def _log(log_path: Path, record: dict) -> None:
    with open(log_path, "a", encoding="utf-8") as stream:
        stream.write(json.dumps(record) + "\n")
    print(json.dumps(record), flush=True)


def train_stage1(out: Path, settings: EvidenceSettings, tokenizer=None) -> Path:
    """Tower + projector + LM from scratch at the native side; writes `out/stage1` (a save_pretrained folder)."""
    out.mkdir(parents=True, exist_ok=True)
    final = out / "stage1"
    if (final / "config.json").is_file():
        return final
    tokenizer = tokenizer or build_evidence_tokenizer()
    config = evidence_config(tokenizer, vision_mode=NATIVE_VIEW, lm_layers=settings.lm_layers,
                             lm_hidden=settings.lm_hidden)
    processor = evidence_processor(config, tokenizer)
    builder = PromptBuilder(processor)
    torch.manual_seed(settings.seed)
    model = ShirgLavidaForDiffusionLM(config).train()
    model.generation_config = evidence_generation_config(config)
    head = GlyphHead(config.vision_config.hidden_size)
    glyph_token_ids = torch.tensor(tokenizer.convert_tokens_to_ids(list(ANSWER_ALPHABET)))
    attention = LastLayerAttention(model, settings.stage1_attention_heads)
    reader = LastLayerAttention(model, 2) if settings.stage1_second_glyph_weight else None
    validation = validation_examples(settings)
    second = SecondGlyphHead(config.vision_config.hidden_size) if settings.stage1_pair_weight else None
    colour = ColourHead(config.vision_config.hidden_size) if settings.stage1_colour_weight else None
    parameters = [*model.parameters(), *head.parameters(), *(second.parameters() if second else ()),
                  *(colour.parameters() if colour else ())]
    optimizer = torch.optim.AdamW(parameters, lr=settings.stage1_lr, betas=(0.9, 0.98), weight_decay=0.01)
    checkpoint, start = out / "stage1_checkpoint.pt", 0
    if checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=False)
        model.load_state_dict(state["model"])
        head.load_state_dict(state["head"])
        if second is not None:
            second.load_state_dict(state["second_head"])
        if colour is not None:
            colour.load_state_dict(state["colour_head"])
        optimizer.load_state_dict(state["optimizer"])
        start = state["step"]
    image_processor = processor.image_processor
    native = config.vision_config.image_size
    highres_layout = native_tokens_on_grid(highres_grid())  # [256] native token of each high-res cell
    log_path, began, running = out / "train_log.jsonl", time.perf_counter(), []
    warmup = max(1, settings.stage1_steps // 20)
    for step in range(start, settings.stage1_steps):
        indices = range(step * settings.stage1_batch, (step + 1) * settings.stage1_batch)
        examples = [make_example("train", settings.stage1_data_seed, i,
                                 row_glyph_scale(i, settings.stage1_glyph_scales)) for i in indices]
        pixels = image_processor([e.image for e in examples], size={"height": native, "width": native},
                                 do_anyres=False, return_tensors="pt")["pixel_values"]
        features = model.vision_features(pixels)  # [B, N, D]
        visual, lm_examples = features, examples
        if uses_highres_layout(settings, step):
            visual = features[:, highres_layout]
            lm_examples = examples_on_grid(examples, highres_layout, highres_grid())
        count = subset_count(settings, step, visual.shape[1])
        if count is not None:
            visual, kept = native_subset(visual, lm_examples, count, _seeded_generator(settings.seed, 7, step))
            lm_examples = lm_examples if kept is None else examples_in_subset(lm_examples, kept)
        batch = noised_batch(builder, [e.question for e in examples], [e.answer for e in examples],
                             visual.shape[1], config.text_config.mask_token_id,
                             _seeded_generator(settings.seed, 1, step))
        if settings.stage1_position_jitter:
            batch["position_ids"] = jittered_positions(batch, config.image_token_id, settings.stage1_position_jitter,
                                                       _seeded_generator(settings.seed, 5, step))
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, settings.stage1_steps, settings.stage1_lr, warmup)
        copy_weight = copy_weight_at(settings, step)
        outputs = diffusion_forward(model, batch, model.multi_modal_projector(visual))
        terms = {
            "loss": (1.0, outputs.loss),
            "aux": (settings.stage1_aux_weight, head.loss(features, examples)),
            "pair": (settings.stage1_pair_weight, second.loss(head, features, examples) if second else None),
            "colour": (settings.stage1_colour_weight, colour.loss(features, examples) if colour else None),
            "readout": (settings.stage1_readout_weight, glyph_readout_loss(
                outputs.logits, batch, lm_examples, glyph_token_ids, config.image_token_id)),
            "attention": (settings.stage1_attention_weight, evidence_attention_loss(
                attention.weights(), batch, lm_examples, [len(builder.answer_ids(e.answer)) for e in examples],
                config.image_token_id, sink_shared_seconds=reader is not None)
                if settings.stage1_attention_weight else None),
            "copy": (copy_weight, glyph_copy_loss(
                model, attention, batch, lm_examples, glyph_token_ids, config.image_token_id) if copy_weight else None),
            "second": (settings.stage1_second_glyph_weight, second_glyph_loss(
                reader, model, batch, lm_examples, glyph_token_ids, config.image_token_id) if reader else None),
        }
        optimizer.zero_grad(set_to_none=True)
        weighted_sum(terms).backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        running.append(term_values(terms))
        if (step + 1) % 50 == 0 or step + 1 == settings.stage1_steps:
            record = {"stage": 1, "step": step + 1, **term_means(running, terms),
                      "seconds": round(time.perf_counter() - began, 1)}
            if (step + 1) % settings.checkpoint_every == 0 or step + 1 == settings.stage1_steps:
                record.update(validation_check(model, processor, builder, validation))
            _log(log_path, record)
            running = []
        if (step + 1) % settings.checkpoint_every == 0 and step + 1 < settings.stage1_steps:
            torch.save({"model": model.state_dict(), "head": head.state_dict(), "optimizer": optimizer.state_dict(),
                        "second_head": second.state_dict() if second else None,
                        "colour_head": colour.state_dict() if colour else None, "step": step + 1}, checkpoint)
    attention.remove()
    if reader is not None:
        reader.remove()
    model.eval()
    model.config.vision_mode = SELECTING
    model.generation_config = evidence_generation_config(model.config)
    staging = out / "stage1.partial"
    model.save_pretrained(staging)
    evidence_processor(model.config, tokenizer).save_pretrained(staging, overwrite=True)
    staging.rename(final)
    checkpoint.unlink(missing_ok=True)
    return final


def validation_examples(settings: EvidenceSettings) -> list[Example]:
    """The first `val_questions` detail questions of the val split (seed `val_seed`) with large glyphs (G0's
    condition): the training-time check that the LM reads."""
    examples, index = [], 0
    while len(examples) < settings.val_questions:
        example = make_example("val", settings.val_seed, index, FORM_MAX_GLYPH_SCALE)
        index += 1
        if example.evidence_patches and is_detail_question(example.question):
            examples.append(example)
    return examples


def is_detail_question(question: str) -> bool:
    return question.startswith(("What is in the", "What is the"))


@torch.no_grad()
def validation_check(model, processor, builder: PromptBuilder, examples: list[Example]) -> dict:
    """Native-view detail accuracy (greedy `generate`) and the masked-diffusion loss with the right images and with
    every image moved to the next row: a model that reads has a clear gap."""
    model.eval()
    features = tower_features(model, [e.image for e in examples], model.config.vision_config.image_size)
    visual = model.multi_modal_projector(features)
    batch = noised_batch(builder, [e.question for e in examples], [e.answer for e in examples], visual.shape[1],
                         model.config.text_config.mask_token_id, _seeded_generator(0, 4, 0))
    right = diffusion_loss(model, batch, visual).item()
    shuffled = diffusion_loss(model, batch, visual.roll(1, dims=0)).item()
    accuracy = quick_accuracy(model, processor, examples, NATIVE_VIEW)["accuracy"]
    model.train()
    return {"val_loss": round(right, 4), "val_loss_shuffled": round(shuffled, 4), "val_detail_accuracy": accuracy}


# ---- stage 2 -----------------------------------------------------------------------------------------------
@torch.inference_mode()
def tower_features(model, images, side: int, batch: int = 64) -> torch.Tensor:
    """Tower features [N, patches, D] of PIL images at `side` px, as the model computes them."""
    processor = model_image_processor(model)
    chunks = []
    for start in range(0, len(images), batch):
        pixels = processor(images[start:start + batch], size={"height": side, "width": side}, do_anyres=False,
                           return_tensors="pt")["pixel_values"]
        chunks.append(model.vision_features(pixels))
    return torch.cat(chunks)


def model_image_processor(model):
    from .processing.image_processing_shirg import ShirgImageProcessor

    side = model.config.highres_image_size
    return ShirgImageProcessor(size={"height": side, "width": side})


def view_of_batch(settings: EvidenceSettings, step: int):
    """The view of stage-2 batch `step`: 'lowres', 'full' or a budget K (a function of the seed and step only)."""
    views = settings.stage2_views
    return views[int(torch.randint(len(views), (), generator=_seeded_generator(settings.seed, 2, step)))]


def visual_tokens_for_view(model, features_low, features_high, view):
    """(projected visual tokens [B, n, H], kept high-res patch indices [B, K] for a budget K, else None)."""
    if view == NATIVE_VIEW:
        return model.multi_modal_projector(features_low), None
    if view == ALL_TOKENS:
        return model.multi_modal_projector(features_high), None
    selection = model.selector(features_high, grid_size=model.config.highres_grid, budget=int(view))
    return model.multi_modal_projector(selection.tokens), selection.kept_indices


def examples_in_view(examples: list[Example], view, kept_indices: torch.Tensor | None, highres_grid: int) -> list:
    """`examples` with their glyph labels and answer-glyph pointers moved to visual-token positions of `view`
    (native grid, high-res grid, or the kept tokens of a budget K): the stage-2 reading aids' targets. A glyph
    whose patch was dropped loses its label; an answer with a dropped glyph loses its pointers."""
    grid = native_grid() if view == NATIVE_VIEW else highres_grid
    every_patch = {patch: patch for patch in range(grid * grid)}
    moved = []
    for row, example in enumerate(examples):
        position = every_patch if kept_indices is None else {
            patch: index for index, patch in enumerate(kept_indices[row].tolist())}
        glyphs = [(position[patch], label) for patch, label in glyph_patches_on_grid(example.glyph_centres, grid)
                  if patch in position]
        pointers = [position.get(patch_on_grid(x, y, grid)) for x, y in example.answer_centres]
        moved.append(replace(example, glyph_patches=glyphs, evidence_patches=[],
                             answer_patches=pointers if None not in pointers else []))
    return moved


def train_stage2(base_dir: Path, out: Path, settings: EvidenceSettings) -> dict:
    """Projector LoRA (or the whole projector) on cached tower features; writes `out/adapter` (LoRA runs) and
    `out/model` (merged save_pretrained folder)."""
    from transformers import AutoProcessor

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(settings.seed)
    model = ShirgLavidaForDiffusionLM.from_pretrained(base_dir).eval()
    processor = AutoProcessor.from_pretrained(base_dir)
    builder = PromptBuilder(processor)
    examples = [make_example("train", settings.stage2_data_seed, i, row_glyph_scale(i, settings.stage2_glyph_scales))
                for i in range(settings.stage2_images)]
    began = time.perf_counter()
    features_low = tower_features(model, [e.image for e in examples], model.config.vision_config.image_size)
    features_high = tower_features(model, [e.image for e in examples], model.config.highres_image_size)
    log_path = out / "train_log.jsonl"
    _log(log_path, {"stage": 2, "cached_images": len(examples), "seconds": round(time.perf_counter() - began, 1)})
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    if settings.stage2_train in ("lora", "lm_lora"):
        from peft import get_peft_model

        lora = projector_lora_config(rank=settings.lora_rank, alpha=2 * settings.lora_rank, dropout=0.0)
        if settings.stage2_train == "lm_lora":
            lora = replace(lora, target_modules=f"{lora.target_modules}|{LM_LORA_TARGETS}")
        peft_model = get_peft_model(model, lora)
        trainable = [p for p in peft_model.parameters() if p.requires_grad]
    elif settings.stage2_train == "projector":
        peft_model = None
        trainable = list(model.multi_modal_projector.parameters())
        for parameter in trainable:
            parameter.requires_grad_(True)
    else:
        raise ValueError(f"stage2_train must be one of {STAGE2_TRAINS}, got {settings.stage2_train!r}")
    optimizer = torch.optim.AdamW(trainable, lr=settings.stage2_lr, weight_decay=0.0)
    glyph_token_ids = torch.tensor(processor.tokenizer.convert_tokens_to_ids(list(ANSWER_ALPHABET)))
    attention = (LastLayerAttention(model, settings.stage1_attention_heads)
                 if settings.stage2_attention_weight else None)
    order = np.random.default_rng(settings.seed).permutation(
        np.concatenate([np.random.default_rng(settings.seed + epoch).permutation(len(examples))
                        for epoch in range(-(-settings.stage2_steps * settings.stage2_batch // len(examples)))]))
    warmup, running = max(1, settings.stage2_steps // 20), []
    model.language_model.train()
    for step in range(settings.stage2_steps):
        rows = order[step * settings.stage2_batch:(step + 1) * settings.stage2_batch]
        view = view_of_batch(settings, step)
        visual, kept_indices = visual_tokens_for_view(model, features_low[rows], features_high[rows], view)
        batch = noised_batch(builder, [examples[r].question for r in rows], [examples[r].answer for r in rows],
                             visual.shape[1], model.config.text_config.mask_token_id,
                             _seeded_generator(settings.seed, 3, step))
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, settings.stage2_steps, settings.stage2_lr, warmup)
        outputs = diffusion_forward(model, batch, visual)
        targets = (examples_in_view([examples[r] for r in rows], view, kept_indices, model.config.highres_grid[0])
                   if settings.stage2_readout_weight or attention else None)
        terms = {
            "loss": (1.0, outputs.loss),
            "readout": (settings.stage2_readout_weight, glyph_readout_loss(
                outputs.logits, batch, targets, glyph_token_ids, model.config.image_token_id)
                if settings.stage2_readout_weight else None),
            "attention": (settings.stage2_attention_weight, evidence_attention_loss(
                attention.weights(), batch, targets, [len(builder.answer_ids(e.answer)) for e in targets],
                model.config.image_token_id) if attention else None),
        }
        optimizer.zero_grad(set_to_none=True)
        weighted_sum(terms).backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        running.append(term_values(terms))
        if (step + 1) % 50 == 0 or step + 1 == settings.stage2_steps:
            _log(log_path, {"stage": 2, "step": step + 1, **term_means(running, terms),
                            "seconds": round(time.perf_counter() - began, 1)})
            running = []
    if attention:
        attention.remove()
    model.eval()
    if peft_model is not None:
        peft_model.save_pretrained(out / "adapter")
        model = peft_model.merge_and_unload()
    model.save_pretrained(out / "model")
    processor.save_pretrained(out / "model", overwrite=True)
    return {"seconds": time.perf_counter() - began}


# ---- quick validation (training-time checks on the val split) ------------------------------------------------
@torch.inference_mode()
def quick_accuracy(model, processor, examples: list[Example], vision_mode: str, budget=None, batch: int = 32) -> dict:
    """Exact-match accuracy of `generate` on `examples` under a vision mode (and budget K for `shirg`)."""
    from .compare import exact_match

    correct = []
    kwargs = {"shirg_budget": budget} if get_vision_mode(vision_mode).selects else {}
    for start in range(0, len(examples), batch):
        chunk = examples[start:start + batch]
        inputs = processor(images=[e.image for e in chunk], text=[build_prompt(e.question) for e in chunk],
                           vision_mode=vision_mode, return_tensors="pt", **kwargs)
        answers = processor.batch_decode(model.generate(**inputs))
        correct += [exact_match(prediction, [e.answer]) for e, prediction in zip(chunk, answers)]
    return {"accuracy": float(np.mean(correct)), "n": len(correct)}


def resave(source: Path, dest: Path) -> None:
    """Load a model folder and save it again with this version's code, config and processor (rebuilt from the
    evidence tokenizer), e.g. a run folder written by an earlier shirg-hf."""
    model = ShirgLavidaForDiffusionLM.from_pretrained(source).eval()
    model.save_pretrained(dest)
    evidence_processor(model.config, build_evidence_tokenizer()).save_pretrained(dest, overwrite=True)


# ---- command line ------------------------------------------------------------------------------------------
def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train-evidence", help="train the tiny evidence model from scratch (stage 1 + projector-LoRA stage 2)",
        description=__doc__.split("\n\n")[0],
    )
    defaults = EvidenceSettings()
    parser.add_argument("--out", required=True, metavar="DIR", help="run folder (stage1/, adapter/, model/, logs)")
    parser.add_argument("--base", metavar="DIR", help="skip stage 1: train stage 2 on this stage-1 model folder")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="initialisation, noise and view draws")
    parser.add_argument("--stage1-steps", type=int, default=defaults.stage1_steps, help="stage-1 optimizer steps")
    parser.add_argument("--stage1-batch", type=int, default=defaults.stage1_batch, help="stage-1 images per step")
    parser.add_argument("--stage1-readout-weight", type=float, default=defaults.stage1_readout_weight,
                        help="weight of the LM's glyph readout at the image positions (0 = off)")
    parser.add_argument("--stage1-attention-weight", type=float, default=defaults.stage1_attention_weight,
                        help="weight of the evidence-attention supervision of the LM's last layer (0 = off)")
    parser.add_argument("--stage1-copy-weight", type=float, default=defaults.stage1_copy_weight,
                        help="weight of the glyph copy loss on the supervised heads' value/output path (0 = off)")
    parser.add_argument("--stage1-copy-start", type=int, default=defaults.stage1_copy_start,
                        help="stage-1 step at which the copy loss switches on (default 1500)")
    parser.add_argument("--stage1-position-jitter", type=int, default=defaults.stage1_position_jitter,
                        help="largest gap (positions) drawn per image between the image block and the text after "
                             "it in stage 1 (0 = off)")
    parser.add_argument("--stage1-subset-batches", type=float, default=defaults.stage1_subset_batches,
                        help="fraction of stage-1 batches whose images keep a random subset of their native tokens "
                             "(every glyph and evidence patch, then the mean of the rest: SHIRG's layout; 0 = off)")
    parser.add_argument("--stage1-subset-min", type=float, default=defaults.stage1_subset_min,
                        help="smallest fraction of the native tokens such a subset keeps (default 0.4)")
    parser.add_argument("--stage1-pair-weight", type=float, default=defaults.stage1_pair_weight,
                        help="weight of the tower's auxiliary second-glyph classifier: a patch holding two glyphs "
                             "learns both, in order (0 = off)")
    parser.add_argument("--stage1-second-glyph-weight", type=float, default=defaults.stage1_second_glyph_weight,
                        help="weight of the LM-side reading of a patch holding two answer glyphs: head 1 of the "
                             "last layer points the second glyph's token at it and copies that glyph, head 0 "
                             "points it at the first token (0 = off)")
    parser.add_argument("--stage1-colour-weight", type=float, default=defaults.stage1_colour_weight,
                        help="weight of the tower's auxiliary colour classifier: each native patch learns which "
                             "palette colours it holds, e.g. a tag's frame beside its glyph (0 = off)")
    parser.add_argument("--lm-layers", type=int, default=defaults.lm_layers,
                        help=f"layers of the from-scratch LM (default {EVIDENCE_LM_LAYERS})")
    parser.add_argument("--lm-hidden", type=int, default=defaults.lm_hidden,
                        help=f"hidden width of the from-scratch LM and the projector's output, a multiple of "
                             f"{2 * EVIDENCE_LM_HEADS} (default {EVIDENCE_LM_HIDDEN}; SwiGLU width 2.75x)")
    parser.add_argument("--stage1-highres-layout-batches", type=float,
                        default=defaults.stage1_highres_layout_batches,
                        help="fraction of stage-1 batches whose native tokens are laid out on the high-res grid "
                             "(each of its 16 x 16 cells holds the native token under it), before any subset: the "
                             "LM sees prefixes as long as the all-tokens view's (0 = off)")
    parser.add_argument("--stage1-attention-heads", type=int, default=defaults.stage1_attention_heads,
                        help="how many heads of the LM's last layer the attention supervision trains")
    parser.add_argument("--stage2-images", type=int, default=defaults.stage2_images,
                        help="train images whose tower features stage 2 caches")
    parser.add_argument("--stage2-steps", type=int, default=defaults.stage2_steps, help="stage-2 optimizer steps")
    parser.add_argument("--stage2-lr", type=float, default=defaults.stage2_lr, help="stage-2 peak learning rate")
    parser.add_argument("--stage2-readout-weight", type=float, default=defaults.stage2_readout_weight,
                        help="weight of the glyph readout at the view's visual tokens in stage 2 (0 = off)")
    parser.add_argument("--stage2-attention-weight", type=float, default=defaults.stage2_attention_weight,
                        help="weight of the answer-glyph attention supervision in stage 2 (0 = off)")
    parser.add_argument("--stage2-glyph-scales", default=",".join(map(str, defaults.stage2_glyph_scales)),
                        help="glyph scales of the stage-2 images, cycled every 3 rows (default 1.0: the test's)")
    parser.add_argument("--stage2-batch", type=int, default=defaults.stage2_batch, help="stage-2 rows per step")
    parser.add_argument("--stage2-views", default=",".join(map(str, default_views())),
                        help="views drawn per stage-2 batch: lowres, full and budgets K "
                             "(default lowres,full,56,84,112)")
    parser.add_argument("--stage2-train", default=defaults.stage2_train, choices=STAGE2_TRAINS,
                        help="train a projector LoRA (default), the projector LoRA plus a LoRA on the LM's linear "
                             "layers, or the whole projector (the last two are controls)")
    parser.add_argument("--lora-rank", type=int, default=defaults.lora_rank, help="LoRA rank r (alpha 2r)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.set_defaults(func=run)


def parse_glyph_scales(text: str) -> tuple:
    problem = f"--stage2-glyph-scales: expected comma-separated numbers >= 1 (e.g. 1.0,1.3), got {text!r}"
    try:
        scales = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(problem) from None
    if not scales or not all(math.isfinite(scale) and scale >= 1 for scale in scales):
        raise ValueError(problem)
    return scales


def parse_views(text: str) -> tuple:
    views = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if part in (NATIVE_VIEW, ALL_TOKENS):
            views.append(part)
        elif part.isdigit() and 16 <= int(part) <= 256:
            views.append(int(part))
        else:
            raise ValueError(f"--stage2-views: {part!r} is not lowres, full or a budget K in [16, 256]")
    if not views:
        raise ValueError("--stage2-views is empty")
    return tuple(views)


def refuse_other_settings(path: Path, settings: EvidenceSettings) -> None:
    """A run folder resumes (stage 1 from its checkpoint) only with the settings it was started with: mixing two
    recipes in one run would be silent, and its `settings.json` would no longer describe it."""
    if not path.is_file():
        return
    wanted = json.loads(json.dumps(asdict(settings)))
    saved = {**json.loads(json.dumps(asdict(EvidenceSettings()))), **json.loads(path.read_text(encoding="utf-8"))}
    changed = sorted(name for name in wanted.keys() | saved.keys() if wanted.get(name) != saved.get(name))
    if changed:
        details = ", ".join(f"{name}: {saved.get(name)!r} there, {wanted.get(name)!r} now" for name in changed)
        raise ValueError(f"{path.parent} holds a run started with other settings ({details}); resume it with the "
                         f"flags it was started with, or pass a new --out")


def run(args: argparse.Namespace) -> int:
    settings = EvidenceSettings(
        seed=args.seed, stage1_steps=args.stage1_steps, stage1_batch=args.stage1_batch,
        stage1_readout_weight=args.stage1_readout_weight, stage1_attention_weight=args.stage1_attention_weight,
        stage1_attention_heads=args.stage1_attention_heads, stage1_copy_weight=args.stage1_copy_weight,
        stage1_pair_weight=args.stage1_pair_weight, lm_layers=args.lm_layers, lm_hidden=args.lm_hidden,
        stage1_second_glyph_weight=args.stage1_second_glyph_weight, stage1_colour_weight=args.stage1_colour_weight,
        stage1_copy_start=args.stage1_copy_start, stage1_position_jitter=args.stage1_position_jitter,
        stage1_subset_batches=args.stage1_subset_batches, stage1_subset_min=args.stage1_subset_min,
        stage1_highres_layout_batches=args.stage1_highres_layout_batches,
        stage2_images=args.stage2_images, stage2_steps=args.stage2_steps, stage2_batch=args.stage2_batch,
        stage2_lr=args.stage2_lr, stage2_readout_weight=args.stage2_readout_weight,
        stage2_attention_weight=args.stage2_attention_weight,
        stage2_glyph_scales=parse_glyph_scales(args.stage2_glyph_scales),
        stage2_views=parse_views(args.stage2_views), stage2_train=args.stage2_train, lora_rank=args.lora_rank,
    )
    if not 1 <= settings.stage1_attention_heads <= EVIDENCE_LM_HEADS:
        raise ValueError(f"--stage1-attention-heads must be in [1, {EVIDENCE_LM_HEADS}] (the LM's heads), got "
                         f"{settings.stage1_attention_heads}")
    for name in ("stage1_steps", "stage1_batch", "stage2_images", "stage2_steps", "stage2_batch", "lora_rank",
                 "lm_layers"):
        if getattr(settings, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if settings.lm_hidden < 2 * EVIDENCE_LM_HEADS or settings.lm_hidden % (2 * EVIDENCE_LM_HEADS):
        raise ValueError(f"--lm-hidden must be a positive multiple of {2 * EVIDENCE_LM_HEADS} (the LM's "
                         f"{EVIDENCE_LM_HEADS} heads need an even rotary width), got {settings.lm_hidden}")
    if not 0 <= settings.stage1_position_jitter <= EVIDENCE_MAX_POSITION_JITTER:
        raise ValueError(f"--stage1-position-jitter must be in [0, {EVIDENCE_MAX_POSITION_JITTER}] positions, got "
                         f"{settings.stage1_position_jitter}")
    for name in ("stage1_subset_batches", "stage1_subset_min", "stage1_highres_layout_batches"):
        if not 0 <= getattr(settings, name) <= 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a fraction in [0, 1], got {getattr(settings, name)}")
    if not 0 <= settings.stage1_copy_start < settings.stage1_steps:
        raise ValueError(f"--stage1-copy-start must be a step in [0, --stage1-steps = {settings.stage1_steps}), got "
                         f"{settings.stage1_copy_start}")
    for name in ("stage1_readout_weight", "stage1_attention_weight", "stage1_copy_weight", "stage1_pair_weight",
                 "stage1_second_glyph_weight", "stage1_colour_weight", "stage2_readout_weight",
                 "stage2_attention_weight"):
        if not math.isfinite(getattr(settings, name)) or getattr(settings, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be a finite number >= 0 (0 turns the term off), got "
                             f"{getattr(settings, name)}")
    if not math.isfinite(settings.stage2_lr) or settings.stage2_lr <= 0:
        raise ValueError(f"--stage2-lr must be a finite number > 0, got {settings.stage2_lr}")
    out = Path(args.out).resolve()
    refuse_other_settings(out / "settings.json", settings)
    previous = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "settings.json").write_text(json.dumps(asdict(settings), indent=2) + "\n", encoding="utf-8")
        began = time.perf_counter()
        base = Path(args.base).resolve() if args.base else train_stage1(out, settings)
        stage1_seconds = time.perf_counter() - began
        result = train_stage2(base, out, settings)
        timing = {"stage1_seconds": round(stage1_seconds, 1), "stage2_seconds": round(result["seconds"], 1),
                  "threads": args.threads}
        (out / "timing.json").write_text(json.dumps(timing, indent=2) + "\n", encoding="utf-8")
    finally:
        torch.set_num_threads(previous)
    print(f"train-evidence: stage 1 {timing['stage1_seconds']:.0f} s, stage 2 {timing['stage2_seconds']:.0f} s; "
          f"merged model in {out / 'model'}")
    return 0


# ---- shipping ----------------------------------------------------------------------------------------------
RESULTS_NAME = "evidence_results.json"


def check_results(results: dict) -> dict:
    """The measured accuracies the shipped model carries for the demo to quote: {"test_questions": 2000,
    "detail_questions": 1388, "detail_accuracy": {"native view": 59 / 1388, ...}, "note": ...}. Each accuracy must be
    an exact fraction of `detail_questions`: a rounded one (0.0425 for 59 / 1388) prints 4.2 where the tables,
    computed from the counts, say 4.3."""
    missing = {"test_questions", "detail_questions", "detail_accuracy", "note"} - set(results)
    if missing:
        raise ValueError(f"the evidence results lack {', '.join(sorted(missing))}; expected test_questions, "
                         "detail_questions, detail_accuracy and note (shirg_hf.evidence.check_results)")
    questions = results["detail_questions"]
    fractions = [(name, value, questions) for name, value in results["detail_accuracy"].items()]
    if "gate_g0" in results:
        fractions.append(("gate_g0", results["gate_g0"]["accuracy"], results["gate_g0"]["n"]))
    rounded = [name for name, value, count in fractions if value != round(value * count) / count]
    if rounded:
        raise ValueError(f"accuracies {', '.join(rounded)} are not a count of correct answers divided by the "
                         f"number of questions; store correct / questions unrounded")
    return results


def ship(run_dir: Path, dest: Path, *, card: str, results: dict) -> None:
    """Save a run's merged model (root), stage-1 base (`stage1/`) and adapter (`adapter/`) into `dest`, the
    package's `evidence_model` folder, replacing it whole; `card` is the merged model's README.md (the evidence
    tables), `results` (see `check_results`) is saved as `evidence_results.json` for the demo to quote."""
    import shutil

    from .fileio import atomic_folder

    run_dir, results = Path(run_dir), check_results(results)
    with atomic_folder(dest, overwrite=True) as staging:  # replacing the shipped model is what shipping means
        resave(run_dir / "model", staging)
        resave(run_dir / "stage1", staging / "stage1")
        shutil.copytree(run_dir / "adapter", staging / "adapter")
        adapter_config = staging / "adapter" / "adapter_config.json"
        settings = json.loads(adapter_config.read_text(encoding="utf-8"))
        settings["base_model_name_or_path"] = "stage1"  # the folder beside it, relative to the evidence model
        adapter_config.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        (staging / "adapter" / "README.md").unlink(missing_ok=True)
        (staging / "README.md").write_text(card, encoding="utf-8")
        (staging / RESULTS_NAME).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        for name in ("settings.json", "timing.json"):
            if (run_dir / name).is_file():
                shutil.copy2(run_dir / name, staging / f"training_{name}")
