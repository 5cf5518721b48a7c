"""The RLlib baseline: the tasks as a token-level gymnasium environment and an RLModule over the HF model."""
