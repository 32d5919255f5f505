"""ShirgLavidaProcessor, the LLaDA chat template and the tiny tokenizer."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import PIL.Image
import pytest
import torch

from shirg_hf import (
    LAVIDA_SYSTEM_PROMPT,
    LladaConfig,
    ShirgImageProcessor,
    ShirgLavidaConfig,
    ShirgLavidaProcessor,
    build_prompt,
    build_tiny_tokenizer,
)
from shirg_hf.modeling.visual_tokens import LAVIDA_GEOMETRY, lavida_hd_num_tokens, selection_method_names
from shirg_hf.processing.processing_shirg_lavida import LLADA_CHAT_TEMPLATE

IMAGE_ID = 504


@pytest.fixture()
def tokenizer():
    return build_tiny_tokenizer()


def make_processor(tokenizer, **config_overrides) -> ShirgLavidaProcessor:
    return ShirgLavidaProcessor.from_model_config(ShirgLavidaConfig.tiny(**config_overrides), tokenizer)


def image(height=60, width=80, seed=0) -> PIL.Image.Image:
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def without_auto_map(processor_dict: dict) -> dict:
    """`save_pretrained` adds `auto_map` to the saved object (register_for_auto_class); compare the rest."""
    return {key: value for key, value in processor_dict.items() if key != "auto_map"}


def image_runs(row: torch.Tensor) -> list[int]:
    """Lengths of the runs of consecutive image token ids in one row of input_ids."""
    runs, current = [], 0
    for token_id in row.tolist() + [-1]:
        if token_id == IMAGE_ID:
            current += 1
        elif current:
            runs, current = runs + [current], 0
    return runs


# ---- tiny tokenizer ------------------------------------------------------------------------------------
def test_tiny_tokenizer_special_ids_match_the_tiny_configs(tokenizer):
    text_config, config = LladaConfig.tiny(), ShirgLavidaConfig.tiny()
    assert len(tokenizer) == text_config.vocab_size == 512
    assert tokenizer.bos_token_id == text_config.bos_token_id == 500
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == text_config.eos_token_id == text_config.pad_token_id
    assert tokenizer.mask_token_id == tokenizer.convert_tokens_to_ids("<|mdm_mask|>") == text_config.mask_token_id
    assert tokenizer.convert_tokens_to_ids("<|eot_id|>") == text_config.eot_token_id == 503
    assert tokenizer.convert_tokens_to_ids("<|start_header_id|>") == 501
    assert tokenizer.convert_tokens_to_ids("<|end_header_id|>") == 502
    assert tokenizer.convert_tokens_to_ids("<image>") == config.image_token_id == IMAGE_ID


@pytest.mark.parametrize("text", ["What colour is the bus?", "Ünïcødé, émojis 🙂 and\ttabs\n\nnew lines", "x" * 300,
                                  ""])
def test_tiny_tokenizer_round_trips_any_text_with_bpe_ids_below_500(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert all(0 <= i < 500 for i in ids)
    assert tokenizer.decode(ids) == text


def test_tiny_tokenizer_is_fast_and_deterministic_across_processes(tokenizer):
    start = time.perf_counter()
    build_tiny_tokenizer()
    assert time.perf_counter() - start < 1.0
    script = "from shirg_hf import build_tiny_tokenizer; print(build_tiny_tokenizer().backend_tokenizer.to_str())"
    other_process = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                                   env={**os.environ, "PYTHONHASHSEED": "12345"}, timeout=300)
    assert other_process.stdout.strip() == tokenizer.backend_tokenizer.to_str()


# ---- chat template ---------------------------------------------------------------------------------------
def test_build_prompt_is_the_lavida_prompt():
    expected = (
        "<|startoftext|><|start_header_id|>system<|end_header_id|>\n\n" + LAVIDA_SYSTEM_PROMPT + "<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat is shown?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert build_prompt("  What is shown? \n") == expected
    assert build_prompt("<image>\nWhat is shown?") == expected
    assert build_prompt("What is shown?", with_image=False) == expected.replace("<image>\n", "")
    assert build_prompt("Hi", system_prompt=None) == (
        "<|startoftext|><|start_header_id|>user<|end_header_id|>\n\n<image>\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_build_prompt(tokenizer, add_generation_prompt):
    processor = make_processor(tokenizer)
    assert processor.chat_template == tokenizer.chat_template == LLADA_CHAT_TEMPLATE
    conversations = {
        build_prompt("What is shown?"): [
            {"role": "system", "content": LAVIDA_SYSTEM_PROMPT},
            {"role": "user", "content": " <image>\nWhat is shown?  "},
        ],
        build_prompt("Count the cars.", system_prompt="Be brief."): [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Count the cars."}]},
        ],
    }
    for expected, messages in conversations.items():
        for render in (tokenizer.apply_chat_template, processor.apply_chat_template):
            assert render(messages, tokenize=False, add_generation_prompt=add_generation_prompt) == expected


def test_chat_template_multi_turn_has_one_bos(tokenizer):
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert rendered.count("<|startoftext|>") == 1 and rendered.startswith("<|startoftext|>")
    assert rendered.endswith("<|start_header_id|>user<|end_header_id|>\n\nc<|eot_id|>"
                             "<|start_header_id|>assistant<|end_header_id|>\n\n")


# ---- token counts ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, expected",
    [
        pytest.param({}, 32 + 1, id="shirg-K-plus-summary"),
        pytest.param({"selection": {"summary": False}}, 32, id="shirg-summary-off"),
        pytest.param({"selection": {"method": "no_summary"}}, 32, id="shirg-no-summary-method"),
        pytest.param({"selection": {"budget": 144}}, 144, id="shirg-K-equals-N"),
        pytest.param({"selection": {"method": "full"}}, 144, id="shirg-full-method"),
        pytest.param({"vision_mode": "full"}, 144, id="full"),
        pytest.param({"vision_mode": "lowres"}, 49, id="lowres"),
    ],
)
def test_placeholder_expands_to_the_mode_token_count(tokenizer, overrides, expected):
    config = ShirgLavidaConfig.tiny(**overrides)
    processor = ShirgLavidaProcessor.from_model_config(config, tokenizer)
    out = processor(images=[image()], text=build_prompt("What is it?"))
    assert image_runs(out["input_ids"][0]) == [expected]
    if config.vision_mode != "lowres":
        assert expected == config.num_image_tokens()
    side = config.vision_config.image_size if config.vision_mode == "lowres" else config.highres_image_size
    assert out["pixel_values"].shape == (1, 3, side, side)
    assert "image_sizes" not in out


def test_shirg_count_rule_equals_the_config_for_every_method_and_budget(tokenizer):
    for method in selection_method_names():
        for summary in (True, False):
            config = ShirgLavidaConfig.tiny(selection={"method": method, "summary": summary})
            processor = ShirgLavidaProcessor.from_model_config(config, tokenizer)
            for budget in (0, 1, 15, 16, 17, 100, 143, 144, 145):
                try:
                    expected = config.num_image_tokens(budget)
                except ValueError:
                    with pytest.raises(ValueError, match="Invalid `selection.budget`"):
                        processor.num_image_tokens(budget=budget)
                    continue
                assert processor.num_image_tokens(budget=budget) == expected, (method, summary, budget)


def test_per_call_budget_override(tokenizer):
    processor = make_processor(tokenizer)
    prompt = build_prompt("What is it?")
    assert image_runs(processor(images=[image()], text=prompt, shirg_budget=20)["input_ids"][0]) == [21]
    assert image_runs(processor(images=[image()], text=prompt)["input_ids"][0]) == [33]  # config K unchanged
    with pytest.raises(ValueError, match=r"Invalid `selection.budget` \(K\) 8 .*: must be an integer in \[16, 144\]"):
        processor(images=[image()], text=prompt, shirg_budget=8)
    with pytest.raises(ValueError, match="shirg_budget and selection_method only apply to selecting vision modes"):
        make_processor(tokenizer, vision_mode="full")(images=[image()], text=prompt, shirg_budget=20)


def test_lavida_hd_counts_views_and_image_sizes(tokenizer):
    config = ShirgLavidaConfig.tiny(vision_mode="lavida-hd")
    processor = ShirgLavidaProcessor.from_model_config(config, tokenizer)
    images = [image(500, 700), image(100, 200, seed=1)]
    out = processor(images=images, text=[build_prompt("a"), build_prompt("b")])
    assert config.geometry.pooled_side == 4  # the 7x7 tiny tower
    expected = [lavida_hd_num_tokens((700, 500), config.geometry), lavida_hd_num_tokens((200, 100), config.geometry)]
    assert [image_runs(row) for row in out["input_ids"]] == [[expected[0]], [expected[1]]]
    assert out["image_sizes"].tolist() == [[700, 500], [200, 100]]
    side = config.vision_config.image_size
    reference = ShirgImageProcessor(size={"height": side, "width": side})(
        images, do_anyres=True, return_tensors="pt")["pixel_values"]
    assert out["pixel_values"].shape == (2, 5, 3, side, side)
    assert torch.equal(out["pixel_values"], reference)


def test_lavida_hd_counts_match_the_spec_with_real_sizes(tokenizer):
    config = ShirgLavidaConfig.tiny(vision_mode="lavida-hd")
    processor = ShirgLavidaProcessor.from_model_config(config, tokenizer, geometry=LAVIDA_GEOMETRY.to_dict())
    assert processor.num_image_tokens(image_size=(700, 500)) == 776
    assert processor.num_image_tokens(image_size=(500, 700)) == 784
    with pytest.raises(ValueError, match="needs the image size"):
        processor.num_image_tokens()


# ---- ids, padding, quirk --------------------------------------------------------------------------------
def expected_ids(tokenizer, prompt: str, count: int, drop: bool) -> list[int]:
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    position = ids.index(IMAGE_ID)
    return ids[:position] + [IMAGE_ID] * count + ids[position + 1 + int(drop):]


@pytest.mark.parametrize("drop", [True, False])
def test_ids_follow_lavida_tokenisation(tokenizer, drop):
    processor = ShirgLavidaProcessor.from_model_config(ShirgLavidaConfig.tiny(), tokenizer,
                                                       drop_token_after_image=drop)
    prompt = build_prompt("What is in the image?")
    out = processor(images=[image()], text=prompt)
    assert out["input_ids"][0].tolist() == expected_ids(tokenizer, prompt, 33, drop)
    assert out["attention_mask"][0].tolist() == [1] * out["input_ids"].shape[1]
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    after_image = out["input_ids"][0].tolist()[out["input_ids"][0].tolist().index(IMAGE_ID) + 33]
    assert (after_image == newline[0]) is not drop


def test_quirk_only_applies_to_bos_prompts(tokenizer):
    processor = make_processor(tokenizer)
    raw = "<image>\nWhat is in the image?"  # no chat template, no BOS: LaViDa's rule does not fire
    assert processor(images=[image()], text=raw)["input_ids"][0].tolist() == expected_ids(tokenizer, raw, 33, False)


def test_batched_prompts_are_left_padded_and_equal_single_prompts(tokenizer):
    processor = make_processor(tokenizer)
    prompts = [build_prompt("Hi"), build_prompt("What is written on the sign in this picture?")]
    images = [image(seed=1), image(seed=2)]
    batch = processor(images=images, text=prompts)
    width = batch["input_ids"].shape[1]
    for row, (prompt, picture) in enumerate(zip(prompts, images, strict=True)):
        single = processor(images=[picture], text=prompt)
        length = single["input_ids"].shape[1]
        assert batch["input_ids"][row, width - length:].tolist() == single["input_ids"][0].tolist()
        assert batch["input_ids"][row, :width - length].tolist() == [tokenizer.pad_token_id] * (width - length)
        assert batch["attention_mask"][row].tolist() == [0] * (width - length) + [1] * length
        assert torch.equal(batch["pixel_values"][row], single["pixel_values"][0])
    right = processor(images=images, text=prompts, padding_side="right")
    assert right["attention_mask"][0, 0] == 1 and right["attention_mask"][0, -1] == 0


def test_several_images_per_prompt_and_nested_image_lists(tokenizer):
    processor = make_processor(tokenizer, vision_mode="lowres")
    prompts = [build_prompt("<image> and <image>: same?"), build_prompt("Describe.")]
    images = [image(seed=1), image(seed=2), image(seed=3)]
    flat = processor(images=images, text=prompts)
    nested = processor(images=[images[:2], images[2:]], text=prompts)
    assert [image_runs(row) for row in flat["input_ids"]] == [[49, 49], [49]]
    assert torch.equal(flat["input_ids"], nested["input_ids"])
    assert torch.equal(flat["pixel_values"], nested["pixel_values"]) and flat["pixel_values"].shape[0] == 3


def test_text_only_prompts(tokenizer):
    out = make_processor(tokenizer)(text=build_prompt("Hello", with_image=False))
    assert set(out) == {"input_ids", "attention_mask"} and IMAGE_ID not in out["input_ids"][0].tolist()


def test_apply_chat_template_tokenize_equals_manual_processing(tokenizer):
    processor = make_processor(tokenizer)
    picture = image()
    messages = [{"role": "system", "content": LAVIDA_SYSTEM_PROMPT},
                {"role": "user", "content": [{"type": "image", "image": picture},
                                             {"type": "text", "text": "What is it?"}]}]
    via_template = processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt")
    manual = processor(images=[picture], text=build_prompt("What is it?"))
    for key in ("input_ids", "attention_mask", "pixel_values"):
        assert torch.equal(via_template[key], manual[key]), key


def test_batch_decode_skips_special_tokens(tokenizer):
    processor = make_processor(tokenizer)
    answer = tokenizer("A red bus.", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([answer + [503, 510, 510], answer + [511, 510, 510]])
    assert processor.batch_decode(ids) == ["A red bus.", "A red bus."]
    assert processor.decode(ids[0]) == "A red bus."
    assert processor.decode(ids[0], skip_special_tokens=False) == "A red bus.<|eot_id|><|endoftext|><|endoftext|>"


# ---- errors ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "call, message",
    [
        pytest.param(lambda p: p(images=[image()], text=build_prompt("Hi", with_image=False)),
                     "no '<image>' placeholder", id="text-without-placeholder"),
        pytest.param(lambda p: p(images=[image()], text=build_prompt("<image> vs <image>?")),
                     "2 '<image>' placeholders but only 1 image", id="more-placeholders-than-images"),
        pytest.param(lambda p: p(images=[image(), image()], text=[build_prompt("a <image> b")]),
                     "2 images were given but the text has only 1", id="fewer-placeholders-than-images"),
        pytest.param(lambda p: p(images=[[image(), image()], []], text=[build_prompt("a"), build_prompt("b")]),
                     "prompt 0 has only 1", id="per-prompt-mismatch"),
        pytest.param(lambda p: p(text=build_prompt("a")), "no images were given", id="placeholder-without-images"),
        pytest.param(lambda p: p(images=[image()]), "Images were given without text", id="images-without-text"),
        pytest.param(lambda p: p(), "Nothing to process", id="nothing"),
        pytest.param(lambda p: p(text=[1, 2]), "must be a string or a non-empty list of strings", id="bad-text"),
        pytest.param(lambda p: p(text="a", videos=[np.zeros((2, 8, 8, 3), np.uint8)]), "videos and audio are not",
                     id="videos"),
        pytest.param(lambda p: p(images=[image()], text=build_prompt("a"), truncation=True),
                     "Truncation is not supported", id="truncation"),
    ],
)
def test_call_errors(tokenizer, call, message):
    with pytest.raises(ValueError, match=message):
        call(make_processor(tokenizer))


def test_constructor_and_from_model_config_errors(tokenizer):
    tiny_geometry = ShirgLavidaConfig.tiny().geometry.to_dict()
    with pytest.raises(ValueError, match="Unknown vision_mode 'hd'"):
        ShirgLavidaProcessor(tokenizer=tokenizer, vision_mode="hd")
    with pytest.raises(ValueError, match="Unknown selection method 'topk'"):
        ShirgLavidaProcessor(tokenizer=tokenizer, selection={"method": "topk"})
    with pytest.raises(ValueError, match=r"Invalid `selection.budget` \(K\) 2304"):
        ShirgLavidaProcessor(tokenizer=tokenizer, selection={"budget": 2304}, geometry=tiny_geometry)
    with pytest.raises(ValueError, match="geometry `patch_size` must be a positive integer"):
        ShirgLavidaProcessor(tokenizer=tokenizer, geometry={**tiny_geometry, "patch_size": 0})
    with pytest.raises(ValueError, match="multiple of the tile size 384"):
        ShirgLavidaProcessor(tokenizer=tokenizer, geometry={**tiny_geometry, "pinpoints": [[384, 500]]})
    with pytest.raises(ValueError, match="needs a tokenizer"):
        ShirgLavidaProcessor()
    with pytest.raises(ValueError, match="config.image_token_id is 505"):
        ShirgLavidaProcessor.from_model_config(ShirgLavidaConfig.tiny(image_token_id=505), tokenizer)
    small_vocab = LladaConfig.tiny(vocab_size=510, mask_token_id=509, eos_token_id=508, pad_token_id=508)
    with pytest.raises(ValueError, match="The tokenizer has 512 tokens but the model's text_config.vocab_size is 510"):
        ShirgLavidaProcessor.from_model_config(ShirgLavidaConfig.tiny(text_config=small_vocab.to_dict()), tokenizer)


def test_from_model_config_adds_a_missing_image_token(tokenizer):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(IMAGE_ID)}  # ids 0..503, no "<image>"
    backend = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    bare = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0", pad_token="w1")
    with pytest.raises(ValueError, match="The tokenizer has no '<image>' token"):
        ShirgLavidaProcessor(tokenizer=bare)
    processor = ShirgLavidaProcessor.from_model_config(ShirgLavidaConfig.tiny(), bare)
    assert processor.image_token_id == IMAGE_ID == bare.convert_tokens_to_ids("<image>")
    out = processor(images=[image()], text="w5 <image> w7")
    assert out["input_ids"][0].tolist() == [5] + [IMAGE_ID] * 33 + [7]


# ---- saving -------------------------------------------------------------------------------------------
def test_save_and_load_keep_every_setting_and_output(tokenizer, tmp_path):
    processor = ShirgLavidaProcessor.from_model_config(ShirgLavidaConfig.tiny(vision_mode="lavida-hd"), tokenizer,
                                                       drop_token_after_image=False)
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert saved["auto_map"]["AutoProcessor"] == "processing_shirg_lavida.ShirgLavidaProcessor"
    assert saved["image_processor"]["auto_map"]["AutoImageProcessor"] == "image_processing_shirg.ShirgImageProcessor"
    assert (tmp_path / "processing_shirg_lavida.py").is_file() and (tmp_path / "image_processing_shirg.py").is_file()
    restored = ShirgLavidaProcessor.from_pretrained(tmp_path)
    assert without_auto_map(restored.to_dict()) == without_auto_map(processor.to_dict())
    assert restored.chat_template == processor.chat_template
    inputs = dict(images=[image(500, 700)], text=[build_prompt("a")])
    expected, actual = processor(**inputs), restored(**inputs)
    assert expected.keys() == actual.keys()
    for key in expected:
        if isinstance(expected[key], torch.Tensor):
            assert torch.equal(expected[key], actual[key]), key
        else:  # vision_mode / selection_method / shirg_budget the prompt was expanded for
            assert expected[key] == actual[key], key


def test_save_into_a_folder_with_another_tokenizers_files_is_refused_or_cleaned(tokenizer, tmp_path):
    from transformers import AutoProcessor

    processor = make_processor(tokenizer)
    folder = tmp_path / "reused"
    folder.mkdir()
    (folder / "special_tokens_map.json").write_text(json.dumps({"bos_token": "X"}))  # left by another tokenizer
    with pytest.raises(FileExistsError, match=r"holds special_tokens_map.json of another tokenizer .*overwrite=True"):
        processor.save_pretrained(folder)
    assert sorted(path.name for path in folder.iterdir()) == ["special_tokens_map.json"]  # nothing written

    processor.save_pretrained(folder, overwrite=True)
    assert not (folder / "special_tokens_map.json").exists()
    reloaded = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    assert reloaded.tokenizer.bos_token == tokenizer.bos_token
    assert not [path.name for path in folder.iterdir() if path.name.startswith(".")]  # no staging left


def test_model_then_processor_into_one_folder_and_saving_again_need_no_overwrite(tokenizer, tmp_path):
    from transformers import AutoProcessor

    from shirg_hf import ShirgLavidaForDiffusionLM

    config = ShirgLavidaConfig.tiny()
    folder = tmp_path / "model"
    ShirgLavidaForDiffusionLM(config).save_pretrained(folder)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = folder / f".processor-save-{dead.pid}-abcd1234"  # a save killed midway
    stale.mkdir()
    (stale / "tokenizer.json").write_text("{}")
    processor = ShirgLavidaProcessor.from_model_config(config, tokenizer)
    processor.save_pretrained(folder)
    processor.save_pretrained(folder)  # its own files are replaced in place
    names = {path.name for path in folder.iterdir()}
    assert not stale.exists() and not [name for name in names if name.startswith(".")]
    assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json"} <= names
    reloaded = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    assert reloaded.tokenizer.bos_token == tokenizer.bos_token and reloaded.image_token == processor.image_token


def test_a_processor_config_of_an_earlier_version_is_refused_clearly(tokenizer, tmp_path):
    make_processor(tokenizer).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    for key in ("geometry", "selection"):
        saved.pop(key)
    saved.update(shirg_budget=32, num_highres_patches=144, highres_image_size=48)
    (tmp_path / "processor_config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=r"earlier shirg-hf \(highres_image_size, num_highres_patches, shirg_budget\)"):
        ShirgLavidaProcessor.from_pretrained(tmp_path)
