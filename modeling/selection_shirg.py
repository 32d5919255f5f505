"""SHIRG: static, parameter-free selection of K high-resolution SigLIP patch tokens plus one summary token.

`ShirgSelector` turns the raw tower features `F [B, N = H*W, D]` (672 px -> 48 x 48 = 2,304 patches, D = 1,152)
into `K` kept tokens in raster order followed by one summary token, before the projector. It runs once per image
before diffusion starts, so the prefix (and its KV cache) never changes afterwards.

Algorithm (`method="shirg"`), per image, in float32 whatever the input dtype:

1. Three scores, each scaled to [0, 1] per image, combined as `s = 0.6 A + 0.25 M + 0.15 G` (weights configurable):

   - **A, importance = redundancy-normalised received attention.** The research plan's "column mean of a softmax
     over scaled cosine similarities" rewards bland background: a white-page token is attended by the hundreds
     of white-page tokens that look like it, so it receives more mass than a glyph does. Checked on synthetic
     images with known text patches (a PIL-rendered text page and a "photo" with a text sign, each encoded by
     random SigLIP towers of 3 sizes, plus a hand-built 48 x 48 x 1152 feature map): that naive score ranks the
     background above the text (AUROC text vs. background 0.00-0.03). We therefore divide the attention a
     token receives by the number of tokens that look like it:

         K_ij = exp(tau (cos(x_i, x_j) - 1)),  Z_i = sum_j K_ij,  P_ij = K_ij / Z_i          (similarity softmax)
         A_j  = log(sum_i P_ij) - log(Z_j)      ("received attention per look-alike", in nats)

     A distinctive token keeps the attention it receives; a repetitive token shares it with all its look-alikes.
     On the same 7 cases this gives AUROC 0.97-1.00. (Plain distinctiveness, 1 - mean cosine, did as well on
     them but cannot use the tower's attention; weighting received attention by the query's distinctiveness
     failed, AUROC 0.00, because glyph patches are mostly white and attend to the page.) When the tower's own
     attention maps are supplied (`attentions=`), they replace `P`; the redundancy `Z` still comes from the
     features. The diagonal of `K` is set to exactly 1, so every log is finite.
     The kernel sharpness is set per image from the features (a mean-distance heuristic, like the median
     heuristic for RBF kernels): `tau = 4 / (1 - mean off-diagonal cosine)`, so a token as similar as the image
     average counts e^-4 of a duplicate. The cosine scale varies between towers and images (mean cosine
     0.79-0.98 on the cases above), and a fixed tau that suits one scale counts nearly everything, or nothing,
     as a look-alike on another: fixed values between 5 and 100 lost up to 0.08 AUROC on some of the cases.
   - **M, magnitude**: L2 norm of the RAW features. ViT feature norms are heavy-tailed (a few "artifact"
     tokens can be 10x the rest), so M is min-max scaled between the minimum and the 99th percentile and
     clipped: a handful of outliers cannot squash every other token to ~0.
   - **G, spatial gradient**: mean L2 distance between the token's unit-normalised feature and those of its
     (up to 4) grid neighbours. Unit-normalising makes G measure a change of *content* (edges, thin text
     strokes) rather than a change of norm, which M already covers.

   A and G are min-max scaled. Min-max scaling would stretch a near-constant score's float32 rounding noise
   to the full [0, 1], differently on every CPU kernel. Each score's range is therefore divided by at least
   `NOISE_MARGIN` (100) times an estimate of its float32 rounding error, propagated from the reduction lengths
   (D, N) and, for A, the kernel sharpness tau (see `_noise_floors`): rounding noise stays below ~1% of the unit
   range, while real contrast (text vs. page: several nats of A, tens of % of M) is scaled as before.

2. **Coverage**: the H x W grid is split into `coverage_cells` (rows x cols, default 8 x 8 = 64 cells of 6 x 6
   patches; patch row r lies in cell row `floor(r * rows / H)`, likewise for columns, so every cell is non-empty
   whenever the cell grid is no finer than the patch grid). Every cell keeps its best
   token; the remaining `K - rows*cols` slots go to the best remaining tokens.
3. Kept tokens are returned in raster order with their indices and (row, col) coordinates.
4. **Summary token**: the softmax(score)-weighted average of the DROPPED tokens (scores are in [0, 1], so the
   weights differ by at most e^1 = 2.7x: near-misses count more than plain background, yet nothing dominates).
   It is appended after the kept tokens: `K + 1` tokens out (`K` when K == N, or summary off).

Determinism: ranking uses a stable sort, so ties go to the lower index; every image is scored and selected on its
own (no cross-image reduction), so an image gives identical indices alone or in a batch of any size; reductions
are row- or column-wise (never a thread-split reduction to a scalar or a BLAS matrix-vector product), so scores
are bit-identical for 1 or 2 threads. The tests check both.

Gradients: the choice of indices is discrete; scores are computed on detached features and are constants for
autograd. Gradients flow to `F` through the gathered kept tokens and through the summary (a fixed convex
combination of dropped features), which is what LoRA training of the projector/LM needs, without back-propagating
through the N x N kernel (which would cost N^2 memory per image for a selection heuristic).

Baselines, same output contract (`method=`): `full` (all N tokens, no summary), `random` (seeded), `pooled`,
`magnitude`, `importance`, `gradient` (one score alone, no coverage), `no_coverage` (SHIRG score, plain top-K),
`no_summary` (SHIRG without the summary token). `random` draws one priority per grid position from
`torch.Generator().manual_seed(seed)`: the pattern depends on the seed and the grid size only, so every image gets
the same kept positions whatever the batch. `pooled` averages a near-regular partition of the grid into exactly K
rectangles (see `pooling_regions`); it does not score tokens (scores are 0) and its summary is the image mean.
Every other method's summary weighs its dropped tokens by softmax of its own scores (`random`: its priorities).
"""

import math
from dataclasses import dataclass

import torch
from torch import nn

# Must match `SELECTION_METHODS` / `DEFAULT_SELECTION` in configuration_shirg_lavida.py (a test checks this); kept
# here so this module needs torch only.
METHODS = ("shirg", "full", "random", "pooled", "magnitude", "importance", "gradient", "no_coverage", "no_summary")
# Methods that rank without the coverage guarantee: any 1 <= K <= N is allowed.
METHODS_WITHOUT_COVERAGE = ("random", "pooled", "magnitude", "importance", "gradient", "no_coverage")
# Kernel sharpness of the importance score: a token as similar as the image average weighs e^-4 of a duplicate.
KERNEL_SHARPNESS = 4.0
# Magnitudes above this per-image quantile saturate at 1 (robust to a few high-norm artifact tokens).
MAGNITUDE_CLIP_QUANTILE = 0.99
# A score's range must exceed this many times its estimated float32 rounding error to be stretched to [0, 1]
# (see `_noise_floors`): rounding noise is scaled to at most ~1/NOISE_MARGIN of the unit range.
NOISE_MARGIN = 100.0


@dataclass
class SelectionOutput:
    """Result of `ShirgSelector` for a batch.

    tokens: [B, K + 1, D] kept features in raster order, then the summary token (in the input dtype; [B, K, D]
        without summary, [B, N, D] for `full`). For `pooled`, the K tokens are region averages.
    kept_indices: [B, K] sorted flat patch indices (row * W + col); for `pooled`, each region's centre patch.
    kept_coords: [B, K, 2] (row, col) of `kept_indices`.
    scores: [B, N] float32 ranking score of every patch (the method's own score; 0 for `pooled`).
    has_summary: whether `tokens` ends with the summary token.
    """

    tokens: torch.Tensor
    kept_indices: torch.LongTensor
    kept_coords: torch.LongTensor
    scores: torch.Tensor
    has_summary: bool


# ---- scores ------------------------------------------------------------------------------------------------
def _unit_range(values: torch.Tensor, floor: float, clip_quantile: float | None = None) -> torch.Tensor:
    """Min-max scale a [N] score to [0, 1], dividing by at least `floor` (its rounding-noise width).

    With `clip_quantile`, the top of the range is that quantile (values above it clip to 1) unless it equals the
    minimum, in which case the maximum is used. A range narrower than `floor` is not contrast: it is divided by
    the floor instead, so a (nearly) constant score stays (nearly) 0 instead of being stretched to [0, 1].
    """
    low = values.min()
    high = values.max()
    if clip_quantile is not None:
        quantile = torch.quantile(values, clip_quantile)
        high = torch.where(quantile > low, quantile, high)
    return ((values - low) / (high - low).clamp_min(floor)).clamp(0.0, 1.0)


def _rounding(length: int) -> float:
    """Relative float32 rounding error of a `length`-term sum: sqrt(n) eps, its typical size in any order.

    The worst case, n eps, is reached only by adversarial inputs; times `NOISE_MARGIN` = 100 the typical size
    also bounds it for every n <= 10,000 (D = 1,152, N = 2,304 in SHIRG), whatever the kernel or thread count.
    """
    return math.sqrt(length) * torch.finfo(torch.float32).eps


def _noise_floors(num_tokens: int, dim: int, tau: float, max_magnitude: float) -> dict[str, float]:
    """`NOISE_MARGIN` times the float32 rounding error of each raw score, from how it is computed.

    - unit vectors: norm of D squares (rounding(D) / 2) and a division, so each is off by ~(rounding(D) / 2 +
      2 eps) in relative terms; a cosine (a D-term dot product of two of them) by (2 rounding(D) + 4 eps).
    - A: the logits tau (cos - 1) carry tau times the cosine error; log Z_j and log sum_i K_ij / Z_i together
      carry three times that, plus two N-term sums.
    - M: a norm of D squares, relative to the largest magnitude.
    - G: the distance of two unit vectors (each off as above, difference norm <= 2): ~(3 rounding(D) + 4 eps).
    """
    eps = torch.finfo(torch.float32).eps
    cosine = 2 * _rounding(dim) + 4 * eps
    errors = {
        "importance": 3 * tau * (cosine + eps) + 2 * _rounding(num_tokens) + 4 * eps,
        "magnitude": (_rounding(dim) / 2 + 2 * eps) * max_magnitude,
        "gradient": 3 * _rounding(dim) + 4 * eps,
    }
    return {name: NOISE_MARGIN * error for name, error in errors.items()}


def _kernel_sharpness(unit: torch.Tensor) -> float:
    """tau = KERNEL_SHARPNESS / (1 - mean off-diagonal cosine) of unit-norm features [N, D]."""
    # Reductions are written so that each output element is summed by one thread in a fixed order (row or
    # column reductions, never a multi-threaded reduction to a scalar or a BLAS matrix-vector product): the
    # result is then bit-identical for any thread count.
    num_tokens = unit.shape[0]
    total = unit.sum(dim=0)  # [D]
    self_similarity = (unit * unit).sum(dim=1).sum()  # N, or fewer for all-zero features
    mean_cosine = ((total * total).sum() - self_similarity) / max(num_tokens * (num_tokens - 1), 1)
    return float(KERNEL_SHARPNESS / (1.0 - mean_cosine).clamp_min(1e-3))


def importance_scores(unit: torch.Tensor, received: torch.Tensor | None = None) -> torch.Tensor:
    """Redundancy-normalised received attention A [N] (unscaled, in nats) from unit-norm features [N, D].

    `received` [N]: attention each token receives from the tower (column sums of its row-stochastic attention);
    by default it is that of the similarity softmax.
    """
    tau = _kernel_sharpness(unit)
    logits = torch.addmm(unit.new_tensor(-tau), unit, unit.T, alpha=tau)  # [N, N] tau (cos - 1)
    # exp(-60) ~ 1e-26 is nothing next to the diagonal's 1, and keeps every entry a normal float: subnormal
    # values (exp below -87) make exp and the sums below several times slower on x86 CPUs.
    kernel = logits.clamp_(min=-60.0).exp_()
    kernel.fill_diagonal_(1.0)
    look_alikes = kernel.sum(dim=1)  # [N] Z_j
    if received is None:
        received = kernel.div_(look_alikes[:, None]).sum(dim=0)  # [N] column sums of the row-softmax P
    else:
        received = received.clamp_min(torch.finfo(torch.float32).tiny)  # [N]
    return received.log() - look_alikes.log()


def magnitude_scores(features: torch.Tensor) -> torch.Tensor:
    """L2 norm of the raw features [N, D] -> [N]."""
    return torch.linalg.vector_norm(features, dim=-1)


def gradient_scores(unit: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
    """Mean distance of each unit-norm feature [N, D] to its 4-neighbours on the H x W grid -> [N]."""
    rows, cols = grid_size
    grid = unit.view(rows, cols, -1)  # [H, W, D]
    total = unit.new_zeros(rows, cols)
    count = unit.new_zeros(rows, cols)
    vertical = torch.linalg.vector_norm(grid[1:] - grid[:-1], dim=-1)  # [H-1, W]
    horizontal = torch.linalg.vector_norm(grid[:, 1:] - grid[:, :-1], dim=-1)  # [H, W-1]
    total[1:] += vertical
    total[:-1] += vertical
    count[1:] += 1
    count[:-1] += 1
    total[:, 1:] += horizontal
    total[:, :-1] += horizontal
    count[:, 1:] += 1
    count[:, :-1] += 1
    return (total / count.clamp_min(1)).flatten()


def score_components(
    features: torch.Tensor,
    grid_size: tuple[int, int],
    attention: torch.Tensor | None = None,
    names: tuple[str, ...] = ("importance", "magnitude", "gradient"),
) -> dict[str, torch.Tensor]:
    """SHIRG scores of one image, each in [0, 1]: {name: [N]} for `names` among importance/magnitude/gradient.

    features: [N, D] any float dtype (scored in float32, detached); attention: optional tower attention
    [N, N] or [heads, N, N] (rows = queries, each summing to 1); heads are averaged.
    """
    with torch.no_grad():
        raw = features.detach().to(torch.float32)  # [N, D]
        unit = nn.functional.normalize(raw, dim=-1)  # [N, D]
        num_tokens, dim = unit.shape
        magnitude = magnitude_scores(raw) if "magnitude" in names else None
        floors = _noise_floors(num_tokens, dim, _kernel_sharpness(unit) if "importance" in names else 0.0,
                               float(magnitude.max()) if magnitude is not None else 0.0)
        components = {}
        if "importance" in names:
            received = None
            if attention is not None:  # column sums accumulated in float32 without a float32 copy of the maps
                received = attention.detach().sum(dim=-2, dtype=torch.float32)  # [N] or [heads, N]
                received = received.mean(dim=0) if received.dim() == 2 else received
            components["importance"] = _unit_range(importance_scores(unit, received), floors["importance"])
        if magnitude is not None:
            components["magnitude"] = _unit_range(magnitude, floors["magnitude"], MAGNITUDE_CLIP_QUANTILE)
        if "gradient" in names:
            components["gradient"] = _unit_range(gradient_scores(unit, grid_size), floors["gradient"])
        return components


# ---- geometry ----------------------------------------------------------------------------------------------
def coverage_cell_ids(grid_size: tuple[int, int], cells: tuple[int, int]) -> torch.LongTensor:
    """Coverage cell of every patch in raster order -> [N]; patch row r is in cell row floor(r * rows / H)."""
    rows, cols = grid_size
    cell_rows, cell_cols = cells
    row_cell = torch.arange(rows) * cell_rows // rows  # [H]
    col_cell = torch.arange(cols) * cell_cols // cols  # [W]
    return (row_cell[:, None] * cell_cols + col_cell[None, :]).flatten()


def pooling_regions(grid_size: tuple[int, int], budget: int) -> list[tuple[int, int, list[tuple[int, int]]]]:
    """Partition the H x W grid into exactly `budget` rectangles, in raster order.

    The grid is cut into `bands` horizontal bands (about sqrt(K * H / W), so regions are about square), band b
    spanning rows [floor(b H / bands), floor((b + 1) H / bands)); the K regions are shared among bands as evenly
    as possible, and band b's n_b regions span columns [floor(c W / n_b), floor((c + 1) W / n_b)). When K = a * b
    tiles the grid evenly (576 = 24 x 24 on 48 x 48) this is plain average pooling. Returns
    [(row_start, row_end, [(col_start, col_end), ...]), ...].
    """
    rows, cols = grid_size
    bands = round(math.sqrt(budget * rows / cols))
    bands = min(max(bands, math.ceil(budget / cols), 1), rows, budget)
    regions = []
    for band in range(bands):
        per_band = (band + 1) * budget // bands - band * budget // bands
        col_spans = [(c * cols // per_band, (c + 1) * cols // per_band) for c in range(per_band)]
        regions.append((band * rows // bands, (band + 1) * rows // bands, col_spans))
    return regions


def _pool(features: torch.Tensor, grid_size: tuple[int, int], budget: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Average `features` [N, D] over `pooling_regions` -> ([K, D] float32 means, [K] centre patch indices)."""
    rows, cols = grid_size
    grid = features.to(torch.float32).view(rows, cols, -1)  # [H, W, D]
    column = torch.arange(cols, device=features.device)  # [W]
    tokens, centres = [], []
    for row_start, row_end, col_spans in pooling_regions(grid_size, budget):
        band = grid[row_start:row_end].mean(dim=0)  # [W, D]
        starts, ends = (torch.tensor(edge, device=features.device) for edge in zip(*col_spans, strict=True))
        inside = (column[None, :] >= starts[:, None]) & (column[None, :] < ends[:, None])  # [n_b, W]
        tokens.append((inside / (ends - starts)[:, None]) @ band)  # [n_b, D] region means
        centre_cols = (starts + ends - 1) // 2
        centres.append((row_start + row_end - 1) // 2 * cols + centre_cols)
    return torch.cat(tokens), torch.cat(centres)


def _top_k(scores: torch.Tensor, budget: int, cell_ids: torch.Tensor | None) -> torch.LongTensor:
    """Indices [K] (sorted) of the K best scores; with `cell_ids` [N], the best of every cell first."""
    order = torch.sort(scores, descending=True, stable=True).indices  # [N] ties -> lower index first
    if cell_ids is None:
        return order[:budget].sort().values
    num_cells = int(cell_ids.max()) + 1
    cells_in_order = cell_ids[order]  # [N]
    positions = torch.arange(order.numel(), device=order.device)
    first = torch.full((num_cells,), order.numel(), dtype=torch.long, device=order.device)
    first = first.scatter_reduce(0, cells_in_order, positions, reduce="amin")  # [C] rank of each cell's best
    is_cell_best = torch.zeros(order.numel(), dtype=torch.bool, device=order.device)
    is_cell_best[first] = True
    rest = order[~is_cell_best][: budget - num_cells]
    return torch.cat([order[first], rest]).sort().values


def _prioritised(scores: torch.Tensor, priority: torch.Tensor) -> torch.Tensor:
    """[N] ranking where every `priority` patch [N] bool is above every other, each group in `scores` order."""
    lift = scores.max() - scores.min() + 1.0
    return scores + priority.to(scores.dtype) * lift


def _summary(features: torch.Tensor, scores: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """softmax(score)-weighted mean of the tokens not in `kept` -> [D] float32 (differentiable in features)."""
    logits = scores.clone()
    logits[kept] = float("-inf")
    weights = torch.softmax(logits, dim=0)  # [N], 0 on kept tokens
    return (weights[:, None] * features.to(torch.float32)).sum(dim=0)  # column sums: thread-count invariant


# ---- selector ----------------------------------------------------------------------------------------------
class ShirgSelector(nn.Module):
    """Keep K of N high-resolution patch tokens (+1 summary); parameter-free and deterministic.

    Args:
        method: one of `METHODS` (`shirg` or an ablation baseline; see the module docstring).
        budget: default K when the call passes none.
        coverage_cells: (rows, cols) of the coverage grid; every cell keeps at least one token.
        weights: (importance, magnitude, gradient) weights of the SHIRG score; non-negative, sum 1.
        summary: append the summary token (ignored by `full`, `no_summary` and when K == N).
        seed: seed of the `random` baseline.
    """

    def __init__(
        self,
        method: str = "shirg",
        budget: int = 768,
        coverage_cells: tuple[int, int] = (8, 8),
        weights: tuple[float, float, float] = (0.6, 0.25, 0.15),
        summary: bool = True,
        seed: int = 0,
    ):
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"ShirgSelector: method must be one of {METHODS}, got {method!r}")
        if not (isinstance(budget, int) and not isinstance(budget, bool) and budget >= 1):
            raise ValueError(f"ShirgSelector: budget must be an integer >= 1, got {budget!r}")
        coverage_cells = tuple(coverage_cells)
        if len(coverage_cells) != 2 or not all(isinstance(c, int) and c >= 1 for c in coverage_cells):
            raise ValueError(
                f"ShirgSelector: coverage_cells must be (rows, cols) of positive integers, got {coverage_cells!r}"
            )
        weights = tuple(float(w) for w in weights)
        if len(weights) != 3 or not all(math.isfinite(w) and w >= 0 for w in weights) or abs(sum(weights) - 1) > 1e-6:
            raise ValueError(
                "ShirgSelector: weights must be three non-negative numbers (importance, magnitude, gradient) "
                f"summing to 1, e.g. (0.6, 0.25, 0.15); got {weights!r}"
            )
        if not isinstance(summary, bool):
            raise ValueError(f"ShirgSelector: summary must be True or False, got {summary!r}")
        if not isinstance(seed, int):
            raise ValueError(f"ShirgSelector: seed must be an integer, got {seed!r}")
        self.method = method
        self.budget = budget
        self.coverage_cells = coverage_cells
        self.weights = weights
        self.summary = summary
        self.seed = seed

    @classmethod
    def from_config(cls, config) -> "ShirgSelector":
        """Build from any config with a `selection` mapping (method, budget, weights, coverage_cells, summary, seed)."""
        selection = getattr(config, "selection", None)
        if not hasattr(selection, "get"):
            raise ValueError(
                f"ShirgSelector.from_config needs a config with a `selection` dict, got {type(config).__name__} "
                f"with selection={selection!r}"
            )
        return cls(
            method=selection.get("method", "shirg"),
            budget=selection.get("budget", 768),
            coverage_cells=tuple(selection.get("coverage_cells", (8, 8))),
            weights=tuple(selection.get("weights", (0.6, 0.25, 0.15))),
            summary=selection.get("summary", True),
            seed=selection.get("seed", 0),
        )

    def extra_repr(self) -> str:
        return (
            f"method={self.method!r}, budget={self.budget}, coverage_cells={self.coverage_cells}, "
            f"weights={self.weights}, summary={self.summary}, seed={self.seed}"
        )

    # ---- validation --------------------------------------------------------------------------------------
    def check_budget(self, budget: int, num_patches: int) -> None:
        """Raise `ValueError` unless coverage cells <= K <= N (1 <= K <= N for methods without coverage)."""
        cell_rows, cell_cols = self.coverage_cells
        low = 1 if self.method in METHODS_WITHOUT_COVERAGE else cell_rows * cell_cols
        if not (isinstance(budget, int) and not isinstance(budget, bool) and low <= budget <= num_patches):
            raise ValueError(
                f"ShirgSelector(method={self.method!r}): budget K must be an integer in [{low}, {num_patches}] "
                f"({'K >= 1' if low == 1 else f'one token per coverage cell, {cell_rows}x{cell_cols} = {low}'}, "
                f"at most the {num_patches} patches), got {budget!r}"
            )

    def num_output_tokens(self, num_patches: int, budget: int | None = None) -> int:
        """Number of tokens `forward` returns per image (K, K + 1, or N for `full`)."""
        budget = self.budget if budget is None else budget
        self.check_budget(budget, num_patches)
        if self.method == "full":
            return num_patches
        return budget + int(self._with_summary(budget, num_patches))

    def _with_summary(self, budget: int, num_patches: int) -> bool:
        return self.summary and self.method not in ("full", "no_summary") and budget < num_patches

    def _check_inputs(self, features, grid_size, attentions) -> tuple[int, int]:
        if not isinstance(features, torch.Tensor) or features.dim() != 3 or not features.is_floating_point():
            raise ValueError(
                "ShirgSelector expects floating-point features of shape [batch, num_patches, hidden], got "
                f"{type(features).__name__} {tuple(getattr(features, 'shape', ()))} "
                f"{getattr(features, 'dtype', '')}"
            )
        batch, num_patches, hidden = features.shape
        if batch == 0 or num_patches == 0 or hidden == 0:
            raise ValueError(f"ShirgSelector: features must be non-empty, got shape {tuple(features.shape)}")
        if grid_size is None:
            side = math.isqrt(num_patches)
            if side * side != num_patches:
                raise ValueError(
                    f"ShirgSelector: {num_patches} patches do not form a square grid; pass grid_size=(rows, cols)"
                )
            grid_size = (side, side)
        grid_size = tuple(grid_size)
        if len(grid_size) != 2 or not all(isinstance(g, int) and g >= 1 for g in grid_size):
            raise ValueError(f"ShirgSelector: grid_size must be (rows, cols) of positive integers, got {grid_size!r}")
        if grid_size[0] * grid_size[1] != num_patches:
            raise ValueError(
                f"ShirgSelector: grid_size {grid_size} has {grid_size[0] * grid_size[1]} patches but features "
                f"have {num_patches}; pass the tower's patch grid (e.g. (48, 48) for 672 px at patch 14)"
            )
        cell_rows, cell_cols = self.coverage_cells
        if self.method not in METHODS_WITHOUT_COVERAGE and (cell_rows > grid_size[0] or cell_cols > grid_size[1]):
            raise ValueError(
                f"ShirgSelector: coverage_cells {self.coverage_cells} exceed the {grid_size[0]}x{grid_size[1]} "
                "patch grid; use at most one cell per patch row/column"
            )
        if not torch.isfinite(features.sum(dtype=torch.float32)):  # one pass; NaN and inf propagate into the sum
            raise ValueError("ShirgSelector: features contain NaN or infinite values")
        if attentions is not None:
            valid = isinstance(attentions, torch.Tensor) and attentions.is_floating_point()
            if not valid or attentions.dim() not in (3, 4) or (
                (attentions.shape[0], *attentions.shape[-2:]) != (batch, num_patches, num_patches)
            ):
                raise ValueError(
                    "ShirgSelector: attentions must be [batch, num_patches, num_patches] or [batch, heads, "
                    f"num_patches, num_patches] matching features {tuple(features.shape)}, got "
                    f"{tuple(getattr(attentions, 'shape', ()))}"
                )
        return grid_size

    def _check_priority(self, priority, batch: int, num_patches: int) -> None:
        if priority is None:
            return
        if not isinstance(priority, torch.Tensor) or priority.dtype != torch.bool or \
                tuple(priority.shape) != (batch, num_patches):
            raise ValueError(f"ShirgSelector: priority must be a bool tensor [batch, num_patches] = "
                             f"[{batch}, {num_patches}], got {type(priority).__name__} "
                             f"{tuple(getattr(priority, 'shape', ()))} {getattr(priority, 'dtype', '')}")
        if self.method == "pooled":
            raise ValueError("ShirgSelector: priority needs a method that ranks patches; 'pooled' does not")

    # ---- selection ---------------------------------------------------------------------------------------
    def score(
        self, features: torch.Tensor, grid_size: tuple[int, int], attention: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The method's ranking score of one image: features [N, D] -> [N] float32."""
        num_patches = features.shape[0]
        if self.method == "pooled":
            return torch.zeros(num_patches, dtype=torch.float32, device=features.device)
        if self.method == "random":
            generator = torch.Generator().manual_seed(self.seed)
            return torch.rand(num_patches, generator=generator).to(features.device)
        if self.method in ("importance", "magnitude", "gradient"):
            return score_components(features, grid_size, attention, names=(self.method,))[self.method]
        components = score_components(features, grid_size, attention)
        weight_a, weight_m, weight_g = self.weights
        return (weight_a * components["importance"] + weight_m * components["magnitude"]
                + weight_g * components["gradient"])

    def _select_one(self, features, grid_size, budget, attention, priority=None):
        """One image: features [N, D], optional priority [N] -> (tokens [T, D], kept indices [K], scores [N])."""
        num_patches = features.shape[0]
        scores = self.score(features, grid_size, attention)  # [N]
        if self.method == "full" or budget == num_patches:
            return features, torch.arange(num_patches, device=features.device), scores
        if self.method == "pooled":
            pooled, kept = _pool(features, grid_size, budget)  # [K, D], [K]
            if self._with_summary(budget, num_patches):
                pooled = torch.cat([pooled, features.to(torch.float32).mean(dim=0, keepdim=True)])
            return pooled.to(features.dtype), kept, scores
        cells = None
        if self.method not in METHODS_WITHOUT_COVERAGE:
            cells = coverage_cell_ids(grid_size, self.coverage_cells).to(features.device)
        kept = _top_k(scores if priority is None else _prioritised(scores, priority), budget, cells)  # [K]
        tokens = features[kept]  # [K, D]
        if self._with_summary(budget, num_patches):
            summary = _summary(features, scores, kept).to(features.dtype)  # [D]
            tokens = torch.cat([tokens, summary[None]])
        return tokens, kept, scores

    def forward(
        self,
        features: torch.Tensor,
        grid_size: tuple[int, int] | None = None,
        budget: int | None = None,
        attentions: torch.Tensor | None = None,
        priority: torch.Tensor | None = None,
    ) -> SelectionOutput:
        """Select K tokens per image.

        Args:
            features: [B, N, D] raw tower output (before post_layernorm), any float dtype.
            grid_size: (H, W) of the patch grid, H * W = N (default: square).
            budget: K (default: the selector's `budget`).
            attentions: optional tower attention [B, N, N] or [B, heads, N, N] (rows = queries) used by the
                importance score instead of the feature-similarity softmax.
            priority: optional [B, N] bool; the marked patches of each image rank above all others (in score order),
                so they are kept first (an oracle selection: e.g. the patches known to hold the answer). Scores and
                the summary weights are unchanged. Not for `pooled`.
        """
        grid_size = self._check_inputs(features, grid_size, attentions)
        batch, num_patches, _ = features.shape
        budget = self.budget if budget is None else budget
        self.check_budget(budget, num_patches)
        self._check_priority(priority, batch, num_patches)
        tokens, kept, scores = [], [], []
        for row in range(batch):
            attention = None if attentions is None else attentions[row]
            row_priority = None if priority is None else priority[row].to(features.device)
            row_tokens, row_kept, row_scores = self._select_one(features[row], grid_size, budget, attention,
                                                                row_priority)
            tokens.append(row_tokens)
            kept.append(row_kept)
            scores.append(row_scores)
        kept_indices = torch.stack(kept)  # [B, K]
        kept_coords = torch.stack([kept_indices // grid_size[1], kept_indices % grid_size[1]], dim=-1)  # [B, K, 2]
        return SelectionOutput(
            tokens=torch.stack(tokens),
            kept_indices=kept_indices,
            kept_coords=kept_coords,
            scores=torch.stack(scores),
            has_summary=self._with_summary(budget, num_patches),
        )


__all__ = ["ShirgSelector", "SelectionOutput", "METHODS", "pooling_regions", "score_components"]
