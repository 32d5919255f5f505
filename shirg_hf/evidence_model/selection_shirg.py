"""SHIRG selection: keep K of the N high-resolution patch tokens (+1 summary token), parameter-free.

`ShirgSelector` runs once per image before diffusion starts, so the prefix KV cache never changes afterwards.
Every method is an entry of the selection-method registry (`visual_tokens.py`); this module attaches the built-in
scorers. Scoring runs in float32 on detached features (bf16 features: the importance Gram from bf16 inputs); each
image is scored on its own with stable sorts and thread-count invariant reductions, so results are identical alone
or in a batch and for any thread count.
The algorithm, its measured design choices and the baselines are described in docs/selection.md.
"""

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import nn

from .visual_tokens import (
    DEFAULT_SELECTION,
    SCORE_TERMS,
    SEED_WEIGHTS,
    check_budget,
    check_coverage,
    check_selection,
    has_summary,
    needs_tower_attention,
    num_selected_tokens,
    get_selection_method,
    selection_scorer,
)

# Kernel sharpness of the importance score: a token as similar as the image average weighs e^-4 of a duplicate.
KERNEL_SHARPNESS = 4.0
# Magnitudes above this per-image quantile saturate at 1 (robust to a few high-norm artifact tokens).
MAGNITUDE_CLIP_QUANTILE = 0.99
# A score's range must exceed this many times its estimated float32 rounding error to be stretched to [0, 1]
# (see `_noise_floors`): rounding noise is scaled to at most ~1/NOISE_MARGIN of the unit range.
NOISE_MARGIN = 100.0
# Rows per tile of the symmetric bf16 Gram of the importance score (N = 2,304: 4 x 4 tiles, 10 computed).
GRAM_TILE = 576
# Queries per block of the received-attention computation: [heads, block, N] float32 logits at a time.
ATTENTION_QUERY_BLOCK = 256


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
    - bf16 Gram (bf16 features): the rounding of each float32-accumulated cosine to bf16 is deterministic; two
      kernels differ there only when their float32 results straddle a bf16 rounding boundary, with probability
      (float32 error / bf16 ulp), by one ulp: the expected difference is the float32 error again, so the same
      floors apply.
    """
    eps = torch.finfo(torch.float32).eps
    cosine = 2 * _rounding(dim) + 4 * eps
    errors = {
        "importance": 3 * tau * (cosine + eps) + 2 * _rounding(num_tokens) + 4 * eps,
        "magnitude": (_rounding(dim) / 2 + 2 * eps) * max_magnitude,
        "gradient": 3 * _rounding(dim) + 4 * eps,
    }
    return {name: NOISE_MARGIN * error for name, error in errors.items()}


def received_attention(queries: torch.Tensor, keys: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Attention each token receives, averaged over heads and queries: [N, D] q and k (projected) -> [N].

    softmax(q k^T / sqrt(d_head)) per head, with logits computed in float32 for `ATTENTION_QUERY_BLOCK` queries at a
    time (never the whole [heads, N, N] map), column sums accumulated block by block in a fixed order.
    """
    num_tokens, dim = queries.shape
    head_dim = dim // num_heads
    q = queries.detach().to(torch.float32).view(num_tokens, num_heads, head_dim).transpose(0, 1)  # [H, N, d]
    k = keys.detach().to(torch.float32).view(num_tokens, num_heads, head_dim).transpose(0, 1)  # [H, N, d]
    k_t = k.transpose(1, 2).contiguous()  # [H, d, N]
    total = q.new_zeros(num_heads, num_tokens)  # [H, N]
    for start in range(0, num_tokens, ATTENTION_QUERY_BLOCK):
        logits = torch.matmul(q[:, start:start + ATTENTION_QUERY_BLOCK], k_t).mul_(head_dim ** -0.5)  # [H, b, N]
        total += torch.softmax(logits, dim=-1).sum(dim=1)  # [H, N]
    return total.mean(dim=0) / num_tokens


def resolve_attention_layer(layer: int | None, num_layers: int) -> int:
    """Index of the tower layer whose attention is read: `None` is the middle layer; negative counts from the end."""
    index = num_layers // 2 if layer is None else layer + num_layers if layer < 0 else layer
    if not 0 <= index < num_layers:
        raise ValueError(f"Invalid `selection.attention_layer` {layer}: the tower has {num_layers} layers "
                         f"(use 0..{num_layers - 1}, a negative index, or null for the middle layer)")
    return index


@contextlib.contextmanager
def capture_received_attention(encoder: nn.Module, layer: int | None):
    """Inside the block, a forward of `encoder` (a SigLIP encoder) also records, for its attention layer `layer`
    (see `resolve_attention_layer`), the attention each token receives; the yielded dict then holds "attention"
    [B, N] float32. The tower's attention implementation is unchanged: forward hooks read that layer's own
    q_proj / k_proj outputs."""
    attention = encoder.layers[resolve_attention_layer(layer, len(encoder.layers))].self_attn
    projected, result = {}, {}

    def keep(name):
        def hook(module, args, output):
            projected[name] = output

        return hook

    handles = [attention.q_proj.register_forward_hook(keep("q")), attention.k_proj.register_forward_hook(keep("k"))]
    try:
        yield result
    finally:
        for handle in handles:
            handle.remove()
    if "q" in projected:
        with torch.no_grad():
            result["attention"] = torch.stack([received_attention(q, k, attention.num_heads)
                                               for q, k in zip(projected["q"], projected["k"], strict=True)])


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


def importance_scores(unit: torch.Tensor, received: torch.Tensor | None = None,
                      gram_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Redundancy-normalised received attention A [N] (unscaled, in nats) from unit-norm features [N, D].

    `received` [N]: attention each token receives from the tower (column sums of its row-stochastic attention);
    by default it is that of the similarity softmax. `gram_dtype=torch.bfloat16` (bf16 features) computes the
    cosine Gram from bf16 inputs in symmetric tiles (`_bf16_kernel_sums`); everything else stays float32.
    """
    tau = _kernel_sharpness(unit)
    if gram_dtype == torch.bfloat16:
        look_alikes, similarity_received = _bf16_kernel_sums(unit, tau, need_received=received is None)
        received = similarity_received if received is None else received.clamp_min(torch.finfo(torch.float32).tiny)
        return received.log() - look_alikes.log()
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


def _bf16_kernel_sums(unit: torch.Tensor, tau: float, need_received: bool = True):
    """(Z [N], column sums of P = K / Z [N] or None) of the similarity kernel K from a bf16 Gram, in float32.

    The kernel is symmetric, so only the tiles (a, b), a <= b, of `GRAM_TILE` rows are computed (bf16 inputs,
    float32 accumulation inside the product, its bf16 output widened to float32) of the features' residuals from
    their mean (the rest of each cosine is float32); a tile below the diagonal is the transpose of its mirror by
    definition. Every sum runs over tiles in a fixed order, each a row or column
    reduction of one tile: deterministic and thread-count invariant.
    """
    num_tokens = unit.shape[0]
    # cos(x_i, x_j) = m.m + m.r_i + m.r_j + r_i.r_j with m the mean unit vector and r_i = x_i - m: only r_i.r_j,
    # of the size of 1 - cos (which tau scales up), comes from the bf16 product; the rest is float32.
    mean = unit.sum(dim=0) / num_tokens  # [D]
    residual = unit - mean  # [N, D]
    offset = (residual * mean).sum(dim=1) + 0.5 * (mean * mean).sum() - 0.5  # [N]: m.r_i + (m.m - 1) / 2
    low = residual.to(torch.bfloat16)
    edges = list(range(0, num_tokens, GRAM_TILE)) + [num_tokens]
    spans = list(zip(edges[:-1], edges[1:]))
    look_alikes = unit.new_zeros(num_tokens)
    tiles = {}
    for a, (a0, a1) in enumerate(spans):
        for b in range(a, len(spans)):
            b0, b1 = spans[b]
            tile = torch.matmul(low[a0:a1], low[b0:b1].T).to(torch.float32)  # [a1 - a0, b1 - b0] r_i.r_j
            tile = tile.add_(offset[a0:a1, None]).add_(offset[None, b0:b1])  # cos - 1
            tile = tile.mul_(tau).clamp_(min=-60.0).exp_()
            if a == b:
                tile.fill_diagonal_(1.0)
            look_alikes[a0:a1] += tile.sum(dim=1)
            if a != b:
                look_alikes[b0:b1] += tile.sum(dim=0)
            tiles[a, b] = tile
    if not need_received:
        return look_alikes, None
    inverse = look_alikes.reciprocal()
    received = unit.new_zeros(num_tokens)
    for (a, b), tile in tiles.items():
        (a0, a1), (b0, b1) = spans[a], spans[b]
        if a != b:  # queries in tile b, keys in tile a (the mirror tile)
            received[a0:a1] += (tile * inverse[None, b0:b1]).sum(dim=1)
        received[b0:b1] += tile.mul_(inverse[a0:a1, None]).sum(dim=0)  # queries in tile a, keys in tile b
    return look_alikes, received


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
    names: tuple[str, ...] = SCORE_TERMS,
    importance: str = "similarity",
) -> dict[str, torch.Tensor]:
    """SHIRG scores of one image, each in [0, 1]: {name: [N]} for `names` among importance/magnitude/gradient.

    features: [N, D] any float dtype (scored in float32, detached); attention: optional tower attention, either
    maps [N, N] / [heads, N, N] (rows = queries, each summing to 1; heads are averaged) or the received attention
    [N] (mean over heads and queries, `received_attention`). `importance` (`selection.importance`): "similarity"
    (the similarity softmax, replaced by `attention` when given), "attention" (log received attention, FastV-style)
    or "attention_normalised" (the tower's received attention per look-alike); the last two need `attention`.
    """
    if importance != "similarity" and "importance" in names and attention is None:
        raise ValueError(f"selection.importance={importance!r} needs the tower layer's attention (selection input "
                         "'attention' [batch, num_patches]); the model passes it when the settings ask for it")
    with torch.no_grad():
        raw = features.detach().to(torch.float32)  # [N, D]
        unit = nn.functional.normalize(raw, dim=-1)  # [N, D]
        num_tokens, dim = unit.shape
        gram_dtype = torch.bfloat16 if features.dtype == torch.bfloat16 else torch.float32
        magnitude = magnitude_scores(raw) if "magnitude" in names else None
        floors = _noise_floors(num_tokens, dim, _kernel_sharpness(unit) if "importance" in names else 0.0,
                               float(magnitude.max()) if magnitude is not None else 0.0)
        components = {}
        if "importance" in names:
            received = None
            if attention is not None and attention.dim() == 1:  # received attention, a column mean
                received = attention.detach().to(torch.float32) * num_tokens
            elif attention is not None:  # column sums accumulated in float32 without a float32 copy of the maps
                received = attention.detach().sum(dim=-2, dtype=torch.float32)  # [N] or [heads, N]
                received = received.mean(dim=0) if received.dim() == 2 else received
            if importance == "attention":
                raw_importance = received.clamp_min(torch.finfo(torch.float32).tiny).log()
                floor = NOISE_MARGIN * (2 * _rounding(num_tokens) + 4 * torch.finfo(torch.float32).eps)
            else:
                raw_importance, floor = importance_scores(unit, received, gram_dtype), floors["importance"]
            components["importance"] = _unit_range(raw_importance, floor)
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


def summary_weights(features: torch.Tensor, scores: torch.Tensor, kept: torch.Tensor, mode: str = "score"
                    ) -> torch.Tensor:
    """Weights [N] float32 of the summary token: 0 on `kept` [K], summing to 1 over the dropped tokens.

    "score": softmax of the method's scores over the dropped tokens. "attention": the attention the kept tokens
    pay to the dropped ones, w_j = mean_i softmax_j(tau (cos(x_i, x_j) - 1)) over kept i and dropped j, with the
    image's kernel sharpness tau (as the importance score): dropped tokens that the kept ones attend to count most.
    """
    with torch.no_grad():
        num_tokens = features.shape[0]
        dropped = torch.ones(num_tokens, dtype=torch.bool, device=features.device)
        dropped[kept] = False
        if mode == "score":
            logits = scores.to(torch.float32).masked_fill(~dropped, float("-inf"))
            return torch.softmax(logits, dim=0)  # [N], 0 on kept tokens
        if mode != "attention":
            raise ValueError(f"Invalid `selection.summary_weights` {mode!r}")
        unit = nn.functional.normalize(features.detach().to(torch.float32), dim=-1)  # [N, D]
        tau = _kernel_sharpness(unit)
        logits = (unit[kept] @ unit[dropped].T).sub_(1.0).mul_(tau)  # [K, N - K]
        attention = torch.softmax(logits, dim=1).mean(dim=0)  # [N - K] column means: thread-count invariant
        weights = torch.zeros(num_tokens, dtype=torch.float32, device=features.device)
        weights[dropped] = attention / attention.sum()
        return weights


def _summary(features: torch.Tensor, scores: torch.Tensor, kept: torch.Tensor, mode: str = "score") -> torch.Tensor:
    """The summary token: `summary_weights`-weighted mean of the tokens not in `kept` -> [D] float32
    (differentiable in features; the weights are constants)."""
    weights = summary_weights(features, scores, kept, mode)  # [N]
    return (weights[:, None] * features.to(torch.float32)).sum(dim=0)  # column sums: thread-count invariant


# ---- built-in scorers: scorer(features [N, D], grid_size, settings, **inputs) -> [N] ------------------------
@selection_scorer("shirg")
@selection_scorer("full")
@selection_scorer("no_coverage")
@selection_scorer("no_summary")
def shirg_score(features, grid_size, settings, attention=None, **inputs) -> torch.Tensor:
    """The weighted SHIRG score sum_t w_t S_t over `SCORE_TERMS` (weights `settings["weights"]`)."""
    names = tuple(term for weight, term in zip(settings["weights"], SCORE_TERMS) if weight > 0) or SCORE_TERMS[:1]
    components = score_components(features, grid_size, attention, names, settings["importance"])
    return sum(weight * components[term] for weight, term in zip(settings["weights"], SCORE_TERMS)
               if term in components)


@selection_scorer("shirg_seed")
def shirg_seed_score(features, grid_size, settings, attention=None, **inputs) -> torch.Tensor:
    """The SHIRG score with the research plan's seed weights `SEED_WEIGHTS` (0.6 / 0.25 / 0.15)."""
    return shirg_score(features, grid_size, {**settings, "weights": list(SEED_WEIGHTS)}, attention)


def _single_term_scorer(term: str):
    def score(features, grid_size, settings, attention=None, **inputs) -> torch.Tensor:
        return score_components(features, grid_size, attention, (term,), settings["importance"])[term]

    score.__name__ = f"{term}_score"
    return score


for _term in SCORE_TERMS:
    selection_scorer(_term)(_single_term_scorer(_term))


@selection_scorer("random")
def random_score(features, grid_size, settings, **inputs) -> torch.Tensor:
    """One seeded priority per grid position: every image of any batch keeps the same positions."""
    generator = torch.Generator().manual_seed(settings["seed"])
    return torch.rand(features.shape[0], generator=generator).to(features.device)


def _pooled_tokens(features, scores, budget, grid_size):
    """`pooled`: K region means of `pooling_regions`, their centre patches, and the image mean as summary."""
    tokens, kept = _pool(features, grid_size, budget)
    return tokens, kept, features.to(torch.float32).mean(dim=0)


@selection_scorer("pooled", builder=_pooled_tokens)
def pooled_score(features, grid_size, settings, **inputs) -> torch.Tensor:
    """`pooled` does not rank tokens: all scores are 0."""
    return torch.zeros(features.shape[0], dtype=torch.float32, device=features.device)


# ---- selector ----------------------------------------------------------------------------------------------
class ShirgSelector(nn.Module):
    """Keep K of N high-resolution patch tokens (+1 summary); parameter-free and deterministic.

    Args: the `selection` settings (see `visual_tokens.DEFAULT_SELECTION`): `method` (a registered selection
    method), `budget` (default K), `coverage_cells` (rows, cols), `weights` (importance, magnitude, gradient; sum
    1), `summary` (append the summary token when the method adds one and K < N), `seed` (`random`), `importance`
    (`IMPORTANCE_SOURCES`) and `attention_layer` (the tower layer whose attention it reads), `summary_weights`
    ("score" or "attention"), `adaptive_budget` ([K_min, K_max] for the processor's per-image K, or None).
    """

    def __init__(
        self,
        method: str = DEFAULT_SELECTION["method"],
        budget: int = DEFAULT_SELECTION["budget"],
        coverage_cells: tuple[int, int] = tuple(DEFAULT_SELECTION["coverage_cells"]),
        weights: tuple[float, float, float] = tuple(DEFAULT_SELECTION["weights"]),
        summary: bool = DEFAULT_SELECTION["summary"],
        seed: int = DEFAULT_SELECTION["seed"],
        importance: str = DEFAULT_SELECTION["importance"],
        attention_layer: int | None = DEFAULT_SELECTION["attention_layer"],
        summary_weights: str = DEFAULT_SELECTION["summary_weights"],
        adaptive_budget: tuple[int, int] | None = DEFAULT_SELECTION["adaptive_budget"],
    ):
        super().__init__()
        settings = check_selection(dict(method=method, budget=budget, coverage_cells=coverage_cells,
                                        weights=weights, summary=summary, seed=seed, importance=importance,
                                        attention_layer=attention_layer, summary_weights=summary_weights,
                                        adaptive_budget=adaptive_budget))
        self.method = settings["method"]
        self.budget = settings["budget"]
        self.coverage_cells = tuple(settings["coverage_cells"])
        self.weights = tuple(settings["weights"])
        self.summary = settings["summary"]
        self.seed = settings["seed"]
        self.importance = settings["importance"]
        self.attention_layer = settings["attention_layer"]
        self.summary_weights = settings["summary_weights"]
        self.adaptive_budget = settings["adaptive_budget"]

    @classmethod
    def from_config(cls, config) -> "ShirgSelector":
        """Build from any config with a `selection` mapping (missing keys take the defaults)."""
        selection = getattr(config, "selection", None)
        if not hasattr(selection, "get"):
            raise ValueError(
                f"ShirgSelector.from_config needs a config with a `selection` dict, got {type(config).__name__} "
                f"with selection={selection!r}"
            )
        return cls(**{**DEFAULT_SELECTION, **selection})

    @property
    def settings(self) -> dict:
        """The selection settings as the `selection` dict of a config."""
        return {"method": self.method, "budget": self.budget, "weights": list(self.weights),
                "coverage_cells": list(self.coverage_cells), "summary": self.summary, "seed": self.seed,
                "importance": self.importance, "attention_layer": self.attention_layer,
                "summary_weights": self.summary_weights,
                "adaptive_budget": None if self.adaptive_budget is None else list(self.adaptive_budget)}

    def needs_attention(self, method: str | None = None) -> bool:
        """Whether `method` (default: the selector's) reads the tower layer's received attention."""
        return needs_tower_attention(self.settings, method or self.method)

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in self.settings.items())

    def check_budget(self, budget: int, num_patches: int, method: str | None = None) -> None:
        """Raise `ValueError` unless K is valid for the method (see `visual_tokens.check_budget`)."""
        check_budget(budget, self.settings, num_patches, method)

    def num_output_tokens(self, num_patches: int, budget: int | None = None, method: str | None = None) -> int:
        """Number of tokens `forward` returns per image (K, K + 1, or N)."""
        return num_selected_tokens(self.settings, num_patches, budget, method)

    def _check_inputs(self, features, grid_size, method, inputs) -> tuple[int, int]:
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
        check_coverage(self.settings, grid_size, method)
        if not torch.isfinite(features.sum(dtype=torch.float32)):  # one pass; NaN and inf propagate into the sum
            raise ValueError("ShirgSelector: features contain NaN or infinite values")
        missing = [name for name in get_selection_method(method).requires if inputs.get(name) is None]
        if missing:
            raise ValueError(f"selection method {method!r} needs the per-image input(s) {missing}: pass "
                             f"selection_inputs={{{missing[0]!r}: tensor [batch, ...]}}")
        for name, value in inputs.items():
            if value is not None and (not isinstance(value, torch.Tensor) or value.shape[0] != batch):
                raise ValueError(f"ShirgSelector: selection input {name!r} must be a tensor [batch={batch}, ...], "
                                 f"got {type(value).__name__} {tuple(getattr(value, 'shape', ()))}")
        attention = inputs.get("attention")
        received = attention is not None and attention.dim() == 2 and attention.shape[1] == num_patches
        maps = attention is not None and attention.dim() in (3, 4) and \
            attention.shape[-2:] == (num_patches, num_patches)
        if attention is not None and (not attention.is_floating_point() or not (received or maps)):
            raise ValueError(
                "ShirgSelector: attentions must be [batch, num_patches] (received attention), [batch, num_patches, "
                f"num_patches] or [batch, heads, num_patches, num_patches] matching features "
                f"{tuple(features.shape)}, got {tuple(attention.shape)}"
            )
        return grid_size

    def _check_priority(self, priority, batch: int, num_patches: int, method: str) -> None:
        if priority is None:
            return
        if not isinstance(priority, torch.Tensor) or priority.dtype != torch.bool or \
                tuple(priority.shape) != (batch, num_patches):
            raise ValueError(f"ShirgSelector: priority must be a bool tensor [batch, num_patches] = "
                             f"[{batch}, {num_patches}], got {type(priority).__name__} "
                             f"{tuple(getattr(priority, 'shape', ()))} {getattr(priority, 'dtype', '')}")
        if get_selection_method(method).builder is not None:
            raise ValueError(f"ShirgSelector: priority needs a method that ranks patches; {method!r} does not")

    # ---- selection ---------------------------------------------------------------------------------------
    def score(self, features: torch.Tensor, grid_size: tuple[int, int], attention: torch.Tensor | None = None,
              method: str | None = None, **inputs) -> torch.Tensor:
        """The method's ranking score of one image: features [N, D] -> [N] float32 (a constant for autograd)."""
        spec = get_selection_method(method or self.method)
        if spec.scorer is None:
            raise ValueError(f"selection method {spec.name!r} has no scorer: register one with "
                             f"@register_selection_method({spec.name!r}, ...) on a scoring function")
        if attention is not None:
            inputs["attention"] = attention
        with torch.no_grad():
            scores = spec.scorer(features, grid_size, self.settings, **inputs)
        return scores.detach().to(torch.float32)

    def _select_one(self, features, grid_size, budget, method, inputs, priority=None):
        """One image: features [N, D], optional priority [N] -> (tokens [T, D], kept indices [K], scores [N])."""
        spec = get_selection_method(method)
        num_patches = features.shape[0]
        scores = self.score(features, grid_size, method=method, **inputs)  # [N]
        if spec.keeps_all or budget == num_patches:
            return features, torch.arange(num_patches, device=features.device), scores
        if spec.builder is not None:
            tokens, kept, summary = spec.builder(features, scores, budget, grid_size)  # [K, D], [K], [D]
        else:
            cells = coverage_cell_ids(grid_size, self.coverage_cells).to(features.device) if spec.uses_coverage \
                else None
            kept = _top_k(scores if priority is None else _prioritised(scores, priority), budget, cells)  # [K]
            tokens, summary = features[kept], None
        if has_summary(self.settings, budget, num_patches, method):
            if summary is None:  # [D] float32
                summary = _summary(features, scores, kept, self.summary_weights)
            tokens = torch.cat([tokens, summary[None].to(tokens.dtype)])
        return tokens.to(features.dtype), kept, scores

    def forward(
        self,
        features: torch.Tensor,
        grid_size: tuple[int, int] | None = None,
        budget: int | None = None,
        attentions: torch.Tensor | None = None,
        method: str | None = None,
        inputs: dict | None = None,
        priority: torch.Tensor | None = None,
    ) -> SelectionOutput:
        """Select K tokens per image.

        Args:
            features: [B, N, D] raw tower output (before post_layernorm), any float dtype.
            grid_size: (H, W) of the patch grid, H * W = N (default: square).
            budget: K (default: the selector's `budget`); method: a registered method (default: the selector's).
            attentions: optional tower attention for the importance score (the `attention` selection input): the
                received attention [B, N] of one layer (see `capture_received_attention`), or maps [B, N, N] /
                [B, heads, N, N] (rows = queries); how it is used follows `importance`.
            inputs: per-image selection inputs {name: [B, ...]} a registered method `requires`.
            priority: optional [B, N] bool; the marked patches of each image rank above all others (in score order),
                so they are kept first (an oracle selection: e.g. the patches known to hold the answer). Scores and
                the summary weights are unchanged. Not for methods with their own token builder (`pooled`).
        """
        method = method or self.method
        inputs = {**(inputs or {}), **({"attention": attentions} if attentions is not None else {})}
        grid_size = self._check_inputs(features, grid_size, method, inputs)
        batch, num_patches, _ = features.shape
        self._check_priority(priority, batch, num_patches, method)
        budget = self.budget if budget is None else budget
        check_budget(budget, self.settings, num_patches, method)
        tokens, kept, scores = [], [], []
        for row in range(batch):
            row_inputs = {name: value[row] for name, value in inputs.items() if value is not None}
            row_priority = None if priority is None else priority[row].to(features.device)
            row_tokens, row_kept, row_scores = self._select_one(features[row], grid_size, budget, method, row_inputs,
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
            has_summary=has_summary(self.settings, budget, num_patches, method),
        )


__all__ = ["ShirgSelector", "SelectionOutput", "capture_received_attention", "pooling_regions", "received_attention",
           "score_components", "summary_weights"]
