"""Make a built-in task's tiny model from scratch, warm-started by supervised learning.

- addition, words, reverse, summarize: a char-level GPT-2.
- llama-addition: the addition task on a char-level tiny Llama (not shipped: benchmarks/staleness_study.py makes it).
- chat-addition: a Llama (RoPE, RMSNorm, SwiGLU, GQA, head_dim 32) with a byte-level BPE tokenizer trained
  here on the task's conversations plus some plain English, BOS added by the tokenizer, and a Llama-3-style
  chat template; the model answers in the assistant turn and ends it with the end-of-turn token (its EOS).
- sort: a GPT-NeoX (Pythia's architecture: parallel attention and MLP, partial rotary, untied output embedding)
  with a SentencePiece-style Unigram tokenizer (256 tokens, "▁" for spaces, BOS added) trained here on the
  task's prompts and answers; not shipped, made on demand into --out (about 1-2 minutes here).
- captioning: a Llava (CLIP vision tower, MLP projector, Llama) with a word-level tokenizer over the captions and
  a Llava processor (32x32 images, 16 image tokens), trained on one reference caption drawn per image and step.

Trains on the task's training prompts (loss on answer tokens and EOS only; conversational prompts are
rendered with the chat template and its generation prompt) and stops as soon as the greedy eval metric
(exact match; words: chrF; summarize: ROUGE-L; captioning: CIDEr-D) reaches --target, so that RL has room to
improve it. Saves a HF-format model (safetensors) + tokenizer (+ processor). Deterministic for a given seed on CPU.

    python scripts/make_task_model.py
        --task addition|words|reverse|summarize|chat-addition|llama-addition|sort|captioning
        [--target T] [--out DIR]

DIR defaults to pipeline/assets/<task, '-' as '_'>/model for a shipped model; llama-addition and sort, which are
not shipped, need --out. The task's data comes from pipeline/assets/<its data dir>.
"""

import argparse
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from rouge_score.rouge_scorer import RougeScorer
from sacrebleu.metrics import CHRF
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from actors.rollout_worker import RolloutWorker
from pipeline.config import load_config
from pipeline.data.images import open_image
from pipeline.data.prompts import encode_image_prompts, encode_prompts
from pipeline.models.hf import ASSETS, builtin_paths
from pipeline.models.tiny import (
    chat_corpus_text,
    make_bpe_chat_tokenizer,
    make_char_tokenizer,
    make_llava_processor,
    make_tiny_gpt2,
    make_tiny_gpt_neox,
    make_tiny_llama,
    make_tiny_llava,
    make_unigram_tokenizer,
    make_word_tokenizer,
)
from pipeline.rewards.cider import CiderD
from pipeline.rewards.components import Cider


def read_rows(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        return pq.read_table(path).to_pylist()
    return [json.loads(line) for line in path.read_text().splitlines()]


def operand_shape(row: dict) -> tuple[int, ...]:
    """Digit counts of the operands in the (last message of the) prompt: (1, 2) for "7+35=" or "Add 7 and 35."."""
    text = row["prompt"] if isinstance(row["prompt"], str) else row["prompt"][-1]["content"]
    return tuple(len(x) for x in re.findall(r"\d+", text))


def balanced_by_shape(train: list[dict], size: int) -> list[dict]:
    """Addition batches: every operand shape equally often, so that the warm start is partly right on
    each shape instead of perfect on two-digit pairs and clueless on one-digit operands (RL cannot
    explore its way out of a shape where every sample is wrong at the same digit)."""
    by_shape = {}  # operand digit counts -> rows, e.g. (1, 2) for "7+35="
    for row in train:
        by_shape.setdefault(operand_shape(row), []).append(row)
    shapes = sorted(by_shape)
    picks = torch.randint(len(shapes), (size,))
    return [by_shape[shapes[s]][torch.randint(len(by_shape[shapes[s]]), ()).item()] for s in picks.tolist()]


def uniform(train: list[dict], size: int) -> list[dict]:
    return [train[i] for i in torch.randint(len(train), (size,)).tolist()]


def exact_match(completions: list[str], rows: list[dict]) -> float:
    return sum(c.strip() == r["answer"] for c, r in zip(completions, rows)) / len(rows)


def chrf(completions: list[str], rows: list[dict]) -> float:
    metric = CHRF()
    return sum(metric.sentence_score(c, [r["reference"]]).score / 100 for c, r in zip(completions, rows)) / len(rows)


def rouge_l(completions: list[str], rows: list[dict]) -> float:
    scorer = RougeScorer(["rougeL"])
    return sum(scorer.score(r["reference"], c)["rougeL"].fmeasure for c, r in zip(completions, rows)) / len(rows)


def cider(completions: list[str], rows: list[dict]) -> float:
    """CIDEr-D against every reference of each image, document frequencies over these rows' references (as eval/cider
    and COCO's evaluation compute it)."""
    references = [[Cider.words(r) for r in row["reference"]] for row in rows]
    return CiderD(references).corpus([Cider.words(c) for c in completions], references)


def char_accuracy(completions: list[str], rows: list[dict]) -> float:
    """Characters in their place / answer length (reported beside exact match for long answers)."""
    return sum(sum(a == b for a, b in zip(c, r["answer"])) / len(r["answer"]) for c, r in zip(completions, rows)) / len(
        rows
    )


# Plain English for the BPE trainer besides the task's conversations, so that not every merge is digits.
ENGLISH = """Hello! How can I help you today? I am a small language model, trained from scratch on arithmetic.
Sure, here is the answer. Thank you for asking; let me know if there is anything else you would like.
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
Numbers can be added, subtracted, multiplied and divided. The sum of two numbers is their total.
Please write only the number, without any explanation. Could you check my work? That looks right to me.
We trained the tokenizer on this text and on the questions, so that words get merges of their own.
Every morning the baker opens the shop early, and the smell of fresh bread fills the whole street.
Rivers carry water from the mountains to the sea; along the way they shape valleys, plains and deltas.
Learning a new language takes patience: practice a little every day and listen to native speakers.
The library closes at six in the evening, but books can be returned through the slot by the door.
Scientists measure the temperature of the ocean at many depths to understand how the climate changes.
If you are not sure about a result, try a smaller example first and compare it with what you expect.
Good questions are short and precise. Good answers are correct, clear and no longer than they need to be.
Our team meets on Tuesdays to plan the week, review open problems and decide who works on what.
Children often count on their fingers before they learn to carry a digit from one column to the next.
The weather was cold and windy, so we stayed inside, drank hot tea and played a game of chess.
Computers represent text as a sequence of tokens; a tokenizer decides where one token ends and the next begins.
Remember to save your work often, and keep a backup copy somewhere safe in case something goes wrong.
She walked through the market, buying apples, onions, cheese and a loaf of bread for the picnic.
Mathematics is the study of patterns, quantities, shapes and the relations between them.
Thanks for your patience while I think about this. Here is what I found, step by step.
The train leaves the station at a quarter past nine and arrives in the city just before noon.
Write clearly, check your spelling, and ask a friend to read the draft before you send it."""


def chat_tokenizer(train: list[dict]) -> PreTrainedTokenizerFast:
    """BPE (512 tokens) on every training conversation with its answer, plus as many characters of the English
    above. With that mix most merges are words and the most frequent digit pairs ("10" to "17", the start of
    every sum from 100 up) get tokens of their own: about half the answers take fewer tokens than characters,
    most operands stay one digit per token. With the conversations alone every number up to 116 becomes one
    token, and the warm start then learns the sums of atomic numbers far more slowly (0.28 after 8,000 steps,
    against 0.41 after 575 steps with this mix)."""
    conversations = [chat_corpus_text([*r["prompt"], {"role": "assistant", "content": r["answer"]}]) for r in train]
    repeats = sum(map(len, conversations)) // len(ENGLISH)
    return make_bpe_chat_tokenizer(conversations + ENGLISH.splitlines() * repeats, vocab_size=512)


def sort_tokenizer(train: list[dict]) -> PreTrainedTokenizerFast:
    """Unigram (256 tokens) on every training prompt and its answer as the model sees them ("dacz= acdz"): answers
    of 4-8 letters take 2-6 tokens ("acdz" -> "▁acd" "z"), prompts, whose letters come in random order, mostly
    one token per letter."""
    corpus = (f"{r['prompt']} {r['answer']}" for r in train)
    return make_unigram_tokenizer(corpus, alphabet="abcdefghijklmnopqrstuvwxyz=")


@dataclass
class Task:
    make_tokenizer: Callable[[list[dict]], PreTrainedTokenizerFast]  # from the training rows
    make_model: Callable[[PreTrainedTokenizerFast], PreTrainedModel]
    max_new_tokens: int
    target: float  # default --target
    eval_every: int  # default --eval-every
    lr: float  # default --lr
    draw_batch: Callable[[list[dict], int], list[dict]]
    metric: Callable[[list[str], list[dict]], float]
    also_report: Callable[[list[str], list[dict]], float] | None = None  # printed beside the metric at each eval
    # written into tokenizer_config.json, as transformers 4.x (e.g. vLLM's) knows no "TokenizersBackend"
    tokenizer_class: str | None = None
    data: str | None = None  # the asset directory of its data when not the task's own name
    shipped: bool = True  # its model is in pipeline/assets (the default --out); else --out is required
    make_processor: Callable[[PreTrainedTokenizerFast], object] | None = None  # a vision-language model's


def target_text(row: dict, generator: torch.Generator) -> str:
    """What the model learns to write for a row: its answer, else one of its references drawn at random."""
    if "answer" in row:
        return row["answer"]
    references = row["reference"] if isinstance(row["reference"], list) else [row["reference"]]
    return references[torch.randint(len(references), (), generator=generator).item()]


def char_task(alphabet: str, n_positions: int, n_embd: int = 128, n_layer: int = 4, **kwargs) -> Task:
    return Task(
        make_tokenizer=lambda train: make_char_tokenizer(alphabet),
        make_model=lambda tokenizer: make_tiny_gpt2(tokenizer, n_embd=n_embd, n_layer=n_layer, n_positions=n_positions),
        **kwargs,
    )


TASKS = {
    "addition": char_task(
        "0123456789+=",
        32,
        max_new_tokens=5,
        target=0.55,
        eval_every=25,
        lr=2e-3,
        draw_batch=balanced_by_shape,
        metric=exact_match,
    ),
    "words": char_task(
        "0123456789= -abcdefghijklmnopqrstuvwxyz",
        48,
        max_new_tokens=32,
        target=0.55,
        eval_every=5,
        lr=2e-3,
        draw_batch=uniform,
        metric=chrf,
    ),
    # long answers (10-20 letters): stop while most characters are right but few whole answers are.
    # 0.16M parameters (n_embd 64, 3 layers): learns reversal in ~1,000 steps, and RL steps stay cheap
    "reverse": char_task(
        "abcdefghijklmnopqrstuvwxyz=",
        48,
        n_embd=64,
        n_layer=3,
        max_new_tokens=24,
        target=0.15,
        eval_every=50,
        lr=3e-3,
        draw_batch=uniform,
        metric=exact_match,
        also_report=char_accuracy,
    ),
    # ROUGE-L sits near 0.70 for ~1,600 steps while the model writes the commonest number for every fact
    # (6% of numbers right), then copying numbers is learned in a jump (0.72 -> 0.84 -> 0.93 -> 0.975,
    # exact match 0.09 -> 0.35 -> 0.65 -> 0.86, steps 1,600-1,800 with --threads 1). RL did not improve
    # warm starts stopped before or in the jump (0.63, 0.84: docs/credit.md); after it, it does.
    "summarize": char_task(
        "abcdefghijklmnopqrstuvwxyz0123456789 .,=",
        192,
        n_embd=64,
        n_layer=3,
        max_new_tokens=48,
        target=0.93,
        eval_every=50,
        lr=2e-3,
        draw_batch=uniform,
        metric=rouge_l,
        also_report=exact_match,
    ),
    "chat-addition": Task(
        make_tokenizer=chat_tokenizer,
        make_model=make_tiny_llama,
        max_new_tokens=6,  # the answer is 1-3 tokens, then the end-of-turn token
        target=0.40,
        eval_every=25,
        lr=1e-3,  # at 2e-3 held-out exact match jumped between 0.26 and 0.47 from one eval to the next
        draw_batch=balanced_by_shape,
        metric=exact_match,
        tokenizer_class="PreTrainedTokenizerFast",
    ),
    # the addition task on a model the defaults were not tuned on (benchmarks/staleness_study.py's
    # llama_addition pair): a char-level tiny Llama stopped near 0.40, not shipped (built by the study)
    "llama-addition": Task(
        make_tokenizer=lambda train: make_char_tokenizer("0123456789+="),
        make_model=make_tiny_llama,
        max_new_tokens=5,
        target=0.40,
        eval_every=25,
        lr=1e-3,
        draw_batch=balanced_by_shape,
        metric=exact_match,
        data="addition",
        shipped=False,
    ),
    # a third architecture and tokenizer kind for the defaults' panel (issue 30): GPT-NeoX + Unigram, not shipped
    "sort": Task(
        make_tokenizer=sort_tokenizer,
        make_model=make_tiny_gpt_neox,
        max_new_tokens=8,  # the answer is 2-6 tokens, then EOS
        target=0.45,
        eval_every=50,
        lr=2e-3,
        draw_batch=uniform,
        metric=exact_match,
        also_report=char_accuracy,
        tokenizer_class="PreTrainedTokenizerFast",
        shipped=False,
    ),
    "captioning": Task(
        make_tokenizer=lambda train: make_word_tokenizer(
            [r["prompt"] for r in train[:1]] + [c for r in train for c in r["reference"]]
        ),
        make_model=make_tiny_llava,
        make_processor=make_llava_processor,
        max_new_tokens=20,
        # held-out CIDEr-D climbs to 3.7 by step 1,000 and on: stopped near 2, where RL has room
        target=2.0,
        eval_every=50,
        lr=2e-3,
        draw_batch=uniform,
        metric=cider,
        tokenizer_class="PreTrainedTokenizerFast",
    ),
}


def save_tokenizer(task: Task, tokenizer: PreTrainedTokenizerFast, out: Path, processor=None) -> None:
    if processor is not None:  # the processor's config and its image processor's, then the tokenizer
        processor.save_pretrained(out)
    tokenizer.save_pretrained(out, save_jinja_files=False)  # the chat template inside tokenizer_config.json
    if task.tokenizer_class:
        config = json.loads((out / "tokenizer_config.json").read_text())
        config["tokenizer_class"] = task.tokenizer_class
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def greedy_completions(worker: RolloutWorker, model: torch.nn.Module, rows: list[dict]) -> list[str]:
    """Greedy completions, decoded without special tokens: the prompt text tokenised without adding any."""
    worker.set_weights(model.state_dict(), version=0)
    columns = ["prompt", "image"] if "image" in rows[0] else ["prompt"]  # a captioning row's image too
    prompts = pa.Table.from_pylist([{**{c: r[c] for c in columns}, "group_id": i} for i, r in enumerate(rows)])
    return worker.generate(prompts, group_size=1, greedy=True).column("response").to_pylist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=TASKS, default="addition")
    parser.add_argument(
        "--out", type=Path, help="default: pipeline/assets/<task, '-' as '_'>/model (required if not shipped)"
    )
    parser.add_argument("--target", type=float, help="stop once the eval metric reaches this (default: per task)")
    parser.add_argument("--seed", default=0, type=int)
    parser.add_argument("--lr", type=float, help="default: per task")
    parser.add_argument("--batch-size", default=64, type=int)
    parser.add_argument("--eval-every", type=int, help="default: per task")
    parser.add_argument("--max-steps", default=20000, type=int)
    parser.add_argument("--threads", default=2, type=int, help="torch threads (1 on a machine shared with another job)")
    args = parser.parse_args()

    task = TASKS[args.task]
    if args.out is None and not task.shipped:
        parser.error(f"--out is required for {args.task}: its model is not shipped in pipeline/assets")
    _, train_file, eval_file = builtin_paths(task.data or args.task.replace("-", "_"))
    out = args.out or ASSETS / args.task.replace("-", "_") / "model"
    target = task.target if args.target is None else args.target
    eval_every = args.eval_every or task.eval_every
    train, evaluation = read_rows(train_file), read_rows(eval_file)
    start, score = time.time(), 0.0
    generator = torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    tokenizer = task.make_tokenizer(train)
    model = task.make_model(tokenizer)
    processor = task.make_processor(tokenizer) if task.make_processor else None
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    save_tokenizer(task, tokenizer, out, processor)
    worker = RolloutWorker(
        load_config(overrides=[f"rollout.max_new_tokens={task.max_new_tokens}", f"rollout.num_threads={args.threads}"]),
        str(out),
    )

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr or task.lr)
    for step in range(1, args.max_steps + 1):
        rows = task.draw_batch(train, args.batch_size)
        # prompts tokenised exactly as the rollout worker does (BOS once); the answer without special tokens
        if processor:
            _, prompts, image_inputs = encode_image_prompts(
                processor, [r["prompt"] for r in rows], [open_image(r["image"]) for r in rows]
            )
        else:
            (_, prompts), image_inputs = encode_prompts(tokenizer, [r["prompt"] for r in rows]), {}
        answers = [
            tokenizer(target_text(r, generator), add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
            for r in rows
        ]
        width = max(len(p) + len(a) for p, a in zip(prompts, answers))
        ids = torch.full((len(rows), width), tokenizer.pad_token_id)
        labels = torch.full_like(ids, -100)  # loss only on the answer and EOS
        for i, (p, a) in enumerate(zip(prompts, answers)):
            ids[i, : len(p) + len(a)] = torch.tensor(p + a)
            labels[i, len(p) : len(p) + len(a)] = torch.tensor(a)
        loss = model(input_ids=ids, labels=labels, **image_inputs).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % eval_every == 0:
            model.eval()
            completions = greedy_completions(worker, model, evaluation)
            score = task.metric(completions, evaluation)
            model.train()
            extra = (
                f" {task.also_report.__name__} {task.also_report(completions, evaluation):.3f}"
                if task.also_report
                else ""
            )
            print(
                f"step {step} loss {loss.item():.3f} eval {task.metric.__name__} {score:.3f}{extra} "
                f"({time.time() - start:.0f}s)",
                flush=True,
            )
            if score >= target:
                break
    model.save_pretrained(out)
    save_tokenizer(task, tokenizer, out, processor)
    params = sum(p.numel() for p in model.parameters())
    print(f"saved {params / 1e6:.2f}M-parameter model with eval {task.metric.__name__} {score:.3f} to {out}")
    if task.draw_batch is balanced_by_shape:
        model.eval()
        completions = greedy_completions(worker, model, evaluation)
        for shape in sorted({operand_shape(r) for r in evaluation}):
            picked = [i for i, r in enumerate(evaluation) if operand_shape(r) == shape]
            value = task.metric([completions[i] for i in picked], [evaluation[i] for i in picked])
            print(f"  {'+'.join(map(str, shape))} digits: {task.metric.__name__} {value:.3f} on {len(picked)} prompts")
    print(f"took {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
