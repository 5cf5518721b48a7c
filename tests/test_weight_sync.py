"""The weight sync's buffers (no Ray): the broadcast writes straight into the rollout model's weights; a published
version (PackedWeights) becomes the model's weights without a copy."""

import pytest
import torch

from pipeline.driver.weight_sync import PackedWeights, adopt, flat_weights, floating


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_packed_weights_round_trip_and_become_the_models_weights_without_a_copy(dtype):
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 5)).to(dtype)
    model.register_buffer("steps", torch.arange(5))
    learner = {name: torch.randn(t.shape).to(dtype) if t.is_floating_point() else t + 1 for name, t in model.state_dict().items()}
    packed = PackedWeights.pack(learner)
    assert packed.data.dtype.name == "uint8" and packed.data.nbytes == sum(t.nbytes for t in floating(learner).values())
    packed.data.flags.writeable = False  # as the object store hands it out
    tensors = packed.tensors()
    assert sorted(tensors) == sorted(learner) and all(torch.equal(tensors[k], v) and tensors[k].dtype == v.dtype for k, v in learner.items())
    adopt(model, tensors, copy=False)
    start = packed.data.ctypes.data
    assert all(start <= p.data_ptr() < start + packed.data.nbytes for p in model.parameters())  # the buffer's own pages
    assert torch.equal(model.steps, learner["steps"]) and all(torch.equal(model.state_dict()[k], v) for k, v in learner.items())
    with torch.no_grad():
        model(torch.ones(1, 3, dtype=dtype))  # inference reads them; nothing writes


def test_adopt_with_copy_leaves_the_callers_tensors_alone_and_refuses_unknown_or_misshapen_weights():
    model = torch.nn.Linear(3, 2)
    weights = {"weight": torch.ones(2, 3), "bias": torch.zeros(2)}
    adopt(model, weights, copy=True)
    with torch.no_grad():
        model.weight.add_(1.0)
    assert torch.equal(weights["weight"], torch.ones(2, 3)) and torch.equal(model.weight, torch.full((2, 3), 2.0))
    with pytest.raises(ValueError, match="weight 'extra' of the learner is not in the rollout model"):
        adopt(model, {"extra": torch.ones(1)}, copy=True)
    with pytest.raises(ValueError, match=r"weight 'bias' has shape \(2,\) in the rollout model, \(3,\) in the learner's"):
        adopt(model, {"bias": torch.ones(3)}, copy=True)
