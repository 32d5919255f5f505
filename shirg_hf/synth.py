"""`shirg-hf synth`: a procedural high-resolution VQA set whose answers live in small, sparse regions.

Every image is drawn at the high-res side with PIL (no fonts: glyphs come from the 5x7 bitmap font below, drawn
as filled cells). The answers of `detail` and `reverse` questions are fine glyphs, `GLYPH_ROWS * glyph_scale` px
tall at the high-res side (7 px by default), so that after the processor's bicubic squash to the native side they
are below `NATIVE_GLYPH_MAX_PX`, while colours, shapes and layout stay visible. Families:

- `tags`: 3-4 thin coloured frames ("tags") around 1-2 glyphs, among distractors aimed at each SHIRG score term
  (large flat shapes, noise-texture blocks, thin random lines, large decoy glyphs readable at low res that are
  never the answer, decoy frames with scribbles). Questions: `detail` "What is in the red tag?", `reverse`
  "Which colour tag holds K?", `global` "What colour is the big square?" / "How many big circles are there?",
  `spatial` "Is the red tag left of the blue tag?".
- `chart`: bars of distinct colours with thin value labels; `detail` "What is the value of the red bar?",
  `global` "Which bar is the tallest?". Bar heights keep the order of the values on a random scale, so the
  height does not give the value.
- `form`: a page with large margins, a large title, rules and a few small "KEY:VALUE" lines; `detail`
  "What is the CODE?".

Positions, colours and glyphs are drawn independently and uniformly, so nothing but reading gives a detail answer.
Rows follow `shirg-hf eval`'s schema (`image`, `question`, `answers`, `id`) plus `family`, `question_type`,
`answer_glyphs` (fine glyphs the answer needs) and `evidence_boxes` ([x0, y0, x1, y1] pixel boxes, ends
exclusive, of the regions that hold the answer). One question per image.

Determinism: row `i` of split `s` with `--seed S` is drawn from its own generator, seeded with `layout_seed(s, S,
i)`: a SeedSequence hash of (s, S, i) whose two lowest bits are the split's code, so two splits never share a
layout seed. The output depends on nothing else (no threads, no system fonts, no clocks).

`--glyph-scale` multiplies the glyph cell (1 px by default). `--glyph-scale native` (= high-res side / native
side) draws glyphs whose height at the native side equals the default glyphs' height at the high-res side: the
same families with tags readable in the native view (the "LaViDa at native resolution" stage of EVIDENCE.md).
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import functools
import hashlib
import io
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageDraw

# ---- constants ---------------------------------------------------------------------------------------------
GENERATOR_VERSION = 1
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}  # the two lowest bits of every layout seed
SEED_ENTROPY = 0x5A1C_5EED  # first word of every layout seed's SeedSequence (namespaces this generator)
FAMILIES = ("tags", "chart", "form")
# Question types per family with their sampling probabilities.
QUESTION_MIX = {
    "tags": {"detail": 0.4, "reverse": 0.2, "global": 0.2, "spatial": 0.2},
    "chart": {"detail": 0.7, "global": 0.3},
    "form": {"detail": 1.0},
}
FINE_QUESTION_TYPES = ("detail", "reverse")  # answers that need reading fine glyphs

GLYPH_ROWS, GLYPH_COLS = 7, 5
# A fine glyph must be shorter than this at the native side (bicubic squash of the high-res image). The
# readability pilot of EVIDENCE.md read 8 px glyphs at 128 px (4.5 px after the squash to 72 px) at 0.40 with
# one glyph; the default 7 px glyphs are 3.9 px at 72/128, 4.1 px at 28/48 and 4.0 px at 384/672.
NATIVE_GLYPH_MAX_PX = 4.25
REFERENCE_SIDE = 128  # layout sizes (shapes, margins, lines) are given for a 128 px canvas and scale with the side
# Each glyph is 7 rows of 5 cells; '#' is ink. Answer glyphs come from a confusable alphabet (B/8/3/E/S/5/6/9/0/D,
# H/N/M/W/K/X, P/R/F, U/V/Y, Z/2): at half size its members blur into the same blobs.
FONT = {
    "B": ("####.", "#...#", "#...#", "####.", "#...#", "#...#", "####."),
    "D": ("###..", "#..#.", "#...#", "#...#", "#...#", "#..#.", "###.."),
    "E": ("#####", "#....", "#....", "####.", "#....", "#....", "#####"),
    "F": ("#####", "#....", "#....", "####.", "#....", "#....", "#...."),
    "H": ("#...#", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),
    "K": ("#...#", "#..#.", "#.#..", "##...", "#.#..", "#..#.", "#...#"),
    "M": ("#...#", "##.##", "#.#.#", "#.#.#", "#...#", "#...#", "#...#"),
    "N": ("#...#", "#...#", "##..#", "#.#.#", "#..##", "#...#", "#...#"),
    "P": ("####.", "#...#", "#...#", "####.", "#....", "#....", "#...."),
    "R": ("####.", "#...#", "#...#", "####.", "#.#..", "#..#.", "#...#"),
    "S": (".####", "#....", "#....", ".###.", "....#", "....#", "####."),
    "U": ("#...#", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."),
    "V": ("#...#", "#...#", "#...#", "#...#", "#...#", ".#.#.", "..#.."),
    "W": ("#...#", "#...#", "#...#", "#.#.#", "#.#.#", "##.##", "#...#"),
    "X": ("#...#", "#...#", ".#.#.", "..#..", ".#.#.", "#...#", "#...#"),
    "Y": ("#...#", "#...#", ".#.#.", "..#..", "..#..", "..#..", "..#.."),
    "Z": ("#####", "....#", "...#.", "..#..", ".#...", "#....", "#####"),
    "0": (".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###."),
    "2": (".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"),
    "3": ("#####", "...#.", "..#..", "...#.", "....#", "#...#", ".###."),
    "5": ("#####", "#....", "####.", "....#", "....#", "#...#", ".###."),
    "6": ("..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###."),
    "8": (".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."),
    "9": (".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##.."),
    # only in form keys, never in answers
    "C": (".###.", "#...#", "#....", "#....", "#....", "#...#", ".###."),
    "I": (".###.", "..#..", "..#..", "..#..", "..#..", "..#..", ".###."),
    "L": ("#....", "#....", "#....", "#....", "#....", "#....", "#####"),
    "O": (".###.", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."),
    "T": ("#####", "..#..", "..#..", "..#..", "..#..", "..#..", "..#.."),
    ":": (".....", ".##..", ".##..", ".....", ".##..", ".##..", "....."),
}
ANSWER_ALPHABET = "BDEFHKMNPRSUVWXYZ0235689"
CHART_LEADING_DIGITS = "235689"
CHART_DIGITS = "0235689"
FORM_KEYS = ("REF", "CODE", "UNIT", "ZONE", "SLOT", "DESK")
PALETTE = {
    "red": (215, 38, 38), "green": (34, 150, 60), "blue": (40, 90, 215), "orange": (240, 140, 20),
    "purple": (135, 60, 185), "cyan": (0, 170, 200), "pink": (230, 100, 170), "brown": (135, 85, 40),
}
COLOUR_NAMES = tuple(PALETTE)
INKS = ((0, 0, 0), (35, 35, 45), (20, 30, 70), (60, 25, 25))
SHAPES = ("circle", "square", "triangle")
MAX_PLACEMENT_TRIES = 60
LAYOUT_ATTEMPTS = 8  # fresh layouts tried before a family declares the canvas too small
CONFIG_NAME = "synth_config.json"
WRITE_BATCH = 256


# ---- geometry ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Geometry:
    """The two sides of a model: images are drawn at `high_res_side`; the native view squashes them to `native_side`."""

    high_res_side: int
    native_side: int

    def __post_init__(self):
        for name in ("high_res_side", "native_side"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 8:
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 8 px, got {value!r}")
        if self.native_side >= self.high_res_side:
            raise ValueError(f"--native-side {self.native_side} must be smaller than --high-res-side "
                             f"{self.high_res_side}: without a resolution gap there is nothing to test")


# The CPU-scale analogue of LaViDa's 384 / 672 px (EVIDENCE.md): 72 px = 9 x 9 patches of 8 px, 128 px = 16 x 16.
EVIDENCE_GEOMETRY = Geometry(high_res_side=128, native_side=72)
EVIDENCE_PATCH_SIZE = 8


def geometry_of_config(config) -> Geometry:
    """(high-res side, native side) of a ShirgLavidaConfig."""
    return Geometry(int(config.highres_image_size), int(config.vision_config.image_size))


def preset_geometry(name: str) -> Geometry:
    """`evidence` (128 / 72), or the sides of a ShirgLavidaConfig preset: `tiny` (48 / 28), `lavida` (672 / 384)."""
    from .modeling.configuration_shirg_lavida import ShirgLavidaConfig

    if name == "evidence":
        return EVIDENCE_GEOMETRY
    if name == "tiny":
        return geometry_of_config(ShirgLavidaConfig.tiny())
    if name == "lavida":
        return geometry_of_config(ShirgLavidaConfig.lavida_llada_8b())
    raise ValueError(f"--config {name!r} is not one of {', '.join(CONFIG_PRESETS)}")


CONFIG_PRESETS = ("evidence", "tiny", "lavida")


def resolve_geometry(model=None, config=None, high_res_side=None, native_side=None) -> Geometry:
    """The geometry from one source: a model folder, a preset name or both sides (default: evidence)."""
    explicit = (high_res_side, native_side) != (None, None)
    sources = [name for name, given in (("--model", model is not None), ("--config", config is not None),
                                        ("--high-res-side/--native-side", explicit)) if given]
    if len(sources) > 1:
        raise ValueError(f"give the geometry once: {' and '.join(sources)} were both given")
    if model is not None:
        from .evaluation import read_model_config

        return geometry_of_config(read_model_config(Path(model)))
    if config is not None:
        return preset_geometry(config)
    if explicit:
        if high_res_side is None or native_side is None:
            raise ValueError("pass both --high-res-side and --native-side")
        return Geometry(high_res_side, native_side)
    return EVIDENCE_GEOMETRY


def resolve_glyph_scale(value, geometry: Geometry) -> float:
    """Glyph cell size in high-res pixels: a number >= 1, or `native` (= high-res side / native side)."""
    if value == "native":
        return geometry.high_res_side / geometry.native_side
    try:
        scale = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"--glyph-scale must be a number >= 1 or 'native', got {value!r}") from None
    if not (math.isfinite(scale) and scale >= 1.0):
        raise ValueError(f"--glyph-scale must be >= 1 (a glyph cell of at least one pixel), got {value!r}")
    return scale


def glyph_height_px(glyph_scale: float) -> int:
    """Height in high-res pixels of a glyph drawn at `glyph_scale`."""
    return _cell_edges(GLYPH_ROWS, glyph_scale)[-1]


def native_glyph_height_px(glyph_scale: float, geometry: Geometry) -> float:
    """Height of the same glyph after the squash to the native side."""
    return glyph_height_px(glyph_scale) * geometry.native_side / geometry.high_res_side


# ---- seeds -------------------------------------------------------------------------------------------------
def layout_seed(split: str, seed: int, index: int) -> int:
    """The 128-bit seed of row `index`: a hash of (split, seed, index) whose two lowest bits are the split's code."""
    if split not in SPLIT_CODES:
        raise ValueError(f"--split must be one of {', '.join(SPLIT_CODES)}, got {split!r}")
    words = np.random.SeedSequence([SEED_ENTROPY, SPLIT_CODES[split], seed, index]).generate_state(4, np.uint32)
    value = 0
    for word in words.tolist():
        value = (value << 32) | word
    return (value >> 2 << 2) | SPLIT_CODES[split]


def row_generator(split: str, seed: int, index: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(layout_seed(split, seed, index)))


# ---- drawing primitives -------------------------------------------------------------------------------------
def _round(value: float) -> int:
    """Round half up (one rounding rule for every pixel coordinate)."""
    return math.floor(value + 0.5)


def _cell_edges(count: int, unit: float) -> list[int]:
    return [_round(i * unit) for i in range(count + 1)]


@functools.lru_cache(maxsize=512)
def glyph_mask(char: str, unit: float) -> PIL.Image.Image:
    """The ink of `char` at `unit` px per font cell, as an 'L' mask (255 = ink)."""
    rows, cols = _cell_edges(GLYPH_ROWS, unit), _cell_edges(GLYPH_COLS, unit)
    ink = np.zeros((rows[-1], cols[-1]), dtype=np.uint8)
    for r, line in enumerate(FONT[char]):
        for c, cell in enumerate(line):
            if cell == "#":
                ink[rows[r]:rows[r + 1], cols[c]:cols[c + 1]] = 255
    return PIL.Image.fromarray(ink)


def text_size(length: int, unit: float) -> tuple[int, int]:
    """(width, height) of `length` glyphs at `unit`, one cell apart."""
    width, height = glyph_mask("B", unit).size
    gap = max(1, _round(unit))
    return length * width + (length - 1) * gap, height


@dataclass(frozen=True)
class PlacedGlyph:
    """A glyph drawn at (x, y) (top-left) with `unit` px per font cell: enough to redraw its exact ink."""

    char: str
    x: int
    y: int
    unit: float

    @property
    def box(self) -> tuple[int, int, int, int]:
        width, height = glyph_mask(self.char, self.unit).size
        return self.x, self.y, self.x + width, self.y + height


_GLYPH_LOG: contextvars.ContextVar = contextvars.ContextVar("glyph_log", default=None)


@contextlib.contextmanager
def recording_glyphs():
    """Inside the block, every glyph `draw_text` draws is appended to the yielded list (e.g. labels for a
    per-patch glyph classifier)."""
    log = []
    token = _GLYPH_LOG.set(log)
    try:
        yield log
    finally:
        _GLYPH_LOG.reset(token)


def draw_text(image: PIL.Image.Image, text: str, x: int, y: int, unit: float, colour) -> list[PlacedGlyph]:
    """Draw `text` with its top-left corner at (x, y); returns the glyphs drawn."""
    placed = []
    gap = max(1, _round(unit))
    for char in text:
        mask = glyph_mask(char, unit)
        image.paste(colour, (x, y, x + mask.width, y + mask.height), mask)
        placed.append(PlacedGlyph(char, x, y, unit))
        x += mask.width + gap
    log = _GLYPH_LOG.get()
    if log is not None:
        log.extend(placed)
    return placed


def union_box(boxes) -> list[int]:
    boxes = list(boxes)
    return [min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes)]


def _pil_box(box) -> list[int]:
    """PIL's inclusive corners of an end-exclusive box."""
    return [box[0], box[1], box[2] - 1, box[3] - 1]


# ---- one scene ---------------------------------------------------------------------------------------------
@dataclass
class Question:
    question: str
    answer: str
    question_type: str
    evidence_boxes: list  # [[x0, y0, x1, y1], ...]
    answer_glyphs: list = field(default_factory=list)  # [PlacedGlyph] the fine glyphs the answer needs


class Canvas:
    """An image being drawn, with the boxes already taken and the row's generator."""

    def __init__(self, side: int, rng: np.random.Generator, glyph_scale: float, background):
        self.side = side
        self.rng = rng
        self.unit = glyph_scale  # px per font cell of the fine glyphs
        self.scale = side / REFERENCE_SIDE  # layout sizes are given for a 128 px canvas
        self.image = PIL.Image.new("RGB", (side, side), background)
        self.draw = PIL.ImageDraw.Draw(self.image)
        self.taken: list[tuple[int, int, int, int]] = []

    def px(self, size: float) -> int:
        """A layout size given for a 128 px canvas, in pixels of this one (at least 1)."""
        return max(1, _round(size * self.scale))

    def uniform(self, low: float, high: float) -> float:
        return float(self.rng.uniform(low, high))

    def integer(self, low: int, high: int) -> int:
        """An integer in [low, high]."""
        return int(self.rng.integers(low, high + 1))

    def choice(self, options, size=None, replace=True):
        if size is None:
            return options[int(self.rng.integers(len(options)))]
        picks = self.rng.choice(len(options), size=size, replace=replace)
        return [options[int(i)] for i in picks]

    def place(self, width: int, height: int, gap: int = 2, region=None):
        """A free box of this size inside `region` (default: the canvas), at least `gap` px from taken boxes."""
        x0, y0, x1, y1 = region or (0, 0, self.side, self.side)
        if width > x1 - x0 or height > y1 - y0:
            return None
        for _ in range(MAX_PLACEMENT_TRIES):
            x = int(self.rng.integers(x0, x1 - width + 1))
            y = int(self.rng.integers(y0, y1 - height + 1))
            box = (x, y, x + width, y + height)
            if all(box[0] >= t[2] + gap or t[0] >= box[2] + gap or box[1] >= t[3] + gap or t[1] >= box[3] + gap
                   for t in self.taken):
                self.taken.append(box)
                return box
        return None

    # ---- distractors aimed at each score term ------------------------------------------------------------
    def noise_block(self, box) -> None:
        """A noise texture (high feature magnitude, no content): fine or 2x2-blocky, colour or grey."""
        width, height = box[2] - box[0], box[3] - box[1]
        cell = self.integer(1, 2)
        channels = 3 if self.rng.random() < 0.5 else 1
        noise = self.rng.integers(0, 256, (-(-height // cell), -(-width // cell), channels), dtype=np.uint8)
        noise = noise.repeat(cell, axis=0).repeat(cell, axis=1)[:height, :width]
        noise = np.repeat(noise, 3 // channels, axis=2)
        self.image.paste(PIL.Image.fromarray(noise), box[:2])

    def thin_lines(self, count: int) -> None:
        """Thin straight lines across the canvas (high spatial gradient, no content)."""
        width = max(1, _round(0.75 * self.scale))
        for _ in range(count):
            points = [tuple(int(v) for v in self.rng.integers(0, self.side, 2)) for _ in range(2)]
            colour = self.choice(INKS + tuple(PALETTE.values()))
            self.draw.line(points, fill=colour, width=width)

    def decoy_glyphs(self, count: int) -> None:
        """Large glyphs of the answer alphabet, readable at the native side and never an answer."""
        unit = max(2.5 * self.scale, 1.5 * self.unit)
        width, height = text_size(1, unit)
        for char in self.choice(ANSWER_ALPHABET, size=count):
            box = self.place(width, height)
            if box is not None:
                draw_text(self.image, char, box[0], box[1], unit, self.choice(INKS))

    def scribbles(self, box, strokes: int) -> None:
        """Unreadable marks of glyph size inside `box`."""
        ink = self.choice(INKS)
        x0, y0, x1, y1 = box
        for _ in range(strokes):
            points = [(self.integer(x0, x1 - 1), self.integer(y0, y1 - 1)) for _ in range(3)]
            self.draw.line(points, fill=ink, width=1)

    def shape(self, kind: str, box, colour) -> None:
        x0, y0, x1, y1 = _pil_box(box)
        if kind == "circle":
            self.draw.ellipse([x0, y0, x1, y1], fill=colour)
        elif kind == "square":
            self.draw.rectangle([x0, y0, x1, y1], fill=colour)
        else:
            self.draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=colour)


def _light_background(canvas_rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in canvas_rng.integers(232, 256, 3))


def _pick_type(rng: np.random.Generator, family: str, allowed=None) -> str:
    mix = {name: weight for name, weight in QUESTION_MIX[family].items() if allowed is None or name in allowed}
    names = list(mix)
    weights = np.array([mix[name] for name in names], dtype=np.float64)
    return names[int(rng.choice(len(names), p=weights / weights.sum()))]


# ---- family: tags ------------------------------------------------------------------------------------------
def _tag_size(glyphs: int, unit: float) -> tuple[int, int, int, int]:
    """(width, height, frame thickness, inner padding) of a tag holding `glyphs` glyphs."""
    frame, pad = max(1, _round(1.5 * unit)), max(1, _round(unit))
    width, height = text_size(glyphs, unit)
    return width + 2 * (frame + pad), height + 2 * (frame + pad), frame, pad


def _draw_tag(canvas: Canvas, box, colour, frame: int, fill) -> None:
    canvas.draw.rectangle(_pil_box(box), fill=colour)
    inner = (box[0] + frame, box[1] + frame, box[2] - frame, box[3] - frame)
    canvas.draw.rectangle(_pil_box(inner), fill=fill)


def draw_tags(rng: np.random.Generator, geometry: Geometry, glyph_scale: float) -> tuple[PIL.Image.Image, Question]:
    for _ in range(LAYOUT_ATTEMPTS):
        canvas = Canvas(geometry.high_res_side, rng, glyph_scale, _light_background(rng))
        tags, free_colours = _place_tags(canvas)
        if len(tags) >= 2:
            return _draw_tags_scene(canvas, tags, free_colours)
    raise ValueError(f"tags: a {geometry.high_res_side} px canvas cannot hold two tags at --glyph-scale "
                     f"{glyph_scale:g}; use a larger --high-res-side or a smaller --glyph-scale")


def _place_tags(canvas: Canvas) -> tuple[list[dict], list[str]]:
    """3-4 tags of distinct colours around 1-2 distinct glyphs each, placed first (as many as fit), and the
    colours no tag uses (for the decoy frames)."""
    unit = canvas.unit
    num_tags = canvas.integer(3, 4)
    tag_colours = canvas.choice(COLOUR_NAMES, size=num_tags, replace=False)
    glyph_counts = [canvas.integer(1, 2) for _ in range(num_tags)]
    glyphs = canvas.choice(ANSWER_ALPHABET, size=sum(glyph_counts), replace=False)  # all distinct
    texts = []
    for count in glyph_counts:
        texts.append("".join(glyphs[:count]))
        glyphs = glyphs[count:]
    tags = []
    for colour, text in zip(tag_colours, texts):
        width, height, frame, pad = _tag_size(len(text), unit)
        box = canvas.place(width, height, gap=canvas.px(3))
        if box is not None:
            tags.append({"colour": colour, "text": text, "box": box, "frame": frame, "pad": pad})
    return tags, [name for name in COLOUR_NAMES if name not in tag_colours]


def _draw_tags_scene(canvas: Canvas, tags: list, free_colours: list) -> tuple[PIL.Image.Image, Question]:
    """Distractors placed around the tags, everything drawn back to front, then the question."""
    unit = canvas.unit
    decoy_colours = canvas.choice(free_colours, size=canvas.integer(1, 2), replace=False)
    decoys = []
    for colour in decoy_colours:
        width, height, frame, pad = _tag_size(canvas.integer(1, 2), unit)
        box = canvas.place(width, height, gap=canvas.px(3))
        if box is not None:
            decoys.append((colour, box, frame, pad))
    num_circles = canvas.integer(0, 3)
    kinds = ["circle"] * num_circles + canvas.choice(("square", "triangle"), size=canvas.integer(1, 2), replace=False)
    shapes = []
    for kind in kinds:
        size = canvas.px(canvas.uniform(16, 28))
        box = canvas.place(size, size, gap=canvas.px(3))
        if box is not None:
            shapes.append({"kind": kind, "box": box, "colour": canvas.choice(COLOUR_NAMES)})
    blocks = [box for box in (canvas.place(canvas.px(canvas.uniform(12, 22)), canvas.px(canvas.uniform(12, 22)))
                              for _ in range(canvas.integer(1, 2))) if box is not None]

    for item in shapes:
        canvas.shape(item["kind"], item["box"], PALETTE[item["colour"]])
    for box in blocks:
        canvas.noise_block(box)
    canvas.thin_lines(canvas.integer(3, 6))
    canvas.decoy_glyphs(canvas.integer(1, 2))
    for colour, box, frame, pad in decoys:
        _draw_tag(canvas, box, PALETTE[colour], frame, (255, 255, 255))
        inset = frame + pad
        canvas.scribbles((box[0] + inset, box[1] + inset, box[2] - inset, box[3] - inset), canvas.integer(2, 3))
    for tag in tags:
        _draw_tag(canvas, tag["box"], PALETTE[tag["colour"]], tag["frame"], (255, 255, 255))
        inset = tag["frame"] + tag["pad"]
        tag["glyphs"] = draw_text(canvas.image, tag["text"], tag["box"][0] + inset, tag["box"][1] + inset, unit,
                                  canvas.choice(INKS))
    return canvas.image, _tags_question(canvas, tags, shapes)


def _tags_question(canvas: Canvas, tags: list, shapes: list) -> Question:
    unique_kinds = [kind for kind in SHAPES if sum(item["kind"] == kind for item in shapes) == 1]
    min_dx = canvas.px(6)
    pairs = [(a, b) for a in tags for b in tags if a is not b
             and abs((a["box"][0] + a["box"][2]) - (b["box"][0] + b["box"][2])) >= 2 * min_dx]
    allowed = {"detail", "reverse", "global"} | ({"spatial"} if pairs else set())
    kind = _pick_type(canvas.rng, "tags", allowed)
    if kind == "detail":
        tag = canvas.choice(tags)
        return Question(f"What is in the {tag['colour']} tag?", tag["text"], "detail",
                        [union_box(g.box for g in tag["glyphs"])], tag["glyphs"])
    if kind == "reverse":
        tag = canvas.choice(tags)
        glyph = canvas.choice(tag["glyphs"])
        return Question(f"Which colour tag holds {glyph.char}?", tag["colour"], "reverse", [list(tag["box"])],
                        [glyph])
    if kind == "spatial":
        first, second = canvas.choice(pairs)
        left = first["box"][0] + first["box"][2] < second["box"][0] + second["box"][2]
        return Question(f"Is the {first['colour']} tag left of the {second['colour']} tag?", "yes" if left else "no",
                        "spatial", [list(first["box"]), list(second["box"])])
    if unique_kinds and canvas.rng.random() < 0.5:
        shape_kind = canvas.choice(unique_kinds)
        item = next(item for item in shapes if item["kind"] == shape_kind)
        return Question(f"What colour is the big {shape_kind}?", item["colour"], "global", [list(item["box"])])
    circles = [list(item["box"]) for item in shapes if item["kind"] == "circle"]
    return Question("How many big circles are there?", str(len(circles)), "global", circles)


# ---- family: chart -----------------------------------------------------------------------------------------
def _chart_values(canvas: Canvas, count: int) -> list[int]:
    """Values of 1-2 alphabet digits with a unique maximum at least 15 % above the runner-up."""
    while True:
        values = []
        for _ in range(count):
            digits = canvas.choice(CHART_LEADING_DIGITS)
            if canvas.rng.random() < 0.5:
                digits += canvas.choice(CHART_DIGITS)
            values.append(int(digits))
        ranked = sorted(values, reverse=True)
        if ranked[0] >= 1.15 * ranked[1]:
            return values


def draw_chart(rng: np.random.Generator, geometry: Geometry, glyph_scale: float) -> tuple[PIL.Image.Image, Question]:
    canvas = Canvas(geometry.high_res_side, rng, glyph_scale, _light_background(rng))
    unit, side = canvas.unit, canvas.side
    title_unit = max(2 * canvas.scale, 1.5 * unit)
    label_width, label_height = text_size(2, unit)
    left, right = canvas.px(canvas.uniform(6, 14)), side - canvas.px(canvas.uniform(4, 10))
    top = canvas.px(canvas.uniform(4, 8))
    bottom = side - canvas.px(canvas.uniform(6, 12))
    title_height = text_size(1, title_unit)[1]
    plot_top = top + title_height + canvas.px(4)
    slot_min = label_width + canvas.px(4)
    num_bars = min(canvas.integer(3, 5), (right - left) // slot_min)
    if num_bars < 2 or bottom - plot_top < 3 * label_height:
        raise ValueError(f"chart: a {side} px canvas cannot hold two labelled bars at --glyph-scale {glyph_scale:g}; "
                         "use a larger --high-res-side or a smaller --glyph-scale")
    colours = canvas.choice(COLOUR_NAMES, size=num_bars, replace=False)
    values = _chart_values(canvas, num_bars)
    # heights keep the order of the values but not their scale: the axis maximum is random
    axis_max = max(values) * canvas.uniform(1.0, 1.6)
    usable = bottom - plot_top - label_height - canvas.px(3)
    slot = (right - left) / num_bars
    bar_width = max(canvas.px(4), _round(slot * canvas.uniform(0.4, 0.7)))

    # title (large decoy glyphs), grid lines and thin lines behind the bars, a noise-block "logo" in a free spot
    title_glyph = text_size(1, title_unit)[0]
    title_step = title_glyph + max(1, _round(title_unit))
    title_length = min(canvas.integer(3, 5), max(1, (side + canvas.px(2)) // title_step))
    title = "".join(canvas.choice(ANSWER_ALPHABET, size=title_length))
    title_width = text_size(len(title), title_unit)[0]
    title_x = canvas.integer(0, max(0, side - title_width))
    draw_text(canvas.image, title, title_x, top, title_unit, canvas.choice(INKS))
    canvas.taken.append((title_x, top, title_x + title_width, top + title_height))
    for _ in range(canvas.integer(2, 5)):
        y = canvas.integer(plot_top, bottom - 1)
        canvas.draw.line([(left, y), (right - 1, y)], fill=(200, 200, 200), width=1)
    canvas.thin_lines(canvas.integer(1, 3))
    bars = []
    for index, (colour, value) in enumerate(zip(colours, values)):
        centre = left + (index + 0.5) * slot
        height = max(1, _round(usable * value / axis_max))
        x0 = _round(centre - bar_width / 2)
        box = (x0, bottom - height, x0 + bar_width, bottom)
        text = str(value)
        width = text_size(len(text), unit)[0]
        label = (_round(centre - width / 2), box[1] - canvas.px(2) - label_height)
        bars.append({"colour": colour, "value": value, "box": box, "text": text, "label": label, "width": width})
        canvas.taken += [box, (label[0] - 1, label[1] - 1, label[0] + width + 1, label[1] + label_height + 1)]
    logo_side = canvas.px(canvas.uniform(10, 16))
    logo = canvas.place(logo_side, logo_side)
    if logo is not None:
        canvas.noise_block(logo)
    for bar in bars:
        canvas.draw.rectangle(_pil_box(bar["box"]), fill=PALETTE[bar["colour"]])
    axis = canvas.choice(INKS)
    canvas.draw.line([(left, plot_top), (left, bottom)], fill=axis, width=1)
    canvas.draw.line([(left, bottom), (right - 1, bottom)], fill=axis, width=1)
    ink = canvas.choice(INKS)
    for bar in bars:
        (lx, ly), width = bar["label"], bar["width"]
        canvas.draw.rectangle(_pil_box((lx - 1, ly - 1, lx + width + 1, ly + label_height + 1)), fill=(255, 255, 255))
        bar["glyphs"] = draw_text(canvas.image, bar["text"], lx, ly, unit, ink)

    kind = _pick_type(rng, "chart")
    if kind == "detail":
        bar = canvas.choice(bars)
        return canvas.image, Question(f"What is the value of the {bar['colour']} bar?", str(bar["value"]), "detail",
                                      [union_box(g.box for g in bar["glyphs"])], bar["glyphs"])
    tallest = max(bars, key=lambda bar: bar["value"])
    return canvas.image, Question("Which bar is the tallest?", tallest["colour"], "global",
                                  [list(bar["box"]) for bar in bars])


# ---- family: form ------------------------------------------------------------------------------------------
def draw_form(rng: np.random.Generator, geometry: Geometry, glyph_scale: float) -> tuple[PIL.Image.Image, Question]:
    canvas = Canvas(geometry.high_res_side, rng, glyph_scale, (255, 255, 255))
    unit, side = canvas.unit, canvas.side
    margins = [canvas.px(canvas.uniform(10, 22)) for _ in range(4)]  # left, top, right, bottom
    content = (margins[0], margins[1], side - margins[2], side - margins[3])
    title_unit = max(2 * canvas.scale, 1.5 * unit)
    glyph_height = text_size(1, unit)[1]
    line_width_max = text_size(max(map(len, FORM_KEYS)) + 1 + 3, unit)[0]
    title_height = text_size(1, title_unit)[1]
    if line_width_max > content[2] - content[0] or title_height + 2 * glyph_height + canvas.px(8) > \
            content[3] - content[1]:
        raise ValueError(f"form: a {side} px canvas cannot hold a title and two key:value lines at --glyph-scale "
                         f"{glyph_scale:g}; use a larger --high-res-side or a smaller --glyph-scale")

    ink = canvas.choice(INKS)
    title_glyph = text_size(1, title_unit)[0] + max(1, _round(title_unit))
    title_length = min(canvas.integer(3, 5), max(1, (content[2] - content[0] + title_glyph) // title_glyph - 1))
    title = "".join(canvas.choice(ANSWER_ALPHABET, size=title_length))
    title_box = (content[0], content[1], content[0] + text_size(len(title), title_unit)[0], content[1] + title_height)
    draw_text(canvas.image, title, content[0], content[1], title_unit, ink)
    rule_y = title_box[3] + canvas.px(2)
    canvas.draw.line([(content[0], rule_y), (content[2] - 1, rule_y)], fill=ink, width=max(1, canvas.px(1)))
    canvas.taken.append((title_box[0], title_box[1], title_box[2], rule_y + 1))

    keys = canvas.choice(FORM_KEYS, size=canvas.integer(3, 5), replace=False)
    lines, y = [], rule_y + canvas.px(canvas.uniform(3, 6))
    for key in keys:
        value = "".join(canvas.choice(ANSWER_ALPHABET, size=canvas.integer(1, 3)))
        text = f"{key}:{value}"
        width = text_size(len(text), unit)[0]
        if y + glyph_height > content[3]:
            break
        x = canvas.integer(content[0], max(content[0], content[0] + (content[2] - content[0] - width) // 3))
        glyphs = draw_text(canvas.image, text, x, y, unit, ink)
        box = union_box(g.box for g in glyphs)
        canvas.taken.append(tuple(box))
        lines.append({"key": key, "value": value, "glyphs": glyphs[len(key) + 1:], "box": box})
        y = box[3] + canvas.px(canvas.uniform(3, 8))
        if canvas.rng.random() < 0.4 and y < content[3]:
            canvas.draw.line([(content[0], y - canvas.px(2)), (content[2] - 1, y - canvas.px(2))],
                             fill=(170, 170, 170), width=1)
    if len(lines) < 2:
        raise ValueError(f"form: a {side} px canvas cannot hold two key:value lines at --glyph-scale {glyph_scale:g}")

    # distractors inside the page: a flat logo, a photo (noise), a signature (thin strokes)
    logo = canvas.place(canvas.px(canvas.uniform(12, 20)), canvas.px(canvas.uniform(12, 20)), region=content)
    if logo is not None:
        canvas.shape(canvas.choice(SHAPES), logo, PALETTE[canvas.choice(COLOUR_NAMES)])
    photo = canvas.place(canvas.px(canvas.uniform(14, 26)), canvas.px(canvas.uniform(12, 22)), region=content)
    if photo is not None:
        canvas.noise_block(photo)
    signature = canvas.place(canvas.px(canvas.uniform(16, 30)), canvas.px(canvas.uniform(5, 9)), region=content)
    if signature is not None:
        canvas.scribbles(signature, canvas.integer(2, 4))

    line = canvas.choice(lines)
    return canvas.image, Question(f"What is the {line['key']}?", line["value"], "detail", [line["box"]],
                                  line["glyphs"])


DRAWERS = {"tags": draw_tags, "chart": draw_chart, "form": draw_form}


# ---- samples and the data set -------------------------------------------------------------------------------
@dataclass
class Sample:
    """One generated row with the drawing metadata the row itself does not carry."""

    image: PIL.Image.Image
    row: dict
    answer_glyphs: list  # [PlacedGlyph]: exactly the ink of the fine glyphs the answer needs
    layout_seed: int


def check_families(families) -> tuple[str, ...]:
    families = tuple(families)
    unknown = [name for name in families if name not in FAMILIES]
    if not families or unknown or len(set(families)) != len(families):
        raise ValueError(f"--families must be distinct names among {', '.join(FAMILIES)}, got {','.join(families)}")
    return families


def generate_sample(split: str, seed: int, index: int, geometry: Geometry = EVIDENCE_GEOMETRY,
                    families=FAMILIES, glyph_scale: float = 1.0) -> Sample:
    """Row `index` of (`split`, `seed`): its family is `families[index % len(families)]`."""
    families = check_families(families)
    family = families[index % len(families)]
    rng = row_generator(split, seed, index)
    image, question = DRAWERS[family](rng, geometry, glyph_scale)
    row = {
        "id": f"{split}-{seed}-{index:07d}",
        "question": question.question,
        "answers": [question.answer],
        "family": family,
        "question_type": question.question_type,
        "answer_glyphs": len(question.answer_glyphs),
        "evidence_boxes": [[int(v) for v in box] for box in question.evidence_boxes],
    }
    return Sample(image, row, question.answer_glyphs, layout_seed(split, seed, index))


def dataset_features():
    import datasets

    return datasets.Features({
        "image": datasets.Image(),
        "question": datasets.Value("string"),
        "answers": datasets.List(datasets.Value("string")),
        "id": datasets.Value("string"),
        "family": datasets.Value("string"),
        "question_type": datasets.Value("string"),
        "answer_glyphs": datasets.Value("int32"),
        "evidence_boxes": datasets.List(datasets.List(datasets.Value("int32"), length=4)),
    })


def png_bytes(image: PIL.Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def synth_settings(split: str, n: int, seed: int, geometry: Geometry, families, glyph_scale: float) -> dict:
    """What a data set was generated with (`synth_config.json`)."""
    native_height = native_glyph_height_px(glyph_scale, geometry)
    return {
        "generator_version": GENERATOR_VERSION, "split": split, "n": n, "seed": seed, "families": list(families),
        "high_res_side": geometry.high_res_side, "native_side": geometry.native_side, "glyph_scale": glyph_scale,
        "glyph_height_px": glyph_height_px(glyph_scale), "native_glyph_height_px": round(native_height, 4),
        "native_glyph_max_px": NATIVE_GLYPH_MAX_PX, "fine_glyphs_below_bound": native_height < NATIVE_GLYPH_MAX_PX,
    }


def _check_count(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"--{name} must be an integer >= {low}, got {value!r}")
    return value


def write_synth(out, split: str, n: int, seed: int = 0, geometry: Geometry = EVIDENCE_GEOMETRY,
                families=FAMILIES, glyph_scale: float = 1.0, overwrite: bool = False, progress: bool = False) -> dict:
    """Generate `n` rows and save them with `save_to_disk` at `out` (atomically); returns the settings written."""
    import datasets
    from datasets.arrow_writer import ArrowWriter
    from datasets.table import MemoryMappedTable
    from tqdm.auto import tqdm

    from .fileio import atomic_folder, check_destination

    n, seed = _check_count("n", n, 1), _check_count("seed", seed, 0)
    families = check_families(families)
    out = Path(out).resolve()
    check_destination(out, overwrite)
    for index in range(min(n, len(families))):  # one row per family: a canvas too small fails before any writing
        generate_sample(split, seed, index, geometry, families, glyph_scale)
    settings = synth_settings(split, n, seed, geometry, families, glyph_scale)
    features = dataset_features()
    fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    with atomic_folder(out, overwrite=overwrite) as staging:
        scratch = staging / ".rows"  # the rows file save_to_disk copies from (it may not write over its source)
        scratch.mkdir()
        arrow_path = str(scratch / "rows.arrow")
        with ArrowWriter(features=features, path=arrow_path, fingerprint=fingerprint) as writer:
            batch = []
            for index in tqdm(range(n), desc=f"synth {split}", unit="image", disable=not progress):
                sample = generate_sample(split, seed, index, geometry, families, glyph_scale)
                batch.append({**sample.row, "image": {"bytes": png_bytes(sample.image), "path": None}})
                if len(batch) == WRITE_BATCH or index == n - 1:
                    writer.write_batch({name: [row[name] for row in batch] for name in features})
                    batch = []
            writer.finalize()
        dataset = datasets.Dataset(MemoryMappedTable.from_file(arrow_path), split=split, fingerprint=fingerprint)
        dataset.save_to_disk(str(staging))
        del dataset
        shutil.rmtree(scratch)
        (staging / CONFIG_NAME).write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return settings


# ---- command line -------------------------------------------------------------------------------------------
def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "synth", help="generate a procedural high-resolution VQA set (tags, chart, form) for eval and compare",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="datasets.save_to_disk folder to write")
    parser.add_argument("--split", required=True, choices=tuple(SPLIT_CODES),
                        help="part of every layout seed: two splits never share a layout")
    parser.add_argument("--n", required=True, type=int, help="number of rows (one image and question each)")
    parser.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
    parser.add_argument("--families", default=",".join(FAMILIES),
                        help="comma-separated families; row i gets family i mod their count "
                             f"(default {','.join(FAMILIES)})")
    parser.add_argument("--model", metavar="DIR", help="take the two sides from a saved model's config")
    parser.add_argument("--config", choices=CONFIG_PRESETS,
                        help="take the two sides from a preset: evidence 128/72 (the default), tiny 48/28, "
                             "lavida 672/384")
    parser.add_argument("--high-res-side", type=int, metavar="PX", help="side the images are drawn at")
    parser.add_argument("--native-side", type=int, metavar="PX", help="side of the model's native (low-res) view")
    parser.add_argument("--glyph-scale", default="1",
                        help="px per font cell of the fine glyphs (default 1: 7 px tall), or 'native' for glyphs "
                             "as tall at the native side as the default ones at the high-res side")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    geometry = resolve_geometry(args.model, args.config, args.high_res_side, args.native_side)
    glyph_scale = resolve_glyph_scale(args.glyph_scale, geometry)
    families = tuple(name.strip() for name in args.families.split(",") if name.strip())
    start = time.perf_counter()
    settings = write_synth(args.out, args.split, args.n, args.seed, geometry, families, glyph_scale,
                           overwrite=args.overwrite, progress=True)
    seconds = time.perf_counter() - start
    bound = "below" if settings["fine_glyphs_below_bound"] else "NOT below"
    print(f"{args.n} rows ({args.split}, seed {args.seed}, {','.join(families)}) at {geometry.high_res_side} px "
          f"in {seconds:.1f} s ({args.n / seconds:.0f} images/s); fine glyphs {settings['glyph_height_px']} px tall, "
          f"{settings['native_glyph_height_px']:.2f} px at the native {geometry.native_side} px side ({bound} the "
          f"{NATIVE_GLYPH_MAX_PX} px bound); written to {Path(args.out).resolve()}")
    return 0
