"""The research plan's LoRA recipe (issue 15 item 5): "baseline" = the native view in the budget list, bias
"lora_only", a separate learning rate for the trained base projector parameters (lr_mm), optimiser defaults."""

import pytest
import torch
from peft import get_peft_model
from safetensors.torch import load_file
from transformers import TrainingArguments

from shirg_hf import ShirgLavidaConfig, ShirgLavidaProcessor, build_tiny_tokenizer
from shirg_hf.modeling.modeling_shirg_lavida import ShirgLavidaForDiffusionLM
from shirg_hf.train import RECIPE_DEFAULTS, main, parse_arguments
from shirg_hf.training import (
    ShirgDiffusionCollator,
    ShirgDiffusionTrainer,
    projector_lora_config,
    resolve_budgets,
    synthetic_shapes_dataset,
)

MASK_ID = 511


def tiny_processor():
    return ShirgLavidaProcessor.from_model_config(ShirgLavidaConfig.tiny(), build_tiny_tokenizer())


def test_command_defaults_are_the_plans_optimiser_recipe(tmp_path):
    _, args = parse_arguments(["--output_dir", str(tmp_path)])
    assert (args.learning_rate, str(args.lr_scheduler_type.value), args.warmup_steps, args.weight_decay) == \
        (1e-4, "cosine", 0.03, 0.0) == tuple(RECIPE_DEFAULTS.values())
    _, args = parse_arguments(["--output_dir", str(tmp_path), "--learning_rate", "1e-2", "--lr_scheduler_type",
                               "linear"])
    assert args.learning_rate == 1e-2 and str(args.lr_scheduler_type.value) == "linear"


def test_baseline_budget_is_the_native_view_and_batches_use_it():
    processor = tiny_processor()
    assert resolve_budgets(["baseline", 64, 48], processor) == ("lowres", 64, 48)
    with pytest.raises(ValueError, match="same K more than once"):
        resolve_budgets(["baseline", "lowres"], processor)
    collator = ShirgDiffusionCollator(processor, MASK_ID, budgets=("baseline",), seed=0)
    rows = synthetic_shapes_dataset(2, seed=0)
    batch = collator([rows[0], rows[1]])
    native = ShirgLavidaConfig.tiny().geometry.grid("native")
    assert batch["vision_mode"] == "lowres" and "shirg_budget" not in batch
    assert tuple(batch["pixel_values"].shape[-2:]) == (ShirgLavidaConfig.tiny().vision_config.image_size,) * 2
    assert int(batch["input_ids"][0].eq(ShirgLavidaConfig.tiny().image_token_id).sum()) == native[0] * native[1]


def test_lora_only_bias_trains_and_saves_the_projector_biases_only():
    model = get_peft_model(ShirgLavidaForDiffusionLM(ShirgLavidaConfig.tiny()), projector_lora_config(bias="lora_only"))
    trainable = sorted(name for name, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted([f"base_model.model.multi_modal_projector.linear_{i}.lora_{m}.default.weight"
                                for i in (1, 2) for m in "AB"] +
                               [f"base_model.model.multi_modal_projector.linear_{i}.base_layer.bias" for i in (1, 2)])
    assert projector_lora_config(bias="lora").bias == "lora_only"  # the plan's spelling
    with pytest.raises(ValueError, match="LoRA bias must be one of"):
        projector_lora_config(bias="all")


def test_lr_mm_sets_the_base_projector_group_and_a_run_saves_trained_biases(tmp_path):
    base = tmp_path / "base"
    config = ShirgLavidaConfig.tiny()
    torch.manual_seed(0)
    reference = ShirgLavidaForDiffusionLM(config)
    reference.save_pretrained(base)
    ShirgLavidaProcessor.from_model_config(config, build_tiny_tokenizer()).save_pretrained(base)
    run = tmp_path / "run"
    trainer = main(["--base", str(base), "--output_dir", str(run), "--budgets", "baseline,64,48",
                    "--lora_bias", "lora_only", "--lr_mm", "2e-3", "--learning_rate", "1e-2", "--max_steps", "3",
                    "--per_device_train_batch_size", "2", "--synthetic_rows", "8", "--eval_size", "4",
                    "--use_cpu", "True", "--disable_tqdm", "True", "--report_to", "none", "--save_strategy", "no"])
    groups = trainer.optimizer.param_groups
    base_names = set(trainer.base_projector_parameters())
    assert len(base_names) == 2 and all(name.endswith("base_layer.bias") for name in base_names)
    by_id = {id(p): name for name, p in trainer.model.named_parameters()}
    for group in groups:
        names = {by_id[id(p)] for p in group["params"]}
        assert names <= base_names or not names & base_names
        assert group["initial_lr"] == (2e-3 if names <= base_names else 1e-2)
    saved = load_file(str(run / "adapter_model.safetensors"))
    biases = {key: value for key, value in saved.items() if key.endswith(".bias")}
    assert len(biases) == 2
    for key, value in biases.items():
        name = key.replace("base_model.model.", "").replace(".base_layer", "")
        assert not torch.equal(value, reference.state_dict()[name])  # they trained
    with pytest.raises(ValueError, match="lr_mm"):
        ShirgDiffusionTrainer(model=get_peft_model(ShirgLavidaForDiffusionLM(config), projector_lora_config()),
                              args=TrainingArguments(output_dir=str(tmp_path / "refused"), report_to=[]),
                              data_collator=ShirgDiffusionCollator(tiny_processor(), MASK_ID, budgets=(64,)),
                              lr_mm=1e-3)
