"""Adaptive decoding (Fast-dLLM's threshold and factor rules), the vectorised sampler and early stop.

A scripted stand-in model gives hand-made probabilities, so the exact tokens and step counts of each rule can be
checked; the tiny random LLaDA of `test_generation.py` checks batch, padding and thread invariance end to end.
"""

import math
from types import SimpleNamespace

import pytest
import torch

from shirg_hf import LladaConfig
from shirg_hf.modeling.generation_diffusion import diffusion_generate

from test_generation import MASK_ID, build_peaked_tiny_model, left_pad, prompt_ids

VOCAB, MASK, EOS, PAD = 8, 7, 6, 5


class ScriptCache:
    """Prefix-cache stand-in holding each row's script key (its first prompt id)."""

    def __init__(self, keys: torch.Tensor):
        self.keys = keys  # [b]
        self.attention_mask = torch.ones(len(keys), 1, dtype=torch.bool)

    def select_rows(self, index: torch.Tensor) -> "ScriptCache":
        return ScriptCache(self.keys[index])


class ScriptedModel(torch.nn.Module):
    """`scripts[key][call]` = one (token, probability) per answer position; a row's k-th call reads entry k.

    The rest of each position's probability is spread evenly over the other tokens, so `token` is the argmax
    and its probability is the low_confidence score. A row's logits depend on its own calls only.
    """

    def __init__(self, scripts: dict):
        super().__init__()
        self.scripts = scripts
        self.calls = {key: 0 for key in scripts}
        self.batch_rows = []  # rows of every denoising call
        self.config = LladaConfig(vocab_size=VOCAB, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                  num_attention_heads=1, num_key_value_heads=1, max_position_embeddings=64,
                                  mask_token_id=MASK, eos_token_id=EOS, pad_token_id=PAD, bos_token_id=None,
                                  eot_token_id=None)

    def encode_prefix(self, input_ids=None, inputs_embeds=None, attention_mask=None) -> ScriptCache:
        return ScriptCache(input_ids[:, 0])

    def forward(self, input_ids=None, cache=None, **kwargs):
        self.batch_rows.append(input_ids.shape[0])
        logits = []
        for key in cache.keys.tolist():
            script = self.scripts[key]
            entries = script[min(self.calls[key], len(script) - 1)]
            self.calls[key] += 1
            probs = torch.empty(input_ids.shape[1], VOCAB, dtype=torch.float64)
            for position, (token, probability) in enumerate(entries):
                probs[position] = (1 - probability) / (VOCAB - 1)
                probs[position, token] = probability
            logits.append(probs.log().float())
        return SimpleNamespace(logits=torch.stack(logits))


def run(scripts, keys, **settings):
    model = ScriptedModel(scripts)
    settings = dict(dict(max_new_tokens=4, decoding="threshold", return_dict_in_generate=True), **settings)
    return model, diffusion_generate(model, input_ids=torch.tensor(keys)[:, None], **settings)


def states(output, row=0):
    return [state[row].tolist() for state in output.history]


M = MASK
THRESHOLD_SCRIPT = [
    [(1, 0.95), (2, 0.60), (3, 0.92), (4, 0.50)],  # two pass 0.9: positions 0 and 2
    [(1, 0.95), (2, 0.70), (3, 0.92), (4, 0.80)],  # none passes: the best one, position 3
    [(1, 0.95), (2, 0.85), (3, 0.92), (4, 0.80)],  # none passes: the only one left, position 1
]
FACTOR_SCRIPT = [[(1, 0.95), (2, 0.80), (3, 0.92), (4, 0.50)]]  # the same at every call
LOW_SCRIPT = [[(1, 0.30), (2, 0.35), (3, 0.40), (4, 0.25)] * 2]  # 8 positions, nothing near 0.9


def test_threshold_rule_on_scripted_logits():
    _, output = run({0: THRESHOLD_SCRIPT}, [0], threshold=0.9)
    assert states(output) == [[1, M, 3, M], [1, M, 3, 4], [1, 2, 3, 4]]
    assert output.num_forward_passes == 1 + 3 and output.num_saved_steps == 4 - 3
    assert output.num_forward_passes_per_row.tolist() == [4]
    assert output.tokens_per_forward.tolist() == pytest.approx([4 / 3])
    # A lower bar takes position 1 at the first step as well.
    _, output = run({0: THRESHOLD_SCRIPT}, [0], threshold=0.55)
    assert states(output) == [[1, 2, 3, M], [1, 2, 3, 4]]


def test_factor_rule_on_scripted_logits():
    # Sorted scores 0.95, 0.92, 0.80, 0.50: (n + 1)(1 - c_n) = 0.10, 0.24, 0.80, 2.50 -> n = 3 below f = 1.
    _, output = run({0: FACTOR_SCRIPT}, [0], decoding="factor", factor=1.0)
    assert states(output) == [[1, 2, 3, M], [1, 2, 3, 4]]
    assert output.num_forward_passes == 1 + 2
    _, output = run({0: FACTOR_SCRIPT}, [0], decoding="factor", factor=0.5)  # 0.80 >= 0.5: n = 2
    assert states(output) == [[1, M, 3, M], [1, 2, 3, M], [1, 2, 3, 4]]
    _, output = run({0: FACTOR_SCRIPT}, [0], threshold=0.9)  # the threshold rule takes 2, then 1 per step
    assert states(output)[0] == [1, M, 3, M] and output.num_forward_passes == 1 + 3


@pytest.mark.parametrize("decoding", ["threshold", "factor"])
def test_at_least_one_token_per_step(decoding):
    _, output = run({0: LOW_SCRIPT}, [0], max_new_tokens=8, block_length=4, decoding=decoding)
    # Block 0 by score (0.40, 0.35, 0.30, 0.25 at positions 2, 1, 0, 3), then block 1 the same way.
    order = [2, 1, 0, 3, 6, 5, 4, 7]
    expected, answer = [], [M] * 8
    for position in order:
        answer = list(answer)
        answer[position] = [1, 2, 3, 4][position % 4]
        expected.append(answer)
    assert states(output) == expected
    assert output.num_forward_passes == 1 + 8 and output.tokens_per_forward.tolist() == [1.0]


def test_max_steps_caps_each_block_and_its_last_step_writes_every_candidate():
    _, output = run({0: LOW_SCRIPT}, [0], max_new_tokens=8, block_length=4, max_steps=2)
    assert states(output) == [
        [M, M, 3, M, M, M, M, M],
        [1, 2, 3, 4, M, M, M, M],  # the cap: block 0's second step writes all it has left
        [1, 2, 3, 4, M, M, 3, M],
        [1, 2, 3, 4, 1, 2, 3, 4],
    ]
    assert output.num_forward_passes == 1 + 4 and output.num_saved_steps == 0
    assert output.tokens_per_forward.tolist() == [2.0]


def test_adaptive_rules_never_take_more_steps_than_the_cap_on_a_real_model():
    model = build_peaked_tiny_model()
    input_ids, attention_mask = left_pad(prompt_ids([5, 9]))
    for decoding in ("threshold", "factor"):
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=16,
                                block_length=8, decoding=decoding, max_steps=3, return_dict_in_generate=True)
        assert output.num_forward_passes <= 1 + 2 * 3
        assert bool((output.num_forward_passes_per_row <= 1 + 2 * 3).all())
        assert not (output.sequences == MASK_ID).any()  # the last allowed step decodes what is left


# ---- the vectorised sampler: batch, padding and thread invariance -----------------------------------------


def right_pad(prompts, pad_id=510):
    width = max(len(prompt) for prompt in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, :len(prompt)] = prompt
        attention_mask[row, :len(prompt)] = 1
    return input_ids, attention_mask


DECODINGS = [
    dict(decoding="schedule"),
    dict(decoding="schedule", temperature=0.8, remasking="random"),
    dict(decoding="threshold", threshold=0.5),
    dict(decoding="threshold", threshold=0.7, temperature=0.8),
    dict(decoding="factor", factor=1.0, remasking="margin"),
]


@pytest.fixture(scope="module")
def model():
    return build_peaked_tiny_model()


@pytest.mark.parametrize("settings", DECODINGS)
@pytest.mark.parametrize("pad", [left_pad, right_pad])
@pytest.mark.parametrize("use_prefix_cache", [True, False])
def test_batch_rows_equal_rows_alone(model, settings, pad, use_prefix_cache):
    prompts = prompt_ids([5, 11, 8])
    input_ids, attention_mask = pad(prompts)
    settings = dict(settings, max_new_tokens=16, block_length=8, seed=[7, 8, 9], use_prefix_cache=use_prefix_cache,
                    return_dict_in_generate=True)
    batched = model.generate(input_ids=input_ids, attention_mask=attention_mask, **settings)
    for row, prompt in enumerate(prompts):
        alone = model.generate(input_ids=prompt[None], **dict(settings, seed=[7 + row]))
        assert torch.equal(batched.sequences[row], alone.sequences[0]), f"row {row}"
        assert batched.num_forward_passes_per_row[row] == alone.num_forward_passes_per_row[0]
        assert batched.tokens_per_forward[row] == alone.tokens_per_forward[0]


@pytest.mark.parametrize("settings", DECODINGS)
def test_same_tokens_with_one_or_two_threads(model, settings):
    input_ids, attention_mask = left_pad(prompt_ids([6, 10, 3]))
    settings = dict(settings, max_new_tokens=16, block_length=8, seed=3, return_dict_in_generate=True)
    threads = torch.get_num_threads()
    outputs = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            outputs.append(model.generate(input_ids=input_ids, attention_mask=attention_mask, **settings))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outputs[0].history, outputs[1].history)
    assert torch.equal(outputs[0].num_forward_passes_per_row, outputs[1].num_forward_passes_per_row)


# ---- early stop that pays ----------------------------------------------------------------------------------

EOS_SCRIPT = [[(EOS, 0.99)] + [(1, 0.30 + 0.01 * position) for position in range(7)]]
LONG_SCRIPT = [[(1, 0.30 + 0.01 * position) for position in range(8)]]


def test_finished_rows_leave_the_forward_batch():
    scripts = {0: EOS_SCRIPT, 1: LONG_SCRIPT}
    model, output = run(scripts, [0, 1], max_new_tokens=8, stop_at_eos=True)
    assert output.sequences[0].tolist() == [EOS] + [PAD] * 7
    assert model.batch_rows == [2] + [1] * 7  # the EOS row ran one step, the other all eight
    assert output.num_forward_passes_per_row.tolist() == [1 + 1, 1 + 8]
    model, output = run(scripts, [0, 1], max_new_tokens=8)
    assert model.batch_rows == [2] * 8  # without stop_at_eos every row decodes every position
    assert output.num_forward_passes_per_row.tolist() == [1 + 8, 1 + 8]


@pytest.mark.parametrize("decoding", ["schedule", "threshold"])
def test_the_call_ends_when_every_row_has_finished(decoding):
    scripts = {0: EOS_SCRIPT, 2: EOS_SCRIPT}
    settings = dict(max_new_tokens=8, decoding=decoding, step_ratio=1.0, schedule="linear")
    model, output = run(scripts, [0, 2], stop_at_eos=True, **settings)
    assert model.batch_rows == [2] and output.num_forward_passes == 1 + 1
    assert output.num_saved_steps == 8 - 1
    model, _ = run(scripts, [0, 2], **settings)
    assert model.batch_rows == [2] * 8


def test_early_stop_saves_backbone_rows_on_a_real_model(model):
    """Forward hooks on the backbone: rows computed per call, with and without stop_at_eos."""
    input_ids, attention_mask = left_pad(prompt_ids([6, 9]))
    settings = dict(max_new_tokens=16, block_length=4, step_ratio=None, schedule="linear", return_dict_in_generate=True)
    full = model.generate(input_ids=input_ids, attention_mask=attention_mask, **settings).sequences
    stop_settings = dict(settings, stop_at_eos=True, eos_token_id=[int(full[0, 0])], pad_token_id=510)
    rows_per_call = {}
    for name, run_settings in (("off", settings), ("on", stop_settings)):
        rows_per_call[name] = []
        handle = model.model.register_forward_hook(
            lambda module, args, kwargs, output: rows_per_call[name].append(
                (kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]).shape[0]),
            with_kwargs=True)
        try:
            output = model.generate(input_ids=input_ids, attention_mask=attention_mask, **run_settings)
        finally:
            handle.remove()
        assert sum(rows_per_call[name]) == int(output.num_forward_passes_per_row.sum())
        assert len(rows_per_call[name]) == output.num_forward_passes
    assert output.num_forward_passes_per_row[0] <= 1 + 4  # row 0 ends within block 0: it leaves the batch
    assert sum(rows_per_call["on"]) < sum(rows_per_call["off"]) == 2 * (1 + 16)
    assert not math.isnan(float(output.tokens_per_forward.sum()))


# ---- options ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings,message",
    [
        (dict(decoding="greedy"), r"Unknown decoding 'greedy'; expected one of \('schedule', 'threshold', 'factor'\)"),
        (dict(decoding="threshold", threshold=1.5), r"threshold must be a number in \(0, 1\]"),
        (dict(decoding="threshold", threshold=0), r"threshold must be a number in \(0, 1\]"),
        (dict(decoding="factor", factor=0), "factor must be a number > 0"),
        (dict(decoding="factor", factor=math.nan), "factor must be a number > 0"),
        (dict(decoding="threshold", max_steps=0), "max_steps must be an integer >= 1 or None"),
        (dict(decoding="threshold", remasking="random"), "use remasking in .'low_confidence', 'margin'. or decoding"),
        (dict(decoding="factor", remasking="entropy"), "remasking='entropy' gives none"),
    ],
)
def test_bad_decoding_options_raise_before_any_forward_pass(settings, message):
    model = ScriptedModel({0: LOW_SCRIPT})
    with pytest.raises(ValueError, match=message):
        diffusion_generate(model, input_ids=torch.zeros(1, 1, dtype=torch.long), max_new_tokens=4, **settings)
    assert model.batch_rows == []
