"""Benchmark: how far the learner's recomputed log-probs are from the rollout worker's behaviour log-probs.

On-policy, the importance ratio exp(log pi_learner - log pi_behaviour) should be 1; precision moves it away.
For each pairing of `model.dtype` (the sampler) and `learner.precision`, the shipped chat-addition model
(a tiny Llama) samples `--prompts` held-out prompts x `--group-size` completions, and the learner recomputes
their log-probs. Prints a Markdown table: max and mean |delta log p| over response tokens, and the largest
|ratio - 1|.

    python benchmarks/logprob_agreement.py [--prompts 64] [--group-size 4]
"""

import argparse
import sys
from pathlib import Path

import pyarrow as pa
import torch

sys.path.insert(0, str(Path(__file__).parent.parent))

from actors.learner import Learner  # noqa: E402
from actors.rollout_worker import RolloutWorker  # noqa: E402
from pipeline.batch import pad_right, response_mask  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.data.inputs import with_builtin_defaults  # noqa: E402
from pipeline.data.loading import load_prompts  # noqa: E402
from pipeline.models.hf import build_sequences, response_logprobs  # noqa: E402

PAIRS = [("float32", "fp32"), ("bfloat16", "fp32"), ("bfloat16", "bf16-mixed"), ("bfloat16", "bf16")]


def gaps(sampler_dtype: str, precision: str, prompts: pa.Table, group_size: int) -> torch.Tensor:
    """|log pi_learner - log pi_behaviour| of every response token."""
    config = with_builtin_defaults(
        load_config(
            overrides=[
                "task=chat_addition",
                f"model.dtype={sampler_dtype}",
                f"learner.precision={precision}",
                "rollout.temperature=1.0",
            ]
        )
    )
    torch.manual_seed(0)
    batch = RolloutWorker(config, config.model.path).generate(prompts, group_size=group_size, step=1)
    learner = Learner(config, config.model.path, config.model.path)
    sequences = build_sequences(
        batch.column("prompt_ids").to_pylist(), batch.column("response_ids").to_pylist(), learner.tokenizer.pad_token_id
    )
    with torch.no_grad(), learner.autocast():
        recomputed = response_logprobs(learner.model, sequences, config.rollout.temperature)[0]
    behaviour = pad_right(batch.column("behaviour_logprobs").to_pylist())
    return (recomputed.float() - behaviour)[response_mask(batch).bool()].abs()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--group-size", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(2)
    config = with_builtin_defaults(load_config(overrides=["task=chat_addition"]))
    rows = load_prompts(config.data.eval_file, "eval").slice(0, args.prompts)
    prompts = rows.append_column("group_id", pa.array(range(rows.num_rows)))
    print(
        "| model.dtype (sampler) | learner.precision | response tokens | max abs delta log p "
        "| mean abs delta log p | max abs (ratio - 1) |"
    )
    print("|---|---|---|---|---|---|")
    for sampler_dtype, precision in PAIRS:
        delta = gaps(sampler_dtype, precision, prompts, args.group_size)
        print(
            f"| {sampler_dtype} | {precision} | {delta.numel()} | {delta.max():.2e} | {delta.mean():.2e} | "
            f"{float(torch.expm1(delta.max())):.2e} |"
        )


if __name__ == "__main__":
    main()
