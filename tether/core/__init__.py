"""Pure torch math for RLHF: no transformers import, no I/O, no logging.

Every function takes tensors and plain numbers and returns tensors (losses as (loss, stats)).
"""

from tether.core.advantages import (
    compute_gae,
    discounted_returns,
    group_advantages,
    informative_groups,
    last_true_index,
    overlong_penalty,
    per_token_rewards,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    rloo_advantages,
    spread_over_tokens,
)
from tether.core.kl import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    kl_per_token,
    make_kl_controller,
    truncated_is_weights,
)
from tether.core.logprobs import logprobs_and_entropy, logprobs_from_logits, sample_tokens
from tether.core.losses import (
    AGGREGATIONS,
    aggregate,
    clipped_policy_loss,
    clipped_surrogate,
    clipped_value_loss,
    gspo_policy_loss,
    kl_loss,
    loss_normaliser,
    ppo_policy_loss,
    sequence_log_ratio,
)
from tether.core.masked import (
    explained_variance,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
)
from tether.core.supervised import dpo_loss, pairwise_loss, response_nll

__all__ = [
    "AGGREGATIONS",
    "KL_ESTIMATORS",
    "AdaptiveKLController",
    "FixedKLController",
    "aggregate",
    "clipped_policy_loss",
    "clipped_surrogate",
    "clipped_value_loss",
    "compute_gae",
    "discounted_returns",
    "dpo_loss",
    "explained_variance",
    "group_advantages",
    "gspo_policy_loss",
    "informative_groups",
    "kl_loss",
    "kl_per_token",
    "last_true_index",
    "logprobs_and_entropy",
    "logprobs_from_logits",
    "loss_normaliser",
    "make_kl_controller",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "overlong_penalty",
    "pairwise_loss",
    "per_token_rewards",
    "ppo_policy_loss",
    "reinforce_pp_advantages",
    "reinforce_pp_baseline_advantages",
    "response_nll",
    "rloo_advantages",
    "sample_tokens",
    "sequence_log_ratio",
    "spread_over_tokens",
    "truncated_is_weights",
]
