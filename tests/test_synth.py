"""`shirg-hf synth`: determinism, split disjointness, the eval schema, coverage of families and question types,
evidence boxes against the drawn answer glyphs, and the native-side glyph bound."""

import hashlib
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from shirg_hf import cli, data, evaluation, synth

NUM_SAMPLES = 360  # enough for every (family, question type) pair


@pytest.fixture(scope="module")
def samples():
    return [synth.generate_sample("train", 3, index) for index in range(NUM_SAMPLES)]


def folder_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


@pytest.mark.slow
def test_output_is_byte_identical_across_processes_and_thread_counts(tmp_path):
    """Two processes with 1 and 2 threads write the same files; the images and rows match the in-process API."""
    folders, processes = [], []
    for threads in (1, 2):
        folder = tmp_path / f"threads{threads}"
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "shirg_hf.cli", "synth", "--out", str(folder), "--split", "val", "--n", "24",
             "--seed", "5"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        folders.append(folder)
    for process in processes:
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr.decode()
    assert folder_digest(folders[0]) == folder_digest(folders[1])

    import datasets

    written = datasets.load_from_disk(str(folders[0]))
    for index, row in enumerate(written):
        sample = synth.generate_sample("val", 5, index)
        assert np.array_equal(np.asarray(row.pop("image")), np.asarray(sample.image))
        assert row == sample.row


def test_splits_never_share_a_layout_seed():
    seeds = {split: {synth.layout_seed(split, seed, index) for seed in range(3) for index in range(500)}
             for split in synth.SPLIT_CODES}
    assert all(len(values) == 1500 for values in seeds.values())
    assert not (seeds["train"] & seeds["val"] or seeds["train"] & seeds["test"] or seeds["val"] & seeds["test"])
    images = {split: {hashlib.sha256(synth.generate_sample(split, 0, index).image.tobytes()).hexdigest()
                      for index in range(30)} for split in synth.SPLIT_CODES}
    assert not (images["train"] & images["val"] or images["train"] & images["test"] or images["val"] & images["test"])
    with pytest.raises(ValueError, match="--split"):
        synth.layout_seed("dev", 0, 0)


def test_written_folder_is_accepted_by_eval(tmp_path):
    import datasets

    out = tmp_path / "test_set"
    assert cli.main(["synth", "--out", str(out), "--split", "test", "--n", "12", "--seed", "1"]) == 0
    dataset, split = data.pick_split(data.load_vqa_data(out)[0], None, out)
    data.check_columns(dataset, str(out))
    data.check_images(dataset, out)
    evaluation.check_answers(dataset, "anls", out)
    assert len(data.question_ids(dataset, out)) == 12
    assert split is None and dataset.features == synth.dataset_features()
    assert isinstance(dataset[0]["image"], __import__("PIL").Image.Image)
    assert dataset[0]["image"].size == (synth.EVIDENCE_GEOMETRY.high_res_side,) * 2
    settings = __import__("json").loads((out / synth.CONFIG_NAME).read_text())
    assert settings["split"] == "test" and settings["fine_glyphs_below_bound"] is True
    assert isinstance(datasets.load_from_disk(str(out)), datasets.Dataset)


def test_every_family_and_question_type_is_produced(samples):
    produced = Counter((s.row["family"], s.row["question_type"]) for s in samples)
    expected = {(family, kind) for family, mix in synth.QUESTION_MIX.items() for kind in mix}
    assert set(produced) == expected
    assert Counter(s.row["family"] for s in samples) == {family: NUM_SAMPLES // 3 for family in synth.FAMILIES}
    assert len({s.row["id"] for s in samples}) == NUM_SAMPLES


def test_answers_are_spread_over_glyphs_colours_and_yes_no(samples):
    fine = "".join(s.row["answers"][0] for s in samples if s.row["question_type"] == "detail"
                   and s.row["family"] != "chart")
    assert set(fine) == set(synth.ANSWER_ALPHABET)
    colours = {s.row["answers"][0] for s in samples if s.row["question_type"] in ("reverse", "global")}
    assert set(synth.COLOUR_NAMES) <= colours
    spatial = Counter(s.row["answers"][0] for s in samples if s.row["question_type"] == "spatial")
    assert set(spatial) == {"yes", "no"}
    lengths = Counter(s.row["answer_glyphs"] for s in samples if s.row["question_type"] == "detail")
    assert set(lengths) == {1, 2, 3}


def test_evidence_boxes_cover_the_drawn_answer_glyphs(samples):
    """The ink of every answer glyph (redrawn from the metadata) lies inside the evidence boxes and is visible."""
    side = synth.EVIDENCE_GEOMETRY.high_res_side
    checked = 0
    for sample in samples:
        row = sample.row
        assert len(sample.answer_glyphs) == row["answer_glyphs"]
        assert (row["answer_glyphs"] > 0) == (row["question_type"] in synth.FINE_QUESTION_TYPES)
        if not sample.answer_glyphs:
            continue
        ink = np.zeros((side, side), dtype=bool)
        for glyph in sample.answer_glyphs:
            x0, y0, x1, y1 = glyph.box
            ink[y0:y1, x0:x1] |= np.asarray(synth.glyph_mask(glyph.char, glyph.unit)) > 0
        covered = np.zeros_like(ink)
        for x0, y0, x1, y1 in row["evidence_boxes"]:
            covered[y0:y1, x0:x1] = True
        assert ink.any() and not (ink & ~covered).any(), row
        pixels = np.asarray(sample.image)[ink]  # [n, 3]: one ink colour, nothing drawn over the glyphs
        assert (pixels == pixels[0]).all() and pixels[0].max() < 100, row
        checked += 1
    assert checked > NUM_SAMPLES // 2


@pytest.mark.parametrize("preset", ["evidence", "tiny", "lavida"])
def test_fine_glyphs_are_below_the_native_bound(preset):
    geometry = synth.preset_geometry(preset)
    families = ("tags", "chart") if preset == "tiny" else synth.FAMILIES
    ratio = geometry.native_side / geometry.high_res_side
    for index in range(60):
        sample = synth.generate_sample("test", 0, index, geometry, families)
        assert all(0 <= x0 < x1 <= geometry.high_res_side and 0 <= y0 < y1 <= geometry.high_res_side
                   for x0, y0, x1, y1 in sample.row["evidence_boxes"])
        for glyph in sample.answer_glyphs:
            height = glyph.box[3] - glyph.box[1]
            assert height == synth.glyph_height_px(1.0) == synth.GLYPH_ROWS
            assert height * ratio < synth.NATIVE_GLYPH_MAX_PX
    # the stage-1 scale: as tall at the native side as the default glyphs at the high-res side
    native_scale = synth.resolve_glyph_scale("native", geometry)
    assert synth.native_glyph_height_px(native_scale, geometry) >= synth.GLYPH_ROWS - 0.5
    if preset != "tiny":
        sample = synth.generate_sample("train", 0, 0, geometry, glyph_scale=native_scale)
        assert all((g.box[3] - g.box[1]) * ratio >= synth.NATIVE_GLYPH_MAX_PX for g in sample.answer_glyphs)


def test_font_glyphs_are_distinct_and_well_formed():
    shapes = list(synth.FONT.values())
    assert len(set(shapes)) == len(shapes)
    assert all(len(rows) == synth.GLYPH_ROWS and all(len(r) == synth.GLYPH_COLS for r in rows) for rows in shapes)
    assert set(synth.ANSWER_ALPHABET) <= set(synth.FONT) and len(set(synth.ANSWER_ALPHABET)) == 24
    assert all(set(key) <= set(synth.FONT) for key in synth.FORM_KEYS)


@pytest.mark.parametrize("arguments, message", [
    (["--n", "0"], "--n must be an integer >= 1"),
    (["--n", "2", "--seed", "-1"], "--seed must be an integer >= 0"),
    (["--n", "2", "--families", "tags,maps"], "--families"),
    (["--n", "2", "--glyph-scale", "0.5"], "--glyph-scale must be >= 1"),
    (["--n", "2", "--glyph-scale", "big"], "--glyph-scale must be a number"),
    (["--n", "2", "--high-res-side", "64", "--native-side", "64"], "must be smaller"),
    (["--n", "2", "--high-res-side", "64"], "both --high-res-side and --native-side"),
    (["--n", "2", "--config", "tiny", "--high-res-side", "64", "--native-side", "32"], "give the geometry once"),
    (["--n", "3", "--config", "tiny"], "form: a 48 px canvas cannot hold"),
])
def test_bad_arguments_are_one_line_errors(tmp_path, capsys, arguments, message):
    out = tmp_path / "bad"
    assert cli.main(["synth", "--out", str(out), "--split", "train", *arguments]) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1
    assert not out.exists()


def test_existing_output_is_kept_without_overwrite(tmp_path, capsys):
    out = tmp_path / "set"
    assert cli.main(["synth", "--out", str(out), "--split", "train", "--n", "3"]) == 0
    before = folder_digest(out)
    assert cli.main(["synth", "--out", str(out), "--split", "train", "--n", "3", "--seed", "9"]) == 2
    assert "--overwrite" in capsys.readouterr().err and folder_digest(out) == before
    assert cli.main(["synth", "--out", str(out), "--split", "train", "--n", "3", "--seed", "9", "--overwrite"]) == 0
    assert folder_digest(out) != before


def test_the_example_sheet_is_drawn(tmp_path):
    """examples/synth_examples.py (which draws docs/synth_examples.png) runs and picks one column per kind."""
    import importlib.util

    import PIL.Image

    path = Path(__file__).resolve().parents[1] / "examples" / "synth_examples.py"
    spec = importlib.util.spec_from_file_location("synth_examples", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    samples = module.pick_samples(synth.EVIDENCE_GEOMETRY)
    assert [(s.row["family"], s.row["answer_glyphs"]) for s in samples] == list(module.COLUMNS)
    out = module.main(["--out", str(tmp_path / "sheet.png"), "--zoom", "2"])
    with PIL.Image.open(out) as sheet:
        assert sheet.width == len(module.COLUMNS) * (2 * 128 + 16) + 16
