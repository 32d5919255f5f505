"""Registration: saved folders load through the Auto classes, installed and as remote code.

The remote-code check runs in a subprocess where `shirg_hf` cannot be imported (a meta-path finder blocks
it, which also defeats the editable install), with `HF_HUB_OFFLINE=1` and a private `HF_HOME`: it must
rebuild the config, image processor and processor from the code files copied by `save_pretrained` alone,
and produce the same dicts and the same outputs bit for bit.
"""

import json
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoImageProcessor, AutoProcessor

from isolation import BLOCK_SHIRG_HF
from shirg_hf import ShirgImageProcessor, ShirgLavidaConfig, ShirgLavidaProcessor, build_prompt, build_tiny_tokenizer

MODES = ("shirg", "lavida-hd")

CHILD_SCRIPT = BLOCK_SHIRG_HF + r"""
import json

import numpy as np
import PIL.Image
from safetensors.torch import save_file
from transformers import AutoConfig, AutoImageProcessor, AutoProcessor

work_dir, modes = sys.argv[1], sys.argv[2:]
inputs = json.load(open(f"{work_dir}/inputs.json"))
arrays = np.load(f"{work_dir}/images.npz")
images = [PIL.Image.fromarray(arrays[name]) for name in sorted(arrays.files)]
report, tensors, settings = {}, {}, {}
for mode in modes:
    saved = f"{work_dir}/{mode}"
    config = AutoConfig.from_pretrained(saved, trust_remote_code=True)
    image_processor = AutoImageProcessor.from_pretrained(saved, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(saved, trust_remote_code=True)
    report[mode] = {
        "modules": [type(obj).__module__ for obj in (config, image_processor, processor)],
        "classes": [type(obj).__name__ for obj in (config, image_processor, processor)],
        "config": json.loads(config.to_json_string()),
        "image_processor": json.loads(image_processor.to_json_string()),
        "processor": json.loads(processor.to_json_string()),
        "chat_template": processor.chat_template,
    }
    outputs = {
        "processor": processor(images=images, text=inputs["texts"]),
        "image_processor": image_processor(images, return_tensors="pt"),
    }
    if mode == "shirg":
        outputs["processor_budget"] = processor(images=images, text=inputs["texts"], shirg_budget=inputs["budget"])
    for name, output in outputs.items():
        for key, value in output.items():
            if hasattr(value, "contiguous"):
                tensors[f"{mode}.{name}.{key}"] = value.contiguous()
            else:  # the settings the prompt was expanded for (vision_mode, selection_method, shirg_budget)
                settings[f"{mode}.{name}.{key}"] = value
report["settings"] = settings
json.dump(report, open(f"{work_dir}/report.json", "w"))
save_file(tensors, f"{work_dir}/outputs.safetensors")
"""


@pytest.fixture(scope="module")
def saved_folders(tmp_path_factory):
    """One folder per mode holding config + processor (+ tokenizer and code), and the inputs to feed them."""
    work_dir = tmp_path_factory.mktemp("remote_code")
    rng = np.random.default_rng(0)
    arrays = {"image_0": rng.integers(0, 256, (500, 700, 3), dtype=np.uint8),
              "image_1": rng.integers(0, 256, (90, 60, 3), dtype=np.uint8)}
    np.savez(work_dir / "images.npz", **arrays)
    inputs = {"texts": [build_prompt("What is on the left?"), build_prompt("<image> Any text?")], "budget": 20}
    (work_dir / "inputs.json").write_text(json.dumps(inputs))
    objects = {}
    for mode in MODES:
        config = ShirgLavidaConfig.tiny(vision_mode=mode)
        processor = ShirgLavidaProcessor.from_model_config(config, build_tiny_tokenizer())
        config.save_pretrained(work_dir / mode)
        processor.save_pretrained(work_dir / mode)
        objects[mode] = (config, processor)
    images = [PIL.Image.fromarray(arrays[name]) for name in sorted(arrays)]
    return work_dir, objects, images, inputs


@pytest.fixture(scope="module")
def remote_results(saved_folders, tmp_path_factory):
    work_dir = saved_folders[0]
    hf_home = tmp_path_factory.mktemp("hf_home")
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PYTHON", "HF_"))}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(hf_home), TRANSFORMERS_VERBOSITY="error")
    completed = subprocess.run(
        [sys.executable, "-I", "-c", CHILD_SCRIPT, str(work_dir), *MODES],
        cwd=hf_home, env=env, capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    report = json.loads((work_dir / "report.json").read_text())
    return report, load_file(work_dir / "outputs.safetensors")


@pytest.mark.parametrize("mode", MODES)
def test_remote_code_rebuilds_identical_objects(saved_folders, remote_results, mode):
    _, objects, _, _ = saved_folders
    config, processor = objects[mode]
    report = remote_results[0][mode]
    assert report["classes"] == ["ShirgLavidaConfig", "ShirgImageProcessor", "ShirgLavidaProcessor"]
    assert all(module.startswith("transformers_modules.") for module in report["modules"]), report["modules"]
    assert report["config"] == json.loads(config.to_json_string())
    assert report["image_processor"] == json.loads(processor.image_processor.to_json_string())
    # the saving object carries the `auto_map` that save_pretrained added; a loaded processor drops it
    saved_processor = {k: v for k, v in json.loads(processor.to_json_string()).items() if k != "auto_map"}
    assert report["processor"] == saved_processor
    assert report["chat_template"] == processor.chat_template


@pytest.mark.parametrize("mode", MODES)
def test_remote_code_outputs_are_identical(saved_folders, remote_results, mode):
    _, objects, images, inputs = saved_folders
    processor = objects[mode][1]
    tensors, settings = remote_results[1], remote_results[0]["settings"]
    expected = {
        "processor": processor(images=images, text=inputs["texts"]),
        "image_processor": processor.image_processor(images, return_tensors="pt"),
    }
    if mode == "shirg":
        expected["processor_budget"] = processor(images=images, text=inputs["texts"], shirg_budget=inputs["budget"])
    keys = {f"{mode}.{name}.{key}" for name, output in expected.items() for key in output}
    assert keys == {key for key in [*tensors, *settings] if key.startswith(f"{mode}.")}
    for name, output in expected.items():
        for key, value in output.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(tensors[f"{mode}.{name}.{key}"], value), f"{mode}.{name}.{key}"
            else:
                assert settings[f"{mode}.{name}.{key}"] == value, f"{mode}.{name}.{key}"
    assert settings[f"{mode}.processor.vision_mode"] == mode


def test_installed_package_wins_over_saved_code(saved_folders):
    """With shirg_hf imported, the Auto classes resolve to the package's classes (no trust_remote_code needed)."""
    work_dir, objects, images, inputs = saved_folders
    saved = work_dir / "shirg"
    assert type(AutoConfig.from_pretrained(saved)) is ShirgLavidaConfig
    assert type(AutoImageProcessor.from_pretrained(saved)) is ShirgImageProcessor
    for trust_remote_code in (None, True):
        loaded = AutoProcessor.from_pretrained(saved, trust_remote_code=trust_remote_code)
        assert type(loaded) is ShirgLavidaProcessor
        assert torch.equal(loaded(images=images, text=inputs["texts"])["input_ids"],
                           objects["shirg"][1](images=images, text=inputs["texts"])["input_ids"])


def test_saved_folder_is_self_contained(saved_folders):
    work_dir = saved_folders[0]
    for mode in MODES:
        names = set(os.listdir(work_dir / mode))
        assert {"config.json", "configuration_shirg_lavida.py", "configuration_llada.py", "processor_config.json",
                "processing_shirg_lavida.py", "image_processing_shirg.py", "visual_tokens.py", "tokenizer.json",
                "tokenizer_config.json", "chat_template.jinja"} <= names
        assert not (work_dir / mode / "visual_tokens.py").is_symlink()  # the contract's content, not a link
        config = json.loads((work_dir / mode / "config.json").read_text())
        assert config["auto_map"] == {"AutoConfig": "configuration_shirg_lavida.ShirgLavidaConfig"}
