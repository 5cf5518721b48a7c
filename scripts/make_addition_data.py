"""Write the built-in addition task: prompts `a+b=` (operands 0-99), answer the decimal sum.

All 10,000 ordered pairs are shuffled with a fixed seed; 1,000 are held out for evaluation and
the remaining 9,000 are the training prompts. Deterministic: running it again gives the same files.

    python scripts/make_addition_data.py [--out pipeline/assets/addition]
"""

import argparse
import json
import random
from pathlib import Path

EVAL_SIZE = 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=Path(__file__).parent.parent / "pipeline" / "assets" / "addition", type=Path)
    parser.add_argument("--seed", default=1234, type=int)
    args = parser.parse_args()
    pairs = [(a, b) for a in range(100) for b in range(100)]
    random.Random(args.seed).shuffle(pairs)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, split in [("eval", pairs[:EVAL_SIZE]), ("train", pairs[EVAL_SIZE:])]:
        with open(args.out / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)}) + "\n" for a, b in split)
        print(f"wrote {len(split)} prompts to {args.out / f'{name}.jsonl'}")


if __name__ == "__main__":
    main()
