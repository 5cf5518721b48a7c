"""VllmRolloutWorker: rollout.backend=vllm, the RolloutWorker contract on a vLLM engine.

The same public methods and output as actors.rollout_worker.RolloutWorker (generate, set_weights,
receive_weights, policy_version, device, name): response ids, their behaviour log-probs under
softmax(logits / rollout.temperature) (vLLM's logprobs_mode="processed_logprobs", which is why
rollout.top_p must be 1: vLLM renormalises over the nucleus), finished flags, the policy version,
the same stop rules. The engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so that new
weights are handed to it as tensors: collective_rpc("reload_weights", weights_iterator=...) then
reset_prefix_cache(), between two generate calls (an actor runs one call at a time). A reload that
fails restarts the engine from the new weights instead of failing the run.

Seeding: every sample is its own request with the seed sample_seed(seed, step, group id, sample
index), so a sample does not depend on the worker, the shard or the batch it was drawn in. vLLM's
random draws are not the HF backend's: the same seed gives other samples (from the same
distribution). vllm is imported when a worker starts, never by the modules that only name it.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoConfig

from actors.rollout_worker import RolloutBase, sample_seed
from pipeline.config import TrainConfig
from pipeline.errors import TokenforgeError

logger = logging.getLogger(__name__)
FIX = "use rollout.backend=hf"


def head_dim(model_path: str, trust_remote_code: bool = False) -> int | None:
    """The attention head size the HF config implies (None if it states none)."""
    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    config = getattr(config, "text_config", None) or config
    if getattr(config, "head_dim", None):
        return int(config.head_dim)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    return hidden // heads if hidden and heads else None


def serving_problem(model_path: str, trust_remote_code: bool, on_gpu: bool) -> str | None:
    """What vLLM is known to refuse before loading the model (on CPU: a head size its attention kernels lack),
    or None. Asks the installed vllm; None when vllm is not installed here. Anything else the engine refuses
    (an architecture neither vLLM nor its Transformers fallback serves) shows when the engine starts."""
    if on_gpu:
        return None
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    except ImportError:
        return None
    size, sizes = head_dim(model_path, trust_remote_code), CPUAttentionBackend.get_supported_head_sizes()
    if size is not None and size not in sizes:
        return f"head size {size} is not supported by vLLM's CPU attention (supported: {', '.join(map(str, sizes))})"
    return None


def unservable(model_path: str, reason: str) -> TokenforgeError:
    return TokenforgeError(f"rollout.backend=vllm cannot serve the model at {model_path}: {reason}; {FIX}")


def check_servable(config: TrainConfig) -> None:
    """The driver's check before any actor starts (a no-op for rollout.backend=hf or without vllm here)."""
    if config.rollout.backend != "vllm":
        return
    on_gpu = config.rollout.num_gpus_per_worker > 0
    problem = serving_problem(config.model.path, config.model.trust_remote_code, on_gpu)
    if problem:
        raise unservable(config.model.path, problem)


def engine_kwargs(config: TrainConfig, on_gpu: bool) -> dict:
    """vllm.LLM(...) keyword arguments from the config (model path aside)."""
    cfg = config.rollout.vllm
    kwargs = {
        "dtype": config.model.dtype,
        "trust_remote_code": config.model.trust_remote_code,
        "seed": config.seed,
        "enforce_eager": cfg.enforce_eager,
        "max_num_seqs": cfg.max_num_seqs,
        "tensor_parallel_size": cfg.tensor_parallel_size,
        "gpu_memory_utilization": cfg.gpu_memory_utilization,
        "enable_prefix_caching": cfg.enable_prefix_caching,
        # log-probs of the sampled tokens under the tempered softmax they were drawn from (before the nucleus: top_p=1)
        "logprobs_mode": "processed_logprobs",
        # the model's generation_config.json must not change the sampling (as in HF's loop)
        "generation_config": "vllm",
    }
    if cfg.kv_cache_gib is not None:
        kwargs["kv_cache_memory_bytes"] = int(cfg.kv_cache_gib * 2**30)
    if cfg.max_model_len is not None:
        kwargs["max_model_len"] = cfg.max_model_len
    return {**kwargs, **cfg.engine_kwargs}


def first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[-1] if lines else ''}"[:400]


class VllmRolloutWorker(RolloutBase):
    """Generates `group_size` samples per prompt with the current policy weights, on a vLLM engine."""

    def __init__(self, config: TrainConfig, model_path: str):
        self._init_common(config, model_path)
        rollout = config.rollout
        self.device = "cuda" if rollout.num_gpus_per_worker > 0 and torch.cuda.is_available() else "cpu"
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process: weights go in as tensors
        if self.device == "cpu" and rollout.vllm.kv_cache_gib is not None:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, math.ceil(rollout.vllm.kv_cache_gib))))
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        self.model_path, self.trust_remote_code = model_path, config.model.trust_remote_code
        self.kwargs = engine_kwargs(config, self.device == "cuda")
        self.restarts = 0  # engines restarted after a failed reload
        self.scratch: str | None = None  # the model directory an engine was restarted from
        self.llm = self._start(model_path)

    def _start(self, path: str):
        """A new engine on the model directory `path`; a model it refuses is a one-line TokenforgeError."""
        problem = serving_problem(path, self.trust_remote_code, self.device == "cuda")
        if problem:
            raise unservable(self.model_path, problem)
        from vllm import LLM

        start = time.perf_counter()
        try:
            llm = LLM(path, **self.kwargs)
        except Exception as error:  # noqa: BLE001 - whatever the engine refuses, said in one line
            raise unservable(self.model_path, first_line(error)) from None
        self.start_s = time.perf_counter() - start
        return llm

    def set_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> int:
        """Load the learner's weights (HF names) into the running engine; if that fails, restart the engine from
        them."""
        try:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(state_dict.items())})
            self.llm.reset_prefix_cache()  # cached prompt KV was computed by the old weights
        except Exception as error:  # noqa: BLE001 - a failed reload costs a restart, not the run
            logger.warning(
                "vLLM weight reload failed (%s): restarting the engine from the new weights", first_line(error)
            )
            self._restart(state_dict)
        self.policy_version = version
        return version

    def _restart(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Write the weights as an HF model directory (config and tokenizer from model_path) and start a new engine
        on it."""
        from safetensors.torch import save_file

        self.close()
        old, self.scratch = self.scratch, tempfile.mkdtemp(prefix="tokenforge-vllm-")
        for name in os.listdir(self.model_path):
            if not name.endswith((".safetensors", ".bin", ".pt")) and name != "model.safetensors.index.json":
                source = Path(self.model_path, name)
                if source.is_file():
                    shutil.copy(source, self.scratch)
        tensors = {}
        for name, tensor in state_dict.items():  # tied tensors are stored once each: every copy its own storage
            tensors[name] = tensor.detach().to("cpu").contiguous().clone()
        save_file(tensors, str(Path(self.scratch, "model.safetensors")), metadata={"format": "pt"})
        Path(self.scratch, "tokenforge_restart.json").write_text(json.dumps({"restarts": self.restarts + 1}))
        self.llm = self._start(self.scratch)
        self.restarts += 1
        if old:
            shutil.rmtree(old, ignore_errors=True)

    def close(self) -> None:
        """Shut the engine down and free vLLM's process-wide state (its parallel groups): one engine per process at a
        time, so the old one goes before a restart starts the new one (a Ray actor's engine goes with its process)."""
        if getattr(self, "llm", None) is None:
            return
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        try:
            self.llm.llm_engine.engine_core.shutdown()
        except Exception as error:  # noqa: BLE001 - a broken engine is being dropped anyway
            logger.warning("vLLM engine shutdown: %s", first_line(error))
        self.llm = None
        gc.collect()
        cleanup_dist_env_and_memory()

    def _responses(self, prompt_ids, group_ids, group_size, greedy, step, image_inputs):
        from vllm import SamplingParams

        cfg = self.config
        common = {
            "max_tokens": cfg.max_new_tokens,
            "logprobs": 0,  # the sampled token's log-prob only
            "stop_token_ids": self.stop_token_ids,
            "stop": list(cfg.stop) or None,  # the token completing a stop string stays in token_ids
            "skip_special_tokens": True,
        }
        params = [
            SamplingParams(temperature=0.0, **common)
            if greedy
            else SamplingParams(
                temperature=cfg.temperature, top_p=1.0, seed=sample_seed(self.seed, step, g, k), **common
            )
            for g in group_ids
            for k in range(group_size)
        ]
        requests = [{"prompt_token_ids": ids} for ids in prompt_ids for _ in range(group_size)]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        response_ids, logprobs, finished = [], [], []
        for output in outputs:
            completion = output.outputs[0]
            ids = list(completion.token_ids)
            response_ids.append(ids)
            logprobs.append([step_logprobs[token].logprob for step_logprobs, token in zip(completion.logprobs, ids)])
            finished.append(completion.finish_reason == "stop")
        return response_ids, logprobs, finished
