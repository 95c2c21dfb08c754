"""PII redaction on ingest: e-mail addresses, phone numbers, payment-card numbers, IBANs and
US social security numbers become typed placeholders (``<EMAIL>``, ``<PHONE>``, ``<CARD>``,
``<IBAN>``, ``<SSN>``) in every string of a record's request and response.

Regexes plus checksums rather than an NER library: the five types have fixed shapes, cards
and IBANs carry check digits (Luhn, ISO 7064 mod 97) that rule out most look-alikes, and
financial text is dense with numbers (prices, EPS, share counts, dates, ISINs, CUSIPs) that a
statistical recogniser tags as phone numbers. Phones are matched only in shapes people write
phones in: ``+`` and a country code, or the North-American ``(212) 555-0100`` /
``212-555-0100`` / ``212.555.0100``; a bare run of digits is never a phone.

    text, counts = redact_text("mail jo@acme.com or call +44 20 7946 0958")
    # "mail <EMAIL> or call <PHONE>", {"EMAIL": 1, "PHONE": 1}
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from typing import Any

_EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b")
_CARD = re.compile(r"(?<![\d.,-])\d(?:[ -]?\d){12,18}(?![\d.,]\d)")
_SSN = re.compile(r"(?<![\d-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\d-])")
_PHONE = re.compile(
    r"(?<![\w+])(?:\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]?\d{2,4}){1,4}"
    r"|\(\d{3}\) ?\d{3}-\d{4}|\d{3}([-.])\d{3}\1\d{4})(?![\w-])"
)


def _luhn(number: str) -> bool:
    digits = [int(c) for c in number if c.isdigit()]
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _iban_ok(candidate: str) -> bool:
    code = candidate.replace(" ", "")
    if not 15 <= len(code) <= 34:
        return False
    moved = code[4:] + code[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


def _phone_ok(candidate: str) -> bool:
    return 8 <= sum(c.isdigit() for c in candidate) <= 15


# Order matters: the checked, specific shapes go before the phone pattern that could eat them.
RULES: list[tuple[str, re.Pattern[str], Callable[[str], bool]]] = [
    ("EMAIL", _EMAIL, lambda _: True),
    ("IBAN", _IBAN, _iban_ok),
    ("CARD", _CARD, _luhn),
    ("SSN", _SSN, lambda _: True),
    ("PHONE", _PHONE, _phone_ok),
]
TYPES = tuple(name for name, _, _ in RULES)


def redact_text(text: str) -> tuple[str, Counter[str]]:
    """``text`` with every PII match replaced by its placeholder, and the counts per type."""
    counts: Counter[str] = Counter()
    for name, pattern, valid in RULES:

        def swap(match: re.Match[str], name: str = name, valid=valid) -> str:
            if not valid(match.group(0)):
                return match.group(0)
            counts[name] += 1
            return f"<{name}>"

        text = pattern.sub(swap, text)
    return text, counts


def redact_record(record: dict[str, Any]) -> Counter[str]:
    """Redact every string under ``request`` and ``response`` in place; the counts."""
    counts: Counter[str] = Counter()

    def walk(value: Any) -> Any:
        if isinstance(value, str):
            clean, found = redact_text(value)
            counts.update(found)
            return clean
        if isinstance(value, list):
            return [walk(v) for v in value]
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        return value

    for key in ("request", "response"):
        if key in record:
            record[key] = walk(record[key])
    return counts


def placeholder_counts(texts: list[str]) -> dict[str, int]:
    """How many placeholders of each type a set of texts holds (for curation manifests)."""
    return {name: n for name in TYPES if (n := sum(t.count(f"<{name}>") for t in texts))}
