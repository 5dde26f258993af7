"""Personal data in text replaced by placeholders: e-mail addresses, phone numbers, IPv4 and
IPv6 addresses, payment card numbers (Luhn-checked), with a count per kind.

    text, counts = redact("mail jo@example.org or call +44 20 7946 0958")
    # "mail <EMAIL> or call <PHONE>", {"email": 1, "phone": 1, ...}

The e-mail and IPv4 patterns are datatrove's PII formatter's (datatrove/pipeline/formatters/
pii.py, the `data` extra). Its `format` is not used as it is: it replaces with real-looking
addresses cycled from a list (a reader cannot tell redacted text from real), counts nothing,
and knows no phones, IPv6 or cards; so the kinds below are matched here, each with its own
pattern and, where a pattern alone would take ordinary numbers, a check:

- IPv4 and IPv6: any address `ipaddress` accepts (private ones too: an internal address
  identifies a machine inside an organisation).
- Cards: 13-19 digits, contiguous or in the printed groups (4-4-4-4[-3], Amex 4-6-5), starting
  with an issuer prefix (3, 4, 5, 6 or 2221-2720) and passing the Luhn check; so years, line
  numbers and most other long numbers are kept.
- Phones: a `+` country code with 8-15 digits in groups, the North American 3-3-4 form
  ((555) 123-4567, 555-123-4567, 555.123.4567) or a national number with its trunk 0 in
  groups (020 7946 0958). Bare digit runs are not phones (ids, counts, years).
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Callable

PLACEHOLDERS = {"email": "<EMAIL>", "ipv6": "<IP>", "ipv4": "<IP>", "card": "<CARD>",
                "phone": "<PHONE>"}
KINDS = tuple(PLACEHOLDERS)  # the order they are replaced in: e-mails hold digits and dots

_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|"
                   r"\d{1,3}(?:\.\d{1,3}){3})?(?![\w:])")
_CARD = re.compile(r"(?<![\d-])(?:\d{13,19}|\d{4}([ -])\d{4}\1\d{4}\1\d{1,4}(?:\1\d{3})?"
                   r"|\d{4}([ -])\d{6}\2\d{5})(?![\d-])")
_PHONE = re.compile(
    r"(?<![\w+])(?:\+\d{1,3}(?:[ .-]?\(?\d{1,4}\)?){2,5}"
    r"|(?:\(\d{3}\) ?|\d{3}[ .-])\d{3}[ .-]\d{4}"
    r"|0\d{1,4}[ -]\d{3,4}[ -]?\d{3,4})(?![\w])")


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum of a string of digits (every second digit from the right doubled)."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card(match: str) -> bool:
    digits = re.sub(r"\D", "", match)
    issuer = digits[0] in "3456" or 2221 <= int(digits[:4]) <= 2720
    return 13 <= len(digits) <= 19 and issuer and luhn_valid(digits)


def _phone(match: str) -> bool:
    return 8 <= len(re.sub(r"\D", "", match)) <= 15 if match.startswith("+") else True


def _ip(version: int) -> Callable[[str], bool]:
    def valid(match: str) -> bool:
        try:
            return ipaddress.ip_address(match).version == version
        except ValueError:
            return False
    return valid


@functools.cache
def _patterns() -> tuple[tuple[str, re.Pattern, Callable[[str], bool] | None], ...]:
    """(kind, pattern, check) in replacement order; datatrove is imported on first use."""
    try:
        from datatrove.pipeline.formatters.pii import PIIFormatter
    except ImportError as e:
        from gopher_jax.errors import UserError

        raise UserError("personal-data redaction needs datatrove",
                        "pip install -e .[data]") from e
    formatter = PIIFormatter()
    return (("email", formatter.emails_replacer.regex, None),
            ("ipv6", _IPV6, _ip(6)),
            ("ipv4", re.compile(r"(?<![\d.])" + formatter.ip_replacer.regex.pattern
                                + r"(?!\d|\.\d)"), _ip(4)),
            ("card", _CARD, _card),
            ("phone", _PHONE, _phone))


def redact(text: str) -> tuple[str, dict[str, int]]:
    """(text with each kind's matches replaced by its placeholder, matches per kind)."""
    counts = dict.fromkeys(KINDS, 0)
    for kind, pattern, check in _patterns():
        def replace(m: re.Match, kind: str = kind, check=check) -> str:
            if check is not None and not check(m.group(0)):
                return m.group(0)
            counts[kind] += 1
            return PLACEHOLDERS[kind]

        text = pattern.sub(replace, text)
    return text, counts


def check_available() -> None:
    """Raises the UserError of a missing datatrove now, before any work."""
    _patterns()
