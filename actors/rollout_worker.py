"""RolloutWorker: holds a policy copy and samples responses with their behaviour log-probs.

A plain class; the driver wraps it with `ray.remote` (see pipeline/actor_group.py).
"""

from __future__ import annotations

import inspect

import pyarrow as pa
import torch

from pipeline.batch import make_rollout_table
from pipeline.config import RolloutConfig
from pipeline.models import load_model, load_tokenizer, positions_from_mask


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

    def __init__(self, model_path: str, config: RolloutConfig, seed: int = 0, trust_remote_code: bool = False):
        torch.set_num_threads(config.num_threads)
        self.config = config
        self.device = "cuda" if config.num_gpus_per_worker > 0 and torch.cuda.is_available() else "cpu"
        self.tokenizer = load_tokenizer(model_path, trust_remote_code)
        self.model = load_model(model_path, trust_remote_code, self.device).eval()
        # the KV-cache keyword: `cache` since transformers 5.24, `past_key_values` before and in most remote code
        self.cache_key = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        self.seed = seed
        self.generator = torch.Generator(device=self.device)
        self.policy_version = 0

    def set_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> int:
        self.model.load_state_dict(state_dict)
        return self.set_policy_version(version)

    def set_policy_version(self, version: int) -> int:
        self.policy_version = version
        return version

    @torch.no_grad()
    def generate(self, prompts: pa.Table, group_size: int, greedy: bool = False, step: int = 0) -> pa.Table:
        """Rollout batch (pipeline.batch schema) for a table of prompts with a `group_id` column.

        The sampling RNG is seeded from (seed, step, first group id), so a shard's samples do not
        depend on which worker drew it, nor on whether the run was resumed.
        """
        self.generator.manual_seed(hash((self.seed, step, prompts.column("group_id")[0].as_py())) % 2**63)
        rows = torch.arange(prompts.num_rows).repeat_interleave(group_size)  # prompt row of each sample
        row_list = rows.tolist()
        texts = prompts.column("prompt").to_pylist()
        prompt_ids = self.tokenizer(texts, add_special_tokens=False).input_ids
        encoded = self.tokenizer.pad({"input_ids": prompt_ids}, return_tensors="pt")  # left padding
        ids = encoded.input_ids[rows].to(self.device)
        attention = encoded.attention_mask[rows].to(self.device)
        tokens, logprobs = self._sample(ids, attention, greedy)

        eos = self.tokenizer.eos_token_id
        response_ids, behaviour, finished = [], [], []
        for token_row, logprob_row in zip(tokens.tolist(), logprobs.tolist()):
            length = token_row.index(eos) + 1 if eos in token_row else len(token_row)
            response_ids.append(token_row[:length])
            behaviour.append(logprob_row[:length])
            finished.append(eos in token_row)
        group_ids = prompts.column("group_id").to_pylist()
        core = {
            "sample_id": [group_ids[r] * group_size + k for r in range(prompts.num_rows) for k in range(group_size)],
            "group_id": [group_ids[r] for r in row_list],
            "prompt": [texts[r] for r in row_list],
            "prompt_ids": [prompt_ids[r] for r in row_list],
            "response_ids": response_ids,
            "behaviour_logprobs": behaviour,
            "completion": self.tokenizer.batch_decode(response_ids, skip_special_tokens=True),
            "finished": finished,
            "policy_version": [self.policy_version] * len(row_list),
        }
        return make_rollout_table(core, prompts.take(pa.array(rows.numpy())))

    def _sample(self, ids: torch.Tensor, attention: torch.Tensor, greedy: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Autoregressive sampling with a KV cache; rows stop at EOS (later tokens are EOS-padded)."""
        cfg, eos = self.config, self.tokenizer.eos_token_id
        positions = positions_from_mask(attention)
        out = self.model(input_ids=ids, attention_mask=attention, position_ids=positions, use_cache=True)
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=self.device)
        tokens, logprobs = [], []
        for _ in range(cfg.max_new_tokens):
            token, logprob = sample_tokens(out.logits[:, -1], cfg.temperature, cfg.top_p, greedy, self.generator)
            token = token.masked_fill(done, eos)
            tokens.append(token)
            logprobs.append(logprob.masked_fill(done, 0.0))
            done |= token == eos
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
        return torch.stack(tokens, 1).cpu(), torch.stack(logprobs, 1).cpu()
