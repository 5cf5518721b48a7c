"""Reward components: the interface and normalisation, the built-in components, the reward pool."""
