"""The visual-token contract: vision modes, selection methods, geometry, budgets and token counts.

Standard library only. The config, processor, selector, model, collator, converter and command line all read
these registries and functions; nothing else holds a list of mode or method names or a geometry number. The torch
halves (a mode's pixels -> features, a method's scorer) attach to the entries by name. See docs/architecture.md.
"""

import dataclasses
import math
import operator
from collections.abc import Callable


# ---- geometry ----------------------------------------------------------------------------------------------
# LaViDa's 2x2 pooling of anyres views: pooled side of a G x G map (bilinear interpolates to ceil(G / 2)).
POOL_MODES = {"bilinear": lambda side: math.ceil(side / 2), "average": lambda side: side // 2,
              "max": lambda side: side // 2}


def check_pinpoints(pinpoints, tile_size: int) -> tuple:
    """Anyres canvases as ((width, height), ...) after checking they are positive multiples of `tile_size`."""
    if not _is_int(tile_size) or tile_size <= 0:
        raise ValueError(f"anyres tile size must be a positive integer, got {tile_size!r}")
    pinpoints = tuple(tuple(p) for p in pinpoints or ())
    if not pinpoints or any(len(p) != 2 or not all(_is_int(s) and s > 0 and s % tile_size == 0 for s in p)
                            for p in pinpoints):
        raise ValueError(f"image_grid_pinpoints must be a non-empty list of [width, height] pairs, each a positive "
                         f"multiple of the tile size {tile_size}; got {pinpoints}")
    return pinpoints


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Sizes of the vision front end. Sides are pixels of a square view; grids are patches.

    native_side: the tower's own input side (the config's `vision_config.image_size`).
    highres_side: input side of the high-res modes (`highres_image_size`); position embeddings are interpolated.
    patch_size: the tower's patch side. tile_size, pinpoints, pool_mode: LaViDa's anyres views (`anyres_tile_size`,
    `image_grid_pinpoints` as (width, height) canvases, `anyres_pool_mode`).
    """

    native_side: int
    highres_side: int
    patch_size: int
    tile_size: int
    pinpoints: tuple
    pool_mode: str

    def __post_init__(self):
        for name in ("native_side", "highres_side", "patch_size", "tile_size"):
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise ValueError(f"geometry `{name}` must be a positive integer, got {value!r}")
        if self.native_side < self.patch_size:
            raise ValueError(f"geometry `native_side` must be >= patch_size={self.patch_size}, got {self.native_side}")
        if self.highres_side < self.native_side:
            raise ValueError(f"geometry `highres_side` must be >= native_side={self.native_side}, "
                             f"got {self.highres_side}")
        if self.pool_mode not in POOL_MODES:
            raise ValueError(f"geometry `pool_mode` must be one of {tuple(POOL_MODES)}, got {self.pool_mode!r}")
        object.__setattr__(self, "pinpoints", check_pinpoints(self.pinpoints, self.tile_size))

    @classmethod
    def from_dict(cls, values: dict) -> "Geometry":
        return cls(**values)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "pinpoints": [list(p) for p in self.pinpoints]}

    def side(self, which: str) -> int:
        """Pixel side of a view: `which` is "native" or "highres"."""
        return {"native": self.native_side, "highres": self.highres_side}[which]

    def grid(self, which: str) -> tuple[int, int]:
        """(rows, cols) of patches of a `which` view."""
        side = self.side(which) // self.patch_size
        return side, side

    @property
    def highres_grid(self) -> tuple[int, int]:
        return self.grid("highres")

    @property
    def num_highres_patches(self) -> int:
        rows, cols = self.highres_grid
        return rows * cols

    @property
    def pooled_side(self) -> int:
        """Side of one anyres view's feature map after LaViDa's 2x2 pooling (27 -> 14 bilinear for so400m)."""
        return POOL_MODES[self.pool_mode](self.native_side // self.patch_size)


# LaViDa: SigLIP so400m-patch14 at 384 px, SHIRG's 672 px high-res side (48 x 48 = 2,304 patches), anyres tiles.
LAVIDA_GEOMETRY = Geometry(
    native_side=384, highres_side=672, patch_size=14, tile_size=384,
    pinpoints=((384, 768), (768, 384), (768, 768), (1152, 384), (384, 1152)), pool_mode="bilinear",
)


def _image_size(image_size) -> tuple[int, int]:
    try:
        width, height = (operator.index(side) for side in image_size)
    except (TypeError, ValueError):
        width = height = 0
    if width <= 0 or height <= 0 or isinstance(image_size[0], bool):
        raise ValueError(f"image_size must be (width, height) with positive integers, got {image_size!r}")
    return width, height


def select_best_resolution(image_size, pinpoints) -> tuple[int, int]:
    """The anyres canvas (width, height) LaViDa / LLaVA-NeXT picks for an image of `image_size` (width, height).

    Maximises the effective resolution min(int(w s) * int(h s), w h), s = min(W / w, H / h), then minimises the
    wasted area; the first pinpoint wins exact ties.
    """
    width, height = _image_size(image_size)
    best, best_effective, best_wasted = None, -1, math.inf
    for canvas_width, canvas_height in pinpoints:
        scale = min(canvas_width / width, canvas_height / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = canvas_width * canvas_height - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (canvas_width, canvas_height), effective, wasted
    return best


def anyres_grid_shape(image_size, geometry: Geometry) -> tuple[int, int]:
    """(tiles per row, tiles per column) of the anyres canvas chosen for `image_size` (width, height)."""
    canvas_width, canvas_height = select_best_resolution(image_size, geometry.pinpoints)
    return canvas_width // geometry.tile_size, canvas_height // geometry.tile_size


def unpadded_grid_size(grid_size: tuple[int, int], image_size) -> tuple[int, int]:
    """(rows, cols) of a stitched anyres feature map after LaViDa's `unpad_image` for `image_size` (width, height).

    LaViDa's arithmetic: plain `int()` truncation of the rescaled side and a symmetric slice [pad, side - pad), so
    an odd difference keeps one extra row (640x480 on a 28x28 map -> 22 rows). transformers' LLaVA-NeXT version
    rounds first and can differ by one row or column.
    """
    rows, cols = grid_size
    width, height = _image_size(image_size)
    if width / height > cols / rows:
        pad = (rows - int(height * (cols / width))) // 2
        return rows - 2 * pad, cols
    pad = (cols - int(width * (rows / height))) // 2
    return rows, cols - 2 * pad


def lavida_hd_num_tokens(image_size, geometry: Geometry) -> int:
    """Tokens of one image in LaViDa's anyres layout: pooled base view + H' (W' + 1) (a newline ends every row).

    For so400m: 406 for small squares, 1008 at most, 776 for 700x500.
    """
    side = geometry.pooled_side
    grid_cols, grid_rows = anyres_grid_shape(image_size, geometry)
    rows, cols = unpadded_grid_size((grid_rows * side, grid_cols * side), image_size)
    return side * side + rows * (cols + 1)


# ---- selection methods -------------------------------------------------------------------------------------
@dataclasses.dataclass
class SelectionMethod:
    """A registered selection method: flags read by every token count, plus its torch callables.

    uses_coverage: every coverage cell keeps its best token first (K >= number of cells); otherwise 1 <= K.
    adds_summary: append one summary token of the dropped tokens (when `summary` is on and K < N).
    keeps_all: return all N tokens whatever K (no selection).
    requires: names of per-image inputs the scorer needs (e.g. "priority"), passed as `selection_inputs`.
    uses_importance: the scorer reads the importance term, so `selection.importance` = "attention..." makes the
        model pass the tower layer's received attention (input "attention").
    scorer: `scorer(features [N, D] float32, grid_size, settings, **inputs) -> scores [N]` (higher is kept first).
    builder: optional `builder(features, scores, budget, grid_size) -> (tokens [K, D], kept [K], summary [D])` for
        methods whose tokens are not a top-K of the features (e.g. `pooled`).
    """

    name: str
    uses_coverage: bool = True
    adds_summary: bool = True
    keeps_all: bool = False
    requires: tuple = ()
    description: str = ""
    uses_importance: bool = False
    scorer: Callable | None = None
    builder: Callable | None = None


SELECTION_METHODS: dict[str, SelectionMethod] = {}


def register_selection_method(name: str, *, uses_coverage: bool = True, adds_summary: bool = True,
                              keeps_all: bool = False, requires=(), description: str = "",
                              builder: Callable | None = None, uses_importance: bool = False, replace: bool = False):
    """Register a selection method; use it as a decorator on the method's scorer.

        @register_selection_method("edges", uses_coverage=False)
        def edges(features, grid_size, settings, **inputs):
            return ...  # [N] scores

    The name then works everywhere: config `selection.method`, the processor's token counts, the selector, the
    model and the command line. `requires` names per-image inputs the scorer reads (passed to the model as
    `selection_inputs={name: tensor [B, ...]}`); `builder` replaces the top-K gather (see `SelectionMethod`).
    `replace=True` re-declares an existing name.
    """
    if not isinstance(name, str) or not name or ":" in name or "," in name:
        raise ValueError(f"a selection method name must be a non-empty string without ':' or ',', got {name!r}")
    if name in SELECTION_METHODS and not replace:
        raise ValueError(f"selection method {name!r} is already registered; pass replace=True to re-declare it")
    method = SelectionMethod(name, bool(uses_coverage), bool(adds_summary), bool(keeps_all), tuple(requires),
                             description, bool(uses_importance), builder=builder)
    SELECTION_METHODS[name] = method

    def attach(scorer: Callable) -> Callable:
        method.scorer = scorer
        return scorer

    return attach


def selection_scorer(name: str, builder: Callable | None = None):
    """Decorator attaching the torch scorer (and optional token builder) to the registered method `name`."""
    method = get_selection_method(name)

    def attach(scorer: Callable) -> Callable:
        method.scorer, method.builder = scorer, builder
        return scorer

    return attach


def get_selection_method(name: str) -> SelectionMethod:
    """The registered method `name`; unknown names raise one `ValueError` listing the registered ones."""
    if name not in SELECTION_METHODS:
        raise ValueError(f"Unknown selection method {name!r}: expected one of {selection_method_names()}")
    return SELECTION_METHODS[name]


def selection_method_names() -> tuple[str, ...]:
    return tuple(SELECTION_METHODS)


# Built-in methods; their scorers are attached by selection_shirg.py.
register_selection_method("shirg", uses_importance=True,
                          description="importance + magnitude + gradient, coverage cells, summary token")
register_selection_method("full", uses_coverage=False, adds_summary=False, keeps_all=True,
                          description="every patch, no selection")
register_selection_method("random", uses_coverage=False, description="seeded random priorities per grid position")
register_selection_method("pooled", uses_coverage=False, description="K region averages of a near-regular grid")
register_selection_method("magnitude", uses_coverage=False, description="feature norm alone")
register_selection_method("importance", uses_coverage=False, uses_importance=True,
                          description="the importance term alone")
register_selection_method("gradient", uses_coverage=False, description="spatial gradient alone")
register_selection_method("no_coverage", uses_coverage=False, uses_importance=True,
                          description="SHIRG score, plain top-K")
register_selection_method("no_summary", adds_summary=False, uses_importance=True,
                          description="SHIRG without the summary token")
register_selection_method("shirg_seed", uses_importance=True,
                          description="SHIRG with the research plan's seed weights 0.6 / 0.25 / 0.15 (ablation row)")
SEED_WEIGHTS = (0.6, 0.25, 0.15)


# ---- selection settings and budgets ------------------------------------------------------------------------
DEFAULT_SELECTION = {
    "method": "shirg",
    "budget": 768,
    "weights": [0.3, 0.0, 0.7],  # validation evidence, docs/selection.md; the plan's seed: [0.6, 0.25, 0.15]
    "coverage_cells": [8, 8],
    "summary": True,
    "seed": 0,
    "importance": "similarity",
    "attention_layer": None,
    "summary_weights": "score",
    "adaptive_budget": None,
}
SCORE_TERMS = ("importance", "magnitude", "gradient")  # the order of `weights`
# `selection.importance`: the similarity softmax of the features, normalised by look-alikes (docs/selection.md);
# a tower layer's received attention (FastV-style); or that attention normalised by look-alikes.
IMPORTANCE_SOURCES = ("similarity", "attention", "attention_normalised")
# `selection.summary_weights`: softmax of the method's scores; the kept tokens' attention to the dropped tokens.
SUMMARY_WEIGHTS = ("score", "attention")


# Adaptive K (`shirg_budget="adaptive"` with `selection.adaptive_budget = [K_min, K_max]`): the processor counts the
# image's "busy" patches in pixel space (mean absolute difference of neighbouring grey values above the threshold,
# on the [-1, 1] pixel scale) and keeps that many times the margin, within [K_min, K_max]. See docs/selection.md.
ADAPTIVE_BUDGET = "adaptive"
ADAPTIVE_EDGE_THRESHOLD = 0.04
ADAPTIVE_MARGIN = 1.25


def adaptive_budget(busy_patches: int, selection: dict) -> int:
    """K for an image with `busy_patches` busy patches: ceil(ADAPTIVE_MARGIN * busy) clipped to adaptive_budget."""
    bounds = selection.get("adaptive_budget")
    if bounds is None:
        raise ValueError(f"shirg_budget={ADAPTIVE_BUDGET!r} needs `selection.adaptive_budget` = [K_min, K_max] in the "
                         "model config (or processor) settings")
    low, high = bounds
    return min(max(math.ceil(ADAPTIVE_MARGIN * busy_patches), low), high)


def needs_tower_attention(selection: dict, method: str | None = None) -> bool:
    """Whether the method, under these settings, reads a tower layer's received attention (input "attention")."""
    spec = get_selection_method(method or selection["method"])
    importance = selection.get("importance", DEFAULT_SELECTION["importance"])  # settings saved before issue 15
    return "attention" in spec.requires or (spec.uses_importance and importance != "similarity")


def check_selection(selection: dict | None, grid: tuple[int, int] | None = None) -> dict:
    """`DEFAULT_SELECTION` updated with `selection`, validated; errors name the field (`selection.weights`, ...).

    With `grid` (the high-res patch grid) the coverage cells and the budget are checked against it too.
    """
    settings = {**DEFAULT_SELECTION, **(selection or {})}
    unknown = sorted(set(settings) - set(DEFAULT_SELECTION))
    if unknown:
        raise ValueError(f"Invalid `selection`: unknown keys {unknown}; allowed keys are {sorted(DEFAULT_SELECTION)}")
    try:
        get_selection_method(settings["method"])
    except ValueError as error:
        raise ValueError(f"Invalid `selection.method`: {error}") from None
    weights = settings["weights"]
    if not isinstance(weights, (list, tuple)) or len(weights) != 3 or not all(
            isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w >= 0 for w in weights):
        raise ValueError(f"Invalid `selection.weights`: must be three non-negative numbers {SCORE_TERMS}, "
                         f"got {weights!r}")
    if abs(sum(weights) - 1.0) > 1e-6:
        raise ValueError(f"Invalid `selection.weights`: must sum to 1 (e.g. {DEFAULT_SELECTION['weights']}), "
                         f"got {list(weights)} (sum {sum(weights):.6g})")
    cells = settings["coverage_cells"]
    if not isinstance(cells, (list, tuple)) or len(cells) != 2 or not all(_is_int(c) and c >= 1 for c in cells):
        raise ValueError(f"Invalid `selection.coverage_cells`: must be [rows, cols] of positive integers, "
                         f"got {cells!r}")
    if not isinstance(settings["summary"], bool):
        raise ValueError(f"Invalid `selection.summary`: must be true or false, got {settings['summary']!r}")
    if not _is_int(settings["seed"]):
        raise ValueError(f"Invalid `selection.seed`: must be an integer, got {settings['seed']!r}")
    if settings["importance"] not in IMPORTANCE_SOURCES:
        raise ValueError(f"Invalid `selection.importance`: must be one of {IMPORTANCE_SOURCES}, "
                         f"got {settings['importance']!r}")
    if settings["attention_layer"] is not None and not _is_int(settings["attention_layer"]):
        raise ValueError(f"Invalid `selection.attention_layer`: must be a tower layer index (negative counts from the "
                         f"last) or null for the middle layer, got {settings['attention_layer']!r}")
    if settings["summary_weights"] not in SUMMARY_WEIGHTS:
        raise ValueError(f"Invalid `selection.summary_weights`: must be one of {SUMMARY_WEIGHTS}, "
                         f"got {settings['summary_weights']!r}")
    adaptive = settings["adaptive_budget"]
    if adaptive is not None:
        if not isinstance(adaptive, (list, tuple)) or len(adaptive) != 2 or not all(_is_int(k) for k in adaptive) \
                or not 1 <= adaptive[0] <= adaptive[1]:
            raise ValueError(f"Invalid `selection.adaptive_budget`: must be [K_min, K_max] with 1 <= K_min <= K_max, "
                             f"or null, got {adaptive!r}")
        settings["adaptive_budget"] = [int(k) for k in adaptive]
    settings = {**settings, "weights": [float(w) for w in weights], "coverage_cells": [int(c) for c in cells]}
    if grid is not None:
        check_coverage(settings, grid)
        check_budget(settings["budget"], settings, grid[0] * grid[1])
        for budget in settings["adaptive_budget"] or ():
            check_budget(budget, settings, grid[0] * grid[1])
    elif not _is_int(settings["budget"]) or settings["budget"] < 1:
        raise ValueError(f"Invalid `selection.budget`: must be an integer >= 1, got {settings['budget']!r}")
    return settings


def check_coverage(selection: dict, grid: tuple[int, int], method: str | None = None) -> None:
    """Raise `ValueError` when a coverage method's cells are finer than the patch grid."""
    cells = selection["coverage_cells"]
    if get_selection_method(method or selection["method"]).uses_coverage and (cells[0] > grid[0] or cells[1] > grid[1]):
        raise ValueError(f"Invalid `selection.coverage_cells`: {list(cells)} exceed the {grid[0]}x{grid[1]} patch "
                         "grid; use at most one cell per patch row and column")


def budget_range(selection: dict, num_patches: int, method: str | None = None) -> tuple[int, int]:
    """(lowest, highest) valid K: coverage methods keep one token per cell, so K >= rows * cols; at most N."""
    rows, cols = selection["coverage_cells"]
    low = rows * cols if get_selection_method(method or selection["method"]).uses_coverage else 1
    return low, num_patches


def check_budget(budget, selection: dict, num_patches: int, method: str | None = None) -> int:
    """Return `budget` if it is a valid K for the method (default: `selection["method"]`), else raise `ValueError`."""
    method = method or selection["method"]
    low, high = budget_range(selection, num_patches, method)
    if not (_is_int(budget) and low <= budget <= high):
        rows, cols = selection["coverage_cells"]
        reason = f"one token per coverage cell, {rows}x{cols} = {low}" if low > 1 else "K >= 1"
        raise ValueError(f"Invalid `selection.budget` (K) {budget!r} for selection method {method!r}: must be an "
                         f"integer in [{low}, {high}] ({reason}; at most the {high} high-res patches)")
    return budget


def has_summary(selection: dict, budget: int, num_patches: int, method: str | None = None) -> bool:
    """Whether the selected tokens end with the summary token."""
    spec = get_selection_method(method or selection["method"])
    return selection["summary"] and spec.adds_summary and not spec.keeps_all and budget < num_patches


def num_selected_tokens(selection: dict, num_patches: int, budget: int | None = None, method: str | None = None) -> int:
    """Tokens a selection returns per image: N (`keeps_all`), else K plus the summary token if any."""
    method = method or selection["method"]
    budget = check_budget(selection["budget"] if budget is None else budget, selection, num_patches, method)
    if get_selection_method(method).keeps_all:
        return num_patches
    return budget + int(has_summary(selection, budget, num_patches, method))


# ---- vision modes ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class VisionMode:
    """A registered vision front end.

    view_side: "highres" or "native", the side every view is resized to.
    selects: keeps K tokens chosen by a selection method (budget and method apply).
    anyres: LaViDa's anyres views (base view + grid crops); the token count needs each image's size.
    count: `count(geometry, image_size) -> tokens` for modes that do not select.
    features: the torch half, `features(model, pixel_values, image_sizes=, method=, budget=, selection_inputs=)
        -> (list of [n_i, hidden] embeddings, kept indices or None)`; attached by modeling_shirg_lavida.py.
    """

    name: str
    view_side: str
    selects: bool = False
    anyres: bool = False
    count: Callable | None = None
    description: str = ""
    features: Callable | None = None


VISION_MODES: dict[str, VisionMode] = {}


def register_vision_mode(name: str, *, view_side: str, selects: bool = False, anyres: bool = False,
                         count: Callable | None = None, description: str = "", replace: bool = False):
    """Register a vision mode (torch-free half); use it as a decorator on the torch half (pixels -> embeddings)."""
    if name in VISION_MODES and not replace:
        raise ValueError(f"vision mode {name!r} is already registered; pass replace=True to re-declare it")
    if view_side not in ("native", "highres"):
        raise ValueError(f"view_side must be 'native' or 'highres', got {view_side!r}")
    if (count is None) == (not selects):
        raise ValueError("a vision mode either selects (selects=True) or counts its tokens (count=...), not both")
    mode = VisionMode(name, view_side, bool(selects), bool(anyres), count, description)
    VISION_MODES[name] = mode

    def attach(features: Callable) -> Callable:
        mode.features = features
        return features

    return attach


def vision_front_end(name: str):
    """Decorator attaching the torch half (pixels -> embeddings) to the registered vision mode `name`."""
    mode = get_vision_mode(name)

    def attach(features: Callable) -> Callable:
        mode.features = features
        return features

    return attach


def get_vision_mode(name: str) -> VisionMode:
    """The registered mode `name`; unknown names raise one `ValueError` listing the registered ones."""
    if name not in VISION_MODES:
        raise ValueError(f"Unknown vision_mode {name!r}: expected one of {vision_mode_names()}")
    return VISION_MODES[name]


def vision_mode_names() -> tuple[str, ...]:
    return tuple(VISION_MODES)


DEFAULT_VISION_MODE = "shirg"

# Built-in modes; their torch halves are attached by modeling_shirg_lavida.py.
register_vision_mode("shirg", view_side="highres", selects=True,
                     description="high-res patches -> K selected tokens (+ 1 summary)")
register_vision_mode("full", view_side="highres", count=lambda geometry, image_size: geometry.num_highres_patches,
                     description="every high-res patch")
register_vision_mode("lowres", view_side="native",
                     count=lambda geometry, image_size: math.prod(geometry.grid("native")),
                     description="the tower's native view (LaViDa's low-res path)")
register_vision_mode("lavida-hd", view_side="native", anyres=True,
                     count=lambda geometry, image_size: lavida_hd_num_tokens(image_size, geometry),
                     description="LaViDa's anyres views, pooling, unpadding and newline tokens")


def lavida_checkpoint_mode(image_aspect_ratio: str | None) -> str:
    """The vision mode reproducing an original LaViDa checkpoint: its anyres path, or its single native view."""
    return "lavida-hd" if image_aspect_ratio == "anyres" else "lowres"


def num_image_tokens(mode: str, geometry: Geometry, selection: dict, *, budget: int | None = None,
                     method: str | None = None, image_size=None) -> int:
    """Visual tokens one image occupies in the prompt: THE count rule of processor, model and collator."""
    spec = get_vision_mode(mode)
    if spec.selects:
        return num_selected_tokens(selection, geometry.num_highres_patches, budget, method)
    if budget is not None or method is not None:
        raise ValueError(f"a budget and a selection method only apply to selecting vision modes "
                         f"{tuple(n for n, m in VISION_MODES.items() if m.selects)}, not {mode!r}")
    if spec.anyres and image_size is None:
        raise ValueError(f"vision_mode={mode!r} needs the image size (width, height) to count its tokens")
    return spec.count(geometry, image_size)
