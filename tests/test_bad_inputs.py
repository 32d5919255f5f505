"""Bad inputs and the one clear error each gets: a table per surface (Python API, command line).

Each row is (name, how to build and use the bad input, expected exception / exit code 2, message fragment).
Add a row when the API grows. Below the tables: the formerly silent results, now explicit.
"""

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import PIL.Image
import pytest
import torch

from shirg_hf import (
    ShirgLavidaConfig,
    ShirgLavidaForDiffusionLM,
    ShirgLavidaProcessor,
    build_prompt,
    build_tiny_tokenizer,
    cli,
)
from shirg_hf.processing.image_processing_shirg import load_image

GENERATE = {"max_new_tokens": 4, "block_length": 4, "step_ratio": 0.5}


@dataclass
class Env:
    """What a case may use: a tiny model per vision mode, a saved model folder, a scratch folder, monkeypatch."""

    tmp: Path
    monkeypatch: pytest.MonkeyPatch
    model_dir: Path
    models: dict
    cleanups: list = field(default_factory=list)

    def model(self, mode: str = "shirg"):
        return self.models[mode]

    def inputs(self, mode: str = "shirg", **kwargs):
        _, processor = self.models[mode]
        image = PIL.Image.new("RGB", (64, 48), "white")
        return processor(images=[image], text=[build_prompt("What is it?")], return_tensors="pt", **kwargs)

    def model_copy(self, name: str) -> Path:
        return Path(shutil.copytree(self.model_dir, self.tmp / name))


@pytest.fixture(scope="module")
def tiny_models():
    models = {}
    for mode in ("shirg", "full", "lowres", "lavida-hd"):
        config = ShirgLavidaConfig.tiny()
        config.vision_mode = mode
        torch.manual_seed(0)
        models[mode] = (ShirgLavidaForDiffusionLM(config).eval(),
                        ShirgLavidaProcessor.from_model_config(config, build_tiny_tokenizer()))
    return models


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad_inputs") / "model"
    assert cli.main(["demo", "--random-tiny", "--out", str(folder), "--max-new-tokens", "4"]) == 0
    return folder


@pytest.fixture
def env(tmp_path, monkeypatch, model_dir, tiny_models):
    environment = Env(tmp_path, monkeypatch, model_dir, tiny_models)
    yield environment
    for cleanup in environment.cleanups:
        cleanup()


# ---- bad files ----------------------------------------------------------------------------------------------
def truncated_jpeg(env) -> Path:
    path = env.tmp / "truncated.jpg"
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    PIL.Image.fromarray(noise).save(path, format="JPEG")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def not_an_image(env) -> Path:
    path = env.tmp / "notes.png"
    path.write_text("not an image")
    return path


def decompression_bomb(env) -> Path:
    """A 64x64 PNG with Pillow's bomb limit lowered to 100 pixels (a real bomb would be gigabytes)."""
    env.monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 100)
    path = env.tmp / "bomb.png"
    PIL.Image.new("RGB", (64, 64)).save(path)
    return path


def animated_gif(env) -> Path:
    path = env.tmp / "animated.gif"
    frames = [PIL.Image.new("RGB", (32, 32), color) for color in ("red", "blue")]
    frames[0].save(path, save_all=True, append_images=frames[1:])
    return path


def truncated_safetensors(env) -> Path:
    folder = env.model_copy("truncated_weights")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 1000])
    return folder


def invalid_config(env) -> Path:
    folder = env.model_copy("invalid_config")
    (folder / "config.json").write_text('{"model_type": "shirg_lavida", ')
    return folder


def missing_tensor(env) -> Path:
    from safetensors.torch import load_file, save_file

    folder = env.model_copy("missing_tensor")
    weights = load_file(folder / "model.safetensors")
    del weights["multi_modal_projector.linear_1.weight"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def nan_pixels(env, mode: str):
    model, _ = env.model(mode)
    inputs = env.inputs(mode)
    inputs["pixel_values"] = torch.full_like(inputs["pixel_values"], float("nan"))
    return model.generate(**inputs, **GENERATE)


def hub_offline(env) -> None:
    import huggingface_hub.constants as constants

    env.monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    env.monkeypatch.setattr(constants, "HF_HUB_CACHE", str(env.tmp / "hub_cache"))


def hub_unreachable(env) -> None:
    import huggingface_hub.constants as constants

    env.monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    env.monkeypatch.setattr(constants, "HF_HUB_CACHE", str(env.tmp / "hub_cache"))
    env.monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # discard port: connection refused


def hub_logged_out(env) -> None:
    import huggingface_hub.constants as constants

    env.monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    env.monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(env.tmp / "no_token"))
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        env.monkeypatch.delenv(name, raising=False)


def adapter_folder(env) -> Path:
    from safetensors.torch import save_file

    folder = env.tmp / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": "o/b"}))
    save_file({"w": torch.zeros(1)}, folder / "adapter_model.safetensors")
    return folder


def read_only_folder(env) -> Path:
    folder = env.tmp / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    env.cleanups.append(lambda: folder.chmod(0o755))
    if os.access(folder, os.W_OK):
        pytest.skip("running as root: folder permissions do not stop writes here")
    return folder


def missing_model_below_existing_folder(env) -> list:
    """`out/model` has the form of a Hub repo id, but `out/` exists here: it is a local path, never a Hub id."""
    env.monkeypatch.chdir(env.tmp)
    (env.tmp / "out").mkdir()
    return cli_generate(env, "out/model")


def eval_data(env, *bad_images) -> Path:
    """A jsonl VQA set of two good images followed by `bad_images` (paths)."""
    rows = []
    for index in range(2):
        path = env.tmp / f"good{index}.png"
        PIL.Image.new("RGB", (40, 30), (80 * index, 120, 200)).save(path)
        rows.append(path)
    rows += list(bad_images)
    data = env.tmp / "vqa.jsonl"
    data.write_text("".join(json.dumps({"id": f"q{index}", "image": str(path), "question": "What is it?",
                                        "answers": ["x"]}) + "\n" for index, path in enumerate(rows)))
    return data


def cli_generate(env, model, image=None):
    if image is None:
        image = env.tmp / "ok.png"
        PIL.Image.new("RGB", (40, 30), "white").save(image)
    return ["generate", "--model", str(model), "--image", str(image), "--question", "What is it?",
            "--max-new-tokens", "4"]


def cli_eval(env, data, *extra):
    return ["eval", "--model", str(env.model_dir), "--data", str(data), "--metric", "anls",
            "--out", str(env.tmp / "eval_out"), "--max-new-tokens", "4", "--block-length", "4", *extra]


# ---- the tables ---------------------------------------------------------------------------------------------
@dataclass
class ApiCase:
    name: str
    call: Callable  # env -> None; must raise
    error: type
    fragment: str


API_CASES = [
    ApiCase("empty input_ids", lambda env: env.model()[0].generate(
        input_ids=torch.zeros(1, 0, dtype=torch.long), pixel_values=env.inputs()["pixel_values"], **GENERATE),
        ValueError, "input_ids is empty"),
    ApiCase("empty prompt text", lambda env: env.model()[1](text=[""]), ValueError, "is empty"),
    ApiCase("float input_ids", lambda env: env.model()[0].generate(
        input_ids=env.inputs()["input_ids"].float(), pixel_values=env.inputs()["pixel_values"], **GENERATE),
        ValueError, "integer torch tensor"),
    ApiCase("3-D pixel_values", lambda env: env.model()[0].generate(
        input_ids=env.inputs()["input_ids"], pixel_values=env.inputs()["pixel_values"][0], **GENERATE),
        ValueError, "pixel_values[None]"),
    ApiCase("numpy pixel_values", lambda env: env.model()[0].generate(
        input_ids=env.inputs()["input_ids"], pixel_values=env.inputs()["pixel_values"].numpy(), **GENERATE),
        ValueError, "return_tensors='pt'"),
    ApiCase("image_sizes [[0, 0]]", lambda env: env.model("lavida-hd")[0].generate(
        **{**env.inputs("lavida-hd"), "image_sizes": torch.tensor([[0, 0]])}, **GENERATE),
        ValueError, "positive integers"),
    ApiCase("NaN pixels, full", lambda env: nan_pixels(env, "full"), ValueError, "NaN"),
    ApiCase("NaN pixels, lowres", lambda env: nan_pixels(env, "lowres"), ValueError, "NaN"),
    ApiCase("NaN pixels, lavida-hd", lambda env: nan_pixels(env, "lavida-hd"), ValueError, "NaN"),
    ApiCase("temperature=inf", lambda env: env.model()[0].generate(**env.inputs(), temperature=float("inf"),
                                                                   **GENERATE), ValueError, "finite number"),
    ApiCase("budget the processor did not expand for", lambda env: env.model()[0].generate(
        **{**env.inputs(shirg_budget=env.model()[0].config.num_highres_patches), "shirg_budget": 20}, **GENERATE),
        ValueError, "Pass the processor's output unchanged"),
    ApiCase("tensor missing from model.safetensors", lambda env: ShirgLavidaForDiffusionLM.from_pretrained(
        missing_tensor(env)), ValueError, "allow_missing_weights=True"),
    ApiCase("animated GIF", lambda env: env.model()[1](
        images=[PIL.Image.open(animated_gif(env))], text=[build_prompt("q")]), ValueError, "image.seek(i)"),
    ApiCase("decompression bomb", lambda env: load_image(decompression_bomb(env)), ValueError,
            "MAX_IMAGE_PIXELS"),
    ApiCase("truncated JPEG", lambda env: load_image(truncated_jpeg(env)), ValueError, "Cannot read"),
    ApiCase("32-bit mode I beyond 16 bits", lambda env: load_image(
        PIL.Image.fromarray(np.full((4, 4), 70000, dtype=np.int32))), ValueError, "rescale them"),
]


@pytest.mark.parametrize("case", API_CASES, ids=[case.name for case in API_CASES])
def test_api_bad_input(case, env):
    with pytest.raises(case.error) as raised:
        case.call(env)
    assert case.fragment in str(raised.value)
    assert "\n" not in str(raised.value)


@dataclass
class CliCase:
    name: str
    argv: Callable  # env -> argv for shirg_hf.cli.main (may set up the environment first)
    fragment: str


CLI_CASES = [
    CliCase("read-only --out", lambda env: ["demo", "--out", str(read_only_folder(env) / "model")],
            "cannot write"),
    CliCase("--out below a file", lambda env: ["demo", "--out", str(not_an_image(env) / "model")],
            "which is a file"),
    CliCase("missing local --model ./x", lambda env: cli_generate(env, "./no/such/model"), "no such folder"),
    CliCase("missing --model out/model (out/ exists)", missing_model_below_existing_folder, "no such folder"),
    CliCase("truncated safetensors", lambda env: cli_generate(env, truncated_safetensors(env)), "truncated"),
    CliCase("invalid config.json", lambda env: cli_generate(env, invalid_config(env)), "not valid JSON"),
    CliCase("tensor missing from model.safetensors", lambda env: cli_generate(env, missing_tensor(env)),
            "allow_missing_weights"),
    CliCase("decompression-bomb image", lambda env: cli_generate(env, env.model_dir, decompression_bomb(env)),
            "too large to decode"),
    CliCase("animated GIF image", lambda env: cli_generate(env, env.model_dir, animated_gif(env)), "frames"),
    CliCase("Hub id while offline", lambda env: hub_offline(env) or cli_generate(env, "org/not-cached"),
            "HF_HUB_OFFLINE"),
    CliCase("Hub unreachable", lambda env: hub_unreachable(env) or cli_generate(env, "org/somewhere"),
            "cannot reach the Hub"),
    CliCase("push-adapter without a token", lambda env: hub_logged_out(env) or [
        "push-adapter", str(adapter_folder(env)), "org/adapter", "--base-repo", "org/base"], "hf auth login"),
    CliCase("push-adapter while offline", lambda env: hub_offline(env) or [
        "push-adapter", str(adapter_folder(env)), "org/adapter", "--base-repo", "org/base"], "HF_HUB_OFFLINE"),
    CliCase("select --grid 400", lambda env: ["select", str(animated_gif(env)), "--grid", "400",
                                              "--out", str(env.tmp / "heat.png")], "--grid must be between"),
    CliCase("eval: truncated JPEG and a non-image", lambda env: cli_eval(
        env, eval_data(env, truncated_jpeg(env), not_an_image(env))), "--on-bad-image skip"),
]


@pytest.mark.parametrize("case", CLI_CASES, ids=[case.name for case in CLI_CASES])
def test_cli_bad_input(case, env, capsys):
    argv = case.argv(env)
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    # progress bars of transformers may precede it; the error itself is one line
    errors = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("shirg-hf ")]
    assert len(errors) == 1 and case.fragment in errors[0], err
    assert err.endswith(errors[0] + "\n")


# ---- silent results, now explicit ---------------------------------------------------------------------------
def rotated_jpeg(path: Path) -> Path:
    """A 40x20 (w x h) JPEG whose EXIF says 'rotate 90 degrees': upright it is 20x40."""
    image = PIL.Image.new("RGB", (40, 20), "white")
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(path, format="JPEG", exif=exif)
    return path


def test_exif_orientation_is_applied_the_same_way_for_paths_open_images_and_eval(tmp_path):
    from shirg_hf.evaluation import load_image as eval_load_image

    path = rotated_jpeg(tmp_path / "rotated.jpg")
    assert load_image(path).size == (20, 40)
    assert load_image(PIL.Image.open(path)).size == (20, 40)
    assert load_image(path.read_bytes()).size == (20, 40)
    assert eval_load_image(path).size == (20, 40)
    with PIL.Image.open(path) as opened:
        from shirg_hf.processing.image_processing_shirg import to_rgb_image

        assert to_rgb_image(opened).size == (20, 40)


def test_eight_bit_data_in_mode_i_keeps_its_brightness():
    values = np.full((8, 8), 200, dtype=np.int32)
    assert np.asarray(load_image(PIL.Image.fromarray(values, mode="I")))[0, 0].tolist() == [200, 200, 200]
    sixteen = np.full((8, 8), 51400, dtype=np.int32)  # 16-bit data: 51400 / 257 = 200
    assert np.asarray(load_image(PIL.Image.fromarray(sixteen, mode="I")))[0, 0].tolist() == [200, 200, 200]


def test_a_single_frame_of_a_gif_is_accepted(env):
    gif = PIL.Image.open(animated_gif(env))
    gif.seek(1)
    assert load_image(gif.convert("RGB")).getpixel((0, 0)) == (0, 0, 255)


def test_budget_k_equal_n_travels_with_the_batch(tiny_models):
    model, processor = tiny_models["shirg"]
    budget = model.config.num_highres_patches
    inputs = processor(images=[PIL.Image.new("RGB", (64, 48))], text=[build_prompt("q")], return_tensors="pt",
                       shirg_budget=budget)
    assert model(**inputs).kept_indices.shape == (1, budget)


def test_missing_weights_load_only_when_explicitly_allowed(env):
    from transformers import AutoModel

    folder = missing_tensor(env)
    model = AutoModel.from_pretrained(folder, allow_missing_weights=True)
    assert isinstance(model, ShirgLavidaForDiffusionLM)


def test_eval_skip_records_bad_images_as_failed_and_answers_the_rest(env, capsys):
    data = eval_data(env, truncated_jpeg(env), not_an_image(env))
    assert cli.main(cli_eval(env, data, "--on-bad-image", "skip")) == 0
    records = [json.loads(line) for line in (env.tmp / "eval_out" / "predictions.jsonl").read_text().splitlines()]
    failed = {record["id"]: record["error"] for record in records if "error" in record}
    assert sorted(failed) == ["q2", "q3"] and "Cannot read" in failed["q2"]
    metrics = json.loads((env.tmp / "eval_out" / "metrics.json").read_text())
    assert (metrics["num_answered"], metrics["num_failed"], metrics["failed_ids"]) == (2, 2, ["q2", "q3"])
    assert "2 failed" in capsys.readouterr().out
    # the rerun resumes: nothing left to answer, the failures stay recorded
    assert cli.main(cli_eval(env, data, "--on-bad-image", "skip")) == 0
