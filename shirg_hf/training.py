"""Fine-tuning helpers: LLaDA forward noising with LaViDa's complementary masking, the data collator, the
projector LoRA config, adapter checks, a Trainer that keeps the noise streams reproducible, and a synthetic
shapes/colours/text data set for demos and tests. `shirg_hf.train` (`shirg-hf train`) runs them.

One adapter learns every SHIRG budget: the collator draws one keep budget K per batch from a set (the research
plan's "baseline" = the native view, 1024, 768, 512 by default; "full" = every high-res patch, other non-selecting
vision modes such as "lowres" may be mixed in), so the projector LoRA sees all the token counts it will serve.
"""

import contextlib
import random
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from transformers import Trainer, TrainerCallback

from .data import ANSWER_ALIAS, REQUIRED_COLUMNS, check_columns, row_answers
from .processing.processing_shirg_lavida import LAVIDA_SYSTEM_PROMPT, build_prompt
from .processing.visual_tokens import get_vision_mode, vision_mode_names


DEFAULT_BUDGETS = ("baseline", 1024, 768, 512)  # the research plan's recipe: native view + three K, one adapter
FULL_BUDGET_NAMES = ("full",)  # K = N: every high-res patch, no summary token
BASELINE_BUDGET_NAME = "baseline"  # the native view (LaViDa's 384 px path, 729 tokens): see `native_vision_mode`
LORA_BIASES = ("none", "lora_only")  # peft's `bias`: which biases train (and are saved) with the adapter


def native_vision_mode() -> str:
    """The registered non-selecting, single-view mode at the tower's native side (`lowres`): the "baseline" budget."""
    for name in vision_mode_names():
        mode = get_vision_mode(name)
        if mode.view_side == "native" and not mode.selects and not mode.anyres:
            return name
    raise ValueError("no registered vision mode gives the native view (view_side='native', no selection, no anyres)")


def complementary_noising(
    input_ids: torch.LongTensor,
    answer_mask: torch.BoolTensor,
    mask_token_id: int,
    generator: torch.Generator | None = None,
    eps: float = 1e-3,
    complementary: bool = True,
) -> dict[str, torch.Tensor]:
    """LLaDA's forward process on the answer tokens, with LaViDa's complementary copies.

    Per row t ~ U(0, 1) and p = (1 - eps) t + eps; each answer token is masked with probability p, and at least
    one answer token per row is masked (**FIX**: the original forces one masked position over the whole row,
    prompt included, so a row could end up with no answer target). With `complementary`, each row appears twice:
    once with mask M and once with the complement of M over the answer tokens, so every answer token is a
    target exactly once per sample.

    Args:
        input_ids: [B, T] clean token ids (prompt, answer and answer padding).
        answer_mask: [B, T] True on answer positions (targets, `<|endoftext|>` padding included).
    Returns:
        `input_ids` [B', T] with masked positions replaced by `mask_token_id`, `labels` [B', T] (the clean id at
        masked positions, -100 elsewhere), `p_mask` [B'] (the masking probability of each copy: p, and
        max(1 - p, eps) for the complement) and `source_rows` [B'] (which input row each copy came from: rows
        0..B-1, then 0..B-1 again for the complements); B' = 2B or B.
    """
    if input_ids.shape != answer_mask.shape or input_ids.dim() != 2:
        raise ValueError(f"input_ids and answer_mask must both be [B, T]; got {tuple(input_ids.shape)} and "
                         f"{tuple(answer_mask.shape)}")
    if not bool(answer_mask.any(-1).all()):
        raise ValueError("every row needs at least one answer token to noise (answer_mask has an all-False row)")
    batch, _ = input_ids.shape
    t = torch.rand(batch, generator=generator)  # [B]
    p = (1 - eps) * t + eps  # [B]
    u = torch.rand(input_ids.shape, generator=generator)  # [B, T]
    u = torch.where(answer_mask, u, torch.full_like(u, 2.0))  # prompt positions can never be masked
    masked = u <= torch.maximum(p[:, None], u.min(-1, keepdim=True).values)  # [B, T], >= 1 answer token per row
    masks = [masked]
    p_masks = [p]
    if complementary:
        masks.append(answer_mask & ~masked)
        p_masks.append((1 - p).clamp_min(eps))  # p < 1, so 1 - p > 0; clamped like p so 1/p stays bounded
    masks = torch.cat(masks)  # [B', T]
    clean = input_ids.repeat(len(p_masks), 1)  # [B', T]
    return {
        "input_ids": torch.where(masks, torch.full_like(clean, mask_token_id), clean),
        "labels": torch.where(masks, clean, torch.full_like(clean, -100)),
        "p_mask": torch.cat(p_masks),
        "source_rows": torch.arange(batch).repeat(len(p_masks)),
    }


# Matches the two projector Linear layers of ShirgLavidaForDiffusionLM and nothing else (peft fullmatches a
# regex string against each module's full name; a list of names would also hit SigLIP's and LLaDA's layers).
PROJECTOR_LORA_TARGETS = r"(.*\.)?multi_modal_projector\.linear_[12]"


def projector_lora_config(rank: int = 16, alpha: int = 32, dropout: float = 0.05, bias: str = "none", **kwargs):
    """peft `LoraConfig` adapting only the projector (rank 16, alpha 32, dropout 0.05 by default).

    `bias`: "none" or "lora_only" (the research plan's `bias: "lora"`, accepted as an alias): the biases of the
    two projector Linear layers then train and are saved with the adapter. peft's "all" is refused: it would train
    every bias of SigLIP and LLaDA too.
    """
    from peft import LoraConfig

    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    if not 0 <= dropout < 1:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
    if bias == "lora":
        bias = "lora_only"
    if bias not in LORA_BIASES:
        raise ValueError(f"LoRA bias must be one of {LORA_BIASES} (or the plan's 'lora' = 'lora_only'), got {bias!r}")
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=PROJECTOR_LORA_TARGETS,
                      bias=bias, **kwargs)


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    """Trainable and total parameter counts (shared tensors counted once)."""
    seen, trainable, total = set(), 0, 0
    for parameter in model.parameters():
        if id(parameter) in seen:
            continue
        seen.add(id(parameter))
        total += parameter.numel()
        trainable += parameter.numel() if parameter.requires_grad else 0
    return {"trainable": trainable, "total": total}


def lora_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable LoRA tensors of a peft model by name (what `save_pretrained` writes), detached on CPU."""
    return {name: parameter.detach().cpu() for name, parameter in model.named_parameters() if "lora_" in name}


# ---- budgets ---------------------------------------------------------------------------------------------
def resolve_budgets(budgets: Iterable, processor) -> tuple[int | str, ...]:
    """What each batch may be built with, for the model `processor` was built for, validated before training.

    Entries: "baseline" (the native view, `native_vision_mode()`: LaViDa's 729-token 384 px path), "full" (K = N,
    every high-res patch kept, no summary token), an integer K, a fraction of N in (0, 1] (K = round(f * N); the
    defaults 1024/768/512 of a 2,304-patch model are 0.444/0.333/0.222), or the name of another registered,
    non-selecting vision mode (e.g. "lowres", the same view as "baseline").
    Strings are parsed, so `"full,0.5,64".split(",")` works. Nothing is clipped or substituted: an entry the model
    cannot take raises `ValueError`.
    """
    if not get_vision_mode(processor.vision_mode).selects:
        raise ValueError(f"keep budgets only apply to selecting vision modes such as vision_mode='shirg'; this "
                         f"processor is {processor.vision_mode!r}. Pass budgets=None.")
    entries = list(budgets)
    if not entries:
        raise ValueError("budgets is empty: give at least one keep budget, e.g. ('full', 768).")
    num_patches = processor.num_highres_patches
    resolved = []
    for entry in entries:
        budget = _parse_budget(entry, num_patches)
        if isinstance(budget, int):
            try:
                processor.check_budget(budget)
            except ValueError as error:
                rows, cols = processor.selection["coverage_cells"]
                raise ValueError(
                    f"budget {entry!r} (K = {budget}) does not fit this model ({num_patches} high-res patches, "
                    f"coverage cells {rows}x{cols}): {error} Pass budgets valid for this model, e.g. fractions of N "
                    f"such as full,0.444,0.333,0.222."
                ) from None
        resolved.append(budget)
    repeated = sorted({str(budget) for budget in resolved if resolved.count(budget) > 1})
    if repeated:
        raise ValueError(f"budgets {entries!r} give the same K more than once ({repeated}); each K must appear once "
                         "(a repeated K would silently be drawn more often).")
    return tuple(resolved)


def _parse_budget(entry, num_patches: int) -> int | str:
    if isinstance(entry, str):
        text = entry.strip().lower()
        if text in FULL_BUDGET_NAMES:
            return num_patches
        if text == BASELINE_BUDGET_NAME:
            return native_vision_mode()
        if text in vision_mode_names() and not get_vision_mode(text).selects:
            return text
        try:
            entry = int(text) if text.lstrip("+-").isdigit() else float(text)
        except ValueError:
            raise ValueError(f"cannot read budget {entry!r}: expected 'full', 'baseline', an integer K, a fraction "
                             f"of the high-res patches in (0, 1] or a non-selecting vision mode "
                             f"{[name for name in vision_mode_names() if not get_vision_mode(name).selects]}") from None
    if isinstance(entry, bool) or not isinstance(entry, (int, float)):
        raise ValueError(f"budget {entry!r} must be 'full', 'baseline', an integer K or a fraction in (0, 1]")
    if isinstance(entry, float):
        if not 0 < entry <= 1:
            raise ValueError(f"fractional budget {entry!r} must lie in (0, 1] (a fraction of the {num_patches} "
                             "high-res patches); write whole token counts as integers")
        return round(entry * num_patches)
    return entry


# ---- data --------------------------------------------------------------------------------------------------
def check_dataset_columns(dataset, name: str = "dataset") -> None:
    """Raise `ValueError` unless `dataset` (a `datasets.Dataset`) follows the data schema (`shirg_hf.data`)."""
    if getattr(dataset, "column_names", None) is None:
        raise ValueError(f"{name} must be a datasets.Dataset with columns {list(REQUIRED_COLUMNS)}, got "
                         f"{type(dataset).__name__}.")
    check_columns(dataset, name)


def _seeded_generator(*key: int) -> torch.Generator:
    """A torch generator whose seed is a hash of the integers `key` (any size, non-negative)."""
    seed = np.random.SeedSequence([int(k) for k in key]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(seed) & (2**63 - 1))


class ShirgDiffusionCollator:
    """Rows {image, question, answers} -> a noised masked-diffusion training batch for ShirgLavidaForDiffusionLM.

    Per batch: one entry of `budgets` is drawn (a keep budget K, or a non-selecting vision mode); prompts are
    LaViDa's chat prompt (`build_prompt`: system prompt, "<image>\\n{question}", assistant header) run through the
    processor with it; the target is the first gold answer, `answers[0].strip() + answer_suffix` (`<|eot_id|>`,
    LaViDa's targets; a row's `answer` string is accepted as the alias, see `shirg_hf.data`); every row is
    `[prompt][answer][<|endoftext|> ...]`, right-padded to the batch length with the pad (EOS) token, which is a
    target like the answer (LLaDA SFT practice). There is no left padding, so rotary positions are 0..T-1 in
    every row, and the prompt ids are exactly those the same processor gives `generate` (its
    `drop_token_after_image` rule included): training sees what cached inference sees. Then LLaDA's forward
    noising with LaViDa's complementary masking (`complementary_noising`) gives 2B sequences.

    Returns `input_ids`, `attention_mask` (all ones: EOS padding is attended, LaViDa), `labels`,
    `prefix_lengths` [2B] (prompt lengths, for the prefix-DLM training mask), `pixel_values` [B, ...] (and
    `image_sizes` for `lavida-hd`) once per image with `image_rows` [2B] naming each row's image (the tower and
    the selector run once per image, as LaViDa computes features once for both copies), the processor's
    `vision_mode` (and `selection_method`, `shirg_budget` for selecting modes) and `p_mask` [2B] only with
    `inverse_p_weighting` (LLaDA's 1/p estimator instead of LaViDa's mean CE).

    Randomness is reproducible: the budget of a batch is a function of (seed, batch index) only, so all DDP
    ranks use the same K at each step (balanced sequence lengths); the noise also depends on the rank, so ranks
    draw different masks. Inside a DataLoader worker the worker is part of the key (see `_worker_key`).
    `evaluation_stream()` switches to a separate stream restarted at batch 0, so every evaluation sees the same
    noise (with workers: as long as they are not persistent) and training noise does not depend on how often you
    evaluate; `ShirgDiffusionTrainer` uses it and restores the batch index when resuming.

    Args:
        processor: a `ShirgLavidaProcessor` built for the model (`from_model_config` or the saved one).
        mask_token_id: the model's `text_config.mask_token_id`.
        budgets: keep budgets for `shirg` mode (see `resolve_budgets`); None for other vision modes.
        seed: base seed of the budget and noise draws.
        complementary: add the complementary copy of each row (LaViDa); False gives B sequences.
        eps: minimum masking probability (p = (1 - eps) t + eps).
        answer_suffix: token appended to every answer (must be one token of the vocabulary), or None.
        inverse_p_weighting: also return `p_mask`, selecting LLaDA's 1/p-weighted loss in the model.
        min_answer_length: pad so that every row has at least this many answer positions (answer + EOS), e.g.
            the generation window `max_new_tokens`, so the model learns to fill it with EOS.
        system_prompt: the system turn of the prompt (LaViDa's by default; None for no system turn).
    """

    def __init__(
        self,
        processor,
        mask_token_id: int,
        budgets: Iterable | None = DEFAULT_BUDGETS,
        seed: int = 0,
        complementary: bool = True,
        eps: float = 1e-3,
        answer_suffix: str | None = "<|eot_id|>",
        inverse_p_weighting: bool = False,
        min_answer_length: int | None = None,
        system_prompt: str | None = LAVIDA_SYSTEM_PROMPT,
    ):
        tokenizer = processor.tokenizer
        vocab = tokenizer.get_vocab()
        if isinstance(mask_token_id, bool) or not isinstance(mask_token_id, int) or \
                not 0 <= mask_token_id < len(tokenizer):
            raise ValueError(f"mask_token_id must be a token id in [0, {len(tokenizer) - 1}] (the model's "
                             f"text_config.mask_token_id), got {mask_token_id!r}")
        if tokenizer.pad_token_id is None or tokenizer.pad_token_id == mask_token_id:
            raise ValueError(f"the tokenizer's pad token ({tokenizer.pad_token!r}) pads the answers and must be set "
                             "and differ from the mask token; LLaDA pads with <|endoftext|>.")
        if answer_suffix is not None and answer_suffix not in vocab:
            raise ValueError(f"answer_suffix {answer_suffix!r} is not a token of the tokenizer; LaViDa ends answers "
                             "with '<|eot_id|>'. Pass a token of the vocabulary or answer_suffix=None.")
        if not 0 < eps < 1:
            raise ValueError(f"eps must lie in (0, 1), got {eps!r}")
        if min_answer_length is not None and (not isinstance(min_answer_length, int) or min_answer_length < 1):
            raise ValueError(f"min_answer_length must be a positive integer or None, got {min_answer_length!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        if budgets is None and get_vision_mode(processor.vision_mode).selects:
            raise ValueError(f"vision_mode={processor.vision_mode!r} needs keep budgets to draw from, e.g. "
                             "budgets=('full', 768).")
        self.processor = processor
        self.mask_token_id = mask_token_id
        self.budgets = None if budgets is None else resolve_budgets(budgets, processor)
        self.seed = seed
        self.complementary = bool(complementary)
        self.eps = float(eps)
        self.answer_suffix = answer_suffix or ""
        self.inverse_p_weighting = bool(inverse_p_weighting)
        self.min_answer_length = min_answer_length
        self.system_prompt = system_prompt
        self.batches_drawn = 0  # index of the next batch in the current stream
        self._stream = 0  # 0: training, 1: evaluation

    @property
    def is_evaluating(self) -> bool:
        """True inside `evaluation_stream()`."""
        return self._stream == 1

    @contextlib.contextmanager
    def evaluation_stream(self):
        """Draw from the evaluation stream, restarted at batch 0; the training stream resumes afterwards."""
        saved = self._stream, self.batches_drawn
        self._stream, self.batches_drawn = 1, 0
        try:
            yield self
        finally:
            self._stream, self.batches_drawn = saved

    def __call__(self, rows: list[dict]) -> dict:
        if not rows:
            raise ValueError("cannot collate an empty batch")
        self._check_rows(rows)
        stream_key = (self.seed, self._stream, self._worker_key(), self.batches_drawn)
        variant = {}
        if self.budgets is not None:
            draw = self.budgets[int(torch.randint(len(self.budgets), (), generator=_seeded_generator(*stream_key)))]
            variant = {"vision_mode": draw} if isinstance(draw, str) else {"shirg_budget": draw}
        encoded = self.processor(
            images=[row["image"] for row in rows],
            text=[build_prompt(row["question"], self.system_prompt) for row in rows],
            padding=True, padding_side="right", return_tensors="pt", **variant,
        )
        answers = [row_answers(row, index)[0] for index, row in enumerate(rows)]
        input_ids, answer_mask, prompt_lengths = self._assemble(encoded, answers)
        noised = complementary_noising(
            input_ids, answer_mask, self.mask_token_id, generator=_seeded_generator(*stream_key, _rank() + 1),
            eps=self.eps, complementary=self.complementary,
        )
        source_rows = noised["source_rows"]  # [B']
        batch = {
            "input_ids": noised["input_ids"],  # [B', T]
            "attention_mask": torch.ones_like(noised["input_ids"]),  # [B', T]
            "labels": noised["labels"],  # [B', T]
            "prefix_lengths": prompt_lengths[source_rows],  # [B']
            "pixel_values": encoded["pixel_values"],  # [B, ...]: each image once
            "image_rows": source_rows,  # [B'] the image of every row
        }
        for key in ("image_sizes", "vision_mode", "selection_method", "shirg_budget"):  # as the processor gives them
            if key in encoded:
                batch[key] = encoded[key]
        if self.inverse_p_weighting:
            batch["p_mask"] = noised["p_mask"]  # [B']
        self.batches_drawn += 1
        return batch

    def _worker_key(self) -> int:
        """0 in the main process; in a DataLoader worker its seed (training: new draws every epoch) or its
        index (evaluation: the same draws at every evaluation)."""
        worker = torch.utils.data.get_worker_info()
        if worker is None:
            return 0
        return worker.id + 1 if self.is_evaluating else worker.seed

    def _check_rows(self, rows: list[dict]) -> None:
        for index, row in enumerate(rows):
            missing = [column for column in ("image", "question") if column not in row]
            if missing or not ("answers" in row or ANSWER_ALIAS in row):
                raise ValueError(
                    f"row {index} of the batch lacks {missing or ['answers']} (it has {sorted(row)}); the collator "
                    f"needs {list(REQUIRED_COLUMNS)}. With the Trainer, set remove_unused_columns=False."
                )
            if not isinstance(row["question"], str):
                raise ValueError(f"row {index}: 'question' must be a string, got {type(row['question']).__name__}")
            row_answers(row, index)

    def _assemble(self, encoded, answers: list[str]):
        """[prompt][answer + suffix][pad ...] rows, the answer mask and the prompt lengths.  -> [B, T], [B, T], [B]"""
        tokenizer = self.processor.tokenizer
        prompt_lengths = encoded["attention_mask"].sum(-1)  # [B] (prompts are right-padded by the processor)
        answer_ids = tokenizer([answer.strip() + self.answer_suffix for answer in answers],
                               add_special_tokens=False)["input_ids"]
        if any(not ids for ids in answer_ids):
            raise ValueError("an answer tokenised to no tokens; give answers (or an answer_suffix) with text")
        answer_lengths = [max(len(ids), self.min_answer_length or 0) for ids in answer_ids]
        total = max(int(p) + a for p, a in zip(prompt_lengths, answer_lengths))
        input_ids = torch.full((len(answers), total), tokenizer.pad_token_id, dtype=torch.long)  # [B, T]
        answer_mask = torch.zeros((len(answers), total), dtype=torch.bool)  # [B, T]
        for row, (prompt_length, ids) in enumerate(zip(prompt_lengths.tolist(), answer_ids)):
            input_ids[row, :prompt_length] = encoded["input_ids"][row, :prompt_length]
            input_ids[row, prompt_length : prompt_length + len(ids)] = torch.tensor(ids)
            answer_mask[row, prompt_length:] = True
        return input_ids, answer_mask, prompt_lengths


def _rank() -> int:
    distributed = torch.distributed
    return distributed.get_rank() if distributed.is_available() and distributed.is_initialized() else 0


# ---- Trainer -----------------------------------------------------------------------------------------------
class _NoiseStreamCallback(TrainerCallback):
    """On (re)start, continue the collator's training stream at the batch the global step corresponds to."""

    def __init__(self, collator: ShirgDiffusionCollator):
        self.collator = collator

    def on_train_begin(self, args, state, control, **kwargs):
        self.collator.batches_drawn = state.global_step * args.gradient_accumulation_steps


class ShirgDiffusionTrainer(Trainer):
    """`Trainer` for a `ShirgDiffusionCollator`: evaluations use the collator's evaluation stream (the same
    budgets and masks at every evaluation, so eval losses are comparable), and a resumed run continues the
    training noise stream where the checkpoint left it (exact with `dataloader_num_workers=0` when the epoch
    length is a multiple of `gradient_accumulation_steps`).
    """

    def __init__(self, *args, lr_mm: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lr_mm = lr_mm
        if lr_mm is not None and not (lr_mm > 0 and self.base_projector_parameters()):
            raise ValueError(f"lr_mm={lr_mm!r} needs a positive learning rate and trainable base projector parameters "
                             "(their biases: projector_lora_config(bias='lora_only'), --lora_bias lora_only)")
        if not isinstance(self.data_collator, ShirgDiffusionCollator):
            raise ValueError("ShirgDiffusionTrainer needs data_collator=ShirgDiffusionCollator(...), got "
                             f"{type(self.data_collator).__name__}")
        if self.args.remove_unused_columns:
            raise ValueError("the collator reads the raw image/question/answer columns: set "
                             "TrainingArguments(remove_unused_columns=False).")
        self.add_callback(_NoiseStreamCallback(self.data_collator))

    def base_projector_parameters(self) -> list[str]:
        """Names of the trainable projector parameters that are not LoRA matrices (e.g. biases with lora_only)."""
        return [name for name, parameter in self.model.named_parameters()
                if parameter.requires_grad and "multi_modal_projector" in name and "lora_" not in name]

    def create_optimizer(self, model=None):
        """The Trainer's optimizer; with `lr_mm`, the base projector parameters form a group at that rate."""
        if self.lr_mm is None or self.optimizer is not None:
            return super().create_optimizer(model)
        model = self.model if model is None else model
        base = set(self.base_projector_parameters())
        decay = set(self.get_decay_parameter_names(model))
        groups = []
        for is_base in (False, True):
            for decays in (True, False):
                params = [p for n, p in model.named_parameters()
                          if p.requires_grad and (n in base) == is_base and (n in decay) == decays]
                if params:
                    groups.append({"params": params, "weight_decay": self.args.weight_decay if decays else 0.0,
                                   **({"lr": self.lr_mm} if is_base else {})})
        optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, model)
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def evaluate(self, *args, **kwargs):
        with self.data_collator.evaluation_stream():
            return super().evaluate(*args, **kwargs)


# ---- adapters ----------------------------------------------------------------------------------------------
_LORA_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<matrix>[AB])\.weight")


def check_adapter_matches_model(adapter_dir: str | Path, model: torch.nn.Module) -> None:
    """Raise `ValueError` (before any training or loading) if the LoRA adapter saved in `adapter_dir` does not
    fit `model` (a base model or a peft model): a LoRA'd module the base lacks, or other layer sizes (an adapter
    trained for another base, e.g. other vision or text hidden sizes)."""
    from safetensors import safe_open

    weights = Path(adapter_dir) / "adapter_model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"no adapter_model.safetensors in '{adapter_dir}': pass a folder written by "
                                "PeftModel.save_pretrained or a Trainer checkpoint of a LoRA run.")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    with safe_open(str(weights), framework="pt") as tensors:
        shapes = {key: tuple(tensors.get_slice(key).get_shape()) for key in tensors.keys()}
    for key, shape in sorted(shapes.items()):
        match = _LORA_KEY.fullmatch(key)
        if match is None:
            continue
        name = match["module"]
        try:
            layer = base.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the adapter in '{adapter_dir}' adapts '{name}', which this base model does not have: "
                             "it was trained for another architecture.") from None
        layer = getattr(layer, "base_layer", layer)
        if match["matrix"] == "A":
            what, expected, found = "input", getattr(layer, "in_features", None), shape[1]
        else:
            what, expected, found = "output", getattr(layer, "out_features", None), shape[0]
        if expected != found:
            raise ValueError(
                f"the adapter in '{adapter_dir}' was trained for another base: its LoRA on '{name}' has {what} size "
                f"{found} but this base's layer has {expected}{_hidden_sizes(base)}. Load the adapter onto the base "
                "it was trained with."
            )


def _hidden_sizes(model) -> str:
    config = getattr(model, "config", None)
    vision, text = getattr(config, "vision_config", None), getattr(config, "text_config", None)
    if vision is None or text is None:
        return ""
    return f" (this base: vision hidden size {vision.hidden_size}, text hidden size {text.hidden_size})"


# ---- synthetic data ----------------------------------------------------------------------------------------
SYNTHETIC_COLOURS = {
    "red": (220, 30, 30), "green": (30, 170, 60), "blue": (30, 70, 220),
    "yellow": (240, 210, 30), "purple": (140, 50, 180), "orange": (245, 130, 20),
}
SYNTHETIC_SHAPES = ("circle", "square", "triangle")
SYNTHETIC_WORDS = ("stop", "open", "cat", "sun", "map", "tea", "bus", "red")
_SYNTHETIC_QUESTIONS = {
    "colour": "What color is the shape?",
    "shape": "What shape is in the image?",
    "word": "What word is written in the image?",
}


def synthetic_shapes_dataset(num_rows: int, seed: int = 0, image_size: int = 64):
    """A deterministic `datasets.Dataset` of drawn images: one coloured shape and one written word on a grey
    background, with a question about the colour, the shape or the word (columns id, image, question, answers)."""
    import datasets
    import PIL.Image
    import PIL.ImageDraw
    import PIL.ImageFont

    if not isinstance(num_rows, int) or num_rows < 1:
        raise ValueError(f"num_rows must be a positive integer, got {num_rows!r}")
    if not isinstance(image_size, int) or image_size < 32:
        raise ValueError(f"image_size must be an integer >= 32, got {image_size!r}")
    rng = random.Random(seed)
    font = PIL.ImageFont.load_default()
    records = {"id": [], "image": [], "question": [], "answers": []}
    for index in range(num_rows):
        colour, shape, word = rng.choice(list(SYNTHETIC_COLOURS)), rng.choice(SYNTHETIC_SHAPES), rng.choice(
            SYNTHETIC_WORDS)
        image = PIL.Image.new("RGB", (image_size, image_size), (200, 200, 200))
        draw = PIL.ImageDraw.Draw(image)
        side = rng.randint(image_size // 3, image_size // 2)
        left = rng.randint(0, image_size - side)
        top = rng.randint(image_size // 4, image_size - side)
        box = (left, top, left + side - 1, top + side - 1)
        fill = SYNTHETIC_COLOURS[colour]
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            corners = [(left + side // 2, top), (left, top + side - 1), (left + side - 1, top + side - 1)]
            draw.polygon(corners, fill=fill)
        draw.text((2, 1), word, fill=(0, 0, 0), font=font)
        kind = rng.choice(list(_SYNTHETIC_QUESTIONS))
        answer = {"colour": colour, "shape": shape, "word": word}[kind]
        for column, value in zip(records, (index, image, _SYNTHETIC_QUESTIONS[kind], [answer])):
            records[column].append(value)
    features = datasets.Features({
        "id": datasets.Value("int64"), "image": datasets.Image(),
        "question": datasets.Value("string"), "answers": datasets.List(datasets.Value("string")),
    })
    return datasets.Dataset.from_dict(records, features=features)
