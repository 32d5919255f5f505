"""SHIRG-LaViDa on the loopback test Hub (tests/hub_server.py): base model, LoRA adapter and `shirg-hf export`.

A tiny model + processor is pushed as org/shirg-lavida (push_to_hub), a projector LoRA adapter with perturbed B
weights (so it changes the outputs) with `shirg-hf push-adapter`, and a merged export with `shirg-hf export
--merge --push`. A fresh process in which shirg_hf cannot be imported (only the repos' remote code exists there)
then loads everything by repo id and must reproduce the adapted model of this process: logits and answer ids
identical through peft, logits equal up to float32 rounding (conftest's policy) for the merged weights.
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import yaml
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from shirg_hf import (
    ShirgLavidaConfig,
    ShirgLavidaForDiffusionLM,
    ShirgLavidaProcessor,
    build_prompt,
    build_tiny_tokenizer,
    cli,
)
from shirg_hf.export import TRAINING_RECORD_NAME
from shirg_hf.training import projector_lora_config

from conftest import assert_fp32_close, merged_lora_reduction_length
from isolation import BLOCK_SHIRG_HF

BASE_REPO = "org/shirg-lavida"
ADAPTER_REPO = "org/shirg-lavida-lora"
MERGED_REPO = "org/shirg-lavida-merged"
ATTACHED_REPO = "org/shirg-lavida-ft"
QUESTIONS = ["What is the total?", "Which colour is the bar on the left?"]
TRAINING_RECORD = {"budgets": [144, 64, 32], "dataset": "synthetic shapes (64 rows)", "max_steps": 20}
GENERATE_KWARGS = {"max_new_tokens": 8, "block_length": 4}

PUBLISH = """
import contextlib, io, json
from transformers import AutoProcessor
from shirg_hf import ShirgLavidaForDiffusionLM
from shirg_hf.cli import main

def cli(*argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(arg) for arg in argv])
    return {{"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}}

ShirgLavidaForDiffusionLM.from_pretrained({base_dir!r}).push_to_hub({base_repo!r})
AutoProcessor.from_pretrained({base_dir!r}).push_to_hub({base_repo!r})
report = {{
    "push_adapter": cli("push-adapter", {adapter_dir!r}, {adapter_repo!r}, "--base-repo", {base_repo!r}),
    "export": cli("export", "--base", {base_dir!r}, "--adapter", {adapter_dir!r}, "--out", {merged_dir!r}, "--merge",
                  "--repo-id", {merged_repo!r}, "--base-repo", {base_repo!r}, "--push"),
}}
print(json.dumps(report))
"""

LOAD = BLOCK_SHIRG_HF + """
import contextlib, io, json, os
import PIL.Image
import torch
from huggingface_hub import hf_hub_download
from peft import PeftConfig, PeftModel
from safetensors.torch import save_file
from transformers import AutoModel, AutoProcessor

images = [PIL.Image.open(name) for name in {image_names!r}]
outputs, report = {{}}, {{}}

def run(name, model, inputs):
    with torch.no_grad():
        outputs[name + ".logits"] = model(**inputs).logits.contiguous()
        outputs[name + ".ids"] = model.generate(**inputs, **{generate_kwargs!r}).contiguous()
    report[name + ".class"] = type(model).__name__

# The base and its processor by repo id (remote code), then the adapter by repo id.
base = AutoModel.from_pretrained({base_repo!r}, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained({base_repo!r}, trust_remote_code=True)
inputs = processor(images=images, text={prompts!r}, return_tensors="pt")
outputs["input_ids"] = inputs["input_ids"].contiguous()
report["base_module"] = type(base).__module__
adapter_config = PeftConfig.from_pretrained({adapter_repo!r})
report["adapter_base"] = adapter_config.base_model_name_or_path
run("peft", PeftModel.from_pretrained(base, {adapter_repo!r}).eval(), inputs)

# The merged export by repo id: a plain model.
run("merged", AutoModel.from_pretrained({merged_repo!r}, trust_remote_code=True).eval(), inputs)

# The unmerged export, as a local folder: AutoModel gives the base; the adapter comes from adapter/.
attached = AutoModel.from_pretrained({attached_dir!r}, trust_remote_code=True).eval()
run("attached_base", attached, inputs)
run("attached", PeftModel.from_pretrained(attached, {attached_dir!r}, subfolder="adapter").eval(), inputs)

# The merged repo's model card: its usage code runs as written.
card = open(hf_hub_download({merged_repo!r}, "README.md")).read()
snippet = card.split("```python\\n")[1].split("```")[0]
images[0].save("image.png")
printed = io.StringIO()
with contextlib.redirect_stdout(printed):
    exec(snippet, {{}})
report["snippet_output"] = printed.getvalue()

save_file(outputs, {outputs_path!r})
print(json.dumps(report))
"""


def run_client(fake_hub, hf_home: Path, code: str) -> dict:
    """Run Python `code` against the test Hub in a fresh process; returns the JSON it prints last."""
    hf_home.mkdir(parents=True)
    completed = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        check=False,  # a failure is reported with the client's stderr below
        env=fake_hub.client_env(hf_home),
        cwd=hf_home,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, f"client failed ({completed.returncode}):\n{completed.stderr[-4000:]}"
    return json.loads(completed.stdout.strip().splitlines()[-1])


def save_base(folder: Path, config: ShirgLavidaConfig, seed: int = 0) -> None:
    torch.manual_seed(seed)
    ShirgLavidaForDiffusionLM(config).save_pretrained(folder)
    ShirgLavidaProcessor.from_model_config(config, build_tiny_tokenizer()).save_pretrained(folder)


def save_adapter(base_dir: Path, adapter_dir: Path, record: dict | None = None) -> PeftModel:
    """A projector LoRA on the base in `base_dir` with random (non-zero) B weights, saved to `adapter_dir`."""
    base = ShirgLavidaForDiffusionLM.from_pretrained(base_dir)
    adapted = get_peft_model(base, projector_lora_config(rank=4, alpha=8))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in adapted.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.5 * torch.randn(parameter.shape, generator=generator))
    adapted.save_pretrained(adapter_dir)
    if record is not None:
        (adapter_dir / TRAINING_RECORD_NAME).write_text(json.dumps(record))
    return adapted.eval()


def card_metadata(card: str) -> dict:
    return yaml.safe_load(card.split("---")[1])


@pytest.fixture(scope="module")
def hub_model(fake_hub, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("hub_model")
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    save_base(base_dir, ShirgLavidaConfig.tiny())
    adapted = save_adapter(base_dir, adapter_dir, TRAINING_RECORD)

    rng = np.random.default_rng(0)
    image_names = []
    for index, size in enumerate([(70, 50), (40, 64)]):
        name = str(tmp_path / f"image_{index}.png")
        PIL.Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(name)
        image_names.append(name)
    processor = ShirgLavidaProcessor.from_pretrained(base_dir)
    prompts = [build_prompt(question) for question in QUESTIONS]
    inputs = processor(images=[PIL.Image.open(name) for name in image_names], text=prompts, return_tensors="pt")
    with torch.no_grad():
        expected = {
            "logits": adapted(**inputs).logits,  # [2, T, V]
            "ids": adapted.generate(**inputs, **GENERATE_KWARGS),  # [2, 8]
        }
        with adapted.disable_adapter():
            expected["base_logits"] = adapted(**inputs).logits  # [2, T, V]
            expected["base_ids"] = adapted.generate(**inputs, **GENERATE_KWARGS)  # [2, 8]

    attached_dir, merged_dir = tmp_path / "attached", tmp_path / "merged"
    assert cli.main(["export", "--base", str(base_dir), "--adapter", str(adapter_dir), "--out", str(attached_dir),
                     "--repo-id", ATTACHED_REPO]) == 0
    names = {
        "base_dir": str(base_dir), "adapter_dir": str(adapter_dir), "merged_dir": str(merged_dir),
        "attached_dir": str(attached_dir), "base_repo": BASE_REPO, "adapter_repo": ADAPTER_REPO,
        "merged_repo": MERGED_REPO, "image_names": image_names, "prompts": prompts,
        "generate_kwargs": GENERATE_KWARGS, "outputs_path": str(tmp_path / "loaded.safetensors"),
    }
    published = run_client(fake_hub, tmp_path / "home_publish", PUBLISH.format(**names))
    loaded = run_client(fake_hub, tmp_path / "home_load", LOAD.format(**names))
    return {
        "hub": fake_hub, "expected": expected, "input_ids": inputs["input_ids"], "published": published,
        "loaded": loaded, "outputs": load_file(names["outputs_path"]), "merged_dir": merged_dir,
        "attached_dir": attached_dir, "adapter_dir": adapter_dir, "base_dir": base_dir,
    }


# --- publishing and loading by repo id -------------------------------------------------------------------------
def test_publishing_commands_succeed(hub_model):
    for name, result in hub_model["published"].items():
        assert result["code"] == 0, (name, result["stderr"])
    pushed_url = hub_model["published"]["export"]["stdout"].strip().splitlines()[-1]
    assert pushed_url == f"{hub_model['hub'].url}/{MERGED_REPO}"


def test_adapter_repo_names_the_base_repo(hub_model):
    assert hub_model["loaded"]["adapter_base"] == BASE_REPO
    files = hub_model["hub"].files(ADAPTER_REPO)
    assert sorted(files) == [".gitattributes", "README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert json.loads(files["adapter_config.json"])["base_model_name_or_path"] == BASE_REPO


def test_base_loads_by_repo_id_from_remote_code(hub_model):
    loaded = hub_model["loaded"]
    assert loaded["base_module"].startswith("transformers_modules.")  # the repo's code: shirg_hf is blocked there
    assert torch.equal(hub_model["outputs"]["input_ids"], hub_model["input_ids"])


def test_peft_adapter_by_repo_id_reproduces_the_adapted_model(hub_model):
    outputs, expected = hub_model["outputs"], hub_model["expected"]
    assert not torch.allclose(expected["logits"], expected["base_logits"], atol=1e-3)  # the adapter matters
    assert torch.equal(outputs["peft.logits"], expected["logits"])
    assert torch.equal(outputs["peft.ids"], expected["ids"])


def test_merged_export_by_repo_id_matches_the_adapted_model(hub_model):
    outputs, expected = hub_model["outputs"], hub_model["expected"]
    assert hub_model["loaded"]["merged.class"] == "ShirgLavidaForDiffusionLM"
    reduction_length = merged_lora_reduction_length(ShirgLavidaConfig.tiny(), expected["logits"].shape[1])
    assert_fp32_close(outputs["merged.logits"], expected["logits"], reduction_length)
    assert torch.equal(outputs["merged.ids"], expected["ids"])


def test_merged_export_repo_is_self_contained(hub_model):
    files = hub_model["hub"].files(MERGED_REPO)
    assert {"config.json", "model.safetensors", "generation_config.json", "modeling_shirg_lavida.py",
            "configuration_shirg_lavida.py", "modeling_llada.py", "processing_shirg_lavida.py",
            "image_processing_shirg.py", "processor_config.json", "tokenizer.json", "README.md"} <= set(files)
    assert not any(name.startswith("adapter") for name in files)  # merged: no peft files
    config = json.loads(files["config.json"])
    assert config["auto_map"]["AutoModel"] == "modeling_shirg_lavida.ShirgLavidaForDiffusionLM"
    assert config["dtype"] == "float32"


def test_merged_model_card_runs_and_lists_the_settings(hub_model):
    card = (hub_model["merged_dir"] / "README.md").read_text()
    metadata = card_metadata(card)
    assert metadata["library_name"] == "transformers"
    assert metadata["base_model"] == BASE_REPO
    assert metadata["pipeline_tag"] == "image-text-to-text"
    assert {"shirg", "lavida", "diffusion", "lora"} <= set(metadata["tags"]) and "peft" not in metadata["tags"]
    assert f'repo = "{MERGED_REPO}"' in card and "trust_remote_code=True" in card
    selection = ShirgLavidaConfig.tiny().selection
    assert f"| default budget K | {selection['budget']} (+1 summary token) |" in card
    assert "| coverage cells | `4, 4` |" in card and "| vision mode | `shirg` |" in card
    assert "| LoRA rank r | `4` |" in card and "| LoRA alpha | `8` |" in card
    assert "| budgets trained on (K) | `144, 64, 32` |" in card
    assert "| training data | `synthetic shapes (64 rows)` |" in card and "| max_steps | `20` |" in card
    # the card's usage code ran in the remote-code-only process and printed the decoded answers
    printed = hub_model["loaded"]["snippet_output"].strip()
    assert printed.startswith("[") and printed.endswith("]")


def test_unmerged_export_is_base_plus_adapter_subfolder(hub_model):
    outputs, expected = hub_model["outputs"], hub_model["expected"]
    assert torch.equal(outputs["attached_base.logits"], expected["base_logits"])  # AutoModel alone: the base
    assert torch.equal(outputs["attached_base.ids"], expected["base_ids"])
    assert torch.equal(outputs["attached.logits"], expected["logits"])
    assert torch.equal(outputs["attached.ids"], expected["ids"])
    attached = hub_model["attached_dir"]
    adapter_config = json.loads((attached / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == ATTACHED_REPO  # the repo it sits in, not a local path
    assert not (attached / "adapter_config.json").exists()
    card = (attached / "README.md").read_text()
    assert "peft" in card_metadata(card)["tags"] and "base_model" not in card_metadata(card)
    assert 'PeftModel.from_pretrained(model, repo, subfolder="adapter")' in card
    assert "| budgets trained on (K) | `144, 64, 32` |" in card


def test_merged_export_keeps_the_saved_dtype(hub_model, tmp_path):
    """A bfloat16 base is merged in float32 and stored in bfloat16: W + scale * B @ A rounded once."""
    bf16_base = tmp_path / "bf16_base"
    ShirgLavidaForDiffusionLM.from_pretrained(hub_model["base_dir"], dtype=torch.bfloat16).save_pretrained(bf16_base)
    ShirgLavidaProcessor.from_pretrained(hub_model["base_dir"]).save_pretrained(bf16_base)
    out = tmp_path / "merged"
    assert cli.main(["export", "--base", str(bf16_base), "--adapter", str(hub_model["adapter_dir"]), "--out", str(out),
                     "--merge"]) == 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    merged = load_file(out / "model.safetensors")
    base = ShirgLavidaForDiffusionLM.from_pretrained(bf16_base, dtype=torch.float32)
    expected = PeftModel.from_pretrained(base, hub_model["adapter_dir"]).merge_and_unload()
    for name in ("multi_modal_projector.linear_1.weight", "multi_modal_projector.linear_2.weight"):
        assert merged[name].dtype == torch.bfloat16
        assert torch.equal(merged[name], expected.get_parameter(name).detach().to(torch.bfloat16))


# --- bad input ----------------------------------------------------------------------------------------------------
def export_error(capsys, *argv) -> str:
    assert cli.main(["export", *map(str, argv)]) == 2
    return capsys.readouterr().err


def test_export_refuses_an_adapter_trained_for_another_base(hub_model, tmp_path, capsys):
    tiny = ShirgLavidaConfig.tiny()
    other = ShirgLavidaConfig.tiny(vision_config={**tiny.vision_config.to_dict(), "hidden_size": 48})
    save_base(tmp_path / "other_base", other)
    save_adapter(tmp_path / "other_base", tmp_path / "other_adapter")
    error = export_error(capsys, "--base", hub_model["base_dir"], "--adapter", tmp_path / "other_adapter",
                         "--out", tmp_path / "out", "--merge")
    assert "trained for another base" in error and "input size 48" in error
    assert "vision hidden size 32" in error
    assert not (tmp_path / "out").exists()


def test_export_refuses_an_existing_out_without_overwrite(hub_model, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("earlier results")
    error = export_error(capsys, "--base", hub_model["base_dir"], "--adapter", hub_model["adapter_dir"],
                         "--out", out, "--merge")
    assert "already exists; pass --overwrite" in error
    assert (out / "keep.txt").read_text() == "earlier results"


def test_export_refuses_a_base_without_processor_and_bad_repo_ids(hub_model, tmp_path, capsys):
    bare = tmp_path / "bare"
    ShirgLavidaForDiffusionLM(ShirgLavidaConfig.tiny()).save_pretrained(bare)
    common = ["--adapter", hub_model["adapter_dir"], "--out", tmp_path / "out"]
    assert "has no processor files" in export_error(capsys, "--base", bare, *common)
    base = ["--base", hub_model["base_dir"], *common]
    assert "--push needs --repo-id" in export_error(capsys, *base, "--push")
    assert "is not a Hub repo id" in export_error(capsys, *base, "--repo-id", "./local/dir")
    assert "is not a Hub repo id" in export_error(capsys, *base, "--base-repo", "/abs/path")
    assert "has no adapter_config.json" in export_error(capsys, "--base", hub_model["base_dir"], "--adapter",
                                                         hub_model["base_dir"], "--out", tmp_path / "out")
    assert not (tmp_path / "out").exists()
