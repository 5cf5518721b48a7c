"""RolloutWorker: holds a policy copy and samples responses with their behaviour log-probs.

A plain class; the driver wraps it with `ray.remote` (see pipeline/driver/actor_group.py).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod

import pyarrow as pa
import ray
import torch

from pipeline.batch import DATASET_PROMPT, make_rollout_table
from pipeline.config import TrainConfig
from pipeline.data.images import IMAGE_COLUMN, open_image
from pipeline.data.prompts import encode_image_prompts, encode_prompts, set_chat_template
from pipeline.models.hf import (
    cache_keyword,
    can_share_prompts,
    image_token_ids,
    is_vision_language,
    load_model,
    load_processor,
    load_tokenizer,
    model_config,
    positions_from_mask,
    suppress,
)
from pipeline.runtime.threads import torch_threads
from pipeline.runtime.weights import PackedWeights, StaleWeights, adopt

GENERATE_SECONDS = "tokenforge.generate_s"  # schema metadata of a generate() result: its seconds


def sample_tokens(
    logits: torch.Tensor, temperature: float, top_p: float, greedy: bool, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next token per row and its log-prob under softmax(logits / temperature). With top_p < 1 the token is drawn
    from the nucleus renormalised, but its log-prob is still that of the whole tempered softmax: the behaviour
    log-prob is the distribution the learner recomputes (on-policy, pi / pi_behaviour = 1), the convention of
    algorithm.is_cap and of the vLLM backend (which refuses top_p < 1, as vLLM reports the nucleus's)."""
    log_pi = torch.log_softmax(logits.float() / temperature, dim=-1)
    if greedy:
        tokens = log_pi.argmax(-1)
    else:
        probs = log_pi.exp()
        if top_p < 1.0:
            # keep the smallest set of most likely tokens whose mass reaches top_p
            sorted_probs, order = probs.sort(-1, descending=True)
            outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p
            probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return tokens, log_pi.gather(-1, tokens[:, None]).squeeze(-1)


def sample_seed(seed: int, step: int, group_id: int, *more: int) -> int:
    """The sampling seed of (run seed, step, group id[, sample index]): the same whichever worker draws it."""
    return hash((seed, step, group_id, *more)) % 2**63


class RolloutBase(ABC):
    """What every rollout backend shares: prompt encoding, the stale-weights check, the rollout table
    (pipeline.batch schema) and the weight-receive path. A backend implements set_weights() and
    _responses(); the driver and `tokenforge eval` only call the public methods below."""

    def _init_common(self, config: TrainConfig, model_path: str) -> None:
        self.config = config.rollout
        self.add_special_tokens = config.data.add_special_tokens
        trust = config.model.trust_remote_code
        self.tokenizer = load_tokenizer(model_path, trust)
        set_chat_template(self.tokenizer, config.model.chat_template)
        # a vision-language model's processor turns each prompt's image into its image tokens and pixel inputs
        vision = is_vision_language(model_config(model_path, trust))
        self.processor = load_processor(model_path, self.tokenizer, trust) if vision else None
        self.suppressed = image_token_ids(self.processor) if vision else None  # never sampled (hf.suppress)
        self.stop_token_ids = sorted({self.tokenizer.eos_token_id, *config.rollout.stop_token_ids})
        self.seed = config.seed
        self.policy_version = 0
        self.name = (ray.get_runtime_context().get_actor_name() if ray.is_initialized() else None) or "local"

    @abstractmethod
    def set_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> int:
        """Load `state_dict` into the backend's model as policy `version`; returns the version."""

    def receive_weights(self, published: list[ray.ObjectRef], version: int) -> float:
        """Load policy `version` from [an ObjectRef of its PackedWeights] (boxed, so that the fetch happens, and is
        timed, here); returns the seconds spent fetching and loading. The driver calls it between generate
        calls: an actor runs one call at a time, so weights never change mid-generation."""
        start = time.perf_counter()
        self.load_published(ray.get(published[0]), version)
        return time.perf_counter() - start

    def load_published(self, weights: PackedWeights, version: int) -> None:
        """Load a published version (its floating-point tensors are views of object-store memory: read-only)."""
        self.set_weights(weights.tensors(), version)

    def generate(
        self,
        prompts: pa.Table,
        group_size: int,
        greedy: bool = False,
        step: int = 0,
        version: int | None = None,
        greedy_baseline: bool = False,
    ) -> pa.Table:
        """Rollout batch (pipeline.batch schema) for a table of prompts with a `group_id` column.

        Sampling is seeded from (seed, step, group ids) (sample_seed), so a shard's samples do not
        depend on which worker drew it, nor on whether the run was resumed. `version`: the policy
        version the caller expects; a worker holding other weights (restarted by Ray since the last
        sync) raises StaleWeights instead of sampling from them. `greedy_baseline` (the self_critical
        estimator): each prompt's greedy response too, in one more row per prompt after the samples. The
        table's schema metadata holds the seconds this call took (GENERATE_SECONDS).
        """
        if version is not None and version != self.policy_version:
            raise StaleWeights(f"holds policy version {self.policy_version}, asked for {version}")
        start = time.perf_counter()
        group_ids = prompts.column("group_id").to_pylist()
        texts, prompt_ids, image_inputs = self._encode(prompts, group_ids)
        encoded = (prompts, group_ids, texts, prompt_ids)
        table = self._rows(encoded, self._responses(prompt_ids, group_ids, group_size, greedy, step, image_inputs))
        if greedy_baseline:
            responses = self._responses(prompt_ids, group_ids, 1, True, step, image_inputs)
            table = pa.concat_tables([table, self._rows(encoded, responses, baseline=True)])
        return table.replace_schema_metadata({GENERATE_SECONDS: str(time.perf_counter() - start)})

    def _rows(self, encoded: tuple, responses: tuple, baseline: bool = False) -> pa.Table:
        """The rollout rows of `responses` (_responses' output: `group_size` per prompt, in prompt order) to the
        `encoded` prompts (table, group ids, texts, token ids); `baseline`: they are greedy baselines."""
        prompts, group_ids, texts, prompt_ids = encoded
        response_ids, logprobs, finished = responses
        group_size = len(response_ids) // prompts.num_rows
        rows = [r for r in range(prompts.num_rows) for _ in range(group_size)]  # prompt row of each response
        if baseline:  # sample ids of their own: -1 - group id
            sample_ids = [-1 - group_ids[r] for r in rows]
        else:
            sample_ids = [group_ids[r] * group_size + k for r in range(prompts.num_rows) for k in range(group_size)]
        core = {
            "sample_id": sample_ids,
            "group_id": [group_ids[r] for r in rows],
            "prompt_text": [texts[r] for r in rows],
            "prompt_ids": [prompt_ids[r] for r in rows],
            "response_ids": response_ids,
            "behaviour_logprobs": logprobs,
            "response": self.tokenizer.batch_decode(response_ids, skip_special_tokens=True),
            "finished": finished,
            "policy_version": [self.policy_version] * len(rows),
            "worker": [self.name] * len(rows),
            "greedy_baseline": [baseline] * len(rows),
        }
        return make_rollout_table(core, prompts.take(pa.array(rows, pa.int64())))

    def _encode(self, prompts: pa.Table, group_ids: list[int]) -> tuple[list[str], list[list[int]], dict]:
        """(rendered text, token ids, the model's image inputs: {} for a text model) of each prompt row; a
        vision-language model's images are read here, from the rows' bytes or paths."""
        texts = prompts.column(DATASET_PROMPT).to_pylist()
        if self.processor is None or IMAGE_COLUMN not in prompts.column_names:  # (a VLM trained on text alone)
            return (*encode_prompts(self.tokenizer, texts, self.add_special_tokens), {})
        images = [
            open_image(value, f"the prompt of group {group}")
            for value, group in zip(prompts.column(IMAGE_COLUMN).to_pylist(), group_ids)
        ]
        return encode_image_prompts(self.processor, texts, images, self.add_special_tokens)

    @abstractmethod
    def _responses(
        self,
        prompt_ids: list[list[int]],
        group_ids: list[int],
        group_size: int,
        greedy: bool,
        step: int,
        image_inputs: dict,
    ) -> tuple[list[list[int]], list[list[float]], list[bool]]:
        """(response ids, their behaviour log-probs under the sampling temperature, whether each stopped) of
        `group_size` samples of each prompt, prompt by prompt; `image_inputs`: the prompts' image inputs of a
        vision-language model, one entry per prompt ({} for a text model). Stop rules: EOS or a rollout.stop_token_ids
        token (kept), or the token that completes a rollout.stop string (kept); else cut at max_new_tokens."""


class RolloutWorker(RolloutBase):
    """Generates `group_size` samples per prompt with the current policy weights (HF transformers, a KV-cache loop)."""

    def __init__(self, config: TrainConfig, model_path: str):
        rollout = config.rollout
        torch.set_num_threads(torch_threads(rollout.num_threads))
        self._init_common(config, model_path)
        self.device = "cuda" if rollout.num_gpus_per_worker > 0 and torch.cuda.is_available() else "cpu"
        self.model = load_model(model_path, config.model.trust_remote_code, self.device, config.model.dtype).eval()
        self.cache_key = cache_keyword(self.model)
        self.share_prompts = can_share_prompts(self.model)  # prefill each prompt once for its whole group
        self.stop_ids = torch.tensor(self.stop_token_ids, device=self.device)
        self.generator = torch.Generator(device=self.device)

    def set_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> int:
        missing = self.model.state_dict().keys() - state_dict.keys()
        if missing:
            raise ValueError(
                f"set_weights: the state dict lacks {len(missing)} of the model's weights, e.g. {sorted(missing)[0]!r}"
            )
        adopt(self.model, state_dict, copy=True)  # copied, in the rollout dtype
        self.policy_version = version
        return version

    def load_published(self, weights: PackedWeights, version: int) -> None:
        adopt(self.model, weights.tensors(), copy=False)  # on CPU: the weights are the object store's shared pages
        self.policy_version = version

    @torch.no_grad()
    def _responses(self, prompt_ids, group_ids, group_size, greedy, step, image_inputs):
        # one generator for the shard, seeded from its first group id
        self.generator.manual_seed(sample_seed(self.seed, step, group_ids[0]))
        rows = torch.arange(len(prompt_ids), device=self.device).repeat_interleave(group_size)  # prompt of each sample
        encoded = self.tokenizer.pad({"input_ids": prompt_ids}, return_tensors="pt")  # left padding
        images = {k: v.to(self.device) for k, v in image_inputs.items()}
        images = {k: v.to(self.model.dtype) if v.is_floating_point() else v for k, v in images.items()}
        tokens, logprobs, lengths, finished = self._sample(
            encoded.input_ids.to(self.device), encoded.attention_mask.to(self.device), rows, greedy, images
        )
        response_ids = [row[:n] for row, n in zip(tokens.tolist(), lengths)]
        return response_ids, [row[:n] for row, n in zip(logprobs.tolist(), lengths)], finished

    def _sample(
        self, ids: torch.Tensor, attention: torch.Tensor, rows: torch.Tensor, greedy: bool, images: dict | None = None
    ):
        """Autoregressive sampling with a KV cache, one sample per entry of `rows` (its prompt's row in `ids`);
        `images`: each prompt row's image inputs (a vision-language model reads them in the prompt's forward only:
        the image tokens' keys and values are then in the cache).
        A row stops at EOS, at a `rollout.stop_token_ids` token or once its text reaches a `rollout.stop` string
        (that token is kept); else at max_new_tokens.
        Returns tokens and log-probs (B, T), each row's length and whether it stopped (not cut)."""
        cfg, images = self.config, images or {}
        share = self.share_prompts and len(rows) > len(ids)
        if not share:
            ids, attention = ids[rows], attention[rows]
            images = {k: v[rows] for k, v in images.items()}
        positions = positions_from_mask(attention)
        out = self.model(input_ids=ids, attention_mask=attention, position_ids=positions, use_cache=True, **images)
        logits = suppress(out.logits[:, -1], self.suppressed)
        if share:  # each prompt was run once: its keys/values and next-token logits copied to each of its samples
            getattr(out, self.cache_key).reorder_cache(rows)
            logits, ids, attention, positions = logits[rows], ids[rows], attention[rows], positions[rows]
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=self.device)
        lengths = torch.full((ids.shape[0],), cfg.max_new_tokens, dtype=torch.long, device=self.device)
        tokens, logprobs, text_lengths = [], [], [0] * ids.shape[0]
        for t in range(cfg.max_new_tokens):
            token, logprob = sample_tokens(logits, cfg.temperature, cfg.top_p, greedy, self.generator)
            tokens.append(token.masked_fill(done, self.tokenizer.pad_token_id))
            logprobs.append(logprob.masked_fill(done, 0.0))
            stop_string = self._reached_stop_string(torch.stack(tokens, 1), text_lengths)
            stopped = ~done & (torch.isin(token, self.stop_ids) | stop_string)
            lengths[stopped] = t + 1
            done |= stopped
            if done.all():
                break
            attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
            positions = positions[:, -1:] + 1
            out = self.model(
                input_ids=token[:, None],
                attention_mask=attention,
                position_ids=positions,
                **{self.cache_key: getattr(out, self.cache_key)},
                use_cache=True,
            )
            logits = suppress(out.logits[:, -1], self.suppressed)
        return torch.stack(tokens, 1).cpu(), torch.stack(logprobs, 1).cpu(), lengths.tolist(), done.tolist()

    def _reached_stop_string(self, tokens: torch.Tensor, text_lengths: list[int]) -> torch.Tensor:
        """Rows whose text gained one of `rollout.stop` with their last token, wherever in that token's text the
        string ends (a BPE token such as ".\n" runs past a stop "."). `text_lengths[i]`: row i's decoded
        length before that token, updated here. All False without stop strings."""
        if not self.config.stop:
            return torch.zeros(tokens.shape[0], dtype=torch.bool, device=self.device)
        texts = self.tokenizer.batch_decode(tokens.tolist(), skip_special_tokens=True)
        reached = []
        for i, text in enumerate(texts):  # a stop string that ends in the new text, even if it began earlier
            reached.append(any(stop in text[max(0, text_lengths[i] - len(stop) + 1) :] for stop in self.config.stop))
            text_lengths[i] = len(text)
        return torch.tensor(reached, device=self.device)


def rollout_worker_class(backend: str) -> type[RolloutBase]:
    """The rollout worker class of rollout.backend (vllm is imported only when a vllm worker starts)."""
    if backend == "vllm":
        from actors.vllm_worker import VllmRolloutWorker

        return VllmRolloutWorker
    return RolloutWorker
