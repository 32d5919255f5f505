"""Atomic writes (`shirg_hf.fileio`): no destination is ever lost, mixed or silently replaced.

Other processes are real subprocesses that load `fileio.py` by path (it needs only the standard library), so
they start in a fraction of a second and use the very same locking protocol as `shirg-hf` commands.
"""

import os
import subprocess
import sys
from pathlib import Path

import PIL.Image
import pytest

from shirg_hf import cli, fileio
from shirg_hf.fileio import DestinationBusyError, atomic_file, atomic_folder, exclusive_lock, write_json_atomically

LOAD_FILEIO = (
    "import importlib.util, sys\n"
    f"spec = importlib.util.spec_from_file_location('fileio', {fileio.__file__!r})\n"
    "fileio = importlib.util.module_from_spec(spec)\n"
    "spec.loader.exec_module(fileio)\n"
)


def start_writer(dst: Path, content: str) -> subprocess.Popen:
    """A process inside `atomic_folder(dst)`: it writes `content`, says "ready", and finishes on a line of stdin."""
    script = LOAD_FILEIO + (
        "with fileio.atomic_folder(sys.argv[1]) as staging:\n"
        "    (staging / 'writer.txt').write_text(sys.argv[2])\n"
        "    print('ready', flush=True)\n"
        "    sys.stdin.readline()\n"
    )
    writer = subprocess.Popen([sys.executable, "-c", script, str(dst), content], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline() == "ready\n"
    return writer


def finish(writer: subprocess.Popen) -> int:
    writer.stdin.write("\n")
    writer.stdin.close()
    return writer.wait(timeout=60)


def hidden_entries(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if path.name.startswith("."))


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_folder_appearing_during_the_write_is_not_replaced(tmp_path):
    dst = tmp_path / "out"
    with pytest.raises(FileExistsError, match="appeared while it was written; pass --overwrite"):
        with atomic_folder(dst) as staging:
            (staging / "mine.txt").write_text("second")
            dst.mkdir()
            (dst / "theirs.txt").write_text("first")  # e.g. written by a tool that does not take the lock
    assert [path.name for path in dst.iterdir()] == ["theirs.txt"]
    assert hidden_entries(tmp_path) == []  # no staging, retired copy or lock file left


def test_a_destination_being_written_by_another_process_is_refused_and_kept(tmp_path):
    dst = tmp_path / "out"
    writer = start_writer(dst, "first")
    try:
        with pytest.raises(DestinationBusyError, match=rf"is being written by pid {writer.pid} on host "):
            with atomic_folder(dst, overwrite=True):
                pass
    finally:
        assert finish(writer) == 0
    assert (dst / "writer.txt").read_text() == "first"
    assert hidden_entries(tmp_path) == []


def test_concurrent_demo_into_one_folder_exits_2_and_the_writer_wins(tmp_path, capsys):
    dst = tmp_path / "model"
    writer = start_writer(dst, "first")
    try:
        assert cli.main(["demo", "--out", str(dst), "--max-new-tokens", "4"]) == 2
        error = capsys.readouterr().err
        assert f"is being written by pid {writer.pid}" in error and len(error.strip().splitlines()) == 1
    finally:
        assert finish(writer) == 0
    assert [path.name for path in dst.iterdir()] == ["writer.txt"]


def test_a_failed_swap_puts_the_old_copy_back(tmp_path, monkeypatch):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "old.txt").write_text("old")
    renames = []

    def failing_second_rename(source, target):
        renames.append((source, target))
        if len(renames) == 2:
            raise OSError(5, "Input/output error")
        return os_rename(source, target)

    os_rename = os.rename
    monkeypatch.setattr(fileio.os, "rename", failing_second_rename)
    with pytest.raises(OSError, match="Input/output error"):
        with atomic_folder(dst, overwrite=True) as staging:
            (staging / "new.txt").write_text("new")
    assert [path.name for path in dst.iterdir()] == ["old.txt"]
    assert hidden_entries(tmp_path) == []


def test_a_crash_between_the_renames_is_recovered_by_the_next_writer(tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "old.txt").write_text("old")
    script = LOAD_FILEIO + (
        "import os\n"
        "rename = os.rename\n"
        "calls = []\n"
        "def dying_rename(source, target):\n"
        "    calls.append(source)\n"
        "    if len(calls) == 2:\n"
        "        os._exit(9)  # killed between retiring the old copy and moving the new one in\n"
        "    rename(source, target)\n"
        "os.rename = dying_rename\n"
        "with fileio.atomic_folder(sys.argv[1], overwrite=True) as staging:\n"
        "    (staging / 'new.txt').write_text('new')\n"
    )
    assert subprocess.run([sys.executable, "-c", script, str(dst)]).returncode == 9
    assert not dst.exists()
    left = hidden_entries(tmp_path)  # the dead writer's lock file, retired copy and staging
    assert [name.split("-")[0] for name in left] == [".out.lock", ".out.old", ".out.tmp"]

    with pytest.raises(FileExistsError, match="already exists; pass --overwrite"):
        with atomic_folder(dst):  # restores the old copy first, then refuses to replace it
            pass
    assert [path.name for path in dst.iterdir()] == ["old.txt"]
    assert hidden_entries(tmp_path) == []


def test_stale_staging_is_removed_only_when_its_process_is_dead(tmp_path):
    dst = tmp_path / "out"
    stale = tmp_path / f".out.tmp-{dead_pid()}-abcd1234"
    alive = tmp_path / f".out.tmp-{os.getpid()}-abcd1234"
    other = tmp_path / f".outer.tmp-{dead_pid()}-abcd1234"  # another destination's staging
    for folder in (stale, alive, other):
        folder.mkdir()
        (folder / "weights.bin").write_bytes(b"\0" * 64)
    with atomic_folder(dst) as staging:
        (staging / "new.txt").write_text("new")
    assert not stale.exists() and alive.exists() and other.exists()
    assert (dst / "new.txt").read_text() == "new"


def test_files_and_folders_are_fsynced_before_the_final_rename(tmp_path, monkeypatch):
    events = []
    fsync, rename = os.fsync, os.rename

    def recording_fsync(descriptor):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{descriptor}")))
        fsync(descriptor)

    def recording_rename(source, target):
        events.append(("rename", str(source), str(target)))
        rename(source, target)

    monkeypatch.setattr(fileio.os, "fsync", recording_fsync)
    monkeypatch.setattr(fileio.os, "rename", recording_rename)
    dst = tmp_path / "out"
    with atomic_folder(dst) as staging:
        (staging / "sub").mkdir()
        (staging / "sub" / "weights.bin").write_bytes(b"1")
        (staging / "config.json").write_text("{}")
    final = events.index(("rename", str(staging), str(dst)))
    synced_before = {event[1] for event in events[:final] if event[0] == "fsync"}
    assert {str(staging), str(staging / "sub"), str(staging / "sub" / "weights.bin"),
            str(staging / "config.json")} <= synced_before
    assert ("fsync", str(tmp_path)) in events[final:]  # the new name itself is durable


def test_atomic_file_refuses_a_file_appearing_meanwhile_and_replaces_only_with_overwrite(tmp_path):
    out = tmp_path / "heat.png"
    with pytest.raises(FileExistsError, match="appeared while it was written"):
        with atomic_file(out) as stream:
            stream.write(b"mine")
            out.write_bytes(b"theirs")
    assert out.read_bytes() == b"theirs"
    with atomic_file(out, overwrite=True) as stream:
        stream.write(b"mine")
    assert out.read_bytes() == b"mine" and hidden_entries(tmp_path) == []
    assert out.stat().st_mode & 0o777 == 0o666 & ~current_umask()


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def test_the_three_writers_are_one(tmp_path, monkeypatch):
    """`write_json_atomically` (eval) and `save_png_atomically` (select, demo) write through `atomic_file`."""
    from shirg_hf import evaluation, visualize

    assert evaluation.write_json_atomically is write_json_atomically
    used = []
    original = fileio.atomic_file

    def counting_atomic_file(*args, **kwargs):
        used.append(Path(args[0]).name)
        return original(*args, **kwargs)

    monkeypatch.setattr(visualize, "atomic_file", counting_atomic_file)
    visualize.save_png_atomically(PIL.Image.new("RGB", (4, 4)), tmp_path / "heat.png", overwrite=False)
    assert used == ["heat.png"] and PIL.Image.open(tmp_path / "heat.png").size == (4, 4)


def test_the_lock_is_reentrant_names_its_holder_and_leaves_nothing(tmp_path):
    dst = tmp_path / "out"
    with exclusive_lock(dst):
        with exclusive_lock(dst):  # the eval run lock around the output folder's atomic write
            write_json_atomically(tmp_path / "metrics.json", {"a": 1})
        holder = (tmp_path / ".out.lock").read_text().split()
        assert holder[0] == str(os.getpid())
        script = LOAD_FILEIO + (
            "try:\n"
            "    with fileio.exclusive_lock(sys.argv[1]):\n"
            "        pass\n"
            "except fileio.DestinationBusyError as error:\n"
            "    print(error)\n"
        )
        refused = subprocess.run([sys.executable, "-c", script, str(dst)], capture_output=True, text=True).stdout
        assert f"is being written by pid {os.getpid()} on host {holder[1]}" in refused
    assert hidden_entries(tmp_path) == []
