"""LLaDA: the bidirectional masked-diffusion language model inside LaViDa, in transformers 5.x idiom.

Numerically faithful to the original LaViDa copy of LLaDA (pre-norm RMSNorm computed in float32, half-split RoPE
in float32, SwiGLU MLP, no biases, untied LM head, no causal masking anywhere), with two deliberate fixes:

* Padding is honoured (FIX): the original builds a padding bias but
  never passes it to attention, so a padded row attends to its padding and a batch differs from its rows run
  alone. Here a 2-D `attention_mask` hides padded keys and positions skip padding, so every row of a left- or
  right-padded batch gives the same logits as that row alone. Unpadded inputs give the original's numbers.
* The prefix pass does not compute LM-head logits: `encode_prefix` runs the backbone only.

The prefix cache (`cache_llada.LladaPrefixCache`) is read-only: answer tokens at rotary positions P..P+L-1
attend to the real prefix tokens and to each other, and any number of calls leave it unchanged.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, slice_logits_to_keep
from transformers.utils import ModelOutput

from .cache_llada import LladaPrefixCache
from .configuration_llada import LladaConfig
from .generation_diffusion import DiffusionGenerationConfig, diffusion_generate

IGNORE_INDEX = -100


@dataclass
class LladaModelOutput(ModelOutput):
    """Backbone output.

    Args:
        last_hidden_state: `[B, T, D]` output of the final RMSNorm.
        cache: the read-only `LladaPrefixCache` of this pass when `use_cache=True`, else the cache passed in.
        hidden_states: with `output_hidden_states=True`, `num_hidden_layers + 1` tensors `[B, T, D]`: the input
            embeddings, the outputs of blocks 0..N-2, and the final-norm output of block N-1 (as the original
            returns them: the raw output of the last block is not included).
    """

    last_hidden_state: torch.FloatTensor | None = None
    cache: LladaPrefixCache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class LladaOutput(ModelOutput):
    """Masked-diffusion LM output: `loss` (with `labels`), `logits` `[B, T, V]`, `cache`, `hidden_states`."""

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    cache: LladaPrefixCache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


def masked_diffusion_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    p_mask: torch.Tensor | None = None,
    num_answer_tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Masked-diffusion training loss.

    `labels` `[B, T]` hold the clean token id at every MASKED target position and -100 everywhere else (LaViDa's
    convention). `logits` `[B, T, V]`. Cross-entropy is computed in float32 on the target positions only.

    * `p_mask=None` (default, LaViDa's training loss): plain mean cross-entropy over all target positions of the
      batch, no 1/t weight.
    * `p_mask` `[B]` (each sequence's masking probability): LLaDA's unbiased estimator
      `sum_b sum_{masked i} CE[b, i] / (p[b] * N_b) / B`, where `N_b` is the number of answer positions of row b
      (masked or not, EOS padding included), given as `num_answer_tokens` `[B]`. Without it every position counts
      as an answer position (`N_b = T`), which is LLaDA's pre-training form. Use this for LLaDA-style fine-tuning;
      LaViDa's released checkpoints were trained with the default.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels must be [B, T] matching logits [B, T, V]; got labels {tuple(labels.shape)} and logits "
            f"{tuple(logits.shape)}. With `logits_to_keep` or a prefix cache, give labels for the kept positions only."
        )
    vocab_size = logits.shape[-1]
    targets = labels != IGNORE_INDEX  # [B, T]
    target_labels = labels[targets]  # [N]
    if target_labels.numel() == 0:
        raise ValueError("labels contain no target position (every label is -100): there is nothing to learn from.")
    if target_labels.min() < 0 or target_labels.max() >= vocab_size:
        raise ValueError(
            f"labels must be -100 or token ids in [0, {vocab_size - 1}]; found {int(target_labels.min())}.."
            f"{int(target_labels.max())}."
        )
    token_loss = F.cross_entropy(logits[targets].float(), target_labels, reduction="none")  # [N]
    if p_mask is None:
        return token_loss.mean()

    batch_size, seq_length = labels.shape
    if p_mask.shape != (batch_size,):
        raise ValueError(f"p_mask must be [B] = [{batch_size}], got {tuple(p_mask.shape)}.")
    if not bool(((p_mask > 0) & (p_mask <= 1)).all()):
        raise ValueError("p_mask holds masking probabilities and must lie in (0, 1].")
    if num_answer_tokens is None:
        num_answer_tokens = torch.full((batch_size,), seq_length, device=labels.device)
    elif num_answer_tokens.shape != (batch_size,) or not bool((num_answer_tokens > 0).all()):
        raise ValueError(f"num_answer_tokens must be [B] = [{batch_size}] positive counts, got {num_answer_tokens!r}.")
    row_weight = 1.0 / (p_mask.float() * num_answer_tokens.float())  # [B]
    token_weight = row_weight[:, None].expand(batch_size, seq_length)[targets]  # [N]
    return (token_loss * token_weight).sum() / batch_size


def prefix_dlm_attention_mask(attention_mask: torch.Tensor | None, prefix_lengths) -> torch.Tensor:
    """Prefix-DLM training mask, bool `[B, 1, T, T]` (True = attend), usable as `forward(attention_mask=...)`.

    Prompt queries (index < `prefix_lengths[b]`, image tokens included) see only real prompt keys; answer queries
    see every real key. This is exactly what cached inference computes, so training with it makes the prefix cache
    exact. `attention_mask` `[B, T]` (1 = real token, None = no padding); `prefix_lengths` `[B]` (or an int) is the
    index of the first answer position of each row. Padded queries also attend to themselves so that no row is
    fully masked (their outputs are irrelevant but stay finite).
    """
    if attention_mask is None:
        raise ValueError("prefix_dlm_attention_mask needs a 2-D attention_mask [B, T] (use torch.ones for no padding).")
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be [B, T], got {tuple(attention_mask.shape)}.")
    batch_size, seq_length = attention_mask.shape
    device = attention_mask.device
    prefix_lengths = torch.as_tensor(prefix_lengths, device=device).long()
    if prefix_lengths.dim() == 0:
        prefix_lengths = prefix_lengths.expand(batch_size)
    if prefix_lengths.shape != (batch_size,):
        raise ValueError(f"prefix_lengths must be an int or [B] = [{batch_size}], got {tuple(prefix_lengths.shape)}.")
    if bool(((prefix_lengths < 0) | (prefix_lengths > seq_length)).any()):
        raise ValueError(f"prefix_lengths must lie in [0, T={seq_length}], got {prefix_lengths.tolist()}.")
    is_real = attention_mask.bool()  # [B, T]
    index = torch.arange(seq_length, device=device)  # [T]
    is_prompt = index[None, :] < prefix_lengths[:, None]  # [B, T]
    query_sees_key = is_prompt[:, None, :] | ~is_prompt[:, :, None]  # [B, Tq, Tk]
    mask = is_real[:, None, :] & query_sees_key  # [B, Tq, Tk]
    padded_self = ~is_real[:, :, None] & torch.eye(seq_length, dtype=torch.bool, device=device)  # [B, Tq, Tk]
    return (mask | padded_self)[:, None]  # [B, 1, T, T]


class LladaRMSNorm(nn.Module):
    """RMSNorm computed in float32, cast back to the input dtype, then scaled by the weight (no bias)."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class LladaRotaryEmbedding(nn.Module):
    """Half-split (NeoX) rotary tables in float32, `cos`/`sin` `[B, T, head_dim]`."""

    def __init__(self, config: LladaConfig):
        super().__init__()
        self.head_dim = config.head_dim
        self.rope_theta = config.rope_theta
        self.inv_freq = nn.Buffer(self.compute_inv_freq(), persistent=False)  # [head_dim / 2]

    def compute_inv_freq(self, device=None) -> torch.Tensor:
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device) / self.head_dim
        return 1.0 / (self.rope_theta**exponents)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(device_type=position_ids.device.type, enabled=False):
            freqs = position_ids[..., None].float() * self.inv_freq.float()  # [B, T, hd/2]
            angles = torch.cat((freqs, freqs), dim=-1)  # [B, T, hd]
            return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary_pos_emb(query, key, cos, sin):
    """Rotate `query`/`key` `[B, H, T, hd]` in float32 (`rope_full_precision`), then cast back."""
    cos, sin = cos[:, None], sin[:, None]  # [B, 1, T, hd]
    query_fp32, key_fp32 = query.float(), key.float()
    query_rotated = query_fp32 * cos + rotate_half(query_fp32) * sin
    key_rotated = key_fp32 * cos + rotate_half(key_fp32) * sin
    return query_rotated.to(query.dtype), key_rotated.to(key.dtype)


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """`[B, KV, S, hd]` -> `[B, KV * n_rep, S, hd]`; query head h uses kv head h // n_rep."""
    batch, num_key_value_heads, seq_length, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None].expand(batch, num_key_value_heads, n_rep, seq_length, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, seq_length, head_dim)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
):
    """Reference attention: softmax in float32; `attention_mask` is additive `[B, 1, Tq, Tk]` or None."""
    key_states = repeat_kv(key, module.num_key_value_groups)
    value_states = repeat_kv(value, module.num_key_value_groups)
    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling  # [B, H, Tq, Tk]
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value_states).transpose(1, 2).contiguous()  # [B, Tq, H, hd]
    return attn_output, attn_weights


class LladaAttention(nn.Module):
    """Bidirectional grouped-query self-attention (no biases, no causal mask)."""

    def __init__(self, config: LladaConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = 1.0 / math.sqrt(self.head_dim)
        self.attention_dropout = config.attention_dropout
        self.is_causal = False
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, hidden_states, position_embeddings, attention_mask=None, cache=None) -> torch.Tensor:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # [B, H, T, hd]
        key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # [B, KV, T, hd]
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # [B, KV, T, hd]
        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)
        if cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx)  # [B, KV, P + T, hd]

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, _ = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            is_causal=False,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()  # [B, T, H * hd]
        return self.o_proj(attn_output)


class LladaMLP(nn.Module):
    """SwiGLU: `down(silu(gate(x)) * up(x))` (LLaDA: `ff_out(silu(ff_proj(x)) * up_proj(x))`)."""

    def __init__(self, config: LladaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(hidden_states)) * self.up_proj(hidden_states))


class LladaDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block: `x + attn(norm(x))`, then `x + mlp(norm(x))`."""

    # The only caches that reach a layer during checkpointed training are read-only prefix caches (LladaModel
    # refuses to record a new cache there), so the backward replay reads the same states.
    _can_checkpoint_with_cache = True

    def __init__(self, config: LladaConfig, layer_idx: int):
        super().__init__()
        self.self_attn = LladaAttention(config, layer_idx)
        self.mlp = LladaMLP(config)
        self.input_layernorm = LladaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LladaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, cache=None) -> torch.Tensor:
        residual = hidden_states
        hidden_states = self.self_attn(
            self.input_layernorm(hidden_states), position_embeddings, attention_mask=attention_mask, cache=cache
        )
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
        return residual + hidden_states


class LladaPreTrainedModel(PreTrainedModel):
    config: LladaConfig
    config_class = LladaConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LladaDecoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = True

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, LladaRotaryEmbedding):
            # Non-persistent buffer: after from_pretrained it is uninitialised memory unless recomputed here.
            init.copy_(module.inv_freq, module.compute_inv_freq(device=module.inv_freq.device))


class LladaModel(LladaPreTrainedModel):
    """The LLaDA backbone: token embedding, `num_hidden_layers` blocks, final RMSNorm."""

    def __init__(self, config: LladaConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            [LladaDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = LladaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LladaRotaryEmbedding(config)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: LladaPrefixCache | None = None,
        use_cache: bool = False,
        output_hidden_states: bool = False,
    ) -> LladaModelOutput:
        r"""
        Args:
            input_ids / inputs_embeds: `[B, T]` ids or `[B, T, D]` embeddings (exactly one; embeddings are used as
                given, no scaling).
            attention_mask: `[B, T]` with 1 at real tokens (with a `cache`: `[B, L]` for the answer or `[B, P + L]`
                whose first P columns equal the cache's prefix mask), or a 4-D mask `[B, 1, T, K]` (bool True =
                attend, or additive float) used as given, e.g. `prefix_dlm_attention_mask(...)`.
            position_ids: `[B, T]` rotary positions. Default: `cumsum(attention_mask) - 1` (clamped at 0), so
                padding does not shift positions; with a `cache` the answer continues from each row's real prefix
                length. With a 4-D mask the default is `0..T-1`.
            cache: a `LladaPrefixCache` from `encode_prefix` / `use_cache=True`; it is read, never modified.
            use_cache: return this pass's keys/values as a new read-only `LladaPrefixCache` (the prefix pass).
            output_hidden_states: also return the per-layer hidden states (see `LladaModelOutput`).
        """
        inputs_embeds = self._embed(input_ids, inputs_embeds)  # [B, T, D]
        batch_size, query_length = inputs_embeds.shape[:2]
        self._check_cache_arguments(cache, use_cache, attention_mask, batch_size)
        prefix_length = cache.prefix_length if cache is not None else 0
        key_length = prefix_length + query_length

        if attention_mask is not None and attention_mask.dim() == 4:
            key_padding_mask = None
            attention_bias = self._four_d_attention_bias(
                attention_mask, batch_size, query_length, key_length, inputs_embeds.dtype
            )
        else:
            key_padding_mask = self._key_padding_mask(attention_mask, cache, batch_size, query_length)  # [B, K] | None
            attention_bias = create_bidirectional_mask(
                config=self.config, inputs_embeds=inputs_embeds, attention_mask=key_padding_mask, cache=cache
            )
        if position_ids is None:
            position_ids = self._default_position_ids(
                key_padding_mask, cache, batch_size, query_length, inputs_embeds.device
            )
        position_ids = self._check_position_ids(position_ids, batch_size, query_length)  # [B, T]
        position_embeddings = self.rotary_emb(position_ids)  # 2 x [B, T, hd] float32

        layer_cache = DynamicCache() if use_cache else cache
        all_hidden_states = [] if output_hidden_states else None
        hidden_states = inputs_embeds
        for decoder_layer in self.layers:
            if output_hidden_states:
                all_hidden_states.append(hidden_states)
            hidden_states = decoder_layer(
                hidden_states, attention_mask=attention_bias, position_embeddings=position_embeddings, cache=layer_cache
            )
        hidden_states = self.norm(hidden_states)  # [B, T, D]
        if output_hidden_states:
            all_hidden_states.append(hidden_states)

        if use_cache:
            key_values = [(layer.keys, layer.values) for layer in layer_cache.layers]
            cache = LladaPrefixCache.from_key_values(key_values, key_padding_mask, self.config)
        return LladaModelOutput(
            last_hidden_state=hidden_states,
            cache=cache,
            hidden_states=tuple(all_hidden_states) if output_hidden_states else None,
        )

    def _embed(self, input_ids, inputs_embeds) -> torch.Tensor:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` [B, T] or `inputs_embeds` [B, T, D].")
        if input_ids is not None:
            if input_ids.dim() != 2 or input_ids.numel() == 0:
                raise ValueError(f"input_ids must be [B, T] with T >= 1, got {tuple(input_ids.shape)}.")
            vocab_size = self.config.vocab_size
            if input_ids.min() < 0 or input_ids.max() >= vocab_size:
                raise ValueError(
                    f"input_ids must lie in [0, {vocab_size - 1}] (vocab_size={vocab_size}); found "
                    f"{int(input_ids.min())}..{int(input_ids.max())}. Check the tokenizer matches this model."
                )
            return self.embed_tokens(input_ids)
        hidden_size = self.config.hidden_size
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != hidden_size or inputs_embeds.shape[:2].numel() == 0:
            raise ValueError(
                f"inputs_embeds must be [B, T, hidden_size={hidden_size}] with T >= 1, got "
                f"{tuple(inputs_embeds.shape)}. Embeddings of another model size cannot be fed to this model."
            )
        return inputs_embeds

    def _checkpointing_with_grad(self) -> bool:
        return self.training and torch.is_grad_enabled() and any(layer.gradient_checkpointing for layer in self.layers)

    def _check_cache_arguments(self, cache, use_cache, attention_mask, batch_size) -> None:
        if use_cache and cache is not None:
            raise ValueError(
                "use_cache=True with a `cache` would extend the prefix cache, but it is read-only: encode the whole "
                "prefix in one call, then pass the cache alone for the answer steps."
            )
        if use_cache and attention_mask is not None and attention_mask.dim() == 4:
            raise ValueError("Encoding a prefix cache needs a 2-D padding attention_mask [B, P], not a 4-D mask.")
        if use_cache and self._checkpointing_with_grad():
            raise ValueError(
                "use_cache=True is not supported while activation checkpointing is active in training mode with "
                "gradients (the backward replay would record the prefix twice). Encode the prefix under "
                "torch.no_grad() or model.eval(), or train in one pass with `prefix_dlm_attention_mask`."
            )
        if cache is not None:
            if not isinstance(cache, LladaPrefixCache):
                raise ValueError(
                    f"`cache` must be a LladaPrefixCache from `encode_prefix` (or `use_cache=True`), got "
                    f"{type(cache).__name__}; growing caches are not used by masked diffusion."
                )
            cache.check_compatible(self.config, batch_size)

    def _key_padding_mask(self, attention_mask, cache, batch_size, query_length) -> torch.Tensor | None:
        """2-D bool mask over all keys `[B, P + T]` (True = real), or None when there is no padding info.

        FIX: the original computes a padding bias but never passes it to
        attention, so padded keys are attended to and a padded row's logits depend on its batch-mates' lengths.
        Hiding padded keys makes every row of a padded batch equal that row alone; without padding nothing changes.
        """
        if cache is None:
            if attention_mask is None:
                return None
            if attention_mask.shape != (batch_size, query_length):
                raise ValueError(
                    f"attention_mask must be [B, T] = [{batch_size}, {query_length}], "
                    f"got {tuple(attention_mask.shape)}."
                )
            key_padding_mask = attention_mask.bool()
        else:
            prefix_mask = cache.attention_mask.to(device=cache.layers[0].keys.device)  # [B, P]
            full_length = cache.prefix_length + query_length
            if attention_mask is None:
                answer_mask = torch.ones(batch_size, query_length, dtype=torch.bool, device=prefix_mask.device)
            elif attention_mask.shape == (batch_size, query_length):
                answer_mask = attention_mask.bool().to(prefix_mask.device)
            elif attention_mask.shape == (batch_size, full_length):
                if not torch.equal(attention_mask[:, : cache.prefix_length].bool().to(prefix_mask.device), prefix_mask):
                    raise ValueError(
                        "The first P columns of attention_mask [B, P + L] differ from the prefix mask stored in the "
                        "cache; pass the answer mask [B, L] alone or the same prefix mask used by encode_prefix."
                    )
                answer_mask = attention_mask[:, cache.prefix_length :].bool().to(prefix_mask.device)
            else:
                raise ValueError(
                    f"With a prefix cache, attention_mask must be [B, L] = [{batch_size}, {query_length}] or "
                    f"[B, P + L] = [{batch_size}, {full_length}], got {tuple(attention_mask.shape)}."
                )
            key_padding_mask = torch.cat([prefix_mask, answer_mask], dim=-1)  # [B, P + L]
        if not bool(key_padding_mask.any(dim=-1).all()):
            raise ValueError("Every row needs at least one real token, but attention_mask has a row of only padding.")
        return key_padding_mask

    def _four_d_attention_bias(self, attention_mask, batch_size, query_length, key_length, dtype) -> torch.Tensor:
        """Validate a caller-supplied 4-D mask and put it in the attention implementation's format."""
        if attention_mask.shape[1:] != (1, query_length, key_length) or attention_mask.shape[0] not in (1, batch_size):
            raise ValueError(
                f"A 4-D attention_mask must be [B, 1, T, K] = [{batch_size}, 1, {query_length}, {key_length}], got "
                f"{tuple(attention_mask.shape)}."
            )
        if attention_mask.dtype == torch.bool and self.config._attn_implementation == "eager":
            # Eager attention adds its mask to the scores: True = attend becomes 0, False the most negative value.
            zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
            return torch.where(attention_mask, zero, torch.finfo(dtype).min)
        return attention_mask

    @staticmethod
    def _default_position_ids(key_padding_mask, cache, batch_size, query_length, device) -> torch.Tensor:
        """`cumsum(mask) - 1` over the query tokens (0..T-1 without a 2-D mask), after the real prefix tokens."""
        if key_padding_mask is None:
            positions = torch.arange(query_length, device=device).expand(batch_size, query_length)  # [B, T]
        else:
            query_mask = key_padding_mask[:, -query_length:].long()  # [B, T]
            positions = (query_mask.cumsum(dim=-1) - 1).clamp(min=0)  # [B, T]
        if cache is not None:
            positions = positions + cache.real_lengths.to(positions.device)[:, None]
        return positions

    def _check_position_ids(self, position_ids, batch_size, query_length) -> torch.Tensor:
        if position_ids.dim() == 1:
            position_ids = position_ids[None]
        if position_ids.shape[-1] != query_length or position_ids.shape[0] not in (1, batch_size):
            raise ValueError(
                f"position_ids must be [B, T] = [{batch_size}, {query_length}], got {tuple(position_ids.shape)}."
            )
        max_positions = self.config.max_position_embeddings
        largest = int(position_ids.max())
        if largest >= max_positions or int(position_ids.min()) < 0:
            raise ValueError(
                f"Rotary positions must lie in [0, {max_positions - 1}] (max_position_embeddings={max_positions}), "
                f"but this call needs position {largest}: shorten the prefix or the answer."
            )
        return position_ids.expand(batch_size, query_length)


class LladaForMaskedDiffusion(LladaPreTrainedModel, GenerationMixin):
    """LLaDA backbone + untied LM head; a masked-diffusion language model usable without images."""

    accepts_loss_kwargs = False
    generation_config_class = DiffusionGenerationConfig

    def __init__(self, config: LladaConfig):
        super().__init__(config)
        self.model = LladaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: LladaPrefixCache | None = None,
        use_cache: bool = False,
        output_hidden_states: bool = False,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor | None = None,
    ) -> LladaOutput:
        r"""
        Inputs as `LladaModel.forward`. With a `cache`, logits are for the answer tokens only `[B, L, V]`.

        labels: `[B, T]` clean ids at masked target positions, -100 elsewhere; gives LaViDa's loss
            (`masked_diffusion_loss`, mean cross-entropy over targets).
        logits_to_keep: None keeps every position; an int keeps the last N; a tensor keeps those indices
            (`transformers.modeling_utils.slice_logits_to_keep`).
        """
        outputs = self.model(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
        )
        hidden_states = outputs.last_hidden_state  # [B, T, D]
        if logits_to_keep is not None:
            hidden_states = slice_logits_to_keep(hidden_states, logits_to_keep)
        logits = self.lm_head(hidden_states)  # [B, T, V]
        loss = masked_diffusion_loss(logits, labels) if labels is not None else None
        return LladaOutput(loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states)

    def encode_prefix(
        self,
        input_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> LladaPrefixCache:
        """Run the backbone once over the prefix (no LM head) and return its read-only cache.

        `attention_mask` `[B, P]` (1 = real) is remembered, so padded prefixes work; answer tokens then take rotary
        positions starting at each row's real prefix length.
        """
        outputs = self.model(
            input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=True
        )
        return outputs.cache

    def generate(self, input_ids=None, inputs_embeds=None, attention_mask=None, generation_config=None, **kwargs):
        """Masked-diffusion generation with the read-only prefix cache; returns the answer ids `[B, max_new_tokens]`.

        The prompt is `input_ids` `[B, P]` or `inputs_embeds` `[B, P, D]` (with `attention_mask` for padding);
        `kwargs` override `self.generation_config` (a `DiffusionGenerationConfig`: `max_new_tokens`, `block_length`,
        `steps`/`step_ratio`, `schedule`, `remasking`, `temperature`, `seed`, `stop_at_eos`, `use_prefix_cache`,
        `return_dict_in_generate`, ...). See `generation_diffusion.diffusion_generate`.
        """
        return diffusion_generate(self, input_ids=input_ids, inputs_embeds=inputs_embeds,
                                  attention_mask=attention_mask, generation_config=generation_config, **kwargs)


__all__ = [
    "LladaForMaskedDiffusion",
    "LladaModel",
    "LladaModelOutput",
    "LladaOutput",
    "LladaPreTrainedModel",
    "masked_diffusion_loss",
    "prefix_dlm_attention_mask",
]
