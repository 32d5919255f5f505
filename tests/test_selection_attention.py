"""Issue 15 selector parts: the tower layer's received attention (importance source), the attention-weighted
summary token, and their wiring through config, processor, model and compare."""

import pytest
import torch
from transformers import SiglipVisionModel

from shirg_hf import ShirgLavidaConfig, ShirgLavidaForDiffusionLM, ShirgLavidaProcessor, ShirgSelector
from shirg_hf import build_prompt, build_tiny_tokenizer
from shirg_hf.modeling.selection_shirg import (
    capture_received_attention,
    received_attention,
    resolve_attention_layer,
    summary_weights,
)

from conftest import fp32_tolerance

GRID = (12, 12)
N = GRID[0] * GRID[1]


def tiny_tower():
    config = ShirgLavidaConfig.tiny()
    torch.manual_seed(0)
    return config, SiglipVisionModel(config.vision_config).eval()


# ---- received attention ----------------------------------------------------------------------------------
@pytest.mark.parametrize("layer", [None, 0, -1])
def test_received_attention_equals_eager_attention_of_the_same_layer(layer):
    """The hook on q_proj / k_proj during the normal (sdpa) forward gives the column means of that layer's
    softmax(q k^T / sqrt(d)), averaged over heads: the eager maps of the same layer are the reference."""
    config, tower = tiny_tower()
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand(2, 3, 48, 48, generator=generator) * 2 - 1  # high-res side: interpolated positions
    with torch.no_grad():
        assert tower.config._attn_implementation == "sdpa"
        with capture_received_attention(tower.encoder, layer) as seen:
            sdpa_out = tower(pixel_values=pixels, interpolate_pos_encoding=True).last_hidden_state
        tower.set_attn_implementation("eager")
        eager = tower(pixel_values=pixels, interpolate_pos_encoding=True, output_attentions=True)
    index = resolve_attention_layer(layer, len(tower.encoder.layers))
    maps = eager.attentions[index]  # [B, heads, N, N], rows = queries
    reference = maps.mean(dim=1).mean(dim=1)  # [B, N]
    assert seen["attention"].shape == (2, N) and seen["attention"].dtype == torch.float32
    torch.testing.assert_close(seen["attention"], reference, rtol=0, atol=fp32_tolerance(N) * 10)
    torch.testing.assert_close(seen["attention"].sum(-1), torch.ones(2), rtol=0, atol=1e-5)
    # the tower's own output is unchanged by the hooks
    torch.testing.assert_close(sdpa_out, eager.last_hidden_state, rtol=1e-5, atol=1e-5)


def test_received_attention_is_blockwise_and_batch_invariant():
    generator = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 600, 32, generator=generator), torch.randn(2, 600, 32, generator=generator)
    full = [torch.softmax(qh @ kh.T / 4 ** 0.5, dim=-1).mean(dim=0)
            for qh, kh in zip(q[0].view(600, 8, 4).transpose(0, 1), k[0].view(600, 8, 4).transpose(0, 1))]
    torch.testing.assert_close(received_attention(q[0], k[0], 8), torch.stack(full).mean(0), rtol=0, atol=1e-6)
    assert torch.equal(received_attention(q[1], k[1], 8), received_attention(q[1].clone(), k[1].clone(), 8))


def test_attention_layer_is_resolved_and_checked():
    assert resolve_attention_layer(None, 26) == 13 and resolve_attention_layer(-1, 26) == 25
    with pytest.raises(ValueError, match="attention_layer"):
        resolve_attention_layer(26, 26)
    with pytest.raises(ValueError, match="selection.importance"):
        ShirgLavidaConfig.tiny(selection={"importance": "fastv"})
    with pytest.raises(ValueError, match="selection.attention_layer"):
        ShirgLavidaConfig.tiny(selection={"attention_layer": 1.5})


@pytest.mark.parametrize("importance", ["attention", "attention_normalised"])
def test_attention_importance_needs_the_attention_and_uses_it(importance):
    generator = torch.Generator().manual_seed(2)
    features = torch.randn(1, N, 16, generator=generator)
    sel = ShirgSelector(method="importance", budget=8, coverage_cells=(4, 4), importance=importance)
    assert sel.needs_attention() and not ShirgSelector(method="gradient", importance=importance).needs_attention()
    with pytest.raises(ValueError, match="needs the tower layer's attention"):
        sel(features, grid_size=GRID)
    received = torch.full((1, N), 0.5 / (N - 8))
    favourite = torch.tensor([3, 40, 77, 100, 120, 130, 141, 143])
    received[0, favourite] = 0.5 / 8  # every head's queries attend these 8 tokens most
    out = sel(features, grid_size=GRID, attentions=received)
    if importance == "attention":  # FastV: exactly the most attended tokens
        assert out.kept_indices[0].tolist() == favourite.tolist()
    else:
        assert len(set(out.kept_indices[0].tolist()) & set(favourite.tolist())) >= 6


# ---- attention-weighted summary ----------------------------------------------------------------------------
def test_attention_summary_weights():
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(N, 16, generator=generator)
    kept = torch.arange(0, N, 3)
    weights = summary_weights(features, torch.zeros(N), kept, "attention")
    assert weights.dtype == torch.float32 and weights.shape == (N,)
    torch.testing.assert_close(weights.sum(), torch.tensor(1.0), rtol=0, atol=1e-6)
    assert torch.all(weights[kept] == 0) and torch.all(weights >= 0)
    # constructed case: dropped tokens 1 and 2 are look-alikes of the kept tokens, the rest is far from them
    base = torch.zeros(6, 4)
    base[:, 0] = 1.0
    base[3:, 0], base[3:, 1] = 0.0, 1.0  # tokens 3..5 point elsewhere
    base[1, 1], base[2, 1] = 0.1, 0.2
    base[5, 2] = 1.0
    case = base + 0.01 * torch.arange(24, dtype=torch.float32).view(6, 4)
    kept_case = torch.tensor([0])
    attention = summary_weights(case, torch.zeros(6), kept_case, "attention")
    plain = torch.zeros(6)
    plain[1:] = 0.2
    assert attention[0] == 0 and attention[1] > 0.2 and attention[2] > 0.2 and attention[3:].sum() < 0.4
    assert (attention - plain).abs().max() > 0.1  # not the plain mean
    # score weights keep the old definition: softmax of the scores over the dropped tokens
    scores = torch.linspace(0, 1, N)
    expected = torch.softmax(scores.masked_fill(torch.isin(torch.arange(N), kept), float("-inf")), dim=0)
    torch.testing.assert_close(summary_weights(features, scores, kept, "score"), expected, rtol=0, atol=0)


def test_attention_summary_token_is_batch_invariant_and_differentiable():
    generator = torch.Generator().manual_seed(4)
    features = torch.randn(3, N, 16, generator=generator)
    sel = ShirgSelector(budget=32, coverage_cells=(4, 4), summary_weights="attention")
    batch = sel(features, grid_size=GRID)
    for row in range(3):
        alone = sel(features[row:row + 1], grid_size=GRID)
        assert torch.equal(alone.tokens[0], batch.tokens[row])
        assert torch.equal(alone.kept_indices[0], batch.kept_indices[row])
    summary = batch.tokens[0, -1]
    weights = summary_weights(features[0], batch.scores[0], batch.kept_indices[0], "attention")
    torch.testing.assert_close(summary, (weights[:, None] * features[0]).sum(0), rtol=0, atol=1e-6)
    plain = features[0][weights > 0].mean(0)
    assert (summary - plain).norm() > 1e-3
    leaf = features.clone().requires_grad_(True)
    sel(leaf, grid_size=GRID).tokens[:, -1].sum().backward()
    torch.testing.assert_close(leaf.grad[0, :, 0], weights, rtol=0, atol=1e-6)


# ---- wiring: config -> processor -> model forward / generate -----------------------------------------------
def test_model_passes_the_tower_attention_when_the_settings_ask_for_it():
    config = ShirgLavidaConfig.tiny(selection={"importance": "attention", "attention_layer": 0,
                                               "summary_weights": "attention"})
    torch.manual_seed(0)
    model = ShirgLavidaForDiffusionLM(config).eval()
    processor = ShirgLavidaProcessor.from_model_config(config, build_tiny_tokenizer())
    generator = torch.Generator().manual_seed(5)
    images = [(torch.rand(40, 56, 3, generator=generator) * 255).to(torch.uint8).numpy() for _ in range(2)]
    from PIL import Image

    inputs = processor(images=[Image.fromarray(image) for image in images],
                       text=[build_prompt("What is here?"), build_prompt("Read the tag")], return_tensors="pt")
    assert inputs["input_ids"].eq(config.image_token_id).sum(-1).tolist() == [33, 33]  # counts unchanged
    with torch.no_grad():
        out = model(**inputs)
        with capture_received_attention(model.vision_tower.encoder, 0) as seen:
            features = model.vision_features(inputs["pixel_values"])
        expected = model.selector(features, grid_size=config.highres_grid, attentions=seen["attention"])
    assert torch.equal(out.kept_indices, expected.kept_indices)
    similarity = ShirgSelector(**{**config.selection, "importance": "similarity"})(features, grid_size=GRID)
    assert not torch.equal(similarity.kept_indices, expected.kept_indices)
    answer = model.generate(**inputs, max_new_tokens=4, block_length=4, step_ratio=1.0)
    assert answer.shape == (2, 4)


# ---- bf16 selection: symmetric bf16 Gram tiles ---------------------------------------------------------------
def structured_features(grid=(24, 24), dim=64, seed=6):
    """Regions of a few shared directions plus sparse distinctive tokens (like text on a page)."""
    generator = torch.Generator().manual_seed(seed)
    count = grid[0] * grid[1]
    region = (torch.arange(count) // (count // 6)).clamp(max=5)
    features = torch.randn(6, dim, generator=generator)[region] + 0.3 * torch.randn(count, dim, generator=generator)
    special = torch.randperm(count, generator=generator)[: count // 10]
    features[special] += 2 * torch.randn(len(special), dim, generator=generator)
    return features


def test_bf16_kernel_sums_match_the_float32_kernel_within_bf16_rounding():
    from shirg_hf.modeling import selection_shirg

    unit = torch.nn.functional.normalize(structured_features(), dim=-1)
    tau = selection_shirg._kernel_sharpness(unit)
    kernel = torch.addmm(unit.new_tensor(-tau), unit, unit.T, alpha=tau).clamp_(min=-60).exp_()
    kernel.fill_diagonal_(1.0)
    look_alikes = kernel.sum(dim=1)
    received = (kernel / look_alikes[:, None]).sum(dim=0)
    bf16_look, bf16_received = selection_shirg._bf16_kernel_sums(unit, tau)
    bound = tau * torch.finfo(torch.bfloat16).eps  # one bf16 ulp of a cosine, as a relative error of K
    torch.testing.assert_close(bf16_look, look_alikes, rtol=bound, atol=0)
    torch.testing.assert_close(bf16_received, received, rtol=2 * bound, atol=0)


def test_bf16_selection_agrees_with_fp32_and_is_thread_and_batch_invariant():
    features = torch.stack([structured_features(seed=seed) for seed in (6, 7, 8)])  # [3, 576, 64]
    sel = ShirgSelector(budget=144, coverage_cells=(8, 8))
    fp32 = sel(features, grid_size=(24, 24)).kept_indices
    low = features.to(torch.bfloat16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = sel(low, grid_size=(24, 24))
        torch.set_num_threads(2)
        two = sel(low, grid_size=(24, 24))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one.kept_indices, two.kept_indices) and torch.equal(one.scores, two.scores)
    assert torch.equal(one.tokens, two.tokens)
    for row in range(3):
        alone = sel(low[row:row + 1], grid_size=(24, 24))
        assert torch.equal(alone.kept_indices[0], one.kept_indices[row])
        assert torch.equal(alone.scores[0], one.scores[row])
    agreement = [len(set(a.tolist()) & set(b.tolist())) / 144 for a, b in zip(fp32, one.kept_indices)]
    assert min(agreement) >= 0.97, agreement  # 0.979-1.000 (mean 0.997) over 10 such images


# ---- adaptive K ------------------------------------------------------------------------------------------------
def adaptive_images():
    """A flat page (K_min), a page with a small textured block (in between) and pure noise (K_max)."""
    from PIL import Image

    generator = torch.Generator().manual_seed(9)
    flat = torch.full((48, 48, 3), 230, dtype=torch.uint8)
    block = flat.clone()
    block[8:24, 8:40] = (torch.rand(16, 32, 3, generator=generator) * 255).to(torch.uint8)
    noise = (torch.rand(48, 48, 3, generator=generator) * 255).to(torch.uint8)
    return [Image.fromarray(image.numpy()) for image in (flat, block, noise)]


def test_adaptive_budget_from_pixels_and_contract():
    from shirg_hf.modeling.visual_tokens import ADAPTIVE_MARGIN, adaptive_budget
    from shirg_hf.processing.image_processing_shirg import busy_patch_count

    selection = {"adaptive_budget": [16, 96]}
    assert adaptive_budget(0, selection) == 16 and adaptive_budget(1000, selection) == 96
    assert adaptive_budget(40, selection) == int(40 * ADAPTIVE_MARGIN)
    with pytest.raises(ValueError, match="selection.adaptive_budget"):
        adaptive_budget(10, {"adaptive_budget": None})
    with pytest.raises(ValueError, match="selection.adaptive_budget"):
        ShirgLavidaConfig.tiny(selection={"adaptive_budget": [96, 16]})
    with pytest.raises(ValueError, match=r"K\) 8"):
        ShirgLavidaConfig.tiny(selection={"adaptive_budget": [8, 96]})  # below the 16 coverage cells
    pixels = torch.zeros(3, 48, 48)
    assert busy_patch_count(pixels, 4, 0.04) == 0
    pixels[:, :8, :8] = torch.arange(64, dtype=torch.float32).view(8, 8) % 2  # a checkerboard-ish 2 x 2 patch area
    assert busy_patch_count(pixels, 4, 0.04) == 4


def test_adaptive_k_rows_differ_and_each_row_equals_the_image_alone():
    config = ShirgLavidaConfig.tiny(selection={"adaptive_budget": [16, 96]})
    torch.manual_seed(0)
    model = ShirgLavidaForDiffusionLM(config).eval()
    processor = ShirgLavidaProcessor.from_model_config(config, build_tiny_tokenizer())
    images = adaptive_images()
    prompts = [build_prompt("What is here?"), build_prompt("Read the tag, please"), build_prompt("Colour?")]
    batch = processor(images=images, text=prompts, return_tensors="pt", shirg_budget="adaptive")
    budgets = batch["shirg_budget"]
    assert isinstance(budgets, list) and budgets[0] == 16 and budgets[2] == 96 and 16 < budgets[1] < 96
    assert batch["input_ids"].eq(config.image_token_id).sum(-1).tolist() == [k + 1 for k in budgets]
    settings = dict(max_new_tokens=4, block_length=4, step_ratio=1.0)
    with torch.no_grad():
        batched = model(**batch)
        answers = model.generate(**batch, **settings)
        for row, (image, prompt) in enumerate(zip(images, prompts)):
            alone = processor(images=[image], text=[prompt], return_tensors="pt", shirg_budget="adaptive")
            assert alone["shirg_budget"] == budgets[row]
            single = model(**alone)
            kept = batched.kept_indices[row]
            assert torch.equal(kept[kept >= 0], single.kept_indices[0]) and int((kept >= 0).sum()) == budgets[row]
            assert torch.equal(model.generate(**alone, **settings)[0], answers[row])
            length = int(alone["attention_mask"].sum())
            torch.testing.assert_close(batched.logits[row, -length:], single.logits[0], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="adaptive_budget"):
        ShirgLavidaProcessor.from_model_config(ShirgLavidaConfig.tiny(), build_tiny_tokenizer())(
            images=images[:1], text=prompts[:1], shirg_budget="adaptive")
    with pytest.raises(ValueError, match="the processor chooses adaptive K"):
        model(**{**batch, "shirg_budget": "adaptive"})


def test_select_command_reads_the_tower_attention(tmp_path):
    from PIL import Image

    from shirg_hf.cli import main

    image = tmp_path / "page.png"
    Image.fromarray((torch.rand(64, 64, 3, generator=torch.Generator().manual_seed(10)) * 255).to(torch.uint8)
                    .numpy()).save(image)
    for importance in ("similarity", "attention", "attention_normalised"):
        assert main(["select", str(image), "--grid", "8", "--budget", "16", "--coverage", "2", "2",
                     "--importance", importance,
                     "--attention-layer", "-1", "--out", str(tmp_path / f"{importance}.png")]) == 0
    assert (tmp_path / "attention.png").read_bytes() != (tmp_path / "similarity.png").read_bytes()


def test_generate_command_takes_an_adaptive_budget(tmp_path, capsys):
    from shirg_hf.cli import main

    config = ShirgLavidaConfig.tiny(selection={"adaptive_budget": [16, 96]})
    torch.manual_seed(0)
    ShirgLavidaForDiffusionLM(config).save_pretrained(tmp_path / "model")
    ShirgLavidaProcessor.from_model_config(config, build_tiny_tokenizer()).save_pretrained(tmp_path / "model")
    adaptive_images()[2].save(tmp_path / "noise.png")
    arguments = ["generate", "--model", str(tmp_path / "model"), "--image", str(tmp_path / "noise.png"),
                 "--question", "What is here?", "--max-new-tokens", "4"]
    assert main([*arguments, "--budget", "adaptive"]) == 0
    adaptive = capsys.readouterr().out
    assert main([*arguments, "--budget", "96"]) == 0  # the noise image's adaptive K is K_max
    assert capsys.readouterr().out.splitlines()[0] == adaptive.splitlines()[0]
    import argparse

    with pytest.raises((SystemExit, argparse.ArgumentError), match="integer K or 'adaptive'|2"):
        main([*arguments, "--budget", "some"])


def test_seed_weight_ablation_method_equals_shirg_with_the_plans_weights():
    features = structured_features()[None]
    seed = ShirgSelector(method="shirg_seed", budget=144, coverage_cells=(8, 8))(features, grid_size=(24, 24))
    plan = ShirgSelector(budget=144, coverage_cells=(8, 8), weights=(0.6, 0.25, 0.15))(features, grid_size=(24, 24))
    default = ShirgSelector(budget=144, coverage_cells=(8, 8))(features, grid_size=(24, 24))
    assert torch.equal(seed.kept_indices, plan.kept_indices) and torch.equal(seed.tokens, plan.tokens)
    assert ShirgSelector().weights == (0.3, 0.0, 0.7)
    assert not torch.equal(default.scores, plan.scores)
