"""`shirg-hf train`: fine-tune only the projector LoRA of a SHIRG-LaViDa model with the Hugging Face Trainer.

One adapter learns every keep budget: each batch draws a budget K (or a non-selecting vision mode such as
`lowres`) from --budgets, and the loss is LaViDa's masked-diffusion objective (complementary masking,
prefix-DLM attention by default). Only the two projector Linear layers carry LoRA; the SigLIP tower and LLaDA
stay frozen. Every TrainingArguments flag works (--learning_rate, --max_steps, --eval_strategy, --save_steps,
--resume_from_checkpoint, --bf16, --deepspeed, --fsdp, ...). Checkpoints hold the adapter only; the final adapter,
the processor and `training_record.json` are saved to --output_dir. Launch it with `torchrun` or `accelerate
launch` for several processes (each rank trains on its own shard; all ranks draw the same budget per step).

--dataset follows the data schema of `shirg_hf.data` (the one `shirg-hf eval` reads): a `save_to_disk` folder or
a .json/.jsonl/.csv/.parquet file with image, question and answers (or the alias answer) columns; a name that is
not a local path is passed to `datasets.load_dataset`.
"""

import argparse
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
from peft import PeftModel, get_peft_model
from transformers import HfArgumentParser, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from .data import absolute_image_paths, load_vqa_data, with_answers
from .export import write_adapter_card
from .fileio import apply_default_permissions, write_json_atomically
from .modeling.configuration_shirg_lavida import ShirgLavidaConfig
from .modeling.modeling_shirg_lavida import ShirgLavidaForDiffusionLM
from .processing.processing_shirg_lavida import ShirgLavidaProcessor
from .processing.visual_tokens import get_vision_mode
from .tokenization import build_tiny_tokenizer
from .training import (
    DEFAULT_BUDGETS,
    ShirgDiffusionCollator,
    ShirgDiffusionTrainer,
    check_adapter_matches_model,
    check_dataset_columns,
    count_parameters,
    lora_state_dict,
    projector_lora_config,
    synthetic_shapes_dataset,
)

DEFAULT_LORA = {"lora_rank": 16, "lora_alpha": 32, "lora_dropout": 0.05, "lora_bias": "none"}
# The research plan's optimiser recipe, the command's defaults (any TrainingArguments flag overrides them): AdamW
# at 1e-4, cosine decay after a linear warm-up over 3 % of the steps, no weight decay.
RECIPE_DEFAULTS = {"learning_rate": 1e-4, "lr_scheduler_type": "cosine", "warmup_steps": 0.03, "weight_decay": 0.0}
TRAINING_RECORD_NAME = "training_record.json"  # read by `shirg-hf export` for the model card


@dataclass
class ScriptArguments:
    base: str = field(default="tiny", metadata={
        "help": "A saved ShirgLavida model folder (with its processor), or 'tiny' for a random tiny model built "
                "in-process from --seed (saved to OUTPUT_DIR/base-model so the adapter has a base to load onto)."})
    dataset: str | None = field(default=None, metadata={
        "help": "Training data (see the module doc). Default: a synthetic shapes/colours/text data set."})
    train_split: str = field(default="train", metadata={"help": "Split to train on when --dataset has splits."})
    eval_split: str = field(default="validation", metadata={
        "help": "Split to evaluate on; when absent, --eval_size rows are held out of the training split."})
    eval_size: int = field(default=32, metadata={"help": "Held-out (or synthetic) evaluation rows."})
    synthetic_rows: int = field(default=512, metadata={"help": "Rows of the synthetic training set."})
    budgets: str | None = field(default=None, metadata={
        "help": "Comma-separated keep budgets drawn per batch (selecting vision modes): 'baseline' (the native view), "
                "'full' (all patches), integers K, fractions of the model's high-res patches in (0, 1], or a "
                "non-selecting vision mode such as 'lowres' (that batch uses the native view). Default "
                "baseline,1024,768,512 (the research plan's recipe), which fits the 2,304-patch LaViDa model; the "
                "tiny model has 144 patches (e.g. full,64,48,32)."})
    lora_rank: int | None = field(default=None, metadata={"help": "LoRA rank (16 unless --adapter)."})
    lora_alpha: int | None = field(default=None, metadata={"help": "LoRA alpha (32 unless --adapter)."})
    lora_dropout: float | None = field(default=None, metadata={"help": "LoRA dropout (0.05 unless --adapter)."})
    lora_bias: str | None = field(default=None, metadata={
        "help": "'none' (default unless --adapter) or 'lora_only' (the plan's bias: lora; the projector Linear "
                "biases train and are saved with the adapter)."})
    lr_mm: float | None = field(default=None, metadata={
        "help": "Learning rate of the trained base projector parameters (their biases, with --lora_bias "
                "lora_only); the LoRA matrices use --learning_rate. Default: --learning_rate for all."})
    adapter: str | None = field(default=None, metadata={
        "help": "Start from this saved projector adapter instead of a fresh LoRA (its rank/alpha are kept)."})
    inverse_p_weighting: bool = field(default=False, metadata={
        "help": "LLaDA's 1/p-weighted loss instead of LaViDa's mean cross-entropy over masked tokens."})
    min_answer_length: int | None = field(default=None, metadata={
        "help": "Pad every answer window to at least this many positions with EOS targets (e.g. the generation "
                "length), so the model learns to fill a long window with <|endoftext|>."})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Allow training into an --output_dir that already holds an adapter or checkpoints (without it such a "
                "folder is refused unless --resume_from_checkpoint is given)."})
    sample_log: bool = field(default=False, metadata={
        "help": "Write OUTPUT_DIR/sample_log/rank<R>.json per process: the `id` of every training row it saw "
                "and a SHA-256 of its final LoRA weights (a data-parallel audit; needs an `id` column)."})


def parse_arguments(argv=None) -> tuple[ScriptArguments, TrainingArguments]:
    parser = HfArgumentParser((ScriptArguments, TrainingArguments))
    # The collator reads the raw image/question/answer columns; the LoRA'd projector is used by every batch.
    # Training keeps its progress bar when the command silences the libraries; pinned memory only helps CUDA.
    parser.set_defaults(remove_unused_columns=False, ddp_find_unused_parameters=False, disable_tqdm=False,
                        dataloader_pin_memory=torch.cuda.is_available(), **RECIPE_DEFAULTS)
    script_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    if training_args.remove_unused_columns:
        raise ValueError("--remove_unused_columns must stay False: the collator needs the raw image/question/answer "
                         "columns.")
    if script_args.sample_log and training_args.dataloader_num_workers:
        raise ValueError("--sample_log records rows in the main process: use --dataloader_num_workers 0.")
    if script_args.adapter is not None:
        given = [f"--{name}" for name in DEFAULT_LORA if getattr(script_args, name) is not None]
        if given:
            raise ValueError(f"{', '.join(given)} cannot change the shape of the adapter given with --adapter; "
                             "drop them (the adapter's own LoRA settings are used).")
    return script_args, training_args


def load_base(script_args: ScriptArguments, training_args: TrainingArguments):
    """(model, processor, base path recorded in the adapter config); `main` saves a tiny base there."""
    if script_args.base == "tiny":
        config = ShirgLavidaConfig.tiny()
        torch.manual_seed(training_args.seed)  # every process builds the same random weights
        model = ShirgLavidaForDiffusionLM(config)
        processor = ShirgLavidaProcessor.from_model_config(config, build_tiny_tokenizer())
        return model, processor, str(Path(training_args.output_dir).resolve() / "base-model")
    base_dir = Path(script_args.base)
    if not (base_dir / "config.json").is_file():
        raise FileNotFoundError(f"--base '{base_dir}' is not a saved model folder (no config.json); pass a folder "
                                "written by save_pretrained / `shirg-hf convert-lavida`, or 'tiny'.")
    if not (base_dir / "processor_config.json").is_file():
        raise FileNotFoundError(f"--base '{base_dir}' has no processor_config.json: save the model's processor "
                                "there (ShirgLavidaProcessor.from_model_config(config, tokenizer).save_pretrained).")
    model = ShirgLavidaForDiffusionLM.from_pretrained(base_dir)
    processor = ShirgLavidaProcessor.from_pretrained(base_dir)
    config = model.config
    expected = (config.vision_mode, config.num_highres_patches, config.image_token_id)
    found = (processor.vision_mode, processor.num_highres_patches, processor.image_token_id)
    if found != expected:
        raise ValueError(f"the processor in '{base_dir}' (vision mode, high-res patches, image token id) = {found} "
                         f"does not match the model's {expected}; save ShirgLavidaProcessor.from_model_config(config, "
                         "tokenizer) with the model.")
    return model, processor, str(base_dir.resolve())  # absolute: the adapter must find it from anywhere


def load_datasets(script_args: ScriptArguments, seed: int):
    """(train, eval) `datasets.Dataset`s in the data schema (`shirg_hf.data`)."""
    if script_args.dataset is None:
        train = synthetic_shapes_dataset(script_args.synthetic_rows, seed=seed)
        evaluation = synthetic_shapes_dataset(script_args.eval_size, seed=seed + 1)
    else:
        path = Path(script_args.dataset)
        loaded = load_vqa_data(path, "--dataset")[0] if path.exists() else datasets.load_dataset(script_args.dataset)
        train, evaluation = loaded, None
        if isinstance(loaded, datasets.DatasetDict):
            if script_args.train_split not in loaded:
                raise ValueError(f"--dataset has splits {list(loaded)}, not --train_split "
                                 f"'{script_args.train_split}'.")
            train, evaluation = loaded[script_args.train_split], loaded.get(script_args.eval_split)
        if evaluation is None:
            if not 0 < script_args.eval_size < len(train):
                raise ValueError(f"cannot hold out --eval_size {script_args.eval_size} of {len(train)} training rows; "
                                 "add an evaluation split or change --eval_size.")
            split = train.train_test_split(test_size=script_args.eval_size, seed=seed)
            train, evaluation = split["train"], split["test"]
        if path.exists():  # image paths are relative to the data file, as `shirg-hf eval` reads them
            train, evaluation = absolute_image_paths(train, path), absolute_image_paths(evaluation, path)
    train, evaluation = with_answers(train), with_answers(evaluation)
    check_dataset_columns(train, "the training set")
    check_dataset_columns(evaluation, "the evaluation set")
    return train, evaluation


def add_projector_lora(model, script_args: ScriptArguments, base_path: str):
    if script_args.adapter is not None:
        model = PeftModel.from_pretrained(model, script_args.adapter, is_trainable=True)
    else:
        settings = {name: default if getattr(script_args, name) is None else getattr(script_args, name)
                    for name, default in DEFAULT_LORA.items()}
        model = get_peft_model(model, projector_lora_config(
            rank=settings["lora_rank"], alpha=settings["lora_alpha"], dropout=settings["lora_dropout"],
            bias=settings["lora_bias"]))
    model.peft_config["default"].base_model_name_or_path = base_path
    return model


def check_output_dir(training_args: TrainingArguments, script_args: ScriptArguments) -> None:
    """Never replace an earlier run's adapter or checkpoints without being asked."""
    output_dir = Path(training_args.output_dir)
    earlier = sorted(p.name for p in output_dir.glob("checkpoint-*")) + \
        [name for name in ("adapter_config.json", "adapter_model.safetensors") if (output_dir / name).exists()]
    if earlier and training_args.resume_from_checkpoint is None and not script_args.overwrite_output_dir:
        raise FileExistsError(
            f"--output_dir {output_dir} already holds {earlier[:3]}{' ...' if len(earlier) > 3 else ''} from an earlier "
            "run: pass --resume_from_checkpoint True to continue it, --overwrite_output_dir True to replace it, or "
            "choose another --output_dir."
        )


def resolve_checkpoint(training_args: TrainingArguments, model) -> str | None:
    """The checkpoint to resume from (`--resume_from_checkpoint PATH` or `True` for the latest), checked."""
    requested = training_args.resume_from_checkpoint
    if requested is None:
        return None
    if requested.lower() == "true":
        checkpoint = get_last_checkpoint(training_args.output_dir) if Path(training_args.output_dir).is_dir() else None
        if checkpoint is None:
            raise FileNotFoundError(f"--resume_from_checkpoint True: no checkpoint-* folder in "
                                    f"'{training_args.output_dir}'.")
    else:
        checkpoint = requested
        if not Path(checkpoint).is_dir():
            raise FileNotFoundError(f"--resume_from_checkpoint '{checkpoint}' is not a folder.")
    check_adapter_matches_model(checkpoint, model)
    return checkpoint


class RecordingCollator(ShirgDiffusionCollator):
    """Also remembers the `id`s of every training batch it collates, by batch index (--sample_log)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.training_batches = {}

    def __call__(self, rows):
        index = self.batches_drawn
        batch = super().__call__(rows)
        if not self.is_evaluating:
            self.training_batches[index] = [int(row["id"]) for row in rows]
        return batch

    def trained_ids(self, global_step: int, gradient_accumulation_steps: int) -> list[int]:
        """Ids of the batches optimised on (the data loader collates one batch ahead of the last step)."""
        trained = global_step * gradient_accumulation_steps
        return [i for index, ids in sorted(self.training_batches.items()) if index < trained for i in ids]


def select_budgets(budgets: str | None, vision_mode: str) -> list[str] | None:
    if not get_vision_mode(vision_mode).selects:
        if budgets is not None:
            raise ValueError(f"--budgets applies to selecting vision modes only; this base uses {vision_mode!r}.")
        return None
    return (budgets or ",".join(str(budget) for budget in DEFAULT_BUDGETS)).split(",")


def lora_sha256(model) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(lora_state_dict(model).items()):
        digest.update(name.encode())
        digest.update(tensor.float().contiguous().numpy().tobytes())
    return digest.hexdigest()


def main(argv=None) -> ShirgDiffusionTrainer:
    script_args, training_args = parse_arguments(argv)
    check_output_dir(training_args, script_args)
    model, processor, base_path = load_base(script_args, training_args)
    train, evaluation = load_datasets(script_args, training_args.seed)
    if script_args.sample_log and "id" not in train.column_names:
        raise ValueError("--sample_log needs an `id` column in the training set.")
    collator_class = RecordingCollator if script_args.sample_log else ShirgDiffusionCollator
    collator = collator_class(
        processor, mask_token_id=model.config.text_config.mask_token_id,
        budgets=select_budgets(script_args.budgets, processor.vision_mode),
        seed=training_args.seed, inverse_p_weighting=script_args.inverse_p_weighting,
        min_answer_length=script_args.min_answer_length,
    )
    if script_args.adapter is not None:
        check_adapter_matches_model(script_args.adapter, model)
    checkpoint = resolve_checkpoint(training_args, model)
    if script_args.base == "tiny" and training_args.should_save:  # all checks passed: give the adapter its base
        model.save_pretrained(base_path)
        processor.save_pretrained(base_path)
    model = add_projector_lora(model, script_args, base_path)
    counts = count_parameters(model)
    if training_args.should_log:
        print(f"trainable parameters: {counts['trainable']:,} of {counts['total']:,} (projector LoRA); "
              f"budgets {collator.budgets}")

    trainer = ShirgDiffusionTrainer(
        model=model, args=training_args, train_dataset=train, eval_dataset=evaluation,
        data_collator=collator, processing_class=processor, lr_mm=script_args.lr_mm,
    )
    train_result = trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model()  # adapter (PeftModel.save_pretrained) + processor, on the main process
    if trainer.is_world_process_zero():  # read by `shirg-hf export` for the model card
        record = {"budgets": list(collator.budgets), "dataset": script_args.dataset or "synthetic shapes (on the fly)",
                  "max_steps": trainer.state.global_step, "learning_rate": training_args.learning_rate,
                  "seed": training_args.seed, "loss": "1/p-weighted (LLaDA)" if script_args.inverse_p_weighting
                  else "mean masked CE (LaViDa)", "lr_scheduler": str(training_args.lr_scheduler_type),
                  "warmup_steps": training_args.warmup_steps, "weight_decay": training_args.weight_decay,
                  "lora_bias": model.peft_config["default"].bias, "lr_mm": script_args.lr_mm}
        write_json_atomically(Path(training_args.output_dir) / TRAINING_RECORD_NAME, record)
    trainer.log_metrics("train", train_result.metrics)
    trainer.save_metrics("train", train_result.metrics)
    if training_args.eval_strategy != "no" or training_args.do_eval:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        if trainer.is_world_process_zero():
            record["eval_loss"] = metrics.get("eval_loss")
            write_json_atomically(Path(training_args.output_dir) / TRAINING_RECORD_NAME, record)
    if trainer.is_world_process_zero():
        output_dir = Path(training_args.output_dir)
        write_adapter_card(output_dir, model.peft_config["default"], base_path, record)
        apply_default_permissions(output_dir)
    if script_args.sample_log:
        log_dir = Path(training_args.output_dir) / "sample_log"
        log_dir.mkdir(parents=True, exist_ok=True)
        step = trainer.state.global_step
        record = {"rank": training_args.process_index, "world_size": training_args.world_size, "global_step": step,
                  "training_ids": collator.trained_ids(step, training_args.gradient_accumulation_steps),
                  "lora_sha256": lora_sha256(trainer.model)}
        write_json_atomically(log_dir / f"rank{training_args.process_index}.json", record)
    return trainer


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", add_help=False, help="fine-tune the projector LoRA (HF Trainer; every TrainingArguments flag)",
        description=__doc__.splitlines()[0],
    )
    parser.set_defaults(func=run, passes_arguments=True)


def run(args: argparse.Namespace) -> int:
    main(args.passed_arguments)
    return 0
