"""Pure torch math for RLHF: no transformers import, no I/O, no logging.

Every function takes tensors and plain numbers and returns tensors (losses as (loss, stats)).
"""

from tether.core.advantages import compute_gae, group_advantages, last_true_index, per_token_rewards
from tether.core.kl import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    kl_per_token,
    make_kl_controller,
)
from tether.core.logprobs import logprobs_and_entropy, logprobs_from_logits, sample_tokens
from tether.core.losses import clipped_value_loss, kl_loss, ppo_policy_loss
from tether.core.masked import (
    explained_variance,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
)
from tether.core.supervised import dpo_loss, pairwise_loss, response_nll

__all__ = [
    "KL_ESTIMATORS",
    "AdaptiveKLController",
    "FixedKLController",
    "clipped_value_loss",
    "compute_gae",
    "dpo_loss",
    "explained_variance",
    "group_advantages",
    "kl_loss",
    "kl_per_token",
    "last_true_index",
    "logprobs_and_entropy",
    "logprobs_from_logits",
    "make_kl_controller",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "pairwise_loss",
    "per_token_rewards",
    "ppo_policy_loss",
    "response_nll",
    "sample_tokens",
]
