"""ShirgSelector: output contract of every method, determinism, dtype, budget validation, text recall, gradients,
and the `shirg-hf select` command."""

import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from shirg_hf import SelectionOutput, ShirgLavidaConfig, ShirgSelector
from shirg_hf.cli import main
from shirg_hf.modeling import selection_shirg, visual_tokens
from shirg_hf.modeling.selection_shirg import coverage_cell_ids, importance_scores, pooling_regions

METHODS = visual_tokens.selection_method_names()

from conftest import fp32_tolerance

GRID = (12, 12)
N = GRID[0] * GRID[1]
CELLS = (4, 4)


def random_features(batch=2, grid=GRID, hidden=16, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, grid[0] * grid[1], hidden, generator=generator).to(dtype)


def selector(method="shirg", budget=32, **kwargs):
    return ShirgSelector(method=method, budget=budget, coverage_cells=CELLS, **kwargs)


# ---- synthetic "text on a white page", encoded by a random tiny SigLIP tower -------------------------------
PAGE_SIDE, PATCH = 336, 14
PAGE_GRID = (PAGE_SIDE // PATCH, PAGE_SIDE // PATCH)  # 24 x 24 = 576 patches


def text_page() -> Image.Image:
    image = Image.new("RGB", (PAGE_SIDE, PAGE_SIDE), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=PAGE_SIDE // 20)
    for line, words in enumerate(["SHIRG keeps text", "K=144 of 576", "LaViDa prefix", "coverage 8x8"]):
        draw.text((PAGE_SIDE // 12, PAGE_SIDE // 10 + line * PAGE_SIDE // 5), words, fill="black", font=font)
    return image


@pytest.fixture(scope="module")
def page():
    """(features [1, 576, 32] from a random tiny SigLIP, text mask [576]: patches containing dark pixels)."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    image = text_page()
    dark = np.asarray(image.convert("L")) < 128
    rows, cols = PAGE_GRID
    text_mask = torch.from_numpy(dark.reshape(rows, PATCH, cols, PATCH).any(axis=(1, 3)).reshape(-1))
    config = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=PAGE_SIDE, patch_size=PATCH, vision_use_head=False)
    torch.manual_seed(0)
    tower = SiglipVisionModel(config).eval()
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    with torch.no_grad():
        features = tower(pixel_values=(pixels - 0.5) / 0.5, output_hidden_states=True).hidden_states[-1]
    assert 0.05 < text_mask.float().mean() < 0.3  # a sparse page: mostly background
    return features, text_mask


def auroc(scores, positive):
    """Probability that a random positive outscores a random negative (ties count half)."""
    pos, neg = scores[positive][:, None], scores[~positive][None, :]
    return ((pos > neg).float().mean() + 0.5 * (pos == neg).float().mean()).item()


# ---- contract ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_contract_of_every_method_matches_config_token_count(method):
    config = ShirgLavidaConfig.tiny(selection={"method": method})  # 12x12 grid, 4x4 cells, K = 32
    sel = ShirgSelector.from_config(config)
    features = random_features(batch=3, hidden=config.vision_config.hidden_size)
    out = sel(features, grid_size=config.highres_grid)
    assert isinstance(out, SelectionOutput)
    expected_tokens = config.num_image_tokens()
    assert out.tokens.shape == (3, expected_tokens, features.shape[-1])
    assert sel.num_output_tokens(N) == expected_tokens
    kept = N if method == "full" else config.selection["budget"]
    assert out.kept_indices.shape == (3, kept) and out.kept_indices.dtype == torch.long
    assert out.kept_coords.shape == (3, kept, 2)
    assert out.scores.shape == (3, N) and out.scores.dtype == torch.float32
    assert out.has_summary == (expected_tokens == kept + 1)
    for row in out.kept_indices:
        assert torch.all(row[1:] > row[:-1])  # sorted and unique
        assert 0 <= row.min() and row.max() < N
    assert torch.equal(out.kept_coords[..., 0] * GRID[1] + out.kept_coords[..., 1], out.kept_indices)
    if method != "pooled":  # kept tokens are the patches themselves, in raster order
        gathered = torch.stack([f[i] for f, i in zip(features, out.kept_indices, strict=True)])
        assert torch.equal(out.tokens[:, :kept], gathered)


@pytest.mark.parametrize("method", ["shirg", "no_summary"])
def test_every_coverage_cell_is_represented(method):
    features = random_features(batch=4)
    # Make one cell's patches dull so plain top-K would skip it.
    cells = coverage_cell_ids(GRID, CELLS)
    features[:, cells == 5] = 0.01 * features[:, cells == 5]
    out = selector(method, budget=16)(features, grid_size=GRID)
    for row in out.kept_indices:
        assert torch.equal(torch.unique(cells[row]), torch.arange(16))
    plain = selector("no_coverage", budget=16)(features, grid_size=GRID)
    assert any(len(torch.unique(cells[row])) < 16 for row in plain.kept_indices)


def test_coverage_cells_partition_uneven_grids():
    ids = coverage_cell_ids((13, 10), (4, 3)).view(13, 10)
    assert torch.equal(torch.unique(ids), torch.arange(12))
    for cell in range(12):  # every cell is one contiguous rectangle
        rows, cols = torch.nonzero(ids == cell, as_tuple=True)
        assert (ids[rows.min():rows.max() + 1, cols.min():cols.max() + 1] == cell).all()


def test_summary_is_softmax_weighted_mean_of_dropped_tokens():
    features = random_features(batch=2)
    out = selector()(features, grid_size=GRID)
    for f, kept, scores, tokens in zip(features, out.kept_indices, out.scores, out.tokens, strict=True):
        dropped = torch.ones(N, dtype=torch.bool)
        dropped[kept] = False
        weights = torch.softmax(scores[dropped], dim=0)
        # Other kernels than the selector's (softmax over the dropped tokens only, a matrix-vector product):
        # two reductions over the dropped tokens, whose convex partial sums stay below max |f|.
        atol = fp32_tolerance(2 * int(dropped.sum()), float(f[dropped].abs().max()))
        torch.testing.assert_close(tokens[-1], weights @ f[dropped], rtol=0, atol=atol)


def test_scores_are_weighted_sum_of_unit_range_components():
    features = random_features(batch=1)
    parts = selection_shirg.score_components(features[0], GRID)
    for name, part in parts.items():
        assert part.min() == 0 and part.max() == 1, name
    sel = selector(weights=(0.5, 0.3, 0.2))
    expected = 0.5 * parts["importance"] + 0.3 * parts["magnitude"] + 0.2 * parts["gradient"]
    torch.testing.assert_close(sel(features, grid_size=GRID).scores[0], expected)
    for name in ("importance", "magnitude", "gradient"):
        assert torch.equal(selector(name)(features, grid_size=GRID).scores[0], parts[name])


def test_full_keeps_everything_in_order():
    features = random_features()
    out = selector("full")(features, grid_size=GRID)
    assert torch.equal(out.tokens, features) and not out.has_summary
    assert torch.equal(out.kept_indices, torch.arange(N).expand(2, N))


@pytest.mark.parametrize("method", ["shirg", "random", "pooled", "no_coverage"])
def test_budget_equal_to_n_keeps_all_without_summary(method):
    features = random_features()
    out = selector(method)(features, grid_size=GRID, budget=N)
    assert torch.equal(out.tokens, features) and not out.has_summary
    assert torch.equal(out.kept_indices[0], torch.arange(N))


def test_summary_flag_off_returns_exactly_k():
    out = selector(summary=False)(random_features(), grid_size=GRID)
    assert out.tokens.shape[1] == 32 and not out.has_summary


# ---- pooled ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("budget", [1, 7, 36, 37, 100, 143, 144])
def test_pooling_regions_partition_the_grid_into_exactly_k(budget):
    coverage = torch.zeros(GRID, dtype=torch.int64)
    regions = pooling_regions(GRID, budget)
    assert sum(len(spans) for _, _, spans in regions) == budget
    for row_start, row_end, spans in regions:
        for col_start, col_end in spans:
            assert row_end > row_start and col_end > col_start
            coverage[row_start:row_end, col_start:col_end] += 1
    assert (coverage == 1).all()


def test_pooled_equals_average_pooling_when_k_tiles_the_grid():
    features = random_features(batch=2)
    out = selector("pooled", budget=36)(features, grid_size=GRID)  # 6x6 regions of 2x2 patches
    grid = features.view(2, 12, 12, -1).permute(0, 3, 1, 2)
    expected = torch.nn.functional.avg_pool2d(grid, 2).flatten(2).transpose(1, 2)
    torch.testing.assert_close(out.tokens[:, :36], expected)
    torch.testing.assert_close(out.tokens[:, 36], features.mean(dim=1))  # pooled's summary: the image mean
    assert torch.equal(out.scores, torch.zeros(2, N))
    rows, cols = out.kept_coords[0, :, 0], out.kept_coords[0, :, 1]  # centre patch of each 2x2 region
    assert torch.equal(torch.unique(rows), torch.arange(0, 12, 2))
    assert torch.equal(torch.unique(cols), torch.arange(0, 12, 2))


# ---- random ------------------------------------------------------------------------------------------------
def test_random_is_seeded_and_independent_of_batch():
    features = random_features(batch=4)
    out = selector("random", seed=3)(features, grid_size=GRID)
    assert all(torch.equal(row, out.kept_indices[0]) for row in out.kept_indices)  # same pattern every image
    alone = selector("random", seed=3)(features[2:3], grid_size=GRID)
    assert torch.equal(alone.kept_indices[0], out.kept_indices[2]) and torch.equal(alone.tokens[0], out.tokens[2])
    other_seed = selector("random", seed=4)(features, grid_size=GRID)
    assert not torch.equal(other_seed.kept_indices, out.kept_indices)


# ---- determinism, batch invariance, threads, dtype ---------------------------------------------------------
@pytest.mark.parametrize("method", ["shirg", "no_coverage", "importance", "pooled"])
def test_same_image_gives_same_result_alone_or_in_any_batch(method):
    features = random_features(batch=5, seed=1)
    sel = selector(method)
    batched = sel(features, grid_size=GRID)
    again = sel(features, grid_size=GRID)
    assert torch.equal(batched.kept_indices, again.kept_indices) and torch.equal(batched.tokens, again.tokens)
    for start, stop in [(0, 1), (3, 4), (1, 4), (2, 5)]:
        part = sel(features[start:stop], grid_size=GRID)
        assert torch.equal(part.kept_indices, batched.kept_indices[start:stop])
        assert torch.equal(part.scores, batched.scores[start:stop])
        assert torch.equal(part.tokens, batched.tokens[start:stop])


def test_same_result_on_any_thread_count():
    features = random_features(batch=2, grid=(24, 24), hidden=64, seed=2)
    sel = ShirgSelector(budget=100, coverage_cells=(8, 8))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = sel(features, grid_size=(24, 24))
        torch.set_num_threads(max(2, threads))
        multi = sel(features, grid_size=(24, 24))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single.scores, multi.scores) and torch.equal(single.kept_indices, multi.kept_indices)


def test_ties_are_broken_by_index():
    features = torch.ones(1, N, 8)  # every norm and every neighbour difference ties exactly
    for method in ("magnitude", "gradient"):
        out = selector(method, budget=10)(features, grid_size=GRID)
        assert torch.equal(out.scores[0], torch.zeros(N))
        assert torch.equal(out.kept_indices[0], torch.arange(10))
    tied = torch.zeros(N)
    tied[[20, 21, 100]] = 1.0  # (row, col) (1, 8), (1, 9), (8, 4): cells 2, 3 and 9 of the 4x4 cells of 3x3
    kept = selection_shirg._top_k(tied, 18, coverage_cell_ids(GRID, CELLS))
    # Each cell keeps its top-left patch (lowest index) except cells 2, 3, 9, which keep the 1.0s; the two
    # free slots go to the lowest indices not yet kept.
    cell_top_left = [0, 3, 6, 9, 36, 39, 42, 45, 72, 75, 78, 81, 108, 111, 114, 117]
    expected = sorted(set(cell_top_left) - {6, 9, 75} | {20, 21, 100} | {1, 2})
    assert kept.tolist() == expected


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("hidden", [8, 256])
@pytest.mark.parametrize("scale", [2.0**-20, 1.0, 2.0**20])
def test_near_constant_scores_are_not_stretched_to_full_range(threads, hidden, scale):
    # Features that differ only at float32 rounding level (1e-7 relative): every score is noise, on any CPU
    # kernel, thread count or feature scale (the old floor was relative to the score, not its rounding error,
    # and stretched A's tau-amplified noise to 0.15).
    noise = torch.randn(1, N, hidden, generator=torch.Generator().manual_seed(0))
    features = scale * (torch.ones(1, N, hidden) + 1e-7 * noise)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        out = selector("shirg")(features, grid_size=GRID)
    finally:
        torch.set_num_threads(previous)
    assert out.scores.max() < 0.01


def test_noise_floor_keeps_real_contrast_and_is_scale_invariant():
    features = torch.ones(1, N, 16) + 1e-7 * torch.randn(1, N, 16, generator=torch.Generator().manual_seed(0))
    features[0, 77] = 3 * torch.randn(16, generator=torch.Generator().manual_seed(1))  # one distinct token
    parts = selection_shirg.score_components(features[0], GRID)
    for name, part in parts.items():
        assert part.argmax() == 77 and part.max() == 1, name
    # Powers of two scale every float32 step exactly: the scores are those of the unscaled features.
    reference = selector("shirg")(features, grid_size=GRID).scores
    for scale in (2.0**-30, 2.0**30):
        assert torch.equal(selector("shirg")(scale * features, grid_size=GRID).scores, reference)


def test_bfloat16_input_scores_in_float32_with_a_bf16_gram_and_matches_float32_input():
    features = random_features(batch=2, dtype=torch.bfloat16)
    out_bf16 = selector()(features, grid_size=GRID)
    out_fp32 = selector()(features.float(), grid_size=GRID)
    assert out_bf16.scores.dtype == torch.float32 and out_bf16.tokens.dtype == torch.bfloat16
    # only the importance term's Gram runs in bf16 (issue 15): magnitude and gradient are float32-exact
    for row in range(2):
        low = selection_shirg.score_components(features[row], GRID)
        exact = selection_shirg.score_components(features[row].float(), GRID)
        assert torch.equal(low["magnitude"], exact["magnitude"]) and torch.equal(low["gradient"], exact["gradient"])
        torch.testing.assert_close(low["importance"], exact["importance"], rtol=0, atol=0.01)
    assert torch.equal(out_bf16.kept_indices, out_fp32.kept_indices)  # these random features: identical choices
    kept = out_bf16.kept_indices
    assert torch.equal(out_bf16.tokens[:, :-1], torch.stack([features[row, kept[row]] for row in range(2)]))


def test_bfloat16_rounding_of_real_features_keeps_the_selection(page):
    features, _ = page
    sel = ShirgSelector(budget=144)
    fp32 = sel(features, grid_size=PAGE_GRID).kept_indices[0]
    bf16 = sel(features.bfloat16(), grid_size=PAGE_GRID).kept_indices[0]
    overlap = len(set(fp32.tolist()) & set(bf16.tolist())) / 144
    assert overlap >= 0.9


# ---- validation --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("budget", [0, 15, N + 1])
def test_budget_outside_cells_to_n_is_rejected_with_range(budget):
    with pytest.raises(ValueError, match=rf"\[16, {N}\]"):
        selector()(random_features(), grid_size=GRID, budget=budget)


@pytest.mark.parametrize("method", ["random", "pooled", "magnitude", "importance", "gradient", "no_coverage"])
def test_baselines_without_coverage_allow_any_k_from_one(method):
    out = selector(method)(random_features(), grid_size=GRID, budget=1)
    assert out.kept_indices.shape == (2, 1) and out.tokens.shape == (2, 2, 16)
    with pytest.raises(ValueError, match=rf"\[1, {N}\]"):
        selector(method)(random_features(), grid_size=GRID, budget=0)


def test_budget_range_matches_config_token_count():
    for method in METHODS:
        config = ShirgLavidaConfig.tiny(selection={"method": method})
        sel = ShirgSelector.from_config(config)
        for budget in (0, 1, 15, 16, 32, N, N + 1):
            config_ok = sel_ok = True
            try:
                config.num_image_tokens(budget)
            except ValueError:
                config_ok = False
            try:
                sel.check_budget(budget, N)
            except ValueError:
                sel_ok = False
            assert config_ok == sel_ok, (method, budget)
            if config_ok:
                assert sel.num_output_tokens(N, budget) == config.num_image_tokens(budget), (method, budget)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda s: s(torch.randn(N, 16), grid_size=GRID), "shape \\[batch, num_patches, hidden\\]"),
        (lambda s: s(torch.randn(1, N, 16), grid_size=(12, 11)), "grid_size \\(12, 11\\) has 132 patches"),
        (lambda s: s(torch.randn(1, 143, 16)), "do not form a square grid"),
        (lambda s: s(torch.randint(0, 5, (1, N, 16)), grid_size=GRID), "floating-point"),
        (lambda s: s(torch.full((1, N, 16), float("nan")), grid_size=GRID), "NaN"),
        (lambda s: s(torch.randn(1, 9, 4), grid_size=(3, 3), budget=9), "coverage_cells`: \\[4, 4\\] exceed"),
        (lambda s: s(torch.randn(1, N, 16), grid_size=GRID, attentions=torch.rand(1, N, 5)), "attentions must be"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call(selector())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"method": "topk"}, "`selection.method`: Unknown selection method .topk."),
        ({"weights": (0.6, 0.3, 0.3)}, "must sum to 1"),
        ({"weights": (1.0, 0.0)}, "three non-negative"),
        ({"coverage_cells": (0, 4)}, "coverage_cells"),
        ({"budget": True}, "`selection.budget`: must be an integer"),
        ({"summary": "yes"}, "`selection.summary`: must be true or false"),
    ],
)
def test_bad_constructor_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ShirgSelector(**kwargs)


def test_from_config_duck_types_and_defaults_match_config():
    defaults = visual_tokens.DEFAULT_SELECTION
    plain = ShirgSelector()
    assert (plain.method, plain.budget, list(plain.coverage_cells), list(plain.weights), plain.summary, plain.seed) == (
        defaults["method"], defaults["budget"], defaults["coverage_cells"], defaults["weights"],
        defaults["summary"], defaults["seed"])
    duck = SimpleNamespace(selection={"method": "random", "budget": 40, "weights": [0.5, 0.25, 0.25],
                                      "coverage_cells": [2, 3], "summary": False, "seed": 7})
    sel = ShirgSelector.from_config(duck)
    assert (sel.method, sel.budget, sel.coverage_cells, sel.weights, sel.summary, sel.seed) == (
        "random", 40, (2, 3), (0.5, 0.25, 0.25), False, 7)
    assert list(sel.parameters()) == [] and list(sel.buffers()) == []
    with pytest.raises(ValueError, match="needs a config with a `selection` dict"):
        ShirgSelector.from_config(SimpleNamespace())


# ---- importance and recall of text ---------------------------------------------------------------------------
def test_importance_prefers_distinctive_tokens_over_repetitive_background():
    generator = torch.Generator().manual_seed(0)
    background = torch.randn(64, generator=generator)
    features = background + 0.05 * torch.randn(N, 64, generator=generator)  # a bland, repetitive page
    distinctive = torch.tensor([5, 40, 77, 130])
    features[distinctive] = torch.randn(4, 64, generator=generator)
    unit = torch.nn.functional.normalize(features, dim=-1)
    importance = importance_scores(unit)
    assert importance[distinctive].min() > importance[~torch.isin(torch.arange(N), distinctive)].max()


def test_importance_formula_and_tower_attention_path():
    features = random_features(batch=1, hidden=32)[0]
    unit = torch.nn.functional.normalize(features, dim=-1)
    cosine = unit @ unit.T
    mean_cosine = (cosine.sum() - cosine.diagonal().sum()) / (N * (N - 1))
    kernel = torch.exp(4.0 / (1 - mean_cosine) * (cosine - 1))
    kernel.fill_diagonal_(1.0)
    look_alikes = kernel.sum(dim=1)
    attention = kernel / look_alikes[:, None]  # the similarity softmax, rows = queries
    expected = attention.sum(dim=0).log() - look_alikes.log()
    # Computed with other kernels: a cosine (a D-term sum, |cos| <= 1) enters A through tau (cos - 1) in three
    # places (log Z_j, and K_ij and Z_i in sum_i P_ij), then two N-term sums are taken in log space.
    tau = 4.0 / float(1 - mean_cosine)
    atol = fp32_tolerance(unit.shape[1], 3 * tau) + fp32_tolerance(2 * N)
    torch.testing.assert_close(importance_scores(unit), expected, rtol=0, atol=atol)
    torch.testing.assert_close(importance_scores(unit, attention.sum(dim=0)), expected, rtol=0, atol=atol)
    # The tower's attention, per head, replaces the similarity softmax: a token every head attends to wins.
    heads = torch.softmax(torch.randn(1, 2, N, N, generator=torch.Generator().manual_seed(1)), dim=-1)
    heads[..., 17] += 5.0
    heads = heads / heads.sum(dim=-1, keepdim=True)
    out = selector("importance")(features[None], grid_size=GRID, attentions=heads)
    assert out.scores[0].argmax() == 17
    averaged = selector("importance")(features[None], grid_size=GRID, attentions=heads.mean(dim=1))
    torch.testing.assert_close(averaged.scores, out.scores)


def test_importance_on_text_page_beats_naive_received_attention(page):
    """The design check: naive received attention ranks the white page above the text; ours ranks text first."""
    features, text_mask = page
    unit = torch.nn.functional.normalize(features[0], dim=-1)
    naive = torch.softmax(10.0 * unit @ unit.T, dim=-1).mean(dim=0)  # column mean of a similarity softmax
    assert auroc(naive, text_mask) < 0.5
    assert auroc(importance_scores(unit), text_mask) > 0.9


def test_kept_set_covers_text_better_than_pooled_and_random(page):
    """Recall of text patches: a text patch is recalled when some output token reproduces its feature
    (cosine >= 0.99), which treats kept patches and pooled averages alike."""
    features, text_mask = page
    unit = torch.nn.functional.normalize(features[0], dim=-1)

    def recall(method):
        out = ShirgSelector(method=method, budget=144)(features, grid_size=PAGE_GRID)
        tokens = torch.nn.functional.normalize(out.tokens[0], dim=-1)
        best = (unit @ tokens.T).max(dim=1).values  # [576]
        return (best[text_mask] >= 0.99).float().mean().item()

    shirg, pooled, random = recall("shirg"), recall("pooled"), recall("random")
    assert shirg >= 0.9
    assert shirg > pooled + 0.3 and shirg > random + 0.3


# ---- gradients ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["shirg", "pooled"])
def test_gradients_flow_through_kept_and_summary_tokens(method):
    features = random_features(batch=2).requires_grad_(True)
    out = selector(method)(features, grid_size=GRID)
    out.tokens.sum(dim=-1).sum().backward()
    grad = features.grad[..., 0]  # [B, N]: d(sum of every token) / d(each patch), identical for every dim
    assert torch.allclose(features.grad, grad[..., None].expand_as(features.grad))
    if method == "shirg":
        for row, kept in enumerate(out.kept_indices):
            is_kept = torch.zeros(N, dtype=torch.bool)
            is_kept[kept] = True
            torch.testing.assert_close(grad[row, is_kept], torch.ones(32) + 0.0)  # gathered verbatim
            dropped = grad[row, ~is_kept]  # summary weights: positive, summing to 1
            assert (dropped > 0).all()
            torch.testing.assert_close(dropped.sum(), torch.tensor(1.0))
    else:
        # Each patch feeds its region's mean and the summary (image mean): 1/region + 1/N, summing to K + 1.
        assert (grad > 0).all()
        torch.testing.assert_close(grad.sum(dim=1), torch.full((2,), 33.0))


# ---- command line ------------------------------------------------------------------------------------------
def test_select_command_writes_png_and_refuses_to_overwrite(tmp_path, capsys):
    image_path = tmp_path / "page.png"
    text_page().convert("RGBA").save(image_path)
    out = tmp_path / "plots" / "heat.png"
    assert main(["select", str(image_path), "--budget", "96", "--grid", "16", "--out", str(out)]) == 0
    with Image.open(out) as picture:
        assert picture.format == "PNG" and picture.width > 2 * 16 * 16
    assert "kept 96 of 256" in capsys.readouterr().out
    before = out.read_bytes()
    assert main(["select", str(image_path), "--budget", "64", "--grid", "16", "--out", str(out)]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert main(["select", str(image_path), "--budget", "64", "--grid", "16", "--method", "pooled",
                 "--out", str(out), "--overwrite"]) == 0
    assert out.read_bytes() != before
    assert sorted(p.name for p in out.parent.iterdir()) == ["heat.png"]  # no temporary file left behind


@pytest.mark.parametrize(
    "argv, message",
    [
        (["select", "{missing}", "--out", "{out}"], "image file not found"),
        (["select", "{garbage}", "--out", "{out}"], "cannot read"),
        (["select", "{image}", "--budget", "10", "--out", "{out}"], r"\[64, 576\]"),
    ],
)
def test_select_command_errors_are_clean(tmp_path, capsys, argv, message):
    paths = {"missing": tmp_path / "nope.png", "garbage": tmp_path / "garbage.png", "image": tmp_path / "ok.png",
             "out": tmp_path / "heat.png"}
    paths["garbage"].write_bytes(b"not an image")
    Image.new("RGB", (40, 30), "white").save(paths["image"])
    assert main([a.format(**paths) for a in argv]) == 2
    error = capsys.readouterr().err
    assert error.startswith("shirg-hf select: error:")
    assert re.search(message, error, re.IGNORECASE)
    assert not paths["out"].exists()


def test_heat_colors_span_dark_to_bright():
    from shirg_hf.visualize import heat_colors

    colors = heat_colors(np.linspace(0, 1, 11))
    assert colors.shape == (11, 3) and colors.dtype == np.uint8
    brightness = colors.astype(int).sum(axis=1)
    assert np.all(np.diff(brightness) > 0)  # monotone: higher score, brighter colour
    assert colors[0].tolist() == [68, 1, 84] and colors[-1].tolist() == [253, 231, 37]  # viridis end points
