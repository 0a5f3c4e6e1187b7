"""The sampling maths (logit bias, OpenAI penalties, logprobs) on small tensors."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoTokenizer

from kensho.demo import DEMO_MODEL_DIR
from kensho.errors import InvalidRequestError
from kensho.runtime.engines._sampling import LogitsProcessor, sampling_scores, top_logprobs
from kensho.runtime.engines._token_text import TokenText
from kensho.runtime.engines.base import GenerationRequest
from kensho.runtime.engines.torch_engine import _sample


def request(**options: object) -> GenerationRequest:
    return GenerationRequest(prompt="x", **options)  # type: ignore[arg-type]


LOGITS = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0]])


def test_no_bias_no_penalty_leaves_the_logits_alone() -> None:
    processor = LogitsProcessor(request(), vocab_size=5)
    assert not processor.active
    assert torch.equal(processor(LOGITS), LOGITS)


def test_logit_bias_is_added_to_the_named_ids_only() -> None:
    processor = LogitsProcessor(request(logit_bias=((1, 5.0), (3, -100.0))), vocab_size=5)
    out = processor(LOGITS)
    assert out.tolist() == [[2.0, 6.0, 0.5, -101.0, 0.0]]
    assert LOGITS.tolist() == [[2.0, 1.0, 0.5, -1.0, 0.0]]  # the input is not modified
    assert int(torch.argmax(out).item()) == 1


def test_a_bias_of_minus_100_bans_a_token_from_sampling() -> None:
    logits = torch.zeros(1, 5)
    processor = LogitsProcessor(request(logit_bias=((2, -100.0),)), vocab_size=5)
    generator = torch.Generator().manual_seed(0)
    drawn = {int(_sample(processor(logits), request(), generator).item()) for _ in range(500)}
    assert 2 not in drawn
    assert drawn == {0, 1, 3, 4}


def test_penalties_follow_the_openai_formula() -> None:
    # generated so far: id 0 three times, id 2 once
    processor = LogitsProcessor(
        request(frequency_penalty=0.5, presence_penalty=1.5), vocab_size=5, generated=[0, 2, 0]
    )
    processor.observe(0)
    out = processor(LOGITS)
    expected = [
        2.0 - (3 * 0.5 + 1.5),
        1.0,
        0.5 - (1 * 0.5 + 1.5),
        -1.0,
        0.0,
    ]
    assert out[0].tolist() == pytest.approx(expected)


def test_negative_penalties_favour_repetition() -> None:
    processor = LogitsProcessor(request(presence_penalty=-2.0), vocab_size=5, generated=[3])
    assert processor(LOGITS)[0, 3].item() == pytest.approx(1.0)


def test_a_wider_lm_head_than_the_vocabulary_keeps_the_extra_ids() -> None:
    processor = LogitsProcessor(request(logit_bias=((0, 1.0),)), vocab_size=3)
    out = processor(LOGITS)
    assert out.tolist() == [[3.0, 1.0, 0.5, -1.0, 0.0]]


def test_a_bias_outside_the_vocabulary_names_logit_bias() -> None:
    with pytest.raises(InvalidRequestError) as err:
        LogitsProcessor(request(logit_bias=((5, 1.0),)), vocab_size=5)
    assert err.value.param == "logit_bias"
    assert "token id 5" in str(err.value)


def test_logprobs_are_the_log_softmax_of_what_is_sampled_from() -> None:
    scores = sampling_scores(LOGITS, 0.5)
    chosen, top = top_logprobs(scores, 2, 3)
    probs = torch.softmax(LOGITS / 0.5, dim=-1)[0]
    assert chosen == pytest.approx(math.log(probs[2].item()), abs=1e-6)
    assert [i for i, _ in top] == [0, 1, 2]
    assert [lp for _, lp in top] == pytest.approx([math.log(p) for p in probs[:3].tolist()])
    everything = top_logprobs(scores, 0, 5)[1]
    assert math.fsum(math.exp(lp) for _, lp in everything) == pytest.approx(1.0)


def test_greedy_logprobs_use_the_unscaled_logits() -> None:
    assert torch.equal(sampling_scores(LOGITS, 0), LOGITS)
    chosen, top = top_logprobs(sampling_scores(LOGITS, 0), 0, 0)
    assert top == []
    assert chosen == pytest.approx(torch.log_softmax(LOGITS, -1)[0, 0].item())


def test_token_bytes_rebuild_characters_split_across_tokens() -> None:
    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL_DIR, local_files_only=True)
    text = "café crème brûlée"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    token_text = TokenText(tokenizer)
    pieces = [token_text(i) for i in ids]
    assert b"".join(raw for _, raw in pieces).decode("utf-8") == text
    assert any(shown == "\ufffd" for shown, _ in pieces)  # a half character on its own
