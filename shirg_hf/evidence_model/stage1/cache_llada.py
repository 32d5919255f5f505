"""Read-only prefix KV cache for masked-diffusion decoding with LLaDA.

LaViDa encodes the prefix (system prompt + image tokens + question + assistant header) once, then re-feeds the
whole answer window at every diffusion step against the same prefix keys/values. The cache therefore must never
grow or change: `LladaPrefixCacheLayer.update` returns `cat(prefix, new)` without storing anything, so any number
of answer calls reuse one cache with no deep copies and no crop bookkeeping.

Keys are stored AFTER rotary (positions 0..P-1 of each row's real tokens). The original code stores keys before
rotary and re-rotates [past; new] on every call; rotary is elementwise, so both are the same numbers for the same
pre-rotary keys. Against the golden data's post-rotary keys the cache is within 5e-6, not bit-exact everywhere: the
projections' float32 sums are ordered by the CPU's kernels (measured with AVX-512, `ATEN_CPU_CAPABILITY=avx2` and
`default` kernels, 1 or 2 threads; 0.0 with sdpa for the first two).
"""

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


def _read_only_error(operation: str) -> ValueError:
    return ValueError(
        f"`{operation}` is not supported on a LladaPrefixCache: the prefix cache is read-only so that every diffusion "
        "step sees the same prefix. Encode a new prefix with `model.encode_prefix(...)` instead."
    )


class LladaPrefixCacheLayer(CacheLayerMixin):
    """One layer's frozen prefix keys/values, each `[B, num_kv_heads, P, head_dim]`.

    Without autograd, `update` avoids re-copying the prefix at every diffusion step: the first call moves the
    prefix into a workspace `[B, KV, P + L, hd]` (the prefix then lives in its first P slots, which are never
    written again) and every call writes only its L new keys/values into the slots after it. With autograd (a
    cache used in training) it returns a fresh `cat(prefix, new)` instead, so no tensor saved for backward is
    overwritten.
    """

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        if keys.shape != values.shape or keys.dim() != 4:
            raise ValueError(
                f"Prefix keys and values must both be [B, num_kv_heads, P, head_dim]; got keys {tuple(keys.shape)} "
                f"and values {tuple(values.shape)}."
            )
        self.keys = keys  # [B, KV, P, hd]
        self.values = values  # [B, KV, P, hd]
        self._workspace = None  # (keys, values) [B, KV, P + L, hd] once answers ran without autograd
        self.device = keys.device
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise _read_only_error("lazy_initialization")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Return prefix + new keys and values `[B, KV, P + L, hd]`; the stored prefix is left untouched."""
        if torch.is_grad_enabled() and (key_states.requires_grad or value_states.requires_grad):
            keys = torch.cat([self.keys.to(key_states.device), key_states], dim=-2)  # [B, KV, P + L, hd]
            values = torch.cat([self.values.to(value_states.device), value_states], dim=-2)  # [B, KV, P + L, hd]
            return keys, values
        prefix_length, total = self.keys.shape[-2], self.keys.shape[-2] + key_states.shape[-2]
        workspace = self._workspace
        if workspace is None or workspace[0].shape[-2] < total or workspace[0].device != key_states.device \
                or workspace[0].dtype != key_states.dtype:
            workspace = tuple(
                torch.cat([stored.to(key_states.device, key_states.dtype), new], dim=-2)  # [B, KV, P + L, hd]
                for stored, new in ((self.keys, key_states), (self.values, value_states))
            )
            self._workspace = workspace
            self.keys, self.values = (buffer[..., :prefix_length, :] for buffer in workspace)  # share, don't copy
        else:
            workspace[0][..., prefix_length:total, :] = key_states
            workspace[1][..., prefix_length:total, :] = value_states
        return workspace[0][..., :total, :], workspace[1][..., :total, :]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return self.keys.shape[-2]

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        raise _read_only_error("reset")

    def crop(self, tokens_to_remove: int) -> None:
        raise _read_only_error("crop")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise _read_only_error("reorder_cache")


class LladaPrefixCache(Cache):
    """Frozen prefix K/V of every layer, the prefix's 2-D padding mask and the model size it came from.

    Built by `LladaForMaskedDiffusion.encode_prefix` (or `forward(..., use_cache=True)`); pass it as `cache=` to
    run answer tokens against the prefix any number of times.

    Attributes:
        attention_mask: `[B, P]` bool, True at real (unpadded) prefix tokens.
        real_lengths: `[B]` long, number of real prefix tokens per row; answer rotary positions start there.
        model_size: dict of `hidden_size`, `num_hidden_layers`, `num_key_value_heads`, `head_dim` of the encoder.
    """

    MODEL_SIZE_FIELDS = ("hidden_size", "num_hidden_layers", "num_key_value_heads", "head_dim")

    def __init__(self, layers: list[LladaPrefixCacheLayer], attention_mask: torch.Tensor, model_size: dict):
        super().__init__(layers=layers)
        batch_size, prefix_length = layers[0].keys.shape[0], layers[0].keys.shape[-2]
        if attention_mask.shape != (batch_size, prefix_length):
            raise ValueError(
                f"Prefix attention_mask must be [B, P] = [{batch_size}, {prefix_length}], "
                f"got {tuple(attention_mask.shape)}."
            )
        missing = [field for field in self.MODEL_SIZE_FIELDS if field not in model_size]
        if missing:
            raise ValueError(f"model_size is missing {missing}; expected the fields {list(self.MODEL_SIZE_FIELDS)}.")
        self.attention_mask = attention_mask.to(dtype=torch.bool)  # [B, P]
        self.real_lengths = self.attention_mask.sum(dim=-1)  # [B]
        self.model_size = {field: int(model_size[field]) for field in self.MODEL_SIZE_FIELDS}

    @classmethod
    def from_key_values(cls, key_values, attention_mask: torch.Tensor | None, config) -> "LladaPrefixCache":
        """Freeze `[(keys, values), ...]` per layer (post-rotary, `[B, KV, P, hd]`) encoded by a model with `config`."""
        layers = [LladaPrefixCacheLayer(keys, values) for keys, values in key_values]
        if not layers:
            raise ValueError("Cannot build a LladaPrefixCache from zero layers.")
        batch_size, _, prefix_length, _ = layers[0].keys.shape
        if attention_mask is None:
            attention_mask = torch.ones(batch_size, prefix_length, dtype=torch.bool, device=layers[0].keys.device)
        model_size = {field: getattr(config, field) for field in cls.MODEL_SIZE_FIELDS}
        return cls(layers, attention_mask, model_size)

    @property
    def batch_size(self) -> int:
        return self.layers[0].keys.shape[0]

    @property
    def prefix_length(self) -> int:
        """Stored prefix length P, padding included."""
        return self.layers[0].get_seq_length()

    def select_rows(self, index: torch.Tensor) -> "LladaPrefixCache":
        """A new read-only cache of the prefix rows `index` (e.g. the rows still decoding); this one is unchanged."""
        layers = [LladaPrefixCacheLayer(layer.keys.index_select(0, index), layer.values.index_select(0, index))
                  for layer in self.layers]
        return LladaPrefixCache(layers, self.attention_mask.index_select(0, index), self.model_size)

    def check_compatible(self, config, batch_size: int) -> None:
        """Raise `ValueError` if this cache came from a model of another size or another batch size."""
        expected = {field: getattr(config, field) for field in self.MODEL_SIZE_FIELDS}
        if expected != self.model_size:
            raise ValueError(
                f"This prefix cache was encoded by a model of size {self.model_size}, but it is used with a model of "
                f"size {expected}. Encode the prefix with the same model that runs the answer steps."
            )
        if len(self.layers) != config.num_hidden_layers:
            raise ValueError(
                f"The prefix cache holds {len(self.layers)} layers but the model has {config.num_hidden_layers}."
            )
        if batch_size != self.batch_size:
            raise ValueError(
                f"The answer batch has {batch_size} rows but the prefix cache was encoded for {self.batch_size} rows; "
                "use one prefix row per answer row."
            )

    def crop(self, tokens_to_remove: int) -> None:
        raise _read_only_error("crop")

    def reset(self) -> None:
        raise _read_only_error("reset")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise _read_only_error("reorder_cache")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise _read_only_error("batch_repeat_interleave")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise _read_only_error("batch_select_indices")


__all__ = ["LladaPrefixCache", "LladaPrefixCacheLayer"]
