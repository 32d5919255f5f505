"""ShirgLavidaProcessor: tokenizer + ShirgImageProcessor + the LLaDA chat template.

The `<image>` placeholder of a prompt is expanded into exactly as many image tokens as the model's vision
front end produces for the mode, selection method and budget of the call (`visual_tokens.num_image_tokens`), and
the returned `BatchFeature` says which (`vision_mode`, and for selecting modes `selection_method` and
`shirg_budget`), so the model uses the very settings the prompt was built for. The geometry and selection
settings are saved with the processor, so it loads alone (`AutoProcessor`, `trust_remote_code=True`).
"""

import os
import re
import shutil
import tempfile

from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin
from transformers.utils.chat_template_utils import render_jinja_template

from .image_processing_shirg import ShirgImageProcessor, busy_patch_count, flatten_images
from .visual_tokens import (
    ADAPTIVE_BUDGET,
    ADAPTIVE_EDGE_THRESHOLD,
    DEFAULT_VISION_MODE,
    LAVIDA_GEOMETRY,
    Geometry,
    adaptive_budget,
    check_budget,
    check_selection,
    num_image_tokens,
    get_vision_mode,
)


IMAGE_PLACEHOLDER = "<image>"
# processor_config.json keys of earlier versions, replaced by `geometry` and `selection`.
LEGACY_SETTINGS = ("shirg_budget", "shirg_summary", "selection_method", "coverage_cells", "num_highres_patches",
                   "num_lowres_patches", "highres_image_size", "lowres_image_size", "image_grid_pinpoints",
                   "anyres_tile_size", "pooled_side")

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

LLADA_BOS_TOKEN = "<|startoftext|>"

# LLaDA-8B-Instruct's chat template (Llama-3 headers) with LaViDa's system prompt: a conversation that does not
# start with a system message gets LAVIDA_SYSTEM_PROMPT as one (the template variable `system_prompt` replaces
# it; `system_prompt=None` leaves it out). Every message content is whitespace-trimmed, the BOS token precedes
# the first message only, and the assistant header is ALWAYS appended (as in the original, whatever
# `add_generation_prompt` says). Content given as a list renders image items as "<image>\n".
LLADA_CHAT_TEMPLATE = (
    "{%- if system_prompt is not defined -%}{%- set system_prompt = '" + LAVIDA_SYSTEM_PROMPT + "' -%}{%- endif -%}"
    "{%- if system_prompt is not none and messages[0]['role'] != 'system' -%}"
    "{%- set messages = [{'role': 'system', 'content': system_prompt}] + messages -%}"
    "{%- endif -%}"
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
    """LaViDa's single-turn prompt string: the chat template (`LLADA_CHAT_TEMPLATE`, as `apply_chat_template`
    renders it) of one user message, BOS `<|startoftext|>` included.

    With `with_image` the user turn starts with "<image>\n" unless the question already has a placeholder
    (LaViDa's evaluation harness does the same).
    """
    question = question.strip()
    content = [{"type": "image"}, {"type": "text", "text": question}] \
        if with_image and IMAGE_PLACEHOLDER not in question else question
    prompts, _ = render_jinja_template([[{"role": "user", "content": content}]], chat_template=LLADA_CHAT_TEMPLATE,
                                       bos_token=LLADA_BOS_TOKEN, system_prompt=system_prompt)
    return prompts[0]


class ShirgLavidaProcessor(ProcessorMixin):
    r"""
    Builds model inputs for ShirgLavidaForDiffusionLM: `input_ids`, `attention_mask`, `pixel_values`, for
    anyres modes `image_sizes` [num_images, 2] as (width, height), and the settings the image tokens were
    counted for: `vision_mode` and, for selecting modes, `selection_method` and `shirg_budget`.

    Args:
        image_processor (`ShirgImageProcessor`, *optional*): defaults to one at the geometry's high-res side.
        tokenizer (`PreTrainedTokenizerBase`): must know `image_token` (see `from_model_config`).
        chat_template (`str`, *optional*): defaults to `LLADA_CHAT_TEMPLATE`.
        vision_mode (`str`): the default registered vision mode.
        geometry (`dict`, *optional*): `visual_tokens.Geometry` fields (default: LaViDa's so400m geometry).
        selection (`dict`, *optional*): the model config's `selection` settings (method, budget K, ...).
        image_token (`str`): the placeholder in prompts and the token repeated once per visual token.
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
        vision_mode=DEFAULT_VISION_MODE,
        geometry=None,
        selection=None,
        image_token=IMAGE_PLACEHOLDER,
        drop_token_after_image=True,
    ):
        if tokenizer is None:
            raise ValueError("ShirgLavidaProcessor needs a tokenizer (e.g. shirg_hf.build_tiny_tokenizer() for tests).")
        vision_mode_spec = get_vision_mode(vision_mode)
        self._geometry = geometry if isinstance(geometry, Geometry) else Geometry.from_dict(
            geometry or LAVIDA_GEOMETRY.to_dict())
        self.geometry = self._geometry.to_dict()
        self.selection = check_selection(selection, self._geometry.highres_grid)
        self.vision_mode = vision_mode_spec.name
        self.image_token = image_token
        self.drop_token_after_image = bool(drop_token_after_image)
        if image_token not in tokenizer.get_vocab():
            raise ValueError(
                f"The tokenizer has no {image_token!r} token. Add it as a special token "
                f"(tokenizer.add_special_tokens({{'extra_special_tokens': [{image_token!r}]}})) with the id of the "
                "model config's image_token_id, or build the processor with ShirgLavidaProcessor.from_model_config."
            )
        if image_processor is None:
            side = self._geometry.highres_side
            image_processor = ShirgImageProcessor(size={"height": side, "width": side})
        super().__init__(image_processor, tokenizer, chat_template=chat_template or LLADA_CHAT_TEMPLATE)

    @classmethod
    def get_processor_dict(cls, pretrained_model_name_or_path, **kwargs):
        """Refuse a processor_config.json of an earlier version (flat copies of the config such as
        `num_highres_patches`): its settings would otherwise be dropped and LaViDa's geometry used instead.
        (`from_pretrained` reads the saved settings through this method in every supported transformers.)"""
        processor_dict, kwargs = super().get_processor_dict(pretrained_model_name_or_path, **kwargs)
        legacy = sorted(set(processor_dict) & set(LEGACY_SETTINGS))
        if legacy:
            raise ValueError(
                f"processor_config.json holds settings of an earlier shirg-hf ({', '.join(legacy)}); rebuild the "
                "processor from the model config: ShirgLavidaProcessor.from_model_config(AutoConfig.from_pretrained("
                "folder), AutoTokenizer.from_pretrained(folder)).save_pretrained(folder)"
            )
        return processor_dict, kwargs

    # ---- construction from a model config -------------------------------------------------------------------
    @classmethod
    def from_model_config(cls, config, tokenizer, image_processor=None, **kwargs) -> "ShirgLavidaProcessor":
        """A processor whose token counts match `config` (a ShirgLavidaConfig, read by duck typing).

        If the tokenizer lacks "<image>" it is added as a special token; its id must equal
        `config.image_token_id`, otherwise a `ValueError` explains the mismatch. `kwargs` override the
        values read from the config (e.g. `drop_token_after_image=False`).
        """
        settings = dict(vision_mode=config.vision_mode, geometry=config.geometry.to_dict(),
                        selection=dict(config.selection), image_token=IMAGE_PLACEHOLDER, chat_template=LLADA_CHAT_TEMPLATE)
        settings.update(kwargs)
        tokenizer.chat_template = settings["chat_template"]  # one template: tokenizer and processor agree
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
            geometry = Geometry.from_dict(settings["geometry"])
            image_processor = ShirgImageProcessor(
                size={"height": geometry.highres_side, "width": geometry.highres_side},
                image_grid_pinpoints=[list(p) for p in geometry.pinpoints], anyres_tile_size=geometry.tile_size,
            )
        return cls(image_processor=image_processor, tokenizer=tokenizer, **settings)

    # ---- token counts -------------------------------------------------------------------------------------
    @property
    def image_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.image_token)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values", "image_sizes"]

    @property
    def num_highres_patches(self) -> int:
        return self._geometry.num_highres_patches

    def check_budget(self, budget, method: str | None = None) -> int:
        """Return `budget` if it is a valid K for the selection method, else raise `ValueError`."""
        return check_budget(budget, self.selection, self._geometry.num_highres_patches, method)

    def num_image_tokens(self, image_size=None, budget: int | None = None, vision_mode: str | None = None,
                         method: str | None = None) -> int:
        """Visual tokens of one image (`visual_tokens.num_image_tokens`); anyres modes need its (width, height)."""
        return num_image_tokens(vision_mode or self.vision_mode, self._geometry, self.selection, budget=budget,
                                method=method, image_size=image_size)

    # ---- main entry point -----------------------------------------------------------------------------------
    def __call__(
        self,
        images=None,
        text=None,
        shirg_budget: int | None = None,
        vision_mode: str | None = None,
        selection_method: str | None = None,
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

        `vision_mode`, `selection_method` and `shirg_budget` (K) override the saved defaults for this call (the
        last two for selecting modes only); the output records them. `shirg_budget="adaptive"` picks K per image
        from its pixels within `selection.adaptive_budget` (the output's `shirg_budget` is then the list of K per
        image when they differ). Prompts are padded on the LEFT by default
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
        mode = get_vision_mode(vision_mode or self.vision_mode)
        request = {}
        if mode.selects:
            request = {"selection_method": selection_method or self.selection["method"],
                       "shirg_budget": self.selection["budget"] if shirg_budget is None else shirg_budget}
            if request["shirg_budget"] == ADAPTIVE_BUDGET:
                adaptive_budget(0, self.selection)  # refuses settings without adaptive_budget
            else:
                self.check_budget(request["shirg_budget"], request["selection_method"])
        elif shirg_budget is not None or selection_method is not None:
            raise ValueError(f"shirg_budget and selection_method only apply to selecting vision modes; "
                             f"vision_mode={mode.name!r} does not select.")
        texts = self._check_text(text, images)
        flat_images = self._check_images(images, texts)

        image_inputs, counts = {}, []
        if flat_images:
            image_inputs = self._process_images(flat_images, mode, return_tensors)
            sizes = image_inputs["image_sizes"] if mode.anyres else [None] * len(flat_images)
            budgets = [request.get("shirg_budget")] * len(flat_images)
            if request.get("shirg_budget") == ADAPTIVE_BUDGET:  # K per image from its pixels (docs/selection.md)
                budgets = [adaptive_budget(busy_patch_count(view, self._geometry.patch_size, ADAPTIVE_EDGE_THRESHOLD),
                                           self.selection) for view in image_inputs["pixel_values"]]
                request["shirg_budget"] = budgets[0] if len(set(budgets)) == 1 else budgets
            counts = [num_image_tokens(mode.name, self._geometry, self.selection, budget=budget,
                                       method=request.get("selection_method"),
                                       image_size=None if size is None else tuple(int(s) for s in size))
                      for size, budget in zip(sizes, budgets)]

        encoded = self.tokenizer(texts, add_special_tokens=add_special_tokens, padding=False, **kwargs)
        counts_left = iter(counts)
        input_ids = [self._expand_image_tokens(ids, counts_left) for ids in encoded["input_ids"]]
        padded = self.tokenizer.pad(
            {"input_ids": input_ids}, padding=padding, max_length=max_length, pad_to_multiple_of=pad_to_multiple_of,
            padding_side=padding_side, return_attention_mask=True,
        )
        data = {"input_ids": padded["input_ids"], "attention_mask": padded["attention_mask"], **image_inputs}
        output = BatchFeature(data=data, tensor_type=return_tensors)
        if flat_images:  # plain values after the tensor conversion: they travel with the batch unchanged
            output.update({"vision_mode": mode.name, **request})
        return output

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

    def _process_images(self, images: list, mode, return_tensors) -> dict:
        side = self._geometry.side(mode.view_side)
        if mode.anyres:
            return dict(self.image_processor(
                images, size={"height": side, "width": side}, do_anyres=True,
                image_grid_pinpoints=[list(p) for p in self._geometry.pinpoints],
                anyres_tile_size=self._geometry.tile_size, return_tensors=return_tensors,
            ))
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


__all__ = ["LAVIDA_SYSTEM_PROMPT", "LLADA_BOS_TOKEN", "LLADA_CHAT_TEMPLATE", "ShirgLavidaProcessor", "build_prompt"]
