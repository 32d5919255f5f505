"""Self-contained tests of the LLaDA backbone (tiny random weights, CPU, no golden data needed)."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel

import shirg_hf
from shirg_hf import LladaConfig, LladaForMaskedDiffusion, LladaPrefixCache, masked_diffusion_loss
from shirg_hf import prefix_dlm_attention_mask
from shirg_hf.modeling.modeling_llada import LladaDecoderLayer

from conftest import assert_fp32_close, llada_reduction_length


def assert_logits_close(actual, expected, model, key_length):
    """Logits of the same tokens computed with other shapes or kernels: equal up to float32 reordering."""
    assert_fp32_close(actual, expected, llada_reduction_length(model.config, key_length))


def make_model(attn_implementation="sdpa", seed=0, **overrides) -> LladaForMaskedDiffusion:
    torch.manual_seed(seed)
    config = LladaConfig.tiny(**overrides)
    model = LladaForMaskedDiffusion(config).eval()
    # Sharper weights than the 0.02 default init, so attention patterns and positions matter for the logits.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() == 2 and "embed" not in name:
                parameter.normal_(0.0, 2.0 / math.sqrt(parameter.shape[1]))
            elif "embed" in name:
                parameter.normal_()
            else:
                parameter.copy_(1 + 0.2 * torch.randn_like(parameter))
    model.set_attn_implementation(attn_implementation)
    return model


def random_ids(model, batch, length, seed=1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (batch, length), generator=generator)


def reference_logits(model, input_ids) -> torch.Tensor:
    """Independent plain-torch LLaDA forward (no padding), written from REFERENCE.md, for the architecture check."""
    config, state = model.config, model.state_dict()
    heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim

    def rms_norm(x, weight):
        x32 = x.float()
        return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + config.rms_norm_eps)).to(x.dtype)

    def rope(x, length):
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
        angles = torch.outer(torch.arange(length).float(), inv_freq)
        angles = torch.cat([angles, angles], -1)
        first, second = x[..., : head_dim // 2], x[..., head_dim // 2 :]
        return x * angles.cos() + torch.cat([-second, first], -1) * angles.sin()

    x = state["model.embed_tokens.weight"][input_ids]
    batch, length, _ = x.shape
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        h = rms_norm(x, state[prefix + "input_layernorm.weight"])
        q = (h @ state[prefix + "self_attn.q_proj.weight"].T).view(batch, length, heads, head_dim).transpose(1, 2)
        k = (h @ state[prefix + "self_attn.k_proj.weight"].T).view(batch, length, kv_heads, head_dim).transpose(1, 2)
        v = (h @ state[prefix + "self_attn.v_proj.weight"].T).view(batch, length, kv_heads, head_dim).transpose(1, 2)
        q, k = rope(q, length), rope(k, length)
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        v = v.repeat_interleave(heads // kv_heads, dim=1)
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(head_dim), dim=-1)  # no causal mask
        attention = (weights @ v).transpose(1, 2).reshape(batch, length, heads * head_dim)
        x = x + attention @ state[prefix + "self_attn.o_proj.weight"].T
        h = rms_norm(x, state[prefix + "post_attention_layernorm.weight"])
        gate = F.silu(h @ state[prefix + "mlp.gate_proj.weight"].T)
        x = x + (gate * (h @ state[prefix + "mlp.up_proj.weight"].T)) @ state[prefix + "mlp.down_proj.weight"].T
    return rms_norm(x, state["model.norm.weight"]) @ state["lm_head.weight"].T


# ----------------------------------------------------------------------------------------------- architecture


def test_parameter_layout_has_no_biases_and_an_untied_head():
    model = make_model()
    names = set(model.state_dict())
    for layer in range(model.config.num_hidden_layers):
        for suffix in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                       "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm"):
            assert f"model.layers.{layer}.{suffix}.weight" in names
    assert not any(name.endswith(".bias") for name in names)
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= names
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    kv_width = model.config.num_key_value_heads * model.config.head_dim
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (kv_width, model.config.hidden_size)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_logits_match_independent_reference_with_grouped_query_attention(attn_implementation):
    model = make_model(attn_implementation)
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    input_ids = random_ids(model, 2, 12)
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
        expected = reference_logits(model, input_ids)
    assert_logits_close(logits, expected, model, key_length=12)


def test_rms_norm_is_computed_in_float32_then_cast_before_the_weight():
    model = make_model().to(torch.bfloat16)
    norm = model.model.norm
    x = torch.randn(2, 5, model.config.hidden_size).to(torch.bfloat16) * 30
    x32 = x.float()
    normalised = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + model.config.rms_norm_eps)).to(torch.bfloat16)
    assert torch.equal(norm(x), norm.weight * normalised)


def test_rope_theta_comes_from_the_config():
    base = make_model()
    other = make_model(rope_theta=10000.0)
    input_ids = random_ids(base, 1, 10)
    with torch.no_grad():
        assert not torch.allclose(base(input_ids=input_ids).logits, other(input_ids=input_ids).logits, atol=1e-3)
        assert_logits_close(other(input_ids=input_ids).logits, reference_logits(other, input_ids), other, 10)


def test_attention_is_bidirectional():
    model = make_model()
    input_ids = random_ids(model, 1, 10)
    changed = input_ids.clone()
    changed[0, -1] = (changed[0, -1] + 1) % model.config.vocab_size
    with torch.no_grad():
        first = model(input_ids=input_ids).logits[0, 0]
        second = model(input_ids=changed).logits[0, 0]
    assert (first - second).abs().max() > 1e-3  # position 0 sees the last token


def test_sdpa_and_eager_agree_with_padding_and_cache():
    sdpa, eager = make_model("sdpa"), make_model("eager")
    input_ids = random_ids(sdpa, 2, 12)
    attention_mask = torch.ones(2, 12, dtype=torch.long)
    attention_mask[0, :3] = 0
    with torch.no_grad():
        assert_logits_close(sdpa(input_ids=input_ids, attention_mask=attention_mask).logits,
                            eager(input_ids=input_ids, attention_mask=attention_mask).logits, sdpa, key_length=12)
        answer = random_ids(sdpa, 2, 4, seed=3)
        cached_sdpa = sdpa(input_ids=answer,
                           cache=sdpa.encode_prefix(input_ids=input_ids, attention_mask=attention_mask))
        cached_eager = eager(input_ids=answer,
                             cache=eager.encode_prefix(input_ids=input_ids, attention_mask=attention_mask))
    assert_logits_close(cached_sdpa.logits, cached_eager.logits, sdpa, key_length=16)


def test_hidden_states_are_embeddings_block_outputs_and_final_norm():
    model = make_model()
    input_ids = random_ids(model, 2, 7)
    with torch.no_grad():
        outputs = model.model(input_ids=input_ids, output_hidden_states=True)
    hidden_states = outputs.hidden_states
    assert len(hidden_states) == model.config.num_hidden_layers + 1
    assert torch.equal(hidden_states[0], model.model.embed_tokens(input_ids))
    assert torch.equal(hidden_states[-1], outputs.last_hidden_state)
    with torch.no_grad():
        first_block = model.model.layers[0](hidden_states[0], position_embeddings=model.model.rotary_emb(
            torch.arange(7).expand(2, 7)))
    torch.testing.assert_close(hidden_states[1], first_block, atol=0, rtol=0)


def test_inputs_embeds_equal_input_ids():
    model = make_model()
    input_ids = random_ids(model, 2, 9)
    with torch.no_grad():
        from_ids = model(input_ids=input_ids).logits
        from_embeds = model(inputs_embeds=model.get_input_embeddings()(input_ids)).logits
    assert torch.equal(from_ids, from_embeds)


# ----------------------------------------------------------------------------------------------- prefix cache


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_cached_answer_equals_prefix_dlm_full_forward_and_is_repeatable(attn_implementation):
    model = make_model(attn_implementation)
    prefix_ids, answer_ids = random_ids(model, 2, 10), random_ids(model, 2, 6, seed=2)
    with torch.no_grad():
        cache = model.encode_prefix(input_ids=prefix_ids)
        keys_before = [layer.keys.clone() for layer in cache.layers]
        first = model(input_ids=answer_ids, cache=cache).logits
        # the first answer call moves the prefix into the layer workspace; from then on nothing is copied
        pointers_before = [layer.keys.data_ptr() for layer in cache.layers]
        second = model(input_ids=answer_ids, cache=cache).logits
        shorter = model(input_ids=answer_ids[:, :3], cache=cache).logits
        third = model(input_ids=answer_ids, cache=cache).logits
        full_ids = torch.cat([prefix_ids, answer_ids], dim=1)
        mask = prefix_dlm_attention_mask(torch.ones_like(full_ids), prefix_lengths=10)
        full = model(input_ids=full_ids, attention_mask=mask).logits[:, 10:]
        unmasked_full = model(input_ids=full_ids).logits[:, 10:]
    assert first.shape == (2, 6, model.config.vocab_size) and shorter.shape == (2, 3, model.config.vocab_size)
    assert torch.equal(first, second) and torch.equal(first, third)
    assert_logits_close(first, full, model, key_length=16)
    assert (first - unmasked_full).abs().max() > 1e-3  # the prefix-DLM mask matters: it is not a full pass
    assert cache.prefix_length == 10 and cache.get_seq_length() == 10
    assert [layer.keys.data_ptr() for layer in cache.layers] == pointers_before
    assert all(torch.equal(layer.keys, before) for layer, before in zip(cache.layers, keys_before))


def test_answer_positions_continue_after_the_prefix():
    model = make_model()
    prefix_ids, answer_ids = random_ids(model, 1, 8), random_ids(model, 1, 4, seed=2)
    with torch.no_grad():
        cache = model.encode_prefix(input_ids=prefix_ids)
        default = model(input_ids=answer_ids, cache=cache).logits
        explicit = model(input_ids=answer_ids, cache=cache, position_ids=torch.arange(8, 12)[None]).logits
        shifted = model(input_ids=answer_ids, cache=cache, position_ids=torch.arange(4)[None]).logits
    assert torch.equal(default, explicit)
    assert (default - shifted).abs().max() > 1e-3


def test_encode_prefix_skips_the_lm_head_and_returns_a_read_only_cache():
    model = make_model()
    calls = []
    handle = model.lm_head.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        cache = model.encode_prefix(input_ids=random_ids(model, 2, 5))
    handle.remove()
    assert calls == [] and isinstance(cache, LladaPrefixCache)
    assert len(cache.layers) == model.config.num_hidden_layers
    for operation in (lambda: cache.crop(-1), cache.reset, lambda: cache.layers[0].reset()):
        with pytest.raises(ValueError, match="read-only"):
            operation()
    with pytest.raises(ValueError, match="read-only"):
        model(input_ids=random_ids(model, 2, 3), cache=cache, use_cache=True)


def test_forward_use_cache_returns_the_same_cache_as_encode_prefix():
    model = make_model()
    prefix_ids = random_ids(model, 2, 6)
    with torch.no_grad():
        outputs = model(input_ids=prefix_ids, use_cache=True)
        cache = model.encode_prefix(input_ids=prefix_ids)
    for left, right in zip(outputs.cache.layers, cache.layers):
        assert torch.equal(left.keys, right.keys) and torch.equal(left.values, right.values)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_padded_prefix_rows_equal_their_unpadded_selves(padding_side):
    model = make_model()
    long_prefix, short_prefix = random_ids(model, 1, 9), random_ids(model, 1, 5, seed=4)
    answer = random_ids(model, 2, 4, seed=5)
    pad = torch.full((1, 4), model.config.pad_token_id)
    padded_short = torch.cat([pad, short_prefix], 1) if padding_side == "left" else torch.cat([short_prefix, pad], 1)
    prefix_mask = torch.ones(2, 9, dtype=torch.long)
    if padding_side == "left":
        prefix_mask[1, :4] = 0
    else:
        prefix_mask[1, 5:] = 0
    with torch.no_grad():
        cache = model.encode_prefix(input_ids=torch.cat([long_prefix, padded_short]), attention_mask=prefix_mask)
        batched = model(input_ids=answer, cache=cache).logits
        full_mask = torch.cat([prefix_mask, torch.ones(2, 4, dtype=torch.long)], 1)
        batched_full_mask = model(input_ids=answer, cache=cache, attention_mask=full_mask).logits
        alone_long = model(input_ids=answer[:1], cache=model.encode_prefix(input_ids=long_prefix)).logits
        alone_short = model(input_ids=answer[1:], cache=model.encode_prefix(input_ids=short_prefix)).logits
    assert_logits_close(batched[:1], alone_long, model, key_length=13)
    assert_logits_close(batched[1:], alone_short, model, key_length=13)
    assert torch.equal(batched, batched_full_mask)
    assert cache.real_lengths.tolist() == [9, 5]


def test_cache_from_another_model_or_batch_is_refused():
    small, wider = make_model(), make_model(hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                                            intermediate_size=256)
    with torch.no_grad():
        cache = small.encode_prefix(input_ids=random_ids(small, 2, 5))
        with pytest.raises(ValueError, match="encoded by a model of size"):
            wider(input_ids=random_ids(wider, 2, 3), cache=cache)
        with pytest.raises(ValueError, match="rows"):
            small(input_ids=random_ids(small, 3, 3), cache=cache)
        with pytest.raises(ValueError, match="first P columns"):
            small(input_ids=random_ids(small, 2, 3), cache=cache,
                  attention_mask=torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1], [1] * 8]))


# ----------------------------------------------------------------------------------------------- padding


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_padded_batch_rows_equal_rows_alone(attn_implementation, padding_side):
    model = make_model(attn_implementation)
    lengths = [10, 6, 3]
    rows = [random_ids(model, 1, length, seed=10 + length) for length in lengths]
    input_ids = torch.full((3, 10), model.config.pad_token_id)
    attention_mask = torch.zeros(3, 10, dtype=torch.long)
    for index, (row, length) in enumerate(zip(rows, lengths)):
        span = slice(10 - length, 10) if padding_side == "left" else slice(0, length)
        input_ids[index, span], attention_mask[index, span] = row[0], 1
    with torch.no_grad():
        batched = model(input_ids=input_ids, attention_mask=attention_mask).logits
        assert torch.isfinite(batched).all()
        for index, (row, length) in enumerate(zip(rows, lengths)):
            span = slice(10 - length, 10) if padding_side == "left" else slice(0, length)
            assert_logits_close(batched[index, span], model(input_ids=row).logits[0], model, key_length=10)


def test_a_row_of_only_padding_is_refused():
    model = make_model()
    with pytest.raises(ValueError, match="only padding"):
        model(input_ids=random_ids(model, 2, 4), attention_mask=torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]]))


# ----------------------------------------------------------------------------------------------- training


def test_prefix_dlm_mask_semantics():
    attention_mask = torch.tensor([[0, 1, 1, 1, 1, 0]])  # left pad, 2 prompt tokens, 2 answer tokens, right pad
    mask = prefix_dlm_attention_mask(attention_mask, prefix_lengths=torch.tensor([3]))[0, 0]
    assert mask.shape == (6, 6) and mask.dtype == torch.bool
    assert mask[1].tolist() == [False, True, True, False, False, False]  # prompt query: real prompt keys only
    assert mask[3].tolist() == [False, True, True, True, True, False]  # answer query: every real key
    assert mask[0].tolist() == [True, True, True, False, False, False]  # padded prompt query: also itself
    assert mask[5].tolist() == [False, True, True, True, True, True]  # padded answer query: also itself
    assert mask[1:5, 0].tolist() == [False] * 4 and mask[1:5, 5].tolist() == [False] * 4  # real queries: no pads
    assert mask.any(dim=-1).all()
    with pytest.raises(ValueError, match="prefix_lengths"):
        prefix_dlm_attention_mask(attention_mask, prefix_lengths=7)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_prefix_dlm_mask_forward_is_finite_and_ignores_padding(attn_implementation):
    model = make_model(attn_implementation)
    input_ids = random_ids(model, 2, 10)
    attention_mask = torch.ones(2, 10, dtype=torch.long)
    attention_mask[1, 7:] = 0  # row 1: right padding after a shorter answer
    mask = prefix_dlm_attention_mask(attention_mask, prefix_lengths=torch.tensor([6, 4]))
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=mask).logits
        alone = model(input_ids=input_ids[1:, :7], attention_mask=prefix_dlm_attention_mask(
            torch.ones(1, 7), prefix_lengths=4)).logits
    assert torch.isfinite(logits).all()
    assert_logits_close(logits[1:, :7], alone, model, key_length=10)


def test_gradient_checkpointing_matches_plain_backward_and_reaches_inputs_embeds():
    def gradients(checkpointing):
        model = make_model()
        model.train()
        if checkpointing:
            model.activation_checkpointing_enable()
        torch.manual_seed(7)
        embeds = torch.randn(2, 8, model.config.hidden_size, requires_grad=True)
        labels = torch.full((2, 8), -100)
        labels[:, 5:] = random_ids(model, 2, 3)
        mask = prefix_dlm_attention_mask(torch.ones(2, 8), prefix_lengths=5)
        loss = model(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss
        loss.backward()
        return loss.detach(), embeds.grad, model.model.layers[0].self_attn.q_proj.weight.grad

    plain, checkpointed = gradients(False), gradients(True)
    assert checkpointed[1] is not None and checkpointed[1].abs().sum() > 0
    for left, right in zip(plain, checkpointed):
        torch.testing.assert_close(left, right, atol=1e-6, rtol=1e-5)


def test_checkpointed_training_with_a_prefix_cache_and_refused_cache_recording():
    model = make_model()
    with torch.no_grad():
        cache = model.encode_prefix(input_ids=random_ids(model, 1, 6))
    model.train()
    model.activation_checkpointing_enable()
    embeds = model.get_input_embeddings()(random_ids(model, 1, 4)).detach().requires_grad_(True)
    model(inputs_embeds=embeds, cache=cache).logits.sum().backward()
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="checkpointing"):
        model.encode_prefix(input_ids=random_ids(model, 1, 6))


def test_bfloat16_forward_and_cache():
    model = make_model().to(torch.bfloat16)
    prefix_ids, answer_ids = random_ids(model, 2, 8), random_ids(model, 2, 4, seed=2)
    with torch.no_grad():
        cache = model.encode_prefix(input_ids=prefix_ids)
        logits = model(input_ids=answer_ids, cache=cache).logits
        reference = make_model()(input_ids=answer_ids, cache=make_model().encode_prefix(input_ids=prefix_ids)).logits
    assert logits.dtype == torch.bfloat16 and cache.layers[0].keys.dtype == torch.bfloat16
    assert torch.isfinite(logits).all()
    assert (logits.float() - reference).abs().max() < 0.1 * reference.abs().max()


def test_masked_diffusion_loss_default_and_llada_estimator():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.full((2, 5), -100)
    labels[0, 1], labels[0, 3], labels[1, 4] = 2, 7, 10
    per_token = {(0, 1): F.cross_entropy(logits[0, 1], torch.tensor(2)),
                 (0, 3): F.cross_entropy(logits[0, 3], torch.tensor(7)),
                 (1, 4): F.cross_entropy(logits[1, 4], torch.tensor(10))}
    torch.testing.assert_close(masked_diffusion_loss(logits, labels), sum(per_token.values()) / 3)
    p_mask = torch.tensor([0.5, 0.25])
    answer_lengths = torch.tensor([4, 2])
    expected = (per_token[0, 1] / (0.5 * 4) + per_token[0, 3] / (0.5 * 4) + per_token[1, 4] / (0.25 * 2)) / 2
    torch.testing.assert_close(masked_diffusion_loss(logits, labels, p_mask, answer_lengths), expected)
    expected_pretraining = (per_token[0, 1] / 0.5 + per_token[0, 3] / 0.5 + per_token[1, 4] / 0.25) / (2 * 5)
    torch.testing.assert_close(masked_diffusion_loss(logits, labels, p_mask), expected_pretraining)
    with pytest.raises(ValueError, match="no target"):
        masked_diffusion_loss(logits, torch.full((2, 5), -100))
    with pytest.raises(ValueError, match="p_mask"):
        masked_diffusion_loss(logits, labels, torch.tensor([0.0, 0.5]))


def test_forward_with_labels_returns_lavida_loss():
    model = make_model()
    input_ids = random_ids(model, 2, 6)
    labels = torch.full((2, 6), -100)
    labels[:, 2] = input_ids[:, 2]
    input_ids[:, 2] = model.config.mask_token_id
    outputs = model(input_ids=input_ids, labels=labels)
    assert outputs.loss is not None and outputs[0] is outputs.loss
    torch.testing.assert_close(outputs.loss, masked_diffusion_loss(outputs.logits, labels))
    assert type(model).accepts_loss_kwargs is False


def test_logits_to_keep():
    model = make_model()
    input_ids = random_ids(model, 2, 8)
    with torch.no_grad():
        full = model(input_ids=input_ids).logits
        hidden = model.model(input_ids=input_ids).last_hidden_state
        last_three = model(input_ids=input_ids, logits_to_keep=3).logits
        picked = model(input_ids=input_ids, logits_to_keep=torch.tensor([0, 4])).logits
        # Bit-exact by construction: the LM head on the same slices of the same hidden states.
        assert torch.equal(last_three, model.lm_head(hidden[:, -3:]))
        assert torch.equal(picked, model.lm_head(hidden[:, torch.tensor([0, 4])]))
    # Against the full logits, the LM head's matmul runs on other shapes (another blocking of its hidden-size
    # reduction): equal up to float32 reordering of that one reduction.
    assert last_three.shape == (2, 3, model.config.vocab_size) and picked.shape == (2, 2, model.config.vocab_size)
    assert_fp32_close(last_three, full[:, -3:], model.config.hidden_size)
    assert_fp32_close(picked, full[:, [0, 4]], model.config.hidden_size)


def test_no_split_modules_keep_blocks_whole_when_sharding():
    from accelerate import infer_auto_device_map

    model = make_model()
    assert set(model._no_split_modules) == {"LladaDecoderLayer"}
    assert all(isinstance(layer, LladaDecoderLayer) for layer in model.model.layers)
    embedding_bytes = model.model.embed_tokens.weight.numel() * 4
    block_bytes = sum(parameter.numel() * 4 for parameter in model.model.layers[0].parameters())
    max_memory = {"cpu": embedding_bytes + int(1.5 * block_bytes), "disk": 10**9}  # room for 1.5 blocks

    def owners_per_block(no_split_module_classes):
        device_map = infer_auto_device_map(model, max_memory=max_memory,
                                           no_split_module_classes=no_split_module_classes)
        assert len(set(device_map.values())) > 1  # really sharded
        return [{device for name, device in device_map.items()
                 if name == f"model.layers.{layer}" or name.startswith(f"model.layers.{layer}.")
                 or (name == "model.layers")} for layer in range(model.config.num_hidden_layers)]

    assert all(len(owners) == 1 for owners in owners_per_block(list(model._no_split_modules)))
    assert any(len(owners) > 1 for owners in owners_per_block([]))  # without it a block would be split


# ----------------------------------------------------------------------------------------------- bad input


def test_bad_inputs_raise_value_errors():
    model = make_model(max_position_embeddings=16)
    with pytest.raises(ValueError, match="vocab_size"):
        model(input_ids=torch.tensor([[1, model.config.vocab_size]]))
    with pytest.raises(ValueError, match="vocab_size"):
        model(input_ids=torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match="hidden_size"):
        model(inputs_embeds=torch.randn(1, 4, model.config.hidden_size + 1))
    with pytest.raises(ValueError, match="exactly one"):
        model(input_ids=torch.tensor([[1]]), inputs_embeds=torch.randn(1, 1, model.config.hidden_size))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(input_ids=random_ids(model, 1, 17))
    with torch.no_grad():
        cache = model.encode_prefix(input_ids=random_ids(model, 1, 12))
    model(input_ids=random_ids(model, 1, 4), cache=cache)  # positions 12..15 fit
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(input_ids=random_ids(model, 1, 5), cache=cache)
    with pytest.raises(ValueError, match="LladaPrefixCache"):
        from transformers import DynamicCache

        model(input_ids=random_ids(model, 1, 2), cache=DynamicCache())
    with pytest.raises(ValueError, match="4-D attention_mask"):
        model(input_ids=random_ids(model, 1, 4), attention_mask=torch.ones(1, 1, 4, 5, dtype=torch.bool))


# ----------------------------------------------------------------------------------------------- HF integration


def test_from_pretrained_round_trip_recomputes_rotary_buffers(tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path)
    loaded, info = AutoModel.from_pretrained(tmp_path, dtype=torch.float32, output_loading_info=True)
    assert type(loaded) is LladaForMaskedDiffusion
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert torch.equal(loaded.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq)
    input_ids = random_ids(model, 2, 7)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=input_ids).logits, model(input_ids=input_ids).logits)
    eager = AutoModel.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="eager")
    assert eager.config._attn_implementation == "eager"


def test_registered_under_its_own_model_type():
    assert LladaConfig.model_type == "shirg_llada" != "llada"
    assert type(AutoConfig.for_model("shirg_llada")) is LladaConfig
    assert type(AutoModel.from_config(LladaConfig.tiny())) is LladaForMaskedDiffusion
    assert "LladaForMaskedDiffusion" in shirg_hf.__all__
    model = make_model()
    model.set_attn_implementation("eager")
    assert model.config._attn_implementation == "eager"


def test_cached_answers_with_autograd_match_and_backpropagate_after_workspace_reuse():
    """The no-copy workspace is used without autograd; with autograd the cache falls back to fresh tensors."""
    model = make_model()
    prefix_ids, answer_ids = random_ids(model, 2, 10), random_ids(model, 2, 6, seed=2)
    with torch.no_grad():
        cache = model.encode_prefix(input_ids=prefix_ids)
        reference = model(input_ids=answer_ids, cache=cache).logits  # builds the workspace
    answer_embeds = model.get_input_embeddings()(answer_ids).detach().requires_grad_(True)
    logits = model(inputs_embeds=answer_embeds, cache=cache).logits
    torch.testing.assert_close(logits, reference, atol=0, rtol=0)
    logits.sum().backward()
    assert answer_embeds.grad is not None and torch.isfinite(answer_embeds.grad).all()
    with torch.no_grad():
        assert torch.equal(model(input_ids=answer_ids, cache=cache).logits, reference)
