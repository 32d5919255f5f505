"""ShirgLavidaForDiffusionLM end to end on the tiny config: vision modes, loss, generate, loading, remote code."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import AutoModel

from conftest import assert_fp32_close, llada_reduction_length
from isolation import BLOCK_SHIRG_HF
from shirg_hf.export import save_model_folder
from shirg_hf import (
    ShirgLavidaConfig,
    ShirgLavidaForDiffusionLM,
    ShirgLavidaProcessor,
    build_prompt,
    build_tiny_tokenizer,
    prefix_dlm_attention_mask,
)
from shirg_hf.training import complementary_noising

QUESTIONS = ("What is written here?", "How many red bars are in the chart on the left side?")


def make_images(count: int = 2, size: int = 64) -> list[PIL.Image.Image]:
    rng = np.random.default_rng(0)
    return [PIL.Image.fromarray(rng.integers(0, 256, (size, size + 8 * i, 3), dtype=np.uint8)) for i in range(count)]


def build(mode: str = "shirg", seed: int = 0, **overrides):
    config = ShirgLavidaConfig.tiny(vision_mode=mode, **overrides)
    torch.manual_seed(seed)
    model = ShirgLavidaForDiffusionLM(config).eval()
    processor = ShirgLavidaProcessor.from_model_config(config, build_tiny_tokenizer())
    return model, processor


def inputs_for(processor, questions=QUESTIONS, images=None, **kwargs):
    images = images if images is not None else make_images(len(questions))
    return processor(images=images, text=[build_prompt(q) for q in questions], return_tensors="pt", **kwargs)


GENERATE = dict(max_new_tokens=8, block_length=4, step_ratio=0.5)


@pytest.mark.parametrize("mode", ["shirg", "full", "lowres", "lavida-hd"])
def test_every_vision_mode_generates_batch_invariant(mode):
    model, processor = build(mode)
    batch = inputs_for(processor)
    answers = model.generate(**batch, **GENERATE)
    assert answers.shape == (2, 8)
    for row, question in enumerate(QUESTIONS):
        single = inputs_for(processor, [question], images=[make_images(2)[row]])
        assert torch.equal(model.generate(**single, **GENERATE)[0], answers[row])


def test_visual_token_counts_per_mode():
    for mode, expected in (("shirg", 33), ("full", 144), ("lowres", 49)):
        model, processor = build(mode)
        batch = inputs_for(processor, QUESTIONS[:1], make_images(1))
        assert int((batch["input_ids"] == model.config.image_token_id).sum()) == expected
        output = model(**batch)
        assert output.image_token_counts.tolist() == [expected]


def test_shirg_budget_travels_with_the_batch_and_is_checked_against_the_placeholders():
    model, processor = build("shirg")
    batch = inputs_for(processor, shirg_budget=20)
    assert (batch["vision_mode"], batch["selection_method"], batch["shirg_budget"]) == ("shirg", "shirg", 20)
    assert int((batch["input_ids"][0] == model.config.image_token_id).sum()) == 21
    carried = model.generate(**batch, **GENERATE)
    explicit = model.generate(**{**batch, "shirg_budget": 20}, **GENERATE)
    assert torch.equal(carried, explicit)
    output = model(**batch)
    assert output.kept_indices.shape == (2, 20)
    with pytest.raises(ValueError, match="image placeholder tokens but vision_mode='shirg', selection_method='shirg', "
                                         "shirg_budget=32 gives 33"):
        model(**{**batch, "shirg_budget": 32})
    with pytest.raises(ValueError, match="image placeholder tokens"):  # K is never inferred from the counts
        model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"])
    with pytest.raises(ValueError, match=r"`selection.budget` \(K\) 500"):
        model(**{**inputs_for(processor), "shirg_budget": 500})
    no_summary = inputs_for(processor, shirg_budget=20, selection_method="no_summary")
    assert int((no_summary["input_ids"][0] == model.config.image_token_id).sum()) == 20
    assert model(**no_summary).kept_indices.shape == (2, 20)


def test_bad_inputs_raise_clear_errors():
    model, processor = build("shirg")
    batch = inputs_for(processor)
    with pytest.raises(ValueError, match=r"pixel_values of shape \[\.\.\., 3, 48, 48\]"):
        model(input_ids=batch["input_ids"], pixel_values=torch.zeros(2, 3, 28, 28))
    with pytest.raises(ValueError, match="no pixel_values"):
        model(input_ids=batch["input_ids"])
    text_only = processor(text=["hello there"], return_tensors="pt")
    with pytest.raises(ValueError, match="one image per row|image placeholder"):
        model(input_ids=text_only["input_ids"], pixel_values=batch["pixel_values"][:1])
    with pytest.raises(ValueError, match="input_ids must lie in"):
        model(input_ids=batch["input_ids"] + 10_000, pixel_values=batch["pixel_values"])
    hd_model, hd_processor = build("lavida-hd")
    hd_batch = inputs_for(hd_processor)
    with pytest.raises(ValueError, match="image_sizes"):
        hd_model(input_ids=hd_batch["input_ids"], pixel_values=hd_batch["pixel_values"])


def test_masked_diffusion_loss_under_prefix_dlm_matches_cached_inference():
    """Training logits of answer tokens under the prefix-DLM mask == the cached-inference logits."""
    model, processor = build("shirg")
    batch = inputs_for(processor, QUESTIONS[:1], make_images(1))
    prefix = batch["input_ids"]
    answer = torch.tensor([[7, 8, 9, 511, 511, 511]])
    ids = torch.cat([prefix, answer], dim=1)
    prefix_lengths = torch.tensor([prefix.shape[1]])
    with torch.no_grad():
        training = model(input_ids=ids, pixel_values=batch["pixel_values"], prefix_lengths=prefix_lengths)
        embeds, _ = model.embed_multimodal(prefix, batch["pixel_values"])
        cache = model.language_model.encode_prefix(inputs_embeds=embeds)
        cached = model.language_model(input_ids=answer, cache=cache).logits
    assert_fp32_close(training.logits[:, prefix.shape[1]:], cached,
                      llada_reduction_length(model.config.text_config, ids.shape[1]))


def test_loss_with_complementary_noising_and_backward_reaches_projector():
    model, processor = build("shirg")
    model.train()
    batch = inputs_for(processor, QUESTIONS[:1], make_images(1))
    answer = torch.tensor([[30, 31, 32, 33, 510, 510]])
    ids = torch.cat([batch["input_ids"], answer], dim=1)
    answer_mask = torch.zeros_like(ids, dtype=torch.bool)
    answer_mask[:, batch["input_ids"].shape[1]:] = True
    noised = complementary_noising(ids, answer_mask, mask_token_id=511, generator=torch.Generator().manual_seed(0))
    assert torch.equal((noised["labels"] != -100).sum(0), answer_mask[0].long() * 1)  # every target exactly once
    prefix_lengths = torch.full((2,), batch["input_ids"].shape[1])
    output = model(input_ids=noised["input_ids"], pixel_values=batch["pixel_values"].repeat(2, 1, 1, 1),
                   labels=noised["labels"], prefix_lengths=prefix_lengths)
    assert output.loss.ndim == 0 and torch.isfinite(output.loss)
    logits = output.logits.float()
    targets = noised["labels"] != -100
    manual = torch.nn.functional.cross_entropy(logits[targets], noised["labels"][targets])
    torch.testing.assert_close(output.loss, manual)
    output.loss.backward()
    assert model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="prefix_lengths"):
        model(input_ids=noised["input_ids"], pixel_values=batch["pixel_values"].repeat(2, 1, 1, 1),
              labels=noised["labels"])


def test_image_features_merge_out_of_place_under_activation_checkpointing():
    model, processor = build("shirg")
    model.train()
    model.activation_checkpointing_enable()
    model.enable_input_require_grads()
    batch = inputs_for(processor, QUESTIONS[:1], make_images(1))
    ids = torch.cat([batch["input_ids"], torch.tensor([[511, 511, 40]])], dim=1)
    labels = torch.full_like(ids, -100)
    labels[0, -3:-1] = torch.tensor([41, 42])
    output = model(input_ids=ids, pixel_values=batch["pixel_values"], labels=labels,
                   prefix_lengths=torch.tensor([batch["input_ids"].shape[1]]))
    output.loss.backward()
    assert model.multi_modal_projector.linear_2.weight.grad is not None


def test_prefix_dlm_mask_shape():
    mask = prefix_dlm_attention_mask(torch.ones(1, 5, dtype=torch.long), torch.tensor([3]))
    assert mask.shape == (1, 1, 5, 5)
    assert not bool(mask[0, 0, 0, 4]) and bool(mask[0, 0, 4, 0])


def test_save_and_load_round_trip_dtype_and_device_map(tmp_path):
    model, processor = build("shirg")
    batch = inputs_for(processor)
    expected = model.generate(**batch, **GENERATE)
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path, dtype=torch.float32)
    assert type(loaded) is ShirgLavidaForDiffusionLM
    assert torch.equal(loaded.generate(**batch, **GENERATE), expected)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, atol=0, rtol=0)
    bf16 = AutoModel.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and bf16.language_model.lm_head.weight.dtype == torch.bfloat16
    assert bf16.generate(**batch, **GENERATE).shape == (2, 8)
    sharded = AutoModel.from_pretrained(tmp_path, dtype=torch.float32, device_map="auto")
    assert {p.device.type for p in sharded.parameters()} == {"cpu"}
    assert torch.equal(sharded.generate(**batch, **GENERATE), expected)


REMOTE_SCRIPT = BLOCK_SHIRG_HF + textwrap.dedent(r"""
    import json
    import numpy as np, PIL.Image, torch
    from transformers import AutoModel, AutoProcessor

    folder, out = sys.argv[1], sys.argv[2]
    model = AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    spec = json.load(open(f"{folder}/../inputs.json"))
    images = [PIL.Image.fromarray(np.asarray(a, dtype=np.uint8)) for a in spec["images"]]
    batch = processor(images=images, text=spec["texts"], return_tensors="pt")
    answers = model.generate(**batch, **spec["generate"])
    json.dump({"module": type(model).__module__, "answers": answers.tolist(),
               "texts": processor.batch_decode(answers)}, open(out, "w"))
""")


def test_remote_code_generate_without_the_package(tmp_path):
    model, processor = build("shirg")
    folder = tmp_path / "saved"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted([
        "cache_llada.py", "chat_template.jinja", "config.json", "configuration_llada.py",
        "configuration_shirg_lavida.py", "generation_config.json", "generation_diffusion.py",
        "image_processing_shirg.py", "model.safetensors", "modeling_llada.py", "modeling_shirg_lavida.py",
        "processing_shirg_lavida.py", "processor_config.json", "selection_shirg.py", "tokenizer.json",
        "tokenizer_config.json", "visual_tokens.py",
    ])
    images = make_images(2)
    texts = [build_prompt(q) for q in QUESTIONS]
    (tmp_path / "inputs.json").write_text(json.dumps({
        "images": [np.asarray(image).tolist() for image in images], "texts": texts, "generate": GENERATE}))
    expected = model.generate(**processor(images=images, text=texts, return_tensors="pt"), **GENERATE)
    script = tmp_path / "remote.py"
    script.write_text(REMOTE_SCRIPT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    result = subprocess.run([sys.executable, str(script), str(folder), str(tmp_path / "out.json")],
                            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["module"].startswith("transformers_modules.")
    assert report["answers"] == expected.tolist()
    assert report["texts"] == processor.batch_decode(expected)


def test_model_card_usage_runs_as_written_without_the_package(tmp_path):
    model, processor = build("shirg")
    folder = tmp_path / "saved"
    save_model_folder(model, processor, folder)  # save_pretrained of both + the card (the model class writes none)
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers")
    code = card.split("```python\n")[1].split("```")[0]
    code = code.replace('"path/to/this/folder"', repr(str(folder))).replace(
        'Image.open("image.png")', 'Image.new("RGB", (64, 48), "white")')
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    result = subprocess.run([sys.executable, "-c", BLOCK_SHIRG_HF + code], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().startswith("[")  # the decoded answers
