"""ShirgLavidaProcessor: tokenizer + ShirgImageProcessor + the LLaDA chat template.

The `<image>` placeholder of a prompt is expanded into exactly as many image tokens as the model's vision
front end produces for the configured mode: K + 1 (`shirg`, K selected tokens + 1 summary token), 2,304
(`full`, all 48x48 patches at 672 px), 729 (`lowres`, one 384 view) or LaViDa's image-size dependent count
(`lavida-hd`: 196 + H'(W' + 1), see `lavida_hd_num_tokens`). The numbers come from plain saved kwargs, so
the processor loads alone (`AutoProcessor`, `trust_remote_code=True`); `from_model_config` reads them from a
`ShirgLavidaConfig`.
"""

import os
import re
import shutil
import tempfile

from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin

from .image_processing_shirg import (
    LAVIDA_GRID_PINPOINTS,
    ShirgImageProcessor,
    check_grid_pinpoints,
    flatten_images,
    lavida_hd_num_tokens,
)


IMAGE_PLACEHOLDER = "<image>"
# Mirrors of the config's VISION_MODES / SELECTION_METHODS (this remote-code module cannot import modeling/).
VISION_MODES = ("shirg", "full", "lowres", "lavida-hd")
SELECTION_METHODS = (
    "shirg", "full", "random", "pooled", "magnitude", "importance", "gradient", "no_coverage", "no_summary",
)
# Selection baselines that do not reserve coverage cells: K may go down to 1 (mirrors ShirgLavidaConfig.check_budget).
_METHODS_WITHOUT_COVERAGE = ("random", "pooled", "magnitude", "importance", "gradient", "no_coverage")

# Files a processor or tokenizer save may write and a processor load reads back: one left in a folder by another
# tokenizer (e.g. its special_tokens_map.json) would be mixed into this processor on reload.
PROCESSOR_FILE_NAMES = (
    "processor_config.json", "preprocessor_config.json", "chat_template.json", "chat_template.jinja",
    "tokenizer_config.json", "tokenizer.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.model",
    "spiece.model", "sentencepiece.bpe.model", "vocab.json", "vocab.txt", "merges.txt",
)
CHAT_TEMPLATES_FOLDER = "additional_chat_templates"
_SAVE_STAGING_PREFIX = ".processor-save-"

LAVIDA_SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the "
    "user provides, and assist the user with a variety of tasks using natural language."
)

# LLaDA-8B-Instruct's chat template (Llama-3 headers): every message content is whitespace-trimmed, the BOS
# token precedes the first message only, and the assistant header is ALWAYS appended (as in the original,
# whatever `add_generation_prompt` says). Content given as a list renders image items as "<image>\n".
LLADA_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}"
    "{%- set text = message['content'] -%}"
    "{%- else -%}"
    "{%- set ns = namespace(text='') -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{%- set ns.text = ns.text + '<image>\\n' -%}"
    "{%- elif item['type'] == 'text' -%}{%- set ns.text = ns.text + item['text'] -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- set text = ns.text -%}"
    "{%- endif -%}"
    "{%- set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + text | trim"
    " + '<|eot_id|>' -%}"
    "{%- if loop.index0 == 0 -%}{%- set content = bos_token + content -%}{%- endif -%}"
    "{{- content -}}"
    "{%- endfor -%}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}"
)


def build_prompt(question: str, system_prompt: str | None = LAVIDA_SYSTEM_PROMPT, with_image: bool = True) -> str:
    """LaViDa's single-turn prompt string (the chat template's output, BOS `<|startoftext|>` included).

    With `with_image` the user turn starts with "<image>\\n" unless the question already has a placeholder
    (LaViDa's evaluation harness does the same).
    """
    user = question.strip()
    if with_image and IMAGE_PLACEHOLDER not in user:
        user = f"{IMAGE_PLACEHOLDER}\n{user}"
    messages = ([("system", system_prompt)] if system_prompt is not None else []) + [("user", user)]
    turns = "".join(
        f"<|start_header_id|>{role}<|end_header_id|>\n\n{content.strip()}<|eot_id|>" for role, content in messages
    )
    return f"<|startoftext|>{turns}<|start_header_id|>assistant<|end_header_id|>\n\n"


def _positive_int(value, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}")
    return value


class ShirgLavidaProcessor(ProcessorMixin):
    r"""
    Builds model inputs for ShirgLavidaForDiffusionLM: `input_ids`, `attention_mask`, `pixel_values` and, for
    `lavida-hd`, `image_sizes` [num_images, 2] as (width, height).

    Args:
        image_processor (`ShirgImageProcessor`, *optional*): defaults to one at `highres_image_size`.
        tokenizer (`PreTrainedTokenizerBase`): must know `image_token` (see `from_model_config`).
        chat_template (`str`, *optional*): defaults to `LLADA_CHAT_TEMPLATE`.
        vision_mode (`str`): `shirg`, `full`, `lowres` or `lavida-hd`.
        image_token (`str`): the placeholder in prompts and the token repeated once per visual token.
        shirg_budget, shirg_summary, selection_method, coverage_cells: SHIRG settings (`selection` of the
            config); decide K + 1 / K / N for `shirg`.
        num_highres_patches, num_lowres_patches: tokens of the `full` and `lowres` modes.
        highres_image_size, lowres_image_size: input side of `shirg`/`full` and of `lowres`/`lavida-hd` views.
        image_grid_pinpoints, anyres_tile_size, pooled_side: LaViDa-HD geometry ([width, height] pinpoints,
            tile side, side of a view's feature map after 2x2 pooling).
        drop_token_after_image (`bool`, defaults to `True`): reproduce LaViDa's inference tokenisation
            (`tokenizer_image_token`): when the ids start with BOS, the first token after each `<image>` (the
            "\n" of "<image>\n") is dropped, as in the ids the released checkpoints see at inference. Set it to
            `False` for LaViDa's training-time ids, which keep that token.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template=None,
        vision_mode="shirg",
        image_token=IMAGE_PLACEHOLDER,
        shirg_budget=768,
        shirg_summary=True,
        selection_method="shirg",
        coverage_cells=(8, 8),
        num_highres_patches=2304,
        num_lowres_patches=729,
        highres_image_size=672,
        lowres_image_size=384,
        image_grid_pinpoints=None,
        anyres_tile_size=384,
        pooled_side=14,
        drop_token_after_image=True,
    ):
        if tokenizer is None:
            raise ValueError("ShirgLavidaProcessor needs a tokenizer (e.g. shirg_hf.build_tiny_tokenizer() for tests).")
        if vision_mode not in VISION_MODES:
            raise ValueError(f"Unknown vision_mode {vision_mode!r}: expected one of {VISION_MODES}.")
        if selection_method not in SELECTION_METHODS:
            raise ValueError(f"Unknown selection_method {selection_method!r}: expected one of {SELECTION_METHODS}.")
        if len(coverage_cells) != 2:
            raise ValueError(f"coverage_cells must be [rows, cols], got {coverage_cells!r}")
        self.vision_mode = vision_mode
        self.image_token = image_token
        self.shirg_summary = bool(shirg_summary)
        self.selection_method = selection_method
        self.coverage_cells = [int(c) for c in coverage_cells]
        self.num_highres_patches = _positive_int(num_highres_patches, "num_highres_patches")
        self.num_lowres_patches = _positive_int(num_lowres_patches, "num_lowres_patches")
        self.highres_image_size = _positive_int(highres_image_size, "highres_image_size")
        self.lowres_image_size = _positive_int(lowres_image_size, "lowres_image_size")
        self.image_grid_pinpoints = [list(p) for p in (image_grid_pinpoints or LAVIDA_GRID_PINPOINTS)]
        self.anyres_tile_size = _positive_int(anyres_tile_size, "anyres_tile_size")
        self.pooled_side = _positive_int(pooled_side, "pooled_side")
        self.drop_token_after_image = bool(drop_token_after_image)
        self.check_budget(shirg_budget)
        self.shirg_budget = shirg_budget
        check_grid_pinpoints(self.image_grid_pinpoints, self.anyres_tile_size)
        if image_token not in tokenizer.get_vocab():
            raise ValueError(
                f"The tokenizer has no {image_token!r} token. Add it as a special token "
                f"(tokenizer.add_special_tokens({{'extra_special_tokens': [{image_token!r}]}})) with the id of the "
                "model config's image_token_id, or build the processor with ShirgLavidaProcessor.from_model_config."
            )
        if image_processor is None:
            image_processor = ShirgImageProcessor(size={"height": highres_image_size, "width": highres_image_size})
        super().__init__(image_processor, tokenizer, chat_template=chat_template or LLADA_CHAT_TEMPLATE)

    # ---- construction from a model config -------------------------------------------------------------------
    @classmethod
    def from_model_config(cls, config, tokenizer, image_processor=None, **kwargs) -> "ShirgLavidaProcessor":
        """A processor whose token counts match `config` (a ShirgLavidaConfig, read by duck typing).

        If the tokenizer lacks "<image>" it is added as a special token; its id must equal
        `config.image_token_id`, otherwise a `ValueError` explains the mismatch. `kwargs` override the
        values read from the config (e.g. `drop_token_after_image=False`).
        """
        selection = config.selection
        lowres_rows, lowres_cols = config.lowres_grid
        settings = dict(
            vision_mode=config.vision_mode,
            image_token=IMAGE_PLACEHOLDER,
            shirg_budget=selection["budget"],
            shirg_summary=selection["summary"],
            selection_method=selection["method"],
            coverage_cells=list(selection["coverage_cells"]),
            num_highres_patches=config.num_highres_patches,
            num_lowres_patches=lowres_rows * lowres_cols,
            highres_image_size=config.highres_image_size,
            lowres_image_size=config.vision_config.image_size,
            image_grid_pinpoints=[list(p) for p in config.image_grid_pinpoints],
            anyres_tile_size=config.anyres_tile_size,
            pooled_side=config.pooled_grid[0],
        )
        settings.update(kwargs)
        image_token = settings["image_token"]
        if image_token not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"extra_special_tokens": [image_token]}, replace_extra_special_tokens=False)
        token_id = tokenizer.convert_tokens_to_ids(image_token)
        if token_id != config.image_token_id:
            raise ValueError(
                f"The tokenizer maps {image_token!r} to id {token_id}, but config.image_token_id is "
                f"{config.image_token_id}: the model would not find the image positions. Use the tokenizer the "
                f"model was built with, or set image_token_id={token_id} in the config."
            )
        vocab_size = config.text_config.vocab_size
        if len(tokenizer) > vocab_size:
            raise ValueError(f"The tokenizer has {len(tokenizer)} tokens but the model's text_config.vocab_size is "
                             f"{vocab_size}: ids beyond the embedding table would crash the model.")
        if image_processor is None:
            side = settings["highres_image_size"]
            image_processor = ShirgImageProcessor(
                size={"height": side, "width": side},
                image_grid_pinpoints=settings["image_grid_pinpoints"],
                anyres_tile_size=settings["anyres_tile_size"],
            )
        return cls(image_processor=image_processor, tokenizer=tokenizer, **settings)

    # ---- token counts -------------------------------------------------------------------------------------
    @property
    def image_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.image_token)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values", "image_sizes"]

    def check_budget(self, budget) -> None:
        """Raise `ValueError` unless coverage cells <= budget <= num_highres_patches (as the config does)."""
        rows, cols = self.coverage_cells
        low = 1 if self.selection_method in _METHODS_WITHOUT_COVERAGE else rows * cols
        high = self.num_highres_patches
        if not (isinstance(budget, int) and not isinstance(budget, bool) and low <= budget <= high):
            raise ValueError(
                f"Invalid shirg_budget {budget!r}: must be an integer in [{low}, {high}] (coverage cells "
                f"{rows}x{cols} <= K <= {high} high-res patches) for selection method {self.selection_method!r}."
            )

    def num_selected_tokens(self, budget: int | None = None) -> int:
        """Tokens of one image in `shirg` mode: K kept + 1 summary (K == N, summary off or `no_summary`: no
        summary token; method `full`: all N patches). Equals ShirgLavidaConfig.num_selected_tokens."""
        budget = self.shirg_budget if budget is None else budget
        self.check_budget(budget)
        if self.selection_method == "full":
            return self.num_highres_patches
        with_summary = (
            self.shirg_summary and self.selection_method != "no_summary" and budget < self.num_highres_patches
        )
        return budget + int(with_summary)

    def num_image_tokens(self, image_size: tuple[int, int] | None = None, budget: int | None = None) -> int:
        """Visual tokens of one image in the configured mode; `lavida-hd` needs its (width, height)."""
        if self.vision_mode == "shirg":
            return self.num_selected_tokens(budget)
        if self.vision_mode == "full":
            return self.num_highres_patches
        if self.vision_mode == "lowres":
            return self.num_lowres_patches
        if image_size is None:
            raise ValueError("vision_mode='lavida-hd' needs the image size (width, height) to count its tokens.")
        return lavida_hd_num_tokens(image_size, self.image_grid_pinpoints, self.anyres_tile_size, self.pooled_side)

    # ---- main entry point -----------------------------------------------------------------------------------
    def __call__(
        self,
        images=None,
        text=None,
        shirg_budget: int | None = None,
        return_tensors="pt",
        padding=True,
        padding_side: str = "left",
        add_special_tokens: bool = False,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        videos=None,
        audio=None,
        **kwargs,
    ) -> BatchFeature:
        """Tokenise `text` (a prompt or a list of prompts, normally from `build_prompt`/`apply_chat_template`)
        and preprocess `images` (one per `<image>` placeholder, in order; a flat list or one list per prompt).

        `shirg_budget` overrides K for this call (`shirg` mode only). Prompts are padded on the LEFT by default
        (generation); `add_special_tokens` is False because the chat template already writes BOS. Other
        kwargs go to the tokenizer's encoding call. `videos` and `audio` exist for ProcessorMixin's
        `apply_chat_template` and must stay None.
        """
        if videos is not None or audio is not None:
            raise ValueError("ShirgLavidaProcessor handles images and text only; videos and audio are not supported.")
        if kwargs.get("truncation"):
            raise ValueError("Truncation is not supported: it could cut image tokens out of the prompt. Shorten the "
                             "text instead.")
        kwargs.pop("truncation", None)
        if shirg_budget is not None and self.vision_mode != "shirg":
            raise ValueError(f"shirg_budget only applies to vision_mode='shirg' (this processor is "
                             f"{self.vision_mode!r}).")
        texts = self._check_text(text, images)
        flat_images = self._check_images(images, texts)

        image_inputs, counts = {}, []
        if flat_images:
            image_inputs = self._process_images(flat_images, return_tensors)
            if self.vision_mode == "lavida-hd":
                counts = [self.num_image_tokens(image_size=tuple(int(s) for s in size))
                          for size in image_inputs["image_sizes"]]
            else:
                counts = [self.num_image_tokens(budget=shirg_budget)] * len(flat_images)

        encoded = self.tokenizer(texts, add_special_tokens=add_special_tokens, padding=False, **kwargs)
        counts_left = iter(counts)
        input_ids = [self._expand_image_tokens(ids, counts_left) for ids in encoded["input_ids"]]
        padded = self.tokenizer.pad(
            {"input_ids": input_ids}, padding=padding, max_length=max_length, pad_to_multiple_of=pad_to_multiple_of,
            padding_side=padding_side, return_attention_mask=True,
        )
        data = {"input_ids": padded["input_ids"], "attention_mask": padded["attention_mask"], **image_inputs}
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _check_text(self, text, images) -> list[str]:
        if text is None:
            if images is not None:
                raise ValueError("Images were given without text: pass a prompt with one '<image>' placeholder per "
                                 "image, e.g. text=build_prompt('What is in the image?').")
            raise ValueError("Nothing to process: pass `text` (and `images` for its '<image>' placeholders).")
        texts = [text] if isinstance(text, str) else text
        if not isinstance(texts, (list, tuple)) or not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"`text` must be a string or a non-empty list of strings, got {type(text).__name__}.")
        empty = [index for index, prompt in enumerate(texts) if not prompt.strip()]
        if empty:
            raise ValueError(f"text {empty} is empty: every row needs a prompt, e.g. build_prompt('What is in the "
                             "image?').")
        return list(texts)

    def _check_images(self, images, texts: list[str]) -> list:
        """Flat list of images after checking they match the placeholders one to one, in order."""
        placeholders = [t.count(self.image_token) for t in texts]
        if images is None:
            if sum(placeholders):
                raise ValueError(f"The text has {sum(placeholders)} '{self.image_token}' placeholder(s) but no images "
                                 "were given: pass one image per placeholder.")
            return []
        if isinstance(images, (list, tuple)) and len(images) == len(texts) and \
                all(isinstance(group, (list, tuple)) for group in images):
            for index, (group, expected) in enumerate(zip(images, placeholders, strict=True)):
                self._check_count(len(flatten_images(group)), expected, f"prompt {index}")
        flat = flatten_images(images)
        self._check_count(len(flat), sum(placeholders), "the text")
        return flat

    def _check_count(self, num_images: int, num_placeholders: int, where: str) -> None:
        if num_placeholders == 0 and num_images:
            raise ValueError(f"{num_images} image(s) given but {where} has no '{self.image_token}' placeholder: put "
                             f"one '{self.image_token}' where each image goes (build_prompt does this).")
        if num_placeholders > num_images:
            raise ValueError(f"{where} has {num_placeholders} '{self.image_token}' placeholders but only "
                             f"{num_images} image(s) were given: pass one image per placeholder.")
        if num_placeholders < num_images:
            raise ValueError(f"{num_images} images were given but {where} has only {num_placeholders} "
                             f"'{self.image_token}' placeholder(s): pass one image per placeholder.")

    def _process_images(self, images: list, return_tensors) -> dict:
        if self.vision_mode == "lavida-hd":
            side = self.lowres_image_size
            return dict(self.image_processor(
                images, size={"height": side, "width": side}, do_anyres=True,
                image_grid_pinpoints=self.image_grid_pinpoints, anyres_tile_size=self.anyres_tile_size,
                return_tensors=return_tensors,
            ))
        side = self.lowres_image_size if self.vision_mode == "lowres" else self.highres_image_size
        pixel_values = self.image_processor(
            images, size={"height": side, "width": side}, do_anyres=False, return_tensors=return_tensors
        )["pixel_values"]
        return {"pixel_values": pixel_values}

    def _expand_image_tokens(self, ids: list[int], counts) -> list[int]:
        """Repeat each image token id once per visual token (after LaViDa's drop rule, see the class doc)."""
        image_id = self.image_token_id
        drop_next = self.drop_token_after_image and bool(ids) and ids[0] == self.tokenizer.bos_token_id
        expanded = []
        for position, token_id in enumerate(ids):
            if token_id == image_id:
                expanded.extend([image_id] * next(counts))
            elif not (drop_next and position > 0 and ids[position - 1] == image_id):
                expanded.append(token_id)
        return expanded

    # ---- decoding -----------------------------------------------------------------------------------------
    @staticmethod
    def build_prompt(question: str, system_prompt: str | None = LAVIDA_SYSTEM_PROMPT, with_image: bool = True) -> str:
        """LaViDa's prompt for one question (system prompt, "<image>\\n{question}", assistant header)."""
        return build_prompt(question, system_prompt, with_image)

    def batch_decode(self, sequences, skip_special_tokens: bool = True, **kwargs) -> list[str]:
        """Decode answers; special tokens (eot, endoftext padding, mask) are skipped by default."""
        return self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens, **kwargs)

    def decode(self, token_ids, skip_special_tokens: bool = True, **kwargs) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens, **kwargs)

    # ---- saving -------------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory, push_to_hub: bool = False, overwrite: bool = False, **kwargs):
        """Save the processor into `save_directory` (which may already hold this model's config and weights).

        Processor or tokenizer files there that this save does not write (another tokenizer's
        `special_tokens_map.json`, say) would be read back with it: they are refused with FileExistsError, or
        removed with `overwrite=True`. Files are staged, fsynced and moved into place one by one.
        """
        target = os.path.abspath(os.fspath(save_directory))
        os.makedirs(target, exist_ok=True)
        _remove_stale_staging(target)
        staging = tempfile.mkdtemp(prefix=f"{_SAVE_STAGING_PREFIX}{os.getpid()}-", dir=target)
        try:
            super().save_pretrained(staging)
            written = _relative_files(staging)
            foreign = [name for name in _relative_files(target) if name not in written and
                       (name in PROCESSOR_FILE_NAMES or name.startswith(CHAT_TEMPLATES_FOLDER + os.sep))]
            if foreign and not overwrite:
                raise FileExistsError(
                    f"{target} holds {', '.join(foreign)} of another tokenizer or processor, which would be loaded "
                    "with this one; save into an empty folder (or one holding only this model), or pass "
                    "overwrite=True to remove them")
            for name in foreign:
                os.remove(os.path.join(target, name))
            for name in written:
                os.makedirs(os.path.dirname(os.path.join(target, name)), exist_ok=True)
                _fsync(os.path.join(staging, name))
                os.replace(os.path.join(staging, name), os.path.join(target, name))
            for folder in {os.path.dirname(os.path.join(target, name)) for name in written + foreign}:
                _fsync(folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if push_to_hub:
            super().save_pretrained(target, push_to_hub=True, **kwargs)
        return [os.path.join(target, "processor_config.json")]


def _relative_files(folder: str) -> list[str]:
    """The files under `folder` as sorted relative paths, skipping save staging folders."""
    found = []
    for root, folders, files in os.walk(folder):
        folders[:] = [name for name in folders if not name.startswith(_SAVE_STAGING_PREFIX)]
        found += [os.path.relpath(os.path.join(root, name), folder) for name in files]
    return sorted(found)


def _fsync(path: str) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _remove_stale_staging(target: str) -> None:
    """Remove save staging folders in `target` whose process is dead (a save killed midway)."""
    for name in os.listdir(target):
        match = re.fullmatch(rf"{re.escape(_SAVE_STAGING_PREFIX)}(\d+)-[a-z0-9_]{{8}}", name)
        if match is None:
            continue
        try:
            os.kill(int(match.group(1)), 0)
        except ProcessLookupError:
            shutil.rmtree(os.path.join(target, name), ignore_errors=True)
        except PermissionError:  # alive, run by another user
            continue


__all__ = ["LAVIDA_SYSTEM_PROMPT", "LLADA_CHAT_TEMPLATE", "ShirgLavidaProcessor", "build_prompt"]
