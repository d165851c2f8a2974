"""Fine-tuning from human ratings: a minimal, correct form of RLHF.

A person reads the model's `response` to a `prompt` and rates it with a reward r in
[-1, 1]. Each rating is one policy-gradient step (REINFORCE with a baseline) on the
response tokens only, with a KL penalty that keeps the model near where it started:

    logp_t = log pi(y_t | prompt, y_<t)                      for each response token y_t
    A      = r - b                                           b: running mean of past rewards
    KL_t   = sum_v pi(v | ...) (log pi(v | ...) - log pi_ref(v | ...))   pi_ref: a frozen copy
    loss   = -A * mean_t(logp_t) + kl_coef * mean_t(KL_t)
    b     <- momentum * b + (1 - momentum) * r

The advantage A makes a rating count relative to what the rater usually gives (a
constant reward teaches nothing once the baseline has caught up); the exact KL over
the vocabulary (not a one-sample estimate) pulls the whole next-token distribution
back towards the starting model, so a few ratings cannot wreck it.
"""

from __future__ import annotations

import copy
import math
from numbers import Real

import torch
import torch.nn.functional as F

from ..analysis import evaluating, prompt_ids

__all__ = ["FeedbackTrainer", "check_reward"]


def check_reward(reward) -> float:
    """`reward` as a float, or ValueError unless it is a finite number in [-1, 1]."""
    if isinstance(reward, bool) or not isinstance(reward, Real):
        raise TypeError(f"reward must be a number in [-1, 1], got {type(reward).__name__} {reward!r}")
    value = float(reward)
    if not (math.isfinite(value) and -1.0 <= value <= 1.0):
        raise ValueError(f"reward must be a finite number in [-1, 1], got {reward!r}")
    return value


class FeedbackTrainer:
    """Applies one rated (prompt, response) pair at a time to `model`, in place.

    Args:
        model: the GPT to tune (its parameters are updated).
        tokenizer: the model's tokenizer (`pyminigpt.tokenizer`).
        lr: AdamW learning rate (no weight decay).
        kl_coef: weight of the KL penalty towards the frozen starting model.
        baseline_momentum: in [0, 1); how slowly the reward baseline follows the rewards.
        max_grad_norm: gradient clipping norm (None: no clipping).
        sos: start every prompt with <SOS> (models trained on `<SOS> text <EOS>`
            sequences); an empty prompt always gets it (see `analysis.prompt_ids`).
    """

    def __init__(
        self,
        model,
        tokenizer,
        lr: float = 1e-4,
        kl_coef: float = 0.1,
        baseline_momentum: float = 0.9,
        max_grad_norm: float | None = 1.0,
        sos: bool = False,
    ):
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr!r}")
        if not kl_coef >= 0:
            raise ValueError(f"kl_coef must be >= 0, got {kl_coef!r}")
        if not 0.0 <= baseline_momentum < 1.0:
            raise ValueError(f"baseline_momentum must be in [0, 1), got {baseline_momentum!r}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.kl_coef = float(kl_coef)
        self.baseline_momentum = float(baseline_momentum)
        self.max_grad_norm = max_grad_norm
        self.sos = bool(sos)
        self.reference = copy.deepcopy(model).eval().requires_grad_(False)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        self.baseline = 0.0
        self.rewards: list[float] = []

    def _sequence(self, prompt: str, response: str) -> tuple[torch.Tensor, int]:
        """prompt + response token ids (1-D) and how many of them are the prompt."""
        if not isinstance(prompt, str) or not isinstance(response, str):
            raise TypeError(
                f"prompt and response must be str, got {type(prompt).__name__} and {type(response).__name__}"
            )
        prompt_tokens = prompt_ids(self.tokenizer, prompt, self.sos)
        response_ids = list(self.tokenizer.encode(response))
        if not response_ids:
            raise ValueError("response is empty: there is nothing to rate")
        context = int(self.model.config.n_positions)
        if len(response_ids) >= context:
            raise ValueError(f"response is {len(response_ids)} tokens; it must be shorter than the context ({context})")
        prompt_tokens = prompt_tokens[-(context - len(response_ids)) :]  # keep the end of a long prompt
        device = next(self.model.parameters()).device
        return torch.tensor(prompt_tokens + response_ids, device=device), len(prompt_tokens)

    @staticmethod
    def _response_log_probs(model, ids: torch.Tensor, n_prompt: int) -> torch.Tensor:
        """log pi(. | prefix) at each response position: (R, V); row t predicts ids[n_prompt + t]."""
        logits = model(ids[None]).logits[0, n_prompt - 1 : -1]
        return F.log_softmax(logits.float(), dim=-1)

    def step(self, prompt: str, response: str, reward: float) -> dict[str, float]:
        """One update from a rating of `response` to `prompt`, reward in [-1, 1].

        Returns loss, logprob (mean per response token, before the update), kl (mean per
        response token, before the update), advantage, baseline (after the update) and reward.
        """
        reward = check_reward(reward)
        ids, n_prompt = self._sequence(prompt, response)
        targets = ids[n_prompt:, None]

        with evaluating(self.model):  # no dropout: score exactly the policy that answered
            log_probs = self._response_log_probs(self.model, ids, n_prompt)
            with torch.no_grad():
                ref_log_probs = self._response_log_probs(self.reference, ids, n_prompt)
            logprob = log_probs.gather(-1, targets).mean()
            kl = (log_probs.exp() * (log_probs - ref_log_probs)).sum(-1).mean()
            advantage = reward - self.baseline
            loss = -advantage * logprob + self.kl_coef * kl

            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
            self.optimizer.step()

        self.baseline = self.baseline_momentum * self.baseline + (1.0 - self.baseline_momentum) * reward
        self.rewards.append(reward)
        return {
            "loss": loss.item(),
            "logprob": logprob.item(),
            "kl": kl.item(),
            "advantage": advantage,
            "baseline": self.baseline,
            "reward": reward,
        }

    @torch.no_grad()
    def response_logprob(self, prompt: str, response: str) -> float:
        """Mean log-probability per token of `response` after `prompt` under the current model."""
        ids, n_prompt = self._sequence(prompt, response)
        with evaluating(self.model):
            log_probs = self._response_log_probs(self.model, ids, n_prompt)
        return log_probs.gather(-1, ids[n_prompt:, None]).mean().item()
