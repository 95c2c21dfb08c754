"""The financial-news event taxonomy: 13 classes, findistil's prompt, and label parsing.

The prompt is findistil's own wording of ``TAXONOMY.md``; the answer format (the class name
inside double square brackets) is upstream's, so teacher logs and student outputs parse alike.
Parsing accepts ``[[x]]``, ``[[[[x]]]]``, a bare ``x``, any case, surrounding text and known
variants (``Labor Issues``, ``M&A``, ``Management changes``, ``no event``); anything else becomes
``OTHER`` flagged as unparseable, so metrics can report the unparseable rate.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

LABELS: tuple[str, ...] = (
    "Analyst Rating",
    "Price Targets",
    "Earnings",
    "Labour Issues",
    "Mergers and Acquisitions",
    "Dividends",
    "Regulatory",
    "Stock price movement",
    "Credit Ratings",
    "Products-Services",
    "Product Approval",
    "Guidance",
    "OTHER",
)
DEFAULT_LABEL = "OTHER"
WORKLOAD_ID = "news_classifier"

HEADLINE_OPEN = "<<<HEADLINE>>>"
HEADLINE_CLOSE = "<<<END>>>"

SYSTEM_PROMPT = "You sort financial news headlines into event types."

# (class, what it covers, an invented example headline in the style of the demo data)
_DEFINITIONS: tuple[tuple[str, str, str], ...] = (
    (
        "Analyst Rating",
        "a named bank, broker, fund or commentator rates, upgrades, downgrades, starts "
        "coverage of or gives a view on a named company, with no price target",
        "Morrow Capital Upgrades Halvorsen Microsystems to Buy",
    ),
    (
        "Price Targets",
        "such an entity sets, raises or cuts a price target; this beats every other class",
        "Pellham Securities Lifts Ardenholm Pharmaceuticals Target to $88",
    ),
    (
        "Earnings",
        "results already reported: revenue, EPS, sales, monthly or quarterly operating figures",
        "Kestrel Beverage Q3 EPS $0.71 vs $0.66 Est.",
    ),
    (
        "Labour Issues",
        "layoffs, strikes, unions, labour costs, executive pay, executives or directors "
        "joining or leaving",
        "Brightwater Rail Names New Chief Financial Officer",
    ),
    (
        "Mergers and Acquisitions",
        "mergers, takeovers (rumoured too), buying a stake or a business, divestitures, "
        "spin-offs; beats most classes; partnerships are not M&A",
        "Orrin Foods to Acquire Lakeshore Dairy for $1.2B",
    ),
    (
        "Dividends",
        "dividends declared, raised, cut or suspended, ex-dividend lists",
        "Tamsin Utilities Raises Quarterly Dividend 6% to $0.42/Share",
    ),
    (
        "Regulatory",
        "governments, regulators or courts acting, laws, policy, treaties, lawsuits, patents "
        "and licences, debt repayment; beats most classes",
        "SEC Opens Probe Into Vantor Networks Accounting",
    ),
    (
        "Stock price movement",
        "share price moves of named companies or industries, movers lists, 52-week highs "
        "and lows, trading halts, pricing of offerings and IPOs",
        "Calderwood Bio Shares Fall 35% in Pre-Market Trade",
    ),
    (
        "Credit Ratings",
        "credit rating actions, debt issuance, credit facilities, borrowing capacity",
        "Moody's Cuts Fenwick Steel to Ba2; Outlook Negative",
    ),
    (
        "Products-Services",
        "products, launches, contracts, delays and operations of a company",
        "Quillon Aerospace Wins $240M Navy Contract",
    ),
    (
        "Product Approval",
        "approval of a product by the FDA, EMA or another body, filings accepted for review, "
        "special designations",
        "FDA Approves Ardenholm's Once-Weekly Insulin",
    ),
    (
        "Guidance",
        "a company's own forecasts (sees FY EPS, expects revenue, ...)",
        "Halvorsen Microsystems Sees FY Revenue $3.1B-$3.3B",
    ),
    (
        "OTHER",
        "none of the above: market-wide news naming no company, buybacks, insider trades, "
        "index changes, calendars and previews, partnerships; the default when unsure",
        "Five Things to Watch Before the Open on Thursday",
    ),
)


def _build_instructions() -> str:
    lines = [
        "Read the headline and decide which event type it reports.",
        "",
        "Event types:",
    ]
    for name, text, _ in _DEFINITIONS:
        lines.append(f"* {name}: {text}.")
    lines += [
        "",
        "When several types fit: Price Targets first, then Mergers and Acquisitions or "
        "Regulatory, then the rest. A share move caused by an analyst action, a deal or a "
        "government action takes that cause's type; other share moves are Stock price movement.",
        "",
        "Examples:",
    ]
    for name, _, example in _DEFINITIONS:
        lines.append(f"{example} => [[{name.lower()}]]")
    return "\n".join(lines)


INSTRUCTIONS = _build_instructions()
ANSWER_REQUEST = (
    "Reply with the event type only, written inside double square brackets, e.g. [[earnings]]."
)


def build_user_prompt(headline: str) -> str:
    """The user message asking for one headline's class (headline between clear markers)."""
    return (
        f"{INSTRUCTIONS}\n\nHeadline:\n{HEADLINE_OPEN}\n{headline.strip()}\n{HEADLINE_CLOSE}\n\n"
        f"{ANSWER_REQUEST}"
    )


def build_messages(headline: str) -> list[dict[str, str]]:
    """System + user messages of a classification request for ``headline``."""
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": build_user_prompt(headline)},
    ]


def format_answer(label: str) -> str:
    """The teacher answer for a class, in upstream's logged form: ``[[price targets]]``."""
    return f"[[{canonical_label(label).lower()}]]"


# ---------------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class ParsedLabel:
    label: str
    parseable: bool


def _norm(text: str) -> str:
    text = text.lower().replace("&", " and ").replace("_", " ")
    text = re.sub(r"[^a-z0-9\- ]+", " ", text)
    text = re.sub(r"\s*-\s*", "-", text)
    return re.sub(r"\s+", " ", text).strip(" -")


_VARIANTS: dict[str, str] = {_norm(label): label for label in LABELS}
_VARIANTS.update(
    {
        _norm(v): label
        for label, variants in {
            "Analyst Rating": ["analyst ratings", "analyst rate", "rating"],
            "Price Targets": ["price target", "pt", "price-target", "price-targets"],
            "Earnings": ["earning", "earnings report", "results"],
            "Labour Issues": [
                "labor issues",
                "labour issue",
                "labor issue",
                "labour",
                "labor",
                "management changes",
                "management change",
            ],
            "Mergers and Acquisitions": [
                "m and a",
                "m-and-a",
                "ma",
                "merger and acquisition",
                "mergers and acquisition",
                "merger",
                "mergers",
                "acquisition",
                "acquisitions",
                "mergers-and-acquisitions",
            ],
            "Dividends": ["dividend"],
            "Regulatory": ["regulation", "regulatory issues", "legal"],
            "Stock price movement": [
                "stock price movements",
                "stock price",
                "stock movement",
                "price movement",
                "stock-price-movement",
            ],
            "Credit Ratings": ["credit rating"],
            "Products-Services": [
                "products services",
                "product-services",
                "products-service",
                "products and services",
                "product and services",
                "products or services",
                "product service",
                "products",
                "services",
            ],
            "Product Approval": ["product approvals", "approval", "fda approval"],
            "Guidance": ["company guidance", "outlook"],
            "OTHER": ["others", "no event", "no-event", "none", "no events"],
        }.items()
        for v in variants
    }
)

_BRACKETED = re.compile(r"\[+\s*([^\[\]]*?)\s*\]+")
# Whole-word mentions of a class inside free text; OTHER is left out on purpose since the
# word "other" is common prose ("no other event ...").
_MENTION = re.compile(
    r"\b("
    + "|".join(
        re.escape(_norm(label)).replace(r"\ ", r"[\s_]+")
        for label in sorted(LABELS, key=len, reverse=True)
        if label != "OTHER"
    )
    + r")\b",
    re.IGNORECASE,
)


def canonical_label(text: str) -> str:
    """The taxonomy spelling of a label or a known variant; raises ValueError otherwise."""
    label = _VARIANTS.get(_norm(text))
    if label is None:
        raise ValueError(f"unknown label {text!r}: expected one of {', '.join(LABELS)}")
    return label


def parse_label(text: str | None) -> ParsedLabel:
    """Extract the class from a model's answer.

    Example: ``parse_label("[[[labor issues]]]") == ParsedLabel("Labour Issues", True)``.
    """
    if not text or not text.strip():
        return ParsedLabel(DEFAULT_LABEL, False)
    for inner in _BRACKETED.findall(text):
        label = _VARIANTS.get(_norm(inner))
        if label:
            return ParsedLabel(label, True)
    label = _VARIANTS.get(_norm(text))
    if label:
        return ParsedLabel(label, True)
    first_line = text.strip().splitlines()[0]
    label = _VARIANTS.get(_norm(first_line.split(":", 1)[-1]))
    if label:
        return ParsedLabel(label, True)
    mention = _MENTION.search(text.replace("_", " "))
    if mention:
        return ParsedLabel(_VARIANTS[_norm(mention.group(1))], True)
    return ParsedLabel(DEFAULT_LABEL, False)
