"""The `shirg-hf` command line: every sub-command has --help; demo and generate run end to end."""

import subprocess
import sys

import pytest
import torch
from PIL import Image

from shirg_hf.cli import COMMAND_MODULES, build_parser, main

SUBCOMMANDS = ("demo", "generate", "convert-lavida", "select", "push-adapter", "export", "eval")


def test_every_subcommand_is_registered_with_help(capsys):
    choices = build_parser()._subparsers._group_actions[0].choices
    assert set(SUBCOMMANDS) <= set(choices)
    for name in SUBCOMMANDS:
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0
    assert len(COMMAND_MODULES) == len(set(COMMAND_MODULES))


def test_console_script_entry_point():
    result = subprocess.run([sys.executable, "-m", "shirg_hf.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "demo" in result.stdout


def test_demo_saves_a_loadable_folder_and_generate_uses_it(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--random-tiny", "--out", str(out), "--max-new-tokens", "8"]) == 0
    printed = capsys.readouterr().out
    assert "RANDOM weights" in printed and "prefix KV cache" in printed and "answer ids" in printed
    for name in ("config.json", "model.safetensors", "processor_config.json", "heatmap.png", "README.md",
                 "generation_config.json", "modeling_shirg_lavida.py"):
        assert (out / name).is_file(), name
    heatmap = Image.open(out / "heatmap.png")
    assert heatmap.width > heatmap.height > 100

    assert main(["demo", "--random-tiny", "--out", str(out)]) == 2  # never overwrites without asking
    assert "--overwrite" in capsys.readouterr().err

    image = tmp_path / "page.png"
    Image.new("RGB", (120, 90), (250, 250, 250)).save(image)
    assert main(["generate", "--model", str(out), "--image", str(image), "--question", "what is this?",
                 "--budget", "100", "--max-new-tokens", "8"]) == 0
    assert "prefix tokens" in capsys.readouterr().out
    assert main(["generate", "--model", str(out), "--image", str(image), "--question", "what?",
                 "--budget", "5000"]) == 2
    assert "budget" in capsys.readouterr().err
    assert main(["generate", "--model", str(out), "--image", str(tmp_path / "missing.png"),
                 "--question", "what?"]) == 2
    assert "not found" in capsys.readouterr().err

    heat = tmp_path / "heat.png"  # `select` with the saved model's own tower and selection settings
    assert main(["select", str(image), "--model", str(out), "--out", str(heat)]) == 0
    assert "kept 128 of 576 patches" in capsys.readouterr().out and heat.is_file()


def test_demo_on_a_user_image_with_a_question(tmp_path, capsys):
    image = tmp_path / "mine.png"
    Image.new("RGB", (200, 150), (10, 200, 30)).save(image)
    assert main(["demo", "--random-tiny", "--image", str(image), "--question", "Which colour dominates?",
                 "--budget", "96", "--max-new-tokens", "8"]) == 0
    printed = capsys.readouterr().out
    assert "Which colour dominates?" in printed and "97 (K + 1 summary)" in printed
    assert main(["demo", "--question", "  "]) == 2


def test_demo_chooses_its_thread_count_and_restores_the_callers(monkeypatch, capsys):
    before, calls, set_num_threads = torch.get_num_threads(), [], torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda count: calls.append(count) or set_num_threads(count))
    assert main(["demo", "--random-tiny", "--max-new-tokens", "4"]) == 0
    assert main(["demo", "--random-tiny", "--max-new-tokens", "4", "--threads", "2"]) == 0
    capsys.readouterr()
    assert calls == [1, before, 2, before] and torch.get_num_threads() == before  # 1 unless asked, then restored
    assert main(["demo", "--threads", "0"]) == 2
    assert "--threads must be at least 1" in capsys.readouterr().err
