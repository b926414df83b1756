"""The four roles of PPO-RLHF: policy (trained), value (trained), reward and reference (frozen).

Each module owns its forward convention: which position's output belongs to which token.
"""
