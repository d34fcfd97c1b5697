"""The embedded default dataset: small listwise reward data with verifiable, graded rewards.

Every list is one short task with a single correct answer -- integer addition and multiplication, and
reversing, upper-casing or alphabetically sorting the letters of a word -- and K candidate answers: the
correct one and graded corruptions (off-by-one, off-by-ten, digit swaps, partial edits, dropped or
doubled letters). Each candidate's reward says how close it is to correct, so rewards are graded, not
binary:

- numbers: ``reward = max(0, 1 - |answer - truth| / max(|truth|, 10))``
- words:   ``reward = 1 - levenshtein(answer, truth) / max(len(answer), len(truth))``

rounded to 4 decimals (the correct answer always scores 1.0). Lists are written in the generic listwise
JSONL format ``{"id", "task", "prompt", "responses": [{"text", "reward"}]}``; the order of responses is
shuffled (the best one is not always first). K = 8 lists are the full candidate sets; the K = 4 lists hold
the same prompts with a nested subset (correct answer + 3 corruptions), so that K = 2 ⊂ K = 4 ⊂ K = 8
for the K ablation (:func:`subset_lists`). Held-out lists use words and operand pairs never seen in training.

Everything is a pure function of the seed: ``python -m nemo_lpo.demo.tasks --out DIR`` regenerates the
files shipped in ``nemo_lpo/demo/data`` byte for byte.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from nemo_lpo.io import atomic_write

SEED = 20261127
TASKS = ("add", "mul", "reverse", "upper", "sort")
NUM_TRAIN = 320  # lists in the train split (64 per task)
NUM_HELDOUT = 64  # lists in the held-out split
MAX_K = 8
DATA_DIR = Path(__file__).resolve().parent / "data"
FILES = {  # file name -> (split, K)
    "train.jsonl": ("train", 4),
    "heldout.jsonl": ("heldout", 4),
    "train_k8.jsonl": ("train", 8),
    "heldout_k8.jsonl": ("heldout", 8),
}

_WORDS = (
    "apple amber anchor arrow autumn badge basket beacon bishop blanket bottle breeze bridge bucket butter "
    "cactus camera candle canyon carpet castle cattle cellar cherry circus clover cobalt copper cotton cradle "
    "dancer desert dinner donkey dragon drawer eagle effort engine falcon farmer feather fields finger forest "
    "fossil garden garlic glider goblet gravel guitar hammer harbor helmet hermit hollow honey hunter "
    "island jacket jigsaw jungle kettle kitten ladder lantern lemon letter lizard locket magnet mantle marble "
    "meadow mirror monkey mortar needle nickel number orange oyster paddle parrot pencil pepper pickle pillow "
    "planet pocket potato puzzle rabbit radish ribbon rocket saddle salmon shadow silver sketch spider spirit "
    "stable sugar summer tablet temple thread ticket timber tomato tunnel turtle valley velvet violin walnut "
    "window winter wizard yellow zephyr"
).split()

_BLOCKED = ("nigg", "fag", "cunt", "shit", "fuck", "rape", "slut", "whore", "dick", "cock", "porn", "kike", "spic")


def levenshtein(a: str, b: str) -> int:
    """Return the edit distance (insertions, deletions, substitutions) between ``a`` and ``b``."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def number_reward(answer: int, truth: int) -> float:
    """Reward of a numeric answer: 1 when exact, falling linearly with the relative error, floored at 0."""
    return round(max(0.0, 1.0 - abs(answer - truth) / max(abs(truth), 10)), 4)


def word_reward(answer: str, truth: str) -> float:
    """Reward of a word answer: one minus the edit distance normalised by the longer length."""
    return round(1.0 - levenshtein(answer, truth) / max(len(answer), len(truth), 1), 4)


def _digit_swaps(n: int) -> list[int]:
    s = str(n)
    return [int(s[:i] + s[i + 1] + s[i] + s[i + 2 :]) for i in range(len(s) - 1) if s[i] != s[i + 1] and (i or s[1] != "0")]


def _number_pool(task: str, a: int, b: int, truth: int) -> list[int]:
    pool = [truth + 1, truth - 1, truth + 2, truth - 10, truth + 10, *_digit_swaps(truth)]
    if task == "add":
        pool += [abs(a - b), a * b if a * b < 1000 else truth + 20, int(str(a) + str(b)[-1])]
    else:
        pool += [truth + a, truth - a, truth + b, a + b]
    return [p for p in pool if p >= 0 and p != truth]


def _word_pool(task: str, word: str, truth: str, rng: random.Random) -> list[str]:
    n = len(truth)
    pool = []
    for i in rng.sample(range(n - 1), 2):  # two different adjacent swaps
        pool.append(truth[:i] + truth[i + 1] + truth[i] + truth[i + 2 :])
    i = rng.randrange(n)
    pool.append(truth[:i] + truth[i + 1 :])  # a dropped letter
    pool.append(truth[:i] + truth[i] + truth[i:])  # a doubled letter
    j = rng.randrange(n)
    letter = rng.choice([c for c in "abcdefghijklmnopqrstuvwxyz" if c != truth[j].lower()])
    pool.append(truth[:j] + (letter.upper() if task == "upper" else letter) + truth[j + 1 :])  # a wrong letter
    pool.append(word)  # the task not done at all
    half = n // 2
    if task == "reverse":
        pool += [word[:half][::-1] + word[half:], word[::-1][:half] + word[half:]]  # partial reversals
    elif task == "upper":
        pool += [word[:half].upper() + word[half:], word.capitalize()]  # partial upper-casing
    else:
        pool += ["".join(sorted(word[:half])) + word[half:], "".join(sorted(word, reverse=True))]
    shuffled = list(truth)
    rng.shuffle(shuffled)
    pool.append("".join(shuffled))
    return [p for p in pool if p != truth and not _unfit(p)]


def _unfit(text: str) -> bool:
    """True for a scrambled candidate that happens to spell an offensive word (never shipped)."""
    return any(bad in text.lower() for bad in _BLOCKED)


def make_list(task: str, operand, rng: random.Random, list_id: str) -> dict:
    """Return one K = 8 list: prompt, the correct answer and 7 distinct graded corruptions, shuffled."""
    if task in ("add", "mul"):
        a, b = operand
        truth = a + b if task == "add" else a * b
        prompt = f"What is {a} + {b}?" if task == "add" else f"What is {a} * {b}?"
        pool = list(dict.fromkeys(_number_pool(task, a, b, truth)))
        while len(pool) < MAX_K - 1:
            extra = truth + rng.randint(-3 * max(truth, 10), 3 * max(truth, 10))
            if extra >= 0 and extra != truth and extra not in pool:
                pool.append(extra)
        wrong = rng.sample(pool, MAX_K - 1)
        responses = [{"text": str(x), "reward": number_reward(x, truth)} for x in [truth, *wrong]]
    else:
        word = operand
        truth = {"reverse": word[::-1], "upper": word.upper(), "sort": "".join(sorted(word))}[task]
        prompt = {
            "reverse": f"Reverse the letters of '{word}'.",
            "upper": f"Write '{word}' in uppercase.",
            "sort": f"Sort the letters of '{word}' alphabetically.",
        }[task]
        pool = list(dict.fromkeys(_word_pool(task, word, truth, rng)))
        while len(pool) < MAX_K - 1:
            extra = "".join(rng.sample(truth, len(truth)))
            if extra != truth and extra not in pool and not _unfit(extra):
                pool.append(extra)
        wrong = rng.sample(pool, MAX_K - 1)
        responses = [{"text": x, "reward": word_reward(x, truth)} for x in [truth, *wrong]]
    # slot of each response in the K=8 list; the first 1/2/4 drawn form the nested K=2/4 subsets
    order = list(range(MAX_K))
    rng.shuffle(order)
    shuffled = [None] * MAX_K
    for source, slot in enumerate(order):
        shuffled[slot] = dict(responses[source], nest=source)
    return {"id": list_id, "task": task, "prompt": prompt, "responses": shuffled}


def _operands(rng: random.Random) -> dict[str, dict[str, list]]:
    """Draw disjoint train / held-out operands for every task."""
    words = list(_WORDS)
    rng.shuffle(words)
    n_held_words = len(words) // 5
    held_words, train_words = words[:n_held_words], words[n_held_words:]
    per_task_train = NUM_TRAIN // len(TASKS)
    per_task_held = [NUM_HELDOUT // len(TASKS) + (i < NUM_HELDOUT % len(TASKS)) for i in range(len(TASKS))]
    out = {"train": {}, "heldout": {}}
    for t, task in enumerate(TASKS):
        if task in ("add", "mul"):
            pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)] if task == "add" else [
                (a, b) for a in range(2, 13) for b in range(3, 30)
            ]
            chosen = rng.sample(pairs, per_task_train + per_task_held[t])
            out["train"][task], out["heldout"][task] = chosen[:per_task_train], chosen[per_task_train:]
        else:
            out["train"][task] = [rng.choice(train_words) for _ in range(per_task_train)]
            out["heldout"][task] = rng.sample(held_words, per_task_held[t])
    return out


def generate(seed: int = SEED) -> dict[str, list[dict]]:
    """Return the K = 8 lists of both splits, ``{"train": [...], "heldout": [...]}``, as a pure function of ``seed``."""
    rng = random.Random(seed)
    operands = _operands(rng)
    splits = {}
    for split, per_task in operands.items():
        lists = []
        for task in TASKS:
            for operand in per_task[task]:
                lists.append(make_list(task, operand, rng, list_id=""))
        rng.shuffle(lists)  # interleave tasks
        for i, item in enumerate(lists):
            item["id"] = f"{split}-{i:04d}-{item['task']}"
        splits[split] = lists
    return splits


def subset_lists(lists: list[dict], k: int) -> list[dict]:
    """Return the nested K-subsets (k in 1..8) of K = 8 lists: the correct answer and the first k - 1 corruptions.

    The responses keep their shuffled K = 8 order; ``nest`` (the internal nesting index) is dropped.
    """
    if not 1 <= k <= MAX_K:
        raise ValueError(f"k must be in 1..{MAX_K}, got {k}")
    out = []
    for item in lists:
        responses = [{"text": r["text"], "reward": r["reward"]} for r in item["responses"] if r["nest"] < k]
        out.append({"id": item["id"], "task": item["task"], "prompt": item["prompt"], "responses": responses})
    return out


def to_jsonl(lists: list[dict]) -> bytes:
    """Serialise lists as JSONL bytes (UTF-8, one list per line, fixed key order)."""
    return "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in lists).encode("utf-8")


def render_files(seed: int = SEED) -> dict[str, bytes]:
    """Return the bytes of every shipped file (:data:`FILES`) for ``seed``."""
    splits = generate(seed)
    return {name: to_jsonl(subset_lists(splits[split], k)) for name, (split, k) in FILES.items()}


def write_files(out_dir: Path, seed: int = SEED) -> list[Path]:
    """Write every shipped file under ``out_dir``; returns their paths."""
    paths = []
    for name, data in render_files(seed).items():
        atomic_write(Path(out_dir) / name, data)
        paths.append(Path(out_dir) / name)
    return paths


def main(argv: list[str] | None = None) -> int:
    """Regenerate the embedded default dataset (``python -m nemo_lpo.demo.tasks``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DATA_DIR, help="output folder (default: the shipped data/)")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    for path in write_files(args.out, args.seed):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
