"""tether: PPO-based RLHF for Hugging Face causal language models.

The policy may move toward higher reward, but it stays tethered (by clipping and a KL penalty) to
the model it started from. See README.md and docs/; `tether ppo --config FILE.yaml` is the main entry point.
"""

__version__ = "0.1.0"
