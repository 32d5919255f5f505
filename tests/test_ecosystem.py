"""transformers ecosystem fit: the image-text-to-text pipeline (installed and as remote code), the chat template
as the one prompt builder, streamers, and `do_sample`."""

import json
import os
import subprocess
import sys
import threading

import PIL.Image
import pytest
import torch
from transformers import (AutoModel, AutoModelForImageTextToText, AutoProcessor, GenerationConfig, TextIteratorStreamer,
                          TextStreamer, pipeline)

from isolation import BLOCK_SHIRG_HF
from shirg_hf import (LAVIDA_SYSTEM_PROMPT, ShirgLavidaConfig, ShirgLavidaForDiffusionLM, ShirgLavidaProcessor,
                      build_prompt, build_tiny_tokenizer)
from shirg_hf.export import save_model_folder

GENERATE = dict(max_new_tokens=8, block_length=8, step_ratio=0.5)
QUESTIONS = ("What is written here?", "Which colour is the frame?")


def chat(image, question):
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    torch.manual_seed(0)
    config = ShirgLavidaConfig.tiny()
    model = ShirgLavidaForDiffusionLM(config).eval()
    processor = ShirgLavidaProcessor.from_model_config(config, build_tiny_tokenizer())
    path = tmp_path_factory.mktemp("ecosystem") / "model"
    save_model_folder(model, processor, path)
    return path


@pytest.fixture(scope="module")
def loaded(folder):
    return AutoModel.from_pretrained(folder).eval(), AutoProcessor.from_pretrained(folder)


@pytest.fixture(scope="module")
def images():
    return [PIL.Image.new("RGB", (64, 48), "white"), PIL.Image.new("RGB", (40, 60), (200, 30, 30))]


def direct_answers(model, processor, images, questions):
    answers = []
    for image, question in zip(images, questions):
        inputs = processor(images=[image], text=[build_prompt(question)])
        answers.append(processor.decode(model.generate(**inputs, **GENERATE)[0]))
    return answers


def test_registered_for_the_image_text_to_text_task(folder):
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == config["auto_map"]["AutoModelForImageTextToText"] == \
        "modeling_shirg_lavida.ShirgLavidaForDiffusionLM"
    assert isinstance(AutoModelForImageTextToText.from_pretrained(folder), ShirgLavidaForDiffusionLM)
    assert "pipeline_tag: image-text-to-text" in (folder / "README.md").read_text()


def test_pipeline_installed_single_and_batched(folder, loaded, images, capfd):
    expected = direct_answers(*loaded, images, QUESTIONS)
    capfd.readouterr()
    pipe = pipeline("image-text-to-text", model=str(folder))
    single = pipe(text=chat(images[0], QUESTIONS[0]), return_full_text=False, **GENERATE)
    assert [row["generated_text"] for row in single] == expected[:1]
    chats = [chat(image, question) for image, question in zip(images, QUESTIONS)]
    for batch_size in (1, 2):
        batched = pipe(text=chats, batch_size=batch_size, return_full_text=False, **GENERATE)
        assert [rows[0]["generated_text"] for rows in batched] == expected
    full = pipe(text=chat(images[0], QUESTIONS[0]), **GENERATE)[0]["generated_text"]
    assert full[-1] == {"role": "assistant", "content": expected[0]}
    # objects too, without the "not supported for image-text-to-text" list of model names
    pipe = pipeline("image-text-to-text", model=loaded[0], processor=loaded[1])
    assert pipe(text=chat(images[0], QUESTIONS[0]), return_full_text=False, **GENERATE)[0]["generated_text"] == \
        expected[0]
    assert "not supported" not in capfd.readouterr().err


REMOTE_PIPELINE = BLOCK_SHIRG_HF + r"""
import json
import PIL.Image
from transformers import pipeline

folder, out = sys.argv[1], sys.argv[2]
images = [PIL.Image.new("RGB", (64, 48), "white"), PIL.Image.new("RGB", (40, 60), (200, 30, 30))]
chats = [[{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
         for image, question in zip(images, json.loads(sys.argv[3]))]
pipe = pipeline("image-text-to-text", model=folder, trust_remote_code=True)
generate = dict(max_new_tokens=8, block_length=8, step_ratio=0.5)
single = pipe(text=chats[0], return_full_text=False, **generate)
batched = pipe(text=chats, batch_size=2, return_full_text=False, **generate)
json.dump({"module": type(pipe.model).__module__, "single": [row["generated_text"] for row in single],
           "batched": [rows[0]["generated_text"] for rows in batched]}, open(out, "w"))
"""


def test_pipeline_remote_code_without_the_package(folder, loaded, images, tmp_path):
    expected = direct_answers(*loaded, images, QUESTIONS)
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PYTHON", "HF_"))}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    out = tmp_path / "out.json"
    completed = subprocess.run([sys.executable, "-I", "-c", REMOTE_PIPELINE, str(folder), str(out),
                                json.dumps(QUESTIONS)], cwd=tmp_path, env=env, capture_output=True, text=True,
                               timeout=600)
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert "not supported" not in completed.stderr
    result = json.loads(out.read_text())
    assert result["module"].startswith("transformers_modules.")
    assert result["single"] == expected[:1] and result["batched"] == expected


def test_batch_settings_must_agree(loaded, images):
    model, processor = loaded
    inputs = processor(images=images, text=[build_prompt(q) for q in QUESTIONS])
    inputs["vision_mode"] = ["shirg", "full"]  # per-row copies, as pipelines collate them, must agree
    with pytest.raises(ValueError, match="vision_mode differs between the rows"):
        model.generate(**inputs, **GENERATE)


CONVERSATIONS = {
    "image": ([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}],
              dict(question="What is it?")),
    "text only": ([{"role": "user", "content": "Say hi."}], dict(question="Say hi.", with_image=False)),
    "own system": ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."}],
                   dict(question="Say hi.", system_prompt="Be brief.", with_image=False)),
}


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_chat_template_is_build_prompt(folder, name, images):
    messages, prompt_args = CONVERSATIONS[name]
    processor = AutoProcessor.from_pretrained(folder)
    prompt = build_prompt(**prompt_args)
    assert processor.apply_chat_template(messages) == prompt
    assert processor.tokenizer.apply_chat_template(messages, tokenize=False) == prompt
    with_image = prompt_args.get("with_image", True)
    image_kwargs = dict(images=[images[0]]) if with_image else {}
    expected = processor(text=[prompt], **image_kwargs)
    if with_image:
        messages = [{"role": "user", "content": [{"type": "image", "image": images[0]}, messages[0]["content"][1]]}]
    got = processor.apply_chat_template(messages, tokenize=True, return_dict=True)
    assert got["input_ids"].tolist() == expected["input_ids"].tolist()
    if with_image:
        assert torch.equal(got["pixel_values"], expected["pixel_values"])


def test_chat_template_system_prompt_and_multi_turn(folder):
    processor = AutoProcessor.from_pretrained(folder)
    messages = [{"role": "user", "content": "Hi."}]
    assert processor.apply_chat_template(messages, system_prompt=None) == build_prompt("Hi.", None, False)
    assert LAVIDA_SYSTEM_PROMPT in processor.apply_chat_template(messages)
    turns = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
             {"role": "assistant", "content": "A cat."}, {"role": "user", "content": "Which colour?"}]
    first = build_prompt("What is it?")
    assert processor.apply_chat_template(turns) == (
        first + "A cat.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nWhich colour?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")


class RecordingStreamer(TextStreamer):
    def __init__(self, tokenizer):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.text, self.puts, self.ended = "", [], False

    def put(self, value):
        self.puts.append(value.tolist())
        super().put(value)

    def on_finalized_text(self, text, stream_end=False):
        self.text += text
        self.ended = self.ended or stream_end


def test_streamers_receive_the_stable_prefix_and_the_final_text(loaded, images):
    model, processor = loaded
    inputs = processor(images=[images[0]], text=[build_prompt(QUESTIONS[0])])
    settings = dict(max_new_tokens=16, block_length=8, step_ratio=0.5)
    out = model.generate(**inputs, **settings, return_dict_in_generate=True)
    final = processor.decode(out.sequences[0])
    streamer = RecordingStreamer(processor.tokenizer)
    assert torch.equal(model.generate(**inputs, **settings, streamer=streamer), out.sequences)
    assert streamer.ended and streamer.text == final
    assert streamer.puts[0] == inputs["input_ids"].tolist()  # the prompt first ([1, P]), as transformers does
    sent = [token for chunk in streamer.puts[1:] for token in chunk]
    assert sent == out.sequences[0].tolist()
    # each chunk is the leftmost decoded run after a step, sent as soon as it is final
    mask_id = model.config.text_config.mask_token_id
    stable = [int((row[0] == mask_id).nonzero()[0]) if (row[0] == mask_id).any() else row.shape[1]
              for row in out.history]
    lengths = [len(chunk) for chunk in streamer.puts[1:]]
    assert [sum(lengths[:i + 1]) for i in range(len(lengths))] == sorted(set(s for s in stable if s))
    iterator = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    thread = threading.Thread(target=model.generate, kwargs=dict(**inputs, **settings, streamer=iterator))
    thread.start()
    assert "".join(iterator) == final
    thread.join()


def test_streamer_needs_one_row(loaded, images):
    model, processor = loaded
    inputs = processor(images=images, text=[build_prompt(q) for q in QUESTIONS])
    with pytest.raises(ValueError, match="A streamer takes one sequence"):
        model.generate(**inputs, **GENERATE, streamer=TextStreamer(processor.tokenizer))


def test_do_sample_is_consistent_with_temperature(loaded, images):
    model, processor = loaded
    inputs = processor(images=[images[0]], text=[build_prompt(QUESTIONS[0])])
    greedy = model.generate(**inputs, **GENERATE)
    sampling = GenerationConfig(**{**model.generation_config.to_dict(), "temperature": 5.0, "do_sample": True})
    assert torch.equal(model.generate(**inputs, **GENERATE, generation_config=sampling, do_sample=False), greedy)
    assert torch.equal(model.generate(**inputs, **GENERATE, do_sample=True, seed=3),
                       model.generate(**inputs, **GENERATE, temperature=1.0, seed=3))
    assert torch.equal(model.generate(**inputs, **GENERATE, do_sample=False, temperature=0), greedy)
    with pytest.raises(ValueError, match="do_sample=False .greedy. contradicts temperature=0.5"):
        model.generate(**inputs, **GENERATE, do_sample=False, temperature=0.5)
    with pytest.raises(ValueError, match="do_sample=True with temperature=0"):
        model.generate(**inputs, **GENERATE, do_sample=True, temperature=0)
    with pytest.raises(ValueError, match=r"Unsupported generation argument\(s\) \['top_p'\]"):
        model.generate(**inputs, **GENERATE, do_sample=True, top_p=0.9)
    with pytest.raises(ValueError, match="sets top_k=5, which the masked-diffusion sampler cannot honour"):
        model.generate(**inputs, **GENERATE, generation_config=GenerationConfig(do_sample=True, top_k=5))
