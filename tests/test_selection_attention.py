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
