"""Commands as a user runs them: quiet by default (`-v` restores the libraries' output), no warnings from our
code, `--device`/`--dtype` everywhere, files written under the user's umask, `--version`, the adapter card, and
`device_map="auto"`. The demo's own output is checked in tests/test_cli.py and tests/test_readme.py."""

import json
import os
import stat
import subprocess
import sys
import warnings

import pytest
import torch
from PIL import Image
from transformers import AutoModel

import shirg_hf
from shirg_hf import ShirgLavidaConfig, ShirgLavidaForDiffusionLM, ShirgLavidaProcessor, build_tiny_tokenizer
from shirg_hf.cli import build_parser, main
from shirg_hf.devices import resolve_device, resolve_dtype
from shirg_hf.export import save_model_folder

MODEL_COMMANDS = ("generate", "demo", "select", "eval", "compare")


def run_cli(*args, cwd, umask=0o022, warnings_as_errors=True):
    """`shirg-hf ARGS` in a fresh process (with `-W error` unless told), under `umask`."""
    flags = ["-W", "error"] if warnings_as_errors else []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, *flags, "-m", "shirg_hf.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600, preexec_fn=lambda: os.umask(umask))


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def quiet_main(capsys, *args) -> tuple[int, str, str]:
    """`shirg-hf ARGS` in this process with every warning raised as an error; (exit code, stdout, stderr)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        code = main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny model folder (`save_model_folder` under umask 022), an image, a one-question data set, and
    `shirg-hf generate` on them run in a fresh process with `-W error`."""
    root = tmp_path_factory.mktemp("commands")
    image = root / "page.png"
    Image.new("RGB", (120, 90), (250, 250, 250)).save(image)
    (root / "data.jsonl").write_text(json.dumps({"image": str(image), "question": "What?", "answers": ["a"]}) + "\n")
    config = ShirgLavidaConfig.tiny()
    torch.manual_seed(0)
    previous = os.umask(0o022)
    try:
        save_model_folder(ShirgLavidaForDiffusionLM(config).eval(),
                          ShirgLavidaProcessor.from_model_config(config, build_tiny_tokenizer()), root / "model")
    finally:
        os.umask(previous)
    fresh = run_cli("generate", "--model", root / "model", "--image", image, "--question", "What?",
                    "--max-new-tokens", 8, cwd=root)
    return root, image, fresh


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"shirg-hf {shirg_hf.__version__}"


def test_commands_print_their_result_and_nothing_else(workspace, capsys, umask_022):
    root, image, fresh = workspace
    assert fresh.returncode == 0 and fresh.stderr == "", fresh.stderr[-2000:]  # fresh process, -W error
    assert "prefix tokens" in fresh.stdout
    model = root / "model"
    code, out, err = quiet_main(capsys, "generate", "--model", model, "--image", image, "--question", "What?",
                                "--max-new-tokens", 8)
    assert code == 0 and err == "" and "prefix tokens" in out
    code, out, err = quiet_main(capsys, "select", image, "--model", model, "--out", root / "heat.png")
    assert code == 0 and err == "" and "kept" in out
    code, out, err = quiet_main(capsys, "eval", "--model", model, "--data", root / "data.jsonl", "--metric", "anls",
                                "--out", root / "eval", "--max-new-tokens", 8, "--block-length", 8)
    assert code == 0 and "Loading weights" not in err and "Warning" not in err  # its own progress bar only
    code = main(["generate", "-v", "--model", str(model), "--image", str(image), "--question", "What?",
                 "--max-new-tokens", "8"])
    assert code == 0 and "Loading weights" in capsys.readouterr().err


def test_written_files_follow_the_umask(workspace, capsys):
    root, image, _ = workspace
    model = root / "model"
    for path in [model / "model.safetensors", model / "README.md", model / "tokenizer.json", root / "heat.png",
                 *(root / "eval").iterdir()]:
        assert mode(path) == 0o644, path
    previous = os.umask(0o077)
    try:
        assert main(["select", str(image), "--out", str(root / "private.png")]) == 0
    finally:
        os.umask(previous)
    assert mode(root / "private.png") == 0o600


@pytest.mark.parametrize("command", MODEL_COMMANDS)
def test_model_commands_take_device_and_dtype(command):
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices[command]
    options = {option: action for action in sub._actions for option in action.option_strings}
    assert options["--device"].default == "auto" and options["--dtype"].default == "auto"
    assert set(options["--dtype"].choices) == {"auto", "float32", "bfloat16", "float16"}


def test_device_and_dtype_resolution(workspace, capsys):
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("auto") == "auto" and resolve_dtype("auto", in_memory=True) == torch.float32
    assert resolve_dtype("bfloat16") is torch.bfloat16
    root, image, _ = workspace
    common = ["--model", str(root / "model"), "--image", str(image), "--question", "What?", "--max-new-tokens", "8"]
    assert main(["generate", *common, "--device", "cpu", "--dtype", "bfloat16"]) == 0
    assert "prefix tokens" in capsys.readouterr().out
    if not torch.cuda.is_available():
        assert main(["generate", *common, "--device", "cuda"]) == 2
        assert "CUDA is not available here" in capsys.readouterr().err
    assert main(["generate", *common, "--device", "gpu0"]) == 2
    assert "is not a torch device" in capsys.readouterr().err


def test_device_map_auto_places_the_model(workspace):
    from transformers import AutoProcessor

    root, image, _ = workspace
    model = AutoModel.from_pretrained(root / "model", device_map="auto")  # accelerate plans the placement
    expected = resolve_device("auto").type
    assert {parameter.device.type for parameter in model.parameters()} == {expected}
    assert model.dtype == torch.float32  # dtype auto: as saved
    processor = AutoProcessor.from_pretrained(root / "model")
    inputs = processor(images=[Image.open(image)], text=[shirg_hf.build_prompt("What?")]).to(model.device)
    assert model.generate(**inputs, max_new_tokens=8, block_length=8).shape == (1, 8)


def test_adapter_folder_has_a_card_and_an_absolute_base(tmp_path, monkeypatch):
    from shirg_hf.train import main as train_main

    monkeypatch.chdir(tmp_path)
    train_main(["--base", "tiny", "--budgets", "full,32", "--output_dir", "runs/tiny", "--max_steps", "1",
                "--per_device_train_batch_size", "2", "--report_to", "none", "--save_strategy", "no"])
    adapter = tmp_path / "runs" / "tiny"
    base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert os.path.isabs(base) and os.path.samefile(base, adapter / "base-model")
    card = (adapter / "README.md").read_text()
    for expected in (f"model at `{base}`", "| LoRA rank r | `16` |", "multi_modal_projector",
                     "| budgets trained on (K) | `144, 32` |", "| training data |", "Pillow", "peft"):
        assert expected in card, expected
    assert all(mode(path) == 0o644 for path in adapter.rglob("*") if path.is_file())


def test_select_budget_beyond_the_random_tower_names_the_fix(tmp_path, capsys):
    image = tmp_path / "page.png"
    Image.new("RGB", (64, 48), "white").save(image)
    assert main(["select", str(image), "--budget", "768", "--out", str(tmp_path / "heat.png")]) == 2
    assert "pass --grid 48 for LaViDa's 2,304 high-res patches, or --model DIR" in capsys.readouterr().err
