"""Personal-data redaction (gopher_jax/pii.py): planted addresses, phones and a card are
replaced and counted; ordinary numbers are kept."""

from __future__ import annotations

import pytest

pytest.importorskip("datatrove")
from gopher_jax import pii  # noqa: E402

VALID_CARD = "4111 1111 1111 1111"  # the Visa test number: Luhn-valid
INVALID_CARD = "4111 1111 1111 1112"  # one digit changed: fails the Luhn check


def test_planted_personal_data_is_replaced_and_counted():
    text = ("Write to jane.doe@example.org or ops+alerts@mail.example.co.uk.\n"
            "Call +44 20 7946 0958, (555) 123-4567 or 020 7946 0958.\n"
            "The host is 203.0.113.7, the router 10.0.0.1, the v6 one 2001:db8::8a2e:370:7334.\n"
            f"Paid with {VALID_CARD} and 378282246310005.\n")
    out, counts = pii.redact(text)
    assert counts == {"email": 2, "ipv6": 1, "ipv4": 2, "card": 2, "phone": 3}
    for planted in ("jane.doe", "ops+alerts", "7946", "123-4567", "203.0.113.7", "10.0.0.1",
                    "2001:db8", "4111", "378282246310005"):
        assert planted not in out
    assert out.count("<EMAIL>") == 2 and out.count("<PHONE>") == 3
    assert out.count("<IP>") == 3 and out.count("<CARD>") == 2


def test_luhn_invalid_numbers_years_and_line_numbers_are_kept():
    text = (f"Card {INVALID_CARD} was refused.\n"
            "Line 1042 of the 1999-2005 report, 12:30:45, version 3.11, in 2024-01-15.\n"
            "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15\n"
            "1999 2000 2001 2002 were good years; order 1234567890123 shipped.\n")
    out, counts = pii.redact(text)
    assert out == text
    assert sum(counts.values()) == 0


def test_luhn_check():
    assert pii.luhn_valid("4111111111111111")
    assert pii.luhn_valid("79927398713")
    assert not pii.luhn_valid("4111111111111112")
    assert not pii.luhn_valid("79927398710")
