"""Generic text for pre-training: simple sentences and everyday instructions in Alpaca form.

The instructions teach the backbone the request/response format on non-domain tasks, so it is
a small "general" model: it answers in the right shape, just not the domains' problems.
"""

from __future__ import annotations

import random

from ccoe_common.engine.templates import render_alpaca

ADJ = ("red", "small", "quiet", "happy", "old", "bright", "cold", "green", "tall", "soft")
NOUN = ("cat", "dog", "bird", "tree", "river", "house", "child", "boat", "garden", "road")
VERB = ("sees", "likes", "finds", "follows", "paints", "visits", "watches", "builds")
OPPOSITES = {"hot": "cold", "big": "small", "up": "down", "day": "night", "old": "new", "fast": "slow",
             "happy": "sad", "open": "closed", "light": "dark", "early": "late"}
COLORS = {"sky": "blue", "grass": "green", "snow": "white", "coal": "black", "blood": "red", "sun": "yellow"}


def sentence(rng: random.Random) -> str:
    return (f"The {rng.choice(ADJ)} {rng.choice(NOUN)} {rng.choice(VERB)} the {rng.choice(ADJ)} "
            f"{rng.choice(NOUN)}.")


def copy_instruction(rng: random.Random) -> tuple[str, str]:
    """Requests whose answer repeats numbers or words from the request: the copying every
    domain's answer needs (a word problem's numbers, a SQL query's names), taught on neutral text."""
    kind = rng.randrange(4)
    if kind == 0:
        nums = [str(rng.randint(1, 9999)) for _ in range(rng.randint(1, 3))]
        return f"Repeat these numbers: {', '.join(nums)}.", ", ".join(nums)
    if kind == 1:
        n = rng.randint(1, 999)
        return f"Which number is in this sentence? The {rng.choice(ADJ)} {rng.choice(NOUN)} has {n} leaves.", str(n)
    if kind == 2:
        a, b = rng.randint(1, 999), rng.randint(1, 999)
        return f"Write the two numbers in {a} {rng.choice(NOUN)}s and {b} {rng.choice(NOUN)}s.", f"{a} and {b}"
    word = rng.choice(ADJ + NOUN)
    return f"Put the word {word} in quotes.", f"'{word}'"


def instruction(rng: random.Random) -> tuple[str, str]:
    if rng.random() < 0.5:
        return copy_instruction(rng)
    kind = rng.randrange(4)
    if kind == 0:
        word = rng.choice(list(OPPOSITES))
        return f"What is the opposite of {word}?", OPPOSITES[word]
    if kind == 1:
        thing = rng.choice(list(COLORS))
        return f"What color is the {thing}?", f"The {thing} is {COLORS[thing]}."
    if kind == 2:
        words = [rng.choice(NOUN) for _ in range(3)]
        return f"Repeat these words: {' '.join(words)}.", " ".join(words)
    s = sentence(rng)
    return f"Copy this sentence: {s}", s


def pretrain_text(rng: random.Random, eos: str) -> str:
    """A short document: a few sentences, or one instruction with its answer."""
    if rng.random() < 0.5:
        return " ".join(sentence(rng) for _ in range(rng.randint(2, 5)))
    q, a = instruction(rng)
    return render_alpaca(q) + a + eos
