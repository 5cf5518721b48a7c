"""Reward components: the interface and normalisation, the built-in components (the reward pool that runs them is
pipeline/driver/reward_pool.py)."""
