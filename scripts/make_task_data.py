"""Write a built-in task's prompt files (jsonl): deterministic, so running it again gives the same files.

- addition: prompts `a+b=` (operands 0-99), field `answer` = the decimal sum. All 10,000 ordered
  pairs shuffled with a fixed seed; 1,000 held out for evaluation, 9,000 for training.
- words: prompts `n=` (0-999), fields `reference` and `answer` = the number in English words
  ("342=" -> "three hundred forty-two"), a toy translation task scored with chrF. 200 held out.
- chat-addition: the addition task as a chat: `prompt` is a conversational (TRL-style) list of messages,
  `[{"role": "user", "content": "What is 37+45?"}]`, in one of several phrasings, a quarter of them after
  a short system message; `answer` = the decimal sum. The same operand pairs as addition are held out.

    python scripts/make_task_data.py --task addition|words|chat-addition [--out pipeline/assets/<task dir>]
"""

import argparse
import json
import random
from pathlib import Path

ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
TENS = ["_", "_", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def in_words(n: int) -> str:
    """0 <= n <= 999 in English words: 342 -> 'three hundred forty-two'."""
    hundreds, rest = divmod(n, 100)
    if rest < 20:
        tail = ONES[rest]
    else:
        tail = TENS[rest // 10] + (f"-{ONES[rest % 10]}" if rest % 10 else "")
    if not hundreds:
        return tail
    return f"{ONES[hundreds]} hundred" + (f" {tail}" if rest else "")


def addition_rows() -> tuple[list[dict], int]:
    pairs = [(a, b) for a in range(100) for b in range(100)]
    random.Random(1234).shuffle(pairs)
    return [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a, b in pairs], 1000


QUESTIONS = [
    "What is {a}+{b}?",
    "What is {a} + {b}?",
    "Compute {a}+{b}.",
    "{a}+{b}=",
    "Add {a} and {b}.",
    "What is the sum of {a} and {b}?",
]
SYSTEM_MESSAGES = ["You are a helpful assistant.", "Answer with the number only."]


def chat_addition_rows() -> tuple[list[dict], int]:
    rows, eval_size = addition_rows()
    rng = random.Random(4321)
    for row in rows:
        a, b = row["prompt"][:-1].split("+")
        messages = [{"role": "user", "content": rng.choice(QUESTIONS).format(a=a, b=b)}]
        if rng.random() < 0.25:
            messages.insert(0, {"role": "system", "content": rng.choice(SYSTEM_MESSAGES)})
        row["prompt"] = messages
    return rows, eval_size


def words_rows() -> tuple[list[dict], int]:
    numbers = list(range(1000))
    random.Random(1234).shuffle(numbers)
    return [{"prompt": f"{n}=", "reference": in_words(n), "answer": in_words(n)} for n in numbers], 200


TASKS = {"addition": addition_rows, "words": words_rows, "chat-addition": chat_addition_rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=TASKS, default="addition")
    parser.add_argument("--out", type=Path, help="default: pipeline/assets/<task, '-' as '_'>")
    args = parser.parse_args()
    out = args.out or Path(__file__).parent.parent / "pipeline" / "assets" / args.task.replace("-", "_")
    rows, eval_size = TASKS[args.task]()
    out.mkdir(parents=True, exist_ok=True)
    for name, split in [("eval", rows[:eval_size]), ("train", rows[eval_size:])]:
        with open(out / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in split)
        print(f"wrote {len(split)} prompts to {out / f'{name}.jsonl'}")


if __name__ == "__main__":
    main()
