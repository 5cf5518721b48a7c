"""Benchmark: peak memory of the learner's log-prob pass (forward + backward) on a 32k-vocabulary model.

`pipeline.models.hf.response_logprobs` takes the fp32 log-softmax over the vocabulary
`learner.logprob_chunk_tokens` tokens at a time and recomputes each chunk in the backward pass, so a
(batch, response, vocab) fp32 tensor never exists. This script measures what that saves against the
plain way (one fp32 log_softmax over the whole micro-batch, kept for the backward), for several chunk
sizes, each in a fresh subprocess: peak GPU memory (torch.cuda.max_memory_allocated) on a GPU, peak
resident memory above the loaded model on CPU. Prints a Markdown table.

    python benchmarks/logprob_memory.py [--batch 16] [--response 256] [--vocab 32000] [--dtype float32|bfloat16]
"""

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def naive_logprobs(model, sequences, temperature=1.0):
    """The plain way, for comparison: the whole micro-batch's fp32 log-softmax at once."""
    ids, width = sequences["input_ids"], sequences["prompt_width"]
    logits = model(
        input_ids=ids, attention_mask=sequences["attention_mask"], position_ids=sequences["position_ids"]
    ).logits
    log_pi = torch.log_softmax(logits[:, width - 1 : -1].float() / temperature, dim=-1)
    entropy = -(log_pi.exp() * log_pi).sum(-1)
    return log_pi.gather(-1, ids[:, width:, None]).squeeze(-1), entropy


def peak_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def measure(args: argparse.Namespace) -> dict:
    """One variant in this process: peak memory of forward + backward above the loaded model and inputs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.models.hf import build_sequences, response_logprobs

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
    )
    model = LlamaForCausalLM(config).to(device, getattr(torch, args.dtype))
    prompts = torch.randint(0, args.vocab, (args.batch, 32)).tolist()
    responses = torch.randint(0, args.vocab, (args.batch, args.response)).tolist()
    sequences = build_sequences(prompts, responses, pad_id=0, device=device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = peak_bytes(device)
    start = time.time()
    if args.variant == "naive":
        logprobs, entropy = naive_logprobs(model, sequences)
    else:
        logprobs, entropy = response_logprobs(model, sequences, chunk_tokens=int(args.variant))
    (-(logprobs.sum()) - 0.01 * entropy.sum()).backward()
    if device == "cuda":
        torch.cuda.synchronize()
    return {
        "variant": args.variant,
        "device": device,
        "peak_mib": (peak_bytes(device) - before) / 2**20,
        "seconds": time.time() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--response", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--variants", nargs="+", default=["naive", "65536", "4096", "1024"])
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # set in the per-variant subprocess
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(measure(args)))
        return
    tokens = args.batch * args.response
    full = tokens * args.vocab * 4 / 2**20
    print(
        f"{args.batch} x {args.response} response tokens, vocabulary {args.vocab}, weights {args.dtype}: one fp32 "
        f"(tokens, vocab) tensor is {full:.0f} MiB\n"
    )
    print("| log-prob pass | peak memory above the model (MiB) | forward + backward (s) |")
    print("|---|---|---|")
    for variant in args.variants:
        command = [
            sys.executable,
            __file__,
            "--variant",
            variant,
            "--batch",
            str(args.batch),
            "--response",
            str(args.response),
            "--vocab",
            str(args.vocab),
            "--dtype",
            args.dtype,
        ]
        result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        name = "one fp32 log_softmax (naive)" if variant == "naive" else f"chunks of {variant} tokens, recomputed"
        print(f"| {name} | {result['peak_mib']:.0f} | {result['seconds']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
