"""Engines at the edge of tether: the existing systems that sample or shard for it when one device
or transformers' generate is not enough. Each is one adapter chosen at start-up from the config;
the stages ask it to "generate these prompts" or "take this step" and read the same whichever does.

    fsdp.py   model.fsdp: FSDP2 sharding of the trained models over a torchrun job
    vllm.py   rollout.engine: vllm, a colocated vLLM engine that samples the rollouts
"""
