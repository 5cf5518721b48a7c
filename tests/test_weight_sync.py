"""The collective weight sync's buffer (no Ray): the broadcast writes straight into the rollout model's weights."""

import torch

from pipeline.driver.weight_sync import flat_weights, floating


def test_the_flat_buffer_aliases_the_models_floating_weights_and_leaves_integer_buffers_alone():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    model.register_buffer("steps", torch.arange(5))  # an integer buffer: never trained, never broadcast
    weights = floating({name: t.clone() for name, t in model.state_dict().items()})
    assert list(weights) == ["0.weight", "0.bias"]
    flat = flat_weights(model, [(name, tuple(t.shape)) for name, t in weights.items()], "torch.float32")
    assert torch.equal(flat, torch.cat([t.reshape(-1) for t in weights.values()]))  # the model's values copied in
    flat.copy_(torch.arange(8.0))  # what a broadcast does
    assert torch.equal(model[0].weight, torch.arange(6.0).view(2, 3)) and torch.equal(model[0].bias, torch.tensor([6.0, 7.0]))
    assert model.steps.dtype == torch.int64 and torch.equal(model.steps, torch.arange(5))
