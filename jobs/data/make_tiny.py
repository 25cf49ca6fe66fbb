"""Regenerate ``tiny.txt``: deterministic little stories from a small grammar (ASCII, ~30 KB).

The character-level transformer example (``jobs/charlm.yaml``) trains on the output. Nothing here is
copied from anywhere, so the text is free to ship; run ``python jobs/data/make_tiny.py`` to rebuild it
byte for byte (``random.Random`` with a fixed seed is stable across Python versions).
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

ADJ = ["small", "old", "quiet", "brave", "sleepy", "clever", "red", "grey", "happy", "curious", "tired", "kind"]
ANIMAL = ["fox", "owl", "cat", "rabbit", "bear", "mouse", "crow", "otter", "goat", "hedgehog", "duck", "wolf"]
HOME = ["under a bridge", "in a hollow tree", "near the river", "at the edge of the wood", "on a green hill",
        "behind the mill", "in a warm barn", "by the old well"]
TIME = ["morning", "evening", "afternoon", "spring day", "winter night", "rainy day"]
PLACE = ["market", "lake", "meadow", "garden", "forest", "village", "harbour", "orchard"]
DO = ["look for berries", "watch the boats", "count the stars", "listen to the wind", "find a quiet spot",
      "sing a little song", "gather dry leaves", "visit a friend"]
FOUND = ["a shiny key", "a lost hat", "a broken kite", "a basket of apples", "a map with no names",
         "a bell that would not ring", "a letter tied with string", "a lantern without a flame"]
FEEL = ["surprised", "puzzled", "glad", "worried", "excited", "unsure"]
END = ["They shared the apples and laughed until the sun went down.",
       "From that day on, the two of them met by the {place} every {time}.",
       "The {animal} went home, made a cup of tea and slept very well.",
       "Nobody ever learned where it came from, and that was fine.",
       "The {animal} kept it on a shelf, and smiled whenever it looked at it.",
       "In the end they gave it to the {adj2} {animal2}, who needed it most."]


def a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def story(rng: random.Random) -> str:
    adj, animal = rng.choice(ADJ), rng.choice(ANIMAL)
    adj2, animal2 = rng.choice(ADJ), rng.choice([a for a in ANIMAL if a != animal])
    place, time = rng.choice(PLACE), rng.choice(TIME)
    found, feel = rng.choice(FOUND), rng.choice(FEEL)
    lines = [
        f"Once there was {a(adj)} {animal} who lived {rng.choice(HOME)}.",
        f"Every {time}, the {animal} went to the {place} to {rng.choice(DO)}.",
        f"One {rng.choice(TIME)} it found {found} and felt {feel}.",
        f'"What should I do with this?" asked the {animal}.',
        f'"Keep it safe," said {a(adj2)} {animal2}, "and ask again tomorrow."',
        rng.choice(END).format(place=place, time=time, animal=animal, adj2=adj2, animal2=animal2),
    ]
    if rng.random() < 0.5:
        lines.insert(3, f"The {animal} had never seen {found} before.")
    return " ".join(lines)


def text(size: int = 32_000, seed: int = 5) -> str:
    rng = random.Random(seed)
    parts: list[str] = []
    total = 0
    while total < size:
        parts.append(story(rng))
        total += len(parts[-1]) + 2
    return "\n\n".join(parts) + "\n"


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("tiny.txt")
    out.write_text(text(), encoding="ascii")
    print(f"wrote {out} ({out.stat().st_size} bytes)")
