"""RolloutWorker: holds a policy copy and samples responses with their behaviour log-probs.

A plain class; the driver wraps it with `ray.remote` (see pipeline/driver/actor_group.py).
"""

from __future__ import annotations

import inspect
import time

import pyarrow as pa
import ray
import torch

from pipeline.batch import DATASET_PROMPT, make_rollout_table
from pipeline.config import TrainConfig
from pipeline.data.prompts import encode_prompts, set_chat_template
from pipeline.driver.actor_group import StaleWeights
from pipeline.driver.placement import torch_threads
from pipeline.models.hf import load_model, load_tokenizer, positions_from_mask

GENERATE_SECONDS = "tokenforge.generate_s"  # schema metadata of a generate() result: its seconds


def sample_tokens(
    logits: torch.Tensor, temperature: float, top_p: float, greedy: bool, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next token per row and its log-prob under softmax(logits / temperature)."""
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


class RolloutWorker:
    """Generates `group_size` samples per prompt with the current policy weights."""

    def __init__(self, config: TrainConfig, model_path: str):
        rollout = config.rollout
        torch.set_num_threads(torch_threads(rollout.num_threads))
        self.config = rollout
        self.add_special_tokens = config.data.add_special_tokens
        self.device = "cuda" if rollout.num_gpus_per_worker > 0 and torch.cuda.is_available() else "cpu"
        self.tokenizer = load_tokenizer(model_path, config.model.trust_remote_code)
        set_chat_template(self.tokenizer, config.model.chat_template)
        self.model = load_model(model_path, config.model.trust_remote_code, self.device, config.model.dtype).eval()
        # the KV-cache keyword: `cache` since transformers 5.24, `past_key_values` before and in most remote code
        self.cache_key = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        self.stop_ids = torch.tensor(sorted({self.tokenizer.eos_token_id, *rollout.stop_token_ids}), device=self.device)
        self.seed = config.seed
        self.generator = torch.Generator(device=self.device)
        self.policy_version = 0
        self.name = (ray.get_runtime_context().get_actor_name() if ray.is_initialized() else None) or "local"

    def set_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> int:
        self.model.load_state_dict(state_dict)  # copied into the rollout dtype
        self.policy_version = version
        return version

    def receive_weights(self, published: list[ray.ObjectRef], version: int) -> float:
        """Load policy `version` from [an ObjectRef of its state dict] (boxed, so that the fetch happens, and is
        timed, here); returns the seconds spent fetching and loading. The driver calls it between generate
        calls: an actor runs one call at a time, so weights never change mid-generation."""
        start = time.perf_counter()
        self.set_weights(ray.get(published[0]), version)
        return time.perf_counter() - start

    @torch.no_grad()
    def generate(
        self, prompts: pa.Table, group_size: int, greedy: bool = False, step: int = 0, version: int | None = None
    ) -> pa.Table:
        """Rollout batch (pipeline.batch schema) for a table of prompts with a `group_id` column.

        The sampling RNG is seeded from (seed, step, first group id), so a shard's samples do not
        depend on which worker drew it, nor on whether the run was resumed. `version`: the policy
        version the caller expects; a worker holding other weights (restarted by Ray since the last
        sync) raises StaleWeights instead of sampling from them. The table's schema metadata holds the
        seconds this call took (GENERATE_SECONDS).
        """
        if version is not None and version != self.policy_version:
            raise StaleWeights(f"holds policy version {self.policy_version}, asked for {version}")
        start = time.perf_counter()
        self.generator.manual_seed(hash((self.seed, step, prompts.column("group_id")[0].as_py())) % 2**63)
        rows = torch.arange(prompts.num_rows).repeat_interleave(group_size)  # prompt row of each sample
        row_list = rows.tolist()
        texts, prompt_ids = encode_prompts(self.tokenizer, prompts.column(DATASET_PROMPT).to_pylist(), self.add_special_tokens)
        encoded = self.tokenizer.pad({"input_ids": prompt_ids}, return_tensors="pt")  # left padding
        ids = encoded.input_ids[rows].to(self.device)
        attention = encoded.attention_mask[rows].to(self.device)
        tokens, logprobs, lengths, finished = self._sample(ids, attention, greedy)
        response_ids = [row[:n] for row, n in zip(tokens.tolist(), lengths)]
        group_ids = prompts.column("group_id").to_pylist()
        core = {
            "sample_id": [group_ids[r] * group_size + k for r in range(prompts.num_rows) for k in range(group_size)],
            "group_id": [group_ids[r] for r in row_list],
            "prompt_text": [texts[r] for r in row_list],
            "prompt_ids": [prompt_ids[r] for r in row_list],
            "response_ids": response_ids,
            "behaviour_logprobs": [row[:n] for row, n in zip(logprobs.tolist(), lengths)],
            "response": self.tokenizer.batch_decode(response_ids, skip_special_tokens=True),
            "finished": finished,
            "policy_version": [self.policy_version] * len(row_list),
            "worker": [self.name] * len(row_list),
        }
        table = make_rollout_table(core, prompts.take(pa.array(rows.numpy())))
        return table.replace_schema_metadata({GENERATE_SECONDS: str(time.perf_counter() - start)})

    def _sample(self, ids: torch.Tensor, attention: torch.Tensor, greedy: bool):
        """Autoregressive sampling with a KV cache. A row stops at EOS, at a `rollout.stop_token_ids` token or
        once its text reaches a `rollout.stop` string (that token is kept); else at max_new_tokens.
        Returns tokens and log-probs (B, T), each row's length and whether it stopped (not cut)."""
        cfg = self.config
        positions = positions_from_mask(attention)
        out = self.model(input_ids=ids, attention_mask=attention, position_ids=positions, use_cache=True)
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=self.device)
        lengths = torch.full((ids.shape[0],), cfg.max_new_tokens, dtype=torch.long, device=self.device)
        tokens, logprobs, text_lengths = [], [], [0] * ids.shape[0]
        for t in range(cfg.max_new_tokens):
            token, logprob = sample_tokens(out.logits[:, -1], cfg.temperature, cfg.top_p, greedy, self.generator)
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
