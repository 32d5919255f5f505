"""Every bash and python block of README.md runs as written, in README order, in one scratch folder.

A block may be marked by an HTML comment on the line before its fence: `<!-- readme-test: skip REASON -->` with
REASON in `SKIP_REASONS` (it needs what the suite does not have), or `<!-- readme-test: covered by TEST_FILE -->`
when that test file runs it. Python blocks share one namespace (the README's examples build on each other). In bash blocks, a
`shirg-hf ARGS` line runs `shirg_hf.cli.main(ARGS)` (the console script's entry point) and a `python SCRIPT.py ARGS`
line runs the script as `__main__` with those arguments, both in this process (a fresh interpreter per command
would cost seconds of imports each); any other line runs in `bash -e`. Everything runs with one thread.
"""

import os
import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from shirg_hf.cli import main

REPO_ROOT = Path(__file__).resolve().parents[1]
README = REPO_ROOT / "README.md"
SKIP_REASONS = ("real weights", "GPU", "Hub", "network", "suite")
MARKER = re.compile(r"<!-- readme-test: (skip (?P<reason>[^>]*?)|covered by (?P<test>\S+)) -->")
BLOCK = re.compile(r"(?ms)^(?:(?P<marker><!--[^\n]*-->)\n)?```(?P<lang>\w*)\n(?P<code>.*?)^```")


def readme_blocks() -> list[dict]:
    text = README.read_text(encoding="utf-8")
    blocks = []
    for match in BLOCK.finditer(text):
        line = text[:match.start("lang")].count("\n") + 1
        marker = MARKER.fullmatch(match.group("marker") or "") if match.group("marker") else None
        if match.group("marker") and marker is None:
            raise AssertionError(f"README.md:{line}: unknown marker {match.group('marker')!r}")
        blocks.append({"line": line, "lang": match.group("lang"), "code": match.group("code"),
                       "skip": marker and marker.group("reason"), "covered": marker and marker.group("test")})
    return blocks


def test_every_block_runs_or_is_marked():
    blocks = readme_blocks()
    assert blocks, "no fenced blocks found in README.md"
    for block in blocks:
        where = f"README.md:{block['line']}"
        assert block["lang"] in ("bash", "python"), f"{where}: fence language {block['lang']!r} (bash or python)"
        if block["skip"]:
            assert block["skip"] in SKIP_REASONS, f"{where}: skip reason {block['skip']!r} not in {SKIP_REASONS}"
        if block["covered"]:
            test_file = REPO_ROOT / block["covered"]
            assert test_file.is_file(), f"{where}: {block['covered']} does not exist"


def test_readme_blocks_run_as_written(tmp_path, monkeypatch):
    for name in ("examples", "docs"):  # paths the README uses relative to the repository root
        (tmp_path / name).symlink_to(REPO_ROOT / name)
    monkeypatch.chdir(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    namespace = {"__name__": "__readme__"}
    for block in readme_blocks():
        if block["skip"] or block["covered"]:
            continue
        where = f"README.md:{block['line']}"
        if block["lang"] == "python":
            try:
                exec(compile(block["code"], where, "exec"), namespace)
            except Exception as error:
                pytest.fail(f"{where} failed: {type(error).__name__}: {error}")
        else:
            for command in block["code"].replace("\\\n", " ").splitlines():
                run_command(command, where, tmp_path, env, monkeypatch)


def run_command(command: str, where: str, cwd: Path, env: dict, monkeypatch) -> None:
    argv = shlex.split(command, comments=True)
    if not argv:
        return
    if argv[0] == "shirg-hf":
        assert main(argv[1:]) == 0, f"{where}: `{command.strip()}` failed"
    elif argv[0] == "python" and len(argv) > 1 and argv[1].endswith(".py"):
        monkeypatch.setattr(sys, "argv", argv[1:])
        try:
            runpy.run_path(argv[1], run_name="__main__")
        except SystemExit as exit_info:
            assert exit_info.code in (None, 0), f"{where}: `{command.strip()}` exited {exit_info.code}"
    else:
        completed = subprocess.run(["bash", "-e", "-c", command], cwd=cwd, env=env, capture_output=True, text=True,
                                   timeout=600)
        assert completed.returncode == 0, f"{where}: `{command.strip()}` failed:\n{completed.stderr[-3000:]}"
