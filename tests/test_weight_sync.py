"""The weight sync's buffers (no Ray): the broadcast writes straight into the rollout model's weights; a published
version (PackedWeights) becomes the model's weights without a copy; each tensor keeps its own dtype."""

import pytest
import torch
from chat_tokenizer import make_bpe_chat_tokenizer
from transformers import Dots1Config, Dots1ForCausalLM

from actors.learner import Learner
from actors.rollout_worker import RolloutWorker
from pipeline.config import load_config
from pipeline.data.inputs import with_builtin_defaults
from pipeline.runtime.weights import (
    PackedWeights,
    adopt,
    flat_weights,
    floating,
    layout_of,
    packed_weights,
    weight_layout,
)


def test_the_flat_buffer_aliases_the_models_floating_weights_and_leaves_integer_buffers_alone():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    model.register_buffer("steps", torch.arange(5))  # an integer buffer: never trained, never broadcast
    weights = floating({name: t.clone() for name, t in model.state_dict().items()})
    assert list(weights) == ["0.weight", "0.bias"]
    flat = flat_weights(model, layout_of(weights))
    assert torch.equal(
        flat.view(torch.float32), torch.cat([t.reshape(-1) for t in weights.values()])
    )  # the model's values copied in
    flat.copy_(torch.arange(8.0).view(torch.uint8))  # what a broadcast does
    assert torch.equal(model[0].weight, torch.arange(6.0).view(2, 3)) and torch.equal(
        model[0].bias, torch.tensor([6.0, 7.0])
    )
    assert model.steps.dtype == torch.int64 and torch.equal(model.steps, torch.arange(5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_packed_weights_round_trip_and_become_the_models_weights_without_a_copy(dtype):
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 5)).to(dtype)
    model.register_buffer("steps", torch.arange(5))
    learner = {
        name: torch.randn(t.shape).to(dtype) if t.is_floating_point() else t + 1
        for name, t in model.state_dict().items()
    }
    packed = PackedWeights.pack(learner)
    assert packed.data.dtype.name == "uint8" and packed.data.nbytes == sum(t.nbytes for t in floating(learner).values())
    packed.data.flags.writeable = False  # as the object store hands it out
    tensors = packed.tensors()
    assert sorted(tensors) == sorted(learner) and all(
        torch.equal(tensors[k], v) and tensors[k].dtype == v.dtype for k, v in learner.items()
    )
    adopt(model, tensors, copy=False)
    start = packed.data.ctypes.data
    assert all(start <= p.data_ptr() < start + packed.data.nbytes for p in model.parameters())  # the buffer's own pages
    assert torch.equal(model.steps, learner["steps"]) and all(
        torch.equal(model.state_dict()[k], v) for k, v in learner.items()
    )
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
    with pytest.raises(
        ValueError, match=r"weight 'bias' has shape \(2,\) in the rollout model, \(3,\) in the learner's"
    ):
        adopt(model, {"bias": torch.ones(3)}, copy=True)
    with pytest.raises(
        ValueError, match="weight 'bias' is torch.float32 in the rollout model, torch.bfloat16 in the learner's"
    ):
        adopt(model, {"bias": torch.ones(2, dtype=torch.bfloat16)}, copy=False)  # a view cannot change the dtype


@pytest.fixture(scope="module")
def dots1_bf16(tmp_path_factory):
    """A tiny random Dots1 (an MoE whose router weights, `gate.weight` and the `e_score_correction_bias` buffer,
    transformers keeps in fp32 when it loads the model in bf16) with the BPE chat tokenizer; a config that
    samples from it in bf16 (model.dtype) and trains it in fp32."""
    tokenizer = make_bpe_chat_tokenizer()
    path = tmp_path_factory.mktemp("dots1")
    torch.manual_seed(0)
    Dots1ForCausalLM(
        Dots1Config(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            moe_intermediate_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_shared_experts=1,
            first_k_dense_replace=1,
            n_group=1,
            topk_group=1,
            max_position_embeddings=64,
        )
    ).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return with_builtin_defaults(load_config(overrides=[f"model.path={path}", "model.dtype=bfloat16"])), str(path)


@pytest.mark.parametrize("sync", ["object_store", "collective"])
def test_weights_kept_in_fp32_follow_the_learner_exactly_and_live_in_the_buffer(dots1_bf16, sync):
    """After each sync every rollout weight equals the learner's in the rollout model's own dtype (the
    fp32-kept router weights exactly, not rounded through bf16) and is a view of the published buffer (object
    store) or of the broadcast's receive buffer (collective; the broadcast is the byte copy it makes)."""
    config, path = dots1_bf16
    learner, worker = Learner(config, path, path), RolloutWorker(config, path)
    kept = {name for name, t in worker.model.state_dict().items() if t.dtype == torch.float32}
    assert kept and all(name.endswith(("mlp.gate.weight", "e_score_correction_bias")) for name in kept)
    receive_buffer = (
        flat_weights(worker.model, weight_layout(learner)) if sync == "collective" else None
    )  # as join does
    for version in (1, 2):
        with torch.no_grad():  # a learner update: fp32 values that bf16 cannot hold
            for t in floating(learner.model.state_dict()).values():
                t.add_(torch.randn_like(t) / 3)
        published = packed_weights(learner)
        if sync == "object_store":
            published.data.flags.writeable = False  # as the object store hands it out
            worker.load_published(published, version)
            buffer = published.flat()
        else:
            receive_buffer.copy_(published.flat())  # what the broadcast does
            buffer = receive_buffer
        trained, rollout = learner.model.state_dict(), worker.model.state_dict()
        for name, value in floating(trained).items():
            assert rollout[name].dtype == (torch.float32 if name in kept else torch.bfloat16), name
            assert torch.equal(rollout[name], value.to(rollout[name].dtype)), (version, name)
            assert buffer.data_ptr() <= rollout[name].data_ptr() < buffer.data_ptr() + buffer.numel(), name
        assert all(torch.equal(rollout[name], trained[name]) for name in kept)  # not rounded on the way
