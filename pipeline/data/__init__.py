"""Prompt datasets, the prompt sampler, prompt encoding and the checked inputs of a run."""
