"""Write a built-in task's prompt files (jsonl): deterministic, so running it again gives the same files.

- addition: prompts `a+b=` (operands 0-99), field `answer` = the decimal sum. All 10,000 ordered
  pairs shuffled with a fixed seed; 1,000 held out for evaluation, 9,000 for training.
- words: prompts `n=` (0-999), fields `reference` and `answer` = the number in English words
  ("342=" -> "three hundred forty-two"), a toy translation task scored with chrF. 200 held out.
- reverse: prompts `s=`, s a random string of 10-20 lowercase letters; field `answer` = s reversed (12-30
  tokens with EOS on a char-level model): a long-output task where one wrong character zeroes exact match.
  10,000 prompts, 500 held out.
- summarize: prompts `<document> =`, a document of 60-150 characters holding 1-3 facts ("ann has 3 cats.")
  among distractor sentences; fields `reference` and `answer` = the facts in order, compressed
  ("ann 3 cats, bob 5 pens"). 10,000 prompts, 500 held out.
- chat-addition: the addition task as a chat: `prompt` is a conversational (TRL-style) list of messages,
  `[{"role": "user", "content": "What is 37+45?"}]`, in one of several phrasings, a quarter of them after
  a short system message; `answer` = the decimal sum. The same operand pairs as addition are held out.
- sort: prompts `s=`, s a random string of 4-8 lowercase letters (repeats allowed); field `answer` = s's letters
  in alphabetical order ("dbca=" -> "abcd"): 2-6 tokens of the Unigram tokenizer that scripts/make_task_model.py
  trains for it. 6,000 prompts, 500 held out (250 KB in all, shipped; its model is not).
- captioning: 32x32 scenes of one or two shapes (circle, square, triangle; four colours; small or big; on the
  left, in the middle or on the right) on a light background; `prompt` = "describe the picture", `image` =
  the PNG (an HF `datasets` Image column), `reference` = five captions of the scene in varied phrasing
  ("a big red circle on the left", "there is a large red circle at the left", ...). Written as Parquet:
  3,000 scenes, 200 held out.

    python scripts/make_task_data.py --task addition|words|reverse|summarize|chat-addition|sort|captioning
        [--out pipeline/assets/<task dir>]
"""

import argparse
import io
import json
import random
from pathlib import Path

import datasets
from PIL import Image, ImageDraw

ONES = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
]
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


LETTERS = "abcdefghijklmnopqrstuvwxyz"


def reverse_rows() -> tuple[list[dict], int]:
    rng = random.Random(1234)
    strings = ["".join(rng.choice(LETTERS) for _ in range(rng.randint(10, 20))) for _ in range(10_000)]
    return [{"prompt": f"{s}=", "answer": s[::-1]} for s in strings], 500


def sort_rows() -> tuple[list[dict], int]:
    rng = random.Random(1234)
    strings = ["".join(rng.choice(LETTERS) for _ in range(rng.randint(4, 8))) for _ in range(6_000)]
    return [{"prompt": f"{s}=", "answer": "".join(sorted(s))} for s in strings], 500


NAMES = ["ann", "bob", "cy", "dan", "eve", "fay", "gus", "hal", "ida", "jo", "kim", "lou", "max", "ned", "ola", "pam"]
THINGS = ["cats", "dogs", "pens", "cups", "hats", "keys", "maps", "eggs", "bags", "kites"]
DISTRACTORS = [
    "it was a sunny day.",
    "the room was quiet.",
    "nobody said a word.",
    "the bus was late.",
    "rain fell all night.",
    "the tea was cold.",
    "a bell rang twice.",
    "the shop was shut.",
    "we sat by the door.",
    "the wind was strong.",
    "it got dark early.",
    "the lamp was on.",
]


def summarize_rows() -> tuple[list[dict], int]:
    """Documents of 60-150 characters: 1-3 facts ("ann has 3 cats.") among distractor sentences, in random
    order; the summary lists the facts in document order as "ann 3 cats, bob 5 pens"."""
    rng, rows = random.Random(1234), []
    while len(rows) < 10_000:
        facts = [(name, rng.randint(2, 9), rng.choice(THINGS)) for name in rng.sample(NAMES, rng.randint(1, 3))]
        sentences = [f"{n} has {k} {t}." for n, k, t in facts]
        while sum(len(x) + 1 for x in sentences) < 60 + rng.randint(0, 60):
            sentences.append(rng.choice(DISTRACTORS))
        rng.shuffle(sentences)
        document = " ".join(sentences)
        if not 60 <= len(document) <= 150:
            continue
        in_order = sorted(facts, key=lambda f: document.index(f"{f[0]} has "))
        summary = ", ".join(f"{n} {k} {t}" for n, k, t in in_order)
        rows.append({"prompt": f"{document} =", "reference": summary, "answer": summary})
    return rows, 500


SHAPES, COLOURS = (
    ("circle", "square", "triangle"),
    {
        "red": (220, 40, 40),
        "green": (40, 170, 60),
        "blue": (40, 70, 220),
        "yellow": (230, 200, 30),
    },
)
SIZES = {"small": 5, "big": 11}  # half the shape's width in pixels
SIZE_WORDS = {"small": ("small", "little"), "big": ("big", "large")}
PLACES = {"left": 8, "middle": 16, "right": 24}  # the shape's centre x
SCENE_SIZE = 32


def draw_scene(objects: list[dict], rng: random.Random) -> bytes:
    """The PNG of a light background with each object (shape, colour, size, place) drawn at its place, at a
    jittered height."""
    shade = rng.randint(225, 255)
    image = Image.new("RGB", (SCENE_SIZE, SCENE_SIZE), (shade, shade, shade))
    draw = ImageDraw.Draw(image)
    for o in objects:
        r, x, y = SIZES[o["size"]], PLACES[o["place"]] + rng.randint(-1, 1), 16 + rng.randint(-4, 4)
        box, colour = (x - r, y - r, x + r, y + r), COLOURS[o["colour"]]
        if o["shape"] == "circle":
            draw.ellipse(box, fill=colour)
        elif o["shape"] == "square":
            draw.rectangle(box, fill=colour)
        else:
            draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=colour)
    png = io.BytesIO()
    image.save(png, format="PNG")
    return png.getvalue()


def scene_captions(objects: list[dict], rng: random.Random) -> list[str]:
    """Five captions of the scene, each in another phrasing (size synonyms, size left out, places said
    differently, the two objects in either order)."""

    def thing(o, variant):  # "big red circle", "large red circle", "red circle"
        size = "" if variant == 2 else SIZE_WORDS[o["size"]][variant] + " "
        return f"{size}{o['colour']} {o['shape']}"

    def where(o, variant):
        if o["place"] == "middle":
            return ("in the middle", "in the centre")[variant % 2]
        return (f"on the {o['place']}", f"at the {o['place']}")[variant % 2]

    if len(objects) == 1:
        (o,) = objects
        captions = [
            f"a {thing(o, 0)} {where(o, 0)}",
            f"there is a {thing(o, 1)} {where(o, 1)}",
            f"a {thing(o, 2)} {where(o, 0)}",
            f"one {thing(o, 0)} {where(o, 1)}",
            f"a {thing(o, 1)} {where(o, 0)}",
        ]
    else:
        a, b = objects
        captions = [
            f"a {thing(a, 0)} on the left and a {thing(b, 0)} on the right",
            f"two shapes : a {thing(a, 1)} and a {thing(b, 1)}",
            f"a {thing(b, 2)} on the right and a {thing(a, 2)} on the left",
            f"there is a {thing(a, 0)} next to a {thing(b, 0)}",
            f"a {thing(a, 2)} and a {thing(b, 1)}",
        ]
    rng.shuffle(captions)
    return captions


def captioning_rows() -> tuple[list[dict], int]:
    rng = random.Random(1234)
    rows = []
    for _ in range(3000):

        def pick(place):
            return {
                "shape": rng.choice(SHAPES),
                "colour": rng.choice(list(COLOURS)),
                "size": rng.choice(list(SIZES)),
                "place": place,
            }

        objects = [pick(rng.choice(list(PLACES)))] if rng.random() < 0.5 else [pick("left"), pick("right")]
        rows.append(
            {
                "prompt": "describe the picture",
                "image": {"bytes": draw_scene(objects, rng), "path": None},
                "reference": scene_captions(objects, rng),
            }
        )
    return rows, 200


TASKS = {
    "addition": addition_rows,
    "words": words_rows,
    "reverse": reverse_rows,
    "summarize": summarize_rows,
    "chat-addition": chat_addition_rows,
    "sort": sort_rows,
    "captioning": captioning_rows,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=TASKS, default="addition")
    parser.add_argument("--out", type=Path, help="default: pipeline/assets/<task, '-' as '_'>")
    args = parser.parse_args()
    out = args.out or Path(__file__).parent.parent / "pipeline" / "assets" / args.task.replace("-", "_")
    rows, eval_size = TASKS[args.task]()
    out.mkdir(parents=True, exist_ok=True)
    for name, split in [("eval", rows[:eval_size]), ("train", rows[eval_size:])]:
        if "image" in split[0]:  # images as an HF Image column (PNG bytes), in Parquet
            features = datasets.Features(
                {"prompt": datasets.Value("string"), "image": datasets.Image(), "reference": [datasets.Value("string")]}
            )
            path = out / f"{name}.parquet"
            datasets.Dataset.from_list(split, features=features).to_parquet(str(path))
        else:
            path = out / f"{name}.jsonl"
            with open(path, "w") as f:
                f.writelines(json.dumps(row) + "\n" for row in split)
        print(f"wrote {len(split)} prompts to {path}")


if __name__ == "__main__":
    main()
