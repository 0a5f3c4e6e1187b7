"""The sampling maths of the torch engine: logit bias, OpenAI penalties, logprobs.

Kept apart from the decoding loop so the maths can be tested on small tensors, and so
every engine built on torch shares one definition. The order is OpenAI's (and vLLM's):

1. ``logit_bias`` is added to the model's logits;
2. the penalties are subtracted, counted over the tokens generated so far (the
   completion, continuation included, never the prompt)::

       logits[j] -= count[j] * frequency_penalty + (count[j] > 0) * presence_penalty

3. the result is divided by the temperature (left as is for greedy decoding).

What comes out of step 3 is the distribution the next token is drawn from, and the
log-softmax of exactly that is what ``logprobs`` report: a token sampled at
temperature 1.5 reports the probability it was sampled with, not the raw model's.
(Top-p truncation is a cut of that distribution, not a new one: the logprobs are those
of the distribution before the cut, as in vLLM.)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from kensho.errors import InvalidRequestError
from kensho.runtime.engines.base import GenerationRequest

__all__ = ["LogitsProcessor", "sampling_scores", "top_logprobs"]


class LogitsProcessor:
    """Applies a request's logit bias and penalties to each step's logits.

    ``vocab_size`` bounds the biased token ids (an id out of range is the client's
    error, named as ``logit_bias``); ``generated`` are token ids already produced for
    this request (a continuation), which the penalties count like new ones.
    """

    def __init__(
        self,
        request: GenerationRequest,
        vocab_size: int,
        *,
        device: Any = "cpu",
        generated: Iterable[int] = (),
    ) -> None:
        import torch

        self.frequency_penalty = request.frequency_penalty
        self.presence_penalty = request.presence_penalty
        self._bias: Any = None
        if request.logit_bias:
            bias = torch.zeros(vocab_size, dtype=torch.float32)
            for token_id, value in request.logit_bias:
                if not 0 <= token_id < vocab_size:
                    raise InvalidRequestError(
                        f"logit_bias: token id {token_id} is not in this model's "
                        f"vocabulary (0 to {vocab_size - 1})",
                        param="logit_bias",
                    )
                bias[token_id] = value
            self._bias = bias.to(device)
        self._counts: Any = None
        if self.frequency_penalty or self.presence_penalty:
            self._counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)
            for token_id in generated:
                self.observe(token_id)

    @property
    def active(self) -> bool:
        """False when the logits pass through unchanged (no bias, no penalty)."""
        return self._bias is not None or self._counts is not None

    def observe(self, token_id: int) -> None:
        """Count one generated token (for the penalties)."""
        if self._counts is not None and 0 <= token_id < self._counts.shape[-1]:
            self._counts[token_id] += 1

    def __call__(self, logits: Any) -> Any:
        """The processed logits (float32, same shape); the input is not modified."""
        scores = logits.float()
        width = scores.shape[-1]
        if self._bias is not None:
            scores = _add_prefix(scores, self._bias, width)
        if self._counts is not None:
            counts = self._counts
            penalty = counts * self.frequency_penalty + (counts > 0).float() * self.presence_penalty
            scores = _add_prefix(scores, -penalty, width)
        return scores


def _add_prefix(scores: Any, delta: Any, width: int) -> Any:
    """``scores + delta`` over the first ``len(delta)`` ids: a model's LM head may be
    wider than its tokenizer's vocabulary (padded), the extra ids are left alone."""
    n = min(width, delta.shape[-1])
    if n == width:
        return scores + delta[:width]
    out = scores.clone()
    out[..., :n] += delta[:n]
    return out


def sampling_scores(logits: Any, temperature: float) -> Any:
    """The scores the next token is drawn from: logits over the temperature (as is
    for greedy decoding at temperature 0)."""
    scores = logits.float()
    return scores if temperature == 0 else scores / temperature


def top_logprobs(scores: Any, token_id: int, n: int) -> tuple[float, list[tuple[int, float]]]:
    """The log-probability of ``token_id`` under ``softmax(scores)`` and the ``n`` most
    likely ids with theirs (most likely first). ``scores`` is one row (``[V]`` or
    ``[1, V]``)."""
    import torch

    logprobs = torch.log_softmax(scores.float().reshape(-1), dim=-1)
    chosen = float(logprobs[token_id].item())
    if n <= 0:
        return chosen, []
    values, ids = torch.topk(logprobs, min(n, logprobs.shape[-1]))
    return chosen, list(zip(ids.tolist(), values.tolist(), strict=True))
