"""Projector-LoRA fine-tuning: the collator, the budget and adapter checks, and examples/train_lora.py end to end."""

import importlib.util
import shutil
from pathlib import Path

import datasets
import PIL.Image
import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from shirg_hf import LladaConfig, ShirgLavidaConfig, ShirgLavidaProcessor, build_tiny_tokenizer
from shirg_hf.modeling.modeling_shirg_lavida import ShirgLavidaForDiffusionLM
from shirg_hf import training
from shirg_hf.training import (
    ShirgDiffusionCollator,
    check_adapter_matches_model,
    check_dataset_columns,
    count_parameters,
    projector_lora_config,
    resolve_budgets,
    synthetic_shapes_dataset,
)

from conftest import assert_fp32_close, merged_lora_reduction_length

TINY_BUDGETS = ("full", 64, 48, 32)
MASK_ID, PAD_ID, EOT_ID = 511, 510, 503


def load_example():
    path = Path(__file__).resolve().parents[1] / "examples" / "train_lora.py"
    spec = importlib.util.spec_from_file_location("train_lora_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train_lora = load_example()


def tiny_processor(**config_overrides):
    return ShirgLavidaProcessor.from_model_config(ShirgLavidaConfig.tiny(**config_overrides), build_tiny_tokenizer())


def rows(count: int = 3, seed: int = 0) -> list[dict]:
    dataset = synthetic_shapes_dataset(count, seed=seed)
    return [dataset[index] for index in range(count)]


def save_tiny_base(folder: Path, seed: int = 0, **config_overrides) -> Path:
    config = ShirgLavidaConfig.tiny(**config_overrides)
    torch.manual_seed(seed)
    ShirgLavidaForDiffusionLM(config).save_pretrained(folder)
    ShirgLavidaProcessor.from_model_config(config, build_tiny_tokenizer()).save_pretrained(folder)
    return folder


def script_args(base: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        "--base", str(base), "--output_dir", str(output_dir), "--budgets", ",".join(map(str, TINY_BUDGETS)),
        "--max_steps", "12", "--learning_rate", "1e-2", "--per_device_train_batch_size", "2",
        "--per_device_eval_batch_size", "8", "--synthetic_rows", "48", "--eval_size", "8", "--logging_steps", "1",
        "--save_steps", "6", "--eval_strategy", "steps", "--eval_steps", "12", "--eval_on_start", "True",
        "--use_cpu", "True", "--disable_tqdm", "True", "--report_to", "none", "--seed", "0", *extra,
    ]


# ---- collator -------------------------------------------------------------------------------------------
def test_collator_builds_complementary_copies_of_prompt_answer_and_eos_padding():
    processor = tiny_processor()
    collator = ShirgDiffusionCollator(processor, MASK_ID, budgets=TINY_BUDGETS, seed=3)
    batch_rows = rows(3)
    batch = collator(batch_rows)
    budget = batch["shirg_budget"]
    assert budget in (144, 64, 48, 32)
    ids, labels, prefix_lengths = batch["input_ids"], batch["labels"], batch["prefix_lengths"]
    assert ids.shape == labels.shape == batch["attention_mask"].shape and ids.shape[0] == 6
    assert bool((batch["attention_mask"] == 1).all())
    assert "p_mask" not in batch

    for row, sample in enumerate(batch_rows):
        alone = processor(images=[sample["image"]], text=[training.build_prompt(sample["question"])],
                          shirg_budget=budget)["input_ids"][0]
        prompt_length = len(alone)
        answer = processor.tokenizer(sample["answers"][0] + "<|eot_id|>", add_special_tokens=False)["input_ids"]
        assert int(prefix_lengths[row]) == int(prefix_lengths[row + 3]) == prompt_length
        clean = torch.where(labels[row] != -100, labels[row], ids[row])  # [T]
        assert torch.equal(clean[:prompt_length], alone)  # the prompt is never masked
        assert clean[prompt_length : prompt_length + len(answer)].tolist() == answer
        assert bool((clean[prompt_length + len(answer):] == PAD_ID).all())  # EOS padding up to the batch length
        targets = (labels[row] != -100).long() + (labels[row + 3] != -100).long()  # [T]
        assert bool((targets[:prompt_length] == 0).all()) and bool((targets[prompt_length:] == 1).all())
        assert bool((ids[row][labels[row] != -100] == MASK_ID).all())
        assert bool((labels[row] != -100).any())  # the first copy always has a target
        assert (int((alone == 504).sum())) == processor.num_image_tokens(budget=budget)
    assert batch["pixel_values"].shape[0] == 3  # each image once; both copies of row b use image b
    assert batch["image_rows"].tolist() == [0, 1, 2, 0, 1, 2]


def test_collator_batch_is_a_valid_model_input_and_p_mask_selects_the_inverse_p_loss():
    config = ShirgLavidaConfig.tiny()
    torch.manual_seed(0)
    model = ShirgLavidaForDiffusionLM(config)
    processor = ShirgLavidaProcessor.from_model_config(config, build_tiny_tokenizer())
    collator = ShirgDiffusionCollator(processor, MASK_ID, budgets=TINY_BUDGETS, inverse_p_weighting=True,
                                      min_answer_length=12)
    batch = collator(rows(2))
    p_mask = batch["p_mask"]
    assert p_mask.shape == (4,)
    torch.testing.assert_close(p_mask[2:], 1 - p_mask[:2])
    assert int((batch["input_ids"].shape[1] - batch["prefix_lengths"]).min()) >= 12
    output = model(**batch)
    mean_ce = model(**{key: value for key, value in batch.items() if key != "p_mask"}).loss
    assert torch.isfinite(output.loss) and torch.isfinite(mean_ce) and not torch.equal(output.loss, mean_ce)


@pytest.mark.parametrize("vision_mode", ["full", "lowres", "lavida-hd"])
def test_collator_serves_the_other_vision_modes_without_budgets(vision_mode):
    config = ShirgLavidaConfig.tiny(vision_mode=vision_mode)
    torch.manual_seed(0)
    model = ShirgLavidaForDiffusionLM(config)
    processor = ShirgLavidaProcessor.from_model_config(config, build_tiny_tokenizer())
    batch = ShirgDiffusionCollator(processor, MASK_ID, budgets=None)(rows(2))
    assert "shirg_budget" not in batch and batch["pixel_values"].shape[0] == 2
    assert batch["image_rows"].tolist() == [0, 1, 0, 1]
    if vision_mode == "lavida-hd":
        assert batch["image_sizes"].shape == (2, 2)
    assert torch.isfinite(model(**batch).loss)
    with pytest.raises(ValueError, match="only apply to selecting vision modes"):
        ShirgDiffusionCollator(processor, MASK_ID)


def test_collator_draws_are_deterministic_per_seed_and_batch_and_evaluation_restarts_its_stream(monkeypatch):
    processor = tiny_processor()
    batch_rows = rows(2)

    def draws(seed, count=6):
        collator = ShirgDiffusionCollator(processor, MASK_ID, budgets=TINY_BUDGETS, seed=seed)
        return [collator(batch_rows) for _ in range(count)], collator

    def same(a, b):
        return a["shirg_budget"] == b["shirg_budget"] and torch.equal(a["input_ids"], b["input_ids"]) and \
            torch.equal(a["labels"], b["labels"])

    first, collator = draws(seed=1)
    again, _ = draws(seed=1)
    other, _ = draws(seed=2)
    assert all(same(a, b) for a, b in zip(first, again))
    assert not any(same(a, b) for a, b in zip(first, other))
    assert len({batch["shirg_budget"] for batch in first}) > 1  # one adapter sees several budgets
    assert not same(first[0], first[1]) and not same(first[1], first[2])  # fresh draws per batch

    with collator.evaluation_stream():
        evaluation = [collator(batch_rows) for _ in range(2)]
    with collator.evaluation_stream():
        evaluation_again = [collator(batch_rows) for _ in range(2)]
    assert collator.batches_drawn == 6 and not collator.is_evaluating
    assert all(same(a, b) for a, b in zip(evaluation, evaluation_again))
    assert not any(same(a, b) for a, b in zip(evaluation, first))  # a stream of its own

    # Another DDP rank: the same budget at each step (balanced lengths), different masks.
    monkeypatch.setattr(training, "_rank", lambda: 1)
    rank_one, _ = draws(seed=1)
    assert [b["shirg_budget"] for b in rank_one] == [b["shirg_budget"] for b in first]
    assert not any(torch.equal(a["labels"], b["labels"]) for a, b in zip(first, rank_one))


def test_collator_in_dataloader_workers_repeats_evaluations_and_redraws_training_epochs():
    collator = ShirgDiffusionCollator(tiny_processor(), MASK_ID, budgets=TINY_BUDGETS)
    loader = torch.utils.data.DataLoader(synthetic_shapes_dataset(4), batch_size=2, collate_fn=collator,
                                         num_workers=1)

    def evaluate():
        with collator.evaluation_stream():
            return list(loader)

    def labels(batches):
        return [batch["labels"] for batch in batches]

    first, second = evaluate(), evaluate()
    assert all(torch.equal(a, b) for a, b in zip(labels(first), labels(second), strict=True))
    epoch_one, epoch_two = list(loader), list(loader)
    assert not any(a.shape == b.shape and torch.equal(a, b) for a, b in zip(labels(epoch_one), labels(epoch_two)))


def test_collator_row_content_does_not_depend_on_the_other_rows():
    processor = tiny_processor()
    collator = ShirgDiffusionCollator(processor, MASK_ID, budgets=(48,), complementary=False)
    batch_rows = rows(3)
    together = collator(batch_rows)
    for row, sample in enumerate(batch_rows):
        alone = collator([sample])
        length = alone["input_ids"].shape[1]
        clean_alone = torch.where(alone["labels"] != -100, alone["labels"], alone["input_ids"])[0]
        clean_together = torch.where(together["labels"] != -100, together["labels"], together["input_ids"])[row]
        assert torch.equal(clean_together[:length], clean_alone)
        assert bool((clean_together[length:] == PAD_ID).all())
        assert int(alone["prefix_lengths"][0]) == int(together["prefix_lengths"][row])
        torch.testing.assert_close(alone["pixel_values"][0], together["pixel_values"][row], rtol=0, atol=0)


def test_collator_rejects_rows_without_the_needed_columns_and_bad_settings():
    processor = tiny_processor()
    collator = ShirgDiffusionCollator(processor, MASK_ID, budgets=TINY_BUDGETS)
    with pytest.raises(ValueError, match=r"lacks \['answers'\].*remove_unused_columns=False"):
        collator([{"image": rows(1)[0]["image"], "question": "What is it?"}])
    with pytest.raises(ValueError, match="'answers' must be a non-empty list of strings"):
        collator([{**rows(1)[0], "answers": [3]}])
    row = rows(1)[0]
    alias = {**{key: value for key, value in row.items() if key != "answers"}, "answer": row["answers"][0]}
    with_alias = ShirgDiffusionCollator(processor, MASK_ID, budgets=TINY_BUDGETS)([alias])  # the documented alias
    with_answers = ShirgDiffusionCollator(processor, MASK_ID, budgets=TINY_BUDGETS)([row])
    assert torch.equal(with_alias["labels"], with_answers["labels"])
    with pytest.raises(ValueError, match="mask_token_id"):
        ShirgDiffusionCollator(processor, 4096, budgets=TINY_BUDGETS)
    with pytest.raises(ValueError, match="answer_suffix"):
        ShirgDiffusionCollator(processor, MASK_ID, budgets=TINY_BUDGETS, answer_suffix="<|not_a_token|>")
    with pytest.raises(ValueError, match="needs keep budgets"):
        ShirgDiffusionCollator(processor, MASK_ID, budgets=None)


# ---- budgets --------------------------------------------------------------------------------------------
def test_budgets_resolve_against_the_model_and_never_get_substituted():
    processor = tiny_processor()  # 12x12 = 144 patches, coverage 4x4
    assert resolve_budgets(["full", "64", 0.25], processor) == (144, 64, 36)
    assert resolve_budgets(("baseline",), processor) == ("lowres",)  # the plan's baseline: the native view
    with pytest.raises(ValueError, match=r"budget 1024 \(K = 1024\) does not fit this model \(144 high-res patches"):
        ShirgDiffusionCollator(processor, MASK_ID)  # the 8B defaults (baseline, 1024, 768, 512)
    with pytest.raises(ValueError, match=r"K = 8.*\[16, 144\]"):
        resolve_budgets([8], processor)  # fewer than the 16 coverage cells
    with pytest.raises(ValueError, match="same K more than once"):
        resolve_budgets(["full", 144], processor)
    with pytest.raises(ValueError, match=r"fractional budget 1.5 must lie in \(0, 1\]"):
        resolve_budgets([1.5], processor)
    with pytest.raises(ValueError, match="cannot read budget 'half'"):
        resolve_budgets(["half"], processor)
    with pytest.raises(ValueError, match="only apply to selecting vision modes"):
        resolve_budgets(["full"], tiny_processor(vision_mode="full"))
    assert resolve_budgets(["lowres", 64], processor) == ("lowres", 64)  # the native view mixed into SHIRG batches
    real = ShirgLavidaProcessor.from_model_config(ShirgLavidaConfig.lavida_llada_8b(image_token_id=504),
                                                  build_tiny_tokenizer())
    assert resolve_budgets(training.DEFAULT_BUDGETS, real) == ("lowres", 1024, 768, 512)


# ---- LoRA config, adapters, data ------------------------------------------------------------------------
def test_projector_lora_targets_only_the_projector_and_counts_parameters():
    config = ShirgLavidaConfig.tiny()
    model = get_peft_model(ShirgLavidaForDiffusionLM(config), projector_lora_config())
    trainable = sorted(name for name, parameter in model.named_parameters() if parameter.requires_grad)
    assert trainable == [f"base_model.model.multi_modal_projector.linear_{i}.lora_{m}.default.weight"
                         for i in (1, 2) for m in "AB"]
    vision, text = config.vision_config.hidden_size, config.text_config.hidden_size
    counts = count_parameters(model)
    assert counts["trainable"] == 16 * (vision + text) + 16 * (text + text)
    base_total = sum(parameter.numel() for parameter in ShirgLavidaForDiffusionLM(config).parameters())
    assert counts["total"] == counts["trainable"] + base_total


def test_an_adapter_trained_for_another_base_is_refused(tmp_path):
    other = ShirgLavidaConfig.tiny(text_config=LladaConfig.tiny(hidden_size=96, head_dim=24).to_dict())
    get_peft_model(ShirgLavidaForDiffusionLM(other), projector_lora_config()).save_pretrained(tmp_path / "other")
    base = ShirgLavidaForDiffusionLM(ShirgLavidaConfig.tiny())
    with pytest.raises(ValueError, match=r"trained for another base.*linear_1.*output size 96.*has 64.*text hidden "
                                         r"size 64"):
        check_adapter_matches_model(tmp_path / "other", base)
    with pytest.raises(FileNotFoundError, match="no adapter_model.safetensors"):
        check_adapter_matches_model(tmp_path, base)


def test_synthetic_dataset_is_deterministic_and_checked_for_columns():
    first, again = synthetic_shapes_dataset(6, seed=5), synthetic_shapes_dataset(6, seed=5)
    assert first.column_names == ["id", "image", "question", "answers"]
    for a, b in zip(first, again):
        assert a["question"] == b["question"] and a["answers"] == b["answers"]
        assert a["image"].tobytes() == b["image"].tobytes()
    check_dataset_columns(first)
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['answers'\].*has \['id', 'image', 'question'\]"):
        check_dataset_columns(first.remove_columns("answers"), "the training set")


# ---- examples/train_lora.py end to end ------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_lora")
    base = save_tiny_base(root / "base")
    reference = {name: tensor.clone() for name, tensor in ShirgLavidaForDiffusionLM.from_pretrained(base).state_dict()
                 .items()}
    trainer = train_lora.main(script_args(base, root / "run"))
    return {"root": root, "base": base, "run": root / "run", "trainer": trainer, "reference": reference}


def eval_batch(folder: Path) -> dict:
    processor = ShirgLavidaProcessor.from_pretrained(folder)
    return ShirgDiffusionCollator(processor, MASK_ID, budgets=TINY_BUDGETS, seed=9)(rows(4, seed=7))


def test_training_lowers_the_eval_loss_and_changes_only_the_lora_weights(trained):
    history = trained["trainer"].state.log_history
    evaluations = [(entry["step"], entry["eval_loss"]) for entry in history if "eval_loss" in entry]
    # eval_on_start, eval_steps=12, then the script's final evaluate(): all on the collator's fixed eval stream
    assert [step for step, _ in evaluations] == [0, 12, 12]
    assert evaluations[1][1] == evaluations[2][1]
    assert evaluations[1][1] < evaluations[0][1] - 0.05, evaluations

    peft_model = trained["trainer"].model
    assert isinstance(peft_model, PeftModel)
    trained_state = peft_model.get_base_model().state_dict()
    lora = {name: tensor for name, tensor in trained_state.items() if "lora_" in name}
    assert sorted(lora) == [f"multi_modal_projector.linear_{i}.lora_{m}.default.weight" for i in (1, 2) for m in "AB"]
    assert all(bool(tensor.abs().sum() > 0) for name, tensor in lora.items() if "lora_B" in name)  # B starts at 0
    base_state = {name.replace(".base_layer.", "."): tensor for name, tensor in trained_state.items()
                  if "lora_" not in name}
    assert sorted(base_state) == sorted(trained["reference"])
    for name, tensor in base_state.items():
        assert torch.equal(tensor, trained["reference"][name]), name


def test_saved_adapter_reloads_with_identical_logits_and_merges_within_1e_5(trained):
    run = trained["run"]
    saved = load_file(run / "adapter_model.safetensors")
    assert sorted(saved) == [f"base_model.model.multi_modal_projector.linear_{i}.lora_{m}.weight"
                             for i in (1, 2) for m in "AB"]
    for folder in [run, *sorted(run.glob("checkpoint-*"))]:
        assert (folder / "adapter_config.json").is_file() and (folder / "processor_config.json").is_file()
        assert not list(folder.glob("model*.safetensors"))  # checkpoints hold the adapter only
    assert sorted(path.name for path in run.glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-6"]

    batch = eval_batch(run)
    trained_model = trained["trainer"].model.eval()
    reloaded = PeftModel.from_pretrained(ShirgLavidaForDiffusionLM.from_pretrained(trained["base"]), run).eval()
    assert reloaded.peft_config["default"].base_model_name_or_path == str(trained["base"])
    with torch.no_grad():
        expected = trained_model(**batch).logits
        logits = reloaded(**batch).logits
        with reloaded.disable_adapter():
            base_logits = reloaded(**batch).logits
        merged = reloaded.merge_and_unload()(**batch).logits
    assert torch.equal(logits, expected)
    assert not torch.allclose(base_logits, logits, atol=1e-4)  # the adapter does something
    assert_fp32_close(merged, logits, merged_lora_reduction_length(reloaded.config, logits.shape[1]))


def test_resuming_from_a_checkpoint_reproduces_the_uninterrupted_run(trained):
    resumed_dir = trained["root"] / "resumed"
    shutil.copytree(trained["run"] / "checkpoint-6", resumed_dir / "checkpoint-6")
    trainer = train_lora.main(script_args(trained["base"], resumed_dir, "--resume_from_checkpoint", "True"))
    assert trainer.state.global_step == 12
    uninterrupted = load_file(trained["run"] / "adapter_model.safetensors")
    resumed = load_file(resumed_dir / "adapter_model.safetensors")
    assert sorted(resumed) == sorted(uninterrupted)
    for name in uninterrupted:
        assert torch.equal(resumed[name], uninterrupted[name]), name

    def losses(history):
        return {entry["step"]: entry["loss"] for entry in history if "loss" in entry and entry["step"] > 6}

    assert losses(trainer.state.log_history) == losses(trained["trainer"].state.log_history)


def test_bad_inputs_fail_before_training_with_clear_errors(trained, tmp_path):
    base = trained["base"]
    no_answer = datasets.Dataset.from_dict({"image": [PIL.Image.new("RGB", (8, 8))] * 4, "question": ["q"] * 4,
                                            "text": ["a"] * 4})
    no_answer.save_to_disk(tmp_path / "no_answer")
    with pytest.raises(ValueError, match=r"the training set lacks the column\(s\) \['answers'\]"):
        train_lora.main(script_args(base, tmp_path / "a", "--dataset", str(tmp_path / "no_answer"),
                                    "--eval_size", "2"))

    other = ShirgLavidaConfig.tiny(vision_config={**ShirgLavidaConfig.tiny().vision_config.to_dict(),
                                                  "hidden_size": 48})
    get_peft_model(ShirgLavidaForDiffusionLM(other), projector_lora_config()).save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match=r"trained for another base.*input size 48.*has 32.*vision hidden size 32"):
        train_lora.main(script_args(base, tmp_path / "b", "--adapter", str(tmp_path / "adapter")))
    shutil.copytree(tmp_path / "adapter", tmp_path / "c" / "checkpoint-3")
    with pytest.raises(ValueError, match="trained for another base"):
        train_lora.main(script_args(base, tmp_path / "c", "--resume_from_checkpoint", "True"))

    with pytest.raises(ValueError, match=r"budget '1024' \(K = 1024\) does not fit this model \(144 high-res"):
        train_lora.main(["--base", "tiny", "--output_dir", str(tmp_path / "d")])  # the 8B default budgets
    assert not (tmp_path / "d" / "base-model").exists()
    with pytest.raises(ValueError, match="--lora_rank cannot change the shape"):
        train_lora.main(script_args(base, tmp_path / "e", "--adapter", str(trained["run"]), "--lora_rank", "8"))
    with pytest.raises(ValueError, match="--remove_unused_columns must stay False"):
        train_lora.main(script_args(base, tmp_path / "f", "--remove_unused_columns", "True"))
    with pytest.raises(FileExistsError, match="--overwrite_output_dir True"):  # an earlier run is never replaced
        train_lora.main(script_args(base, trained["run"]))
    for folder in "abdef":  # nothing was trained
        assert not list((tmp_path / folder).glob("checkpoint-*"))
    assert sorted(path.name for path in (tmp_path / "c").iterdir()) == ["checkpoint-3"]


def test_adapter_from_a_run_continues_training(trained, tmp_path):
    trainer = train_lora.main(script_args(trained["base"], tmp_path / "continued", "--adapter", str(trained["run"]),
                                          "--max_steps", "2", "--eval_strategy", "no", "--eval_on_start", "False"))
    start = load_file(trained["run"] / "adapter_model.safetensors")
    continued = load_file(tmp_path / "continued" / "adapter_model.safetensors")
    assert trainer.state.global_step == 2 and sorted(continued) == sorted(start)
    assert any(not torch.equal(continued[name], start[name]) for name in start)
