"""Reward functions for the token-environment tests (TRL's signature: keyword lists)."""


def share_of_length(prompts, completions, completion_ids, **columns):
    """Token-level and looking ahead: each token earns 1 / (length of the whole completion)."""
    return [[1.0 / len(ids)] * len(ids) for ids in completion_ids]


def prefix_error(prompts, completions, completion_ids, **columns):
    """Sequence-level: 1 per completion; raises on anything but a finished one (ending in EOS id 1)."""
    if any(ids[-1] != 1 for ids in completion_ids):
        raise ValueError("only whole completions")
    return [1.0] * len(completions)
