"""PII redaction: what must go, and the financial figures that must stay."""

from __future__ import annotations

import json

import pytest

from findistil.loaders import load_file
from findistil.logstore import LogStore
from findistil.redact import placeholder_counts, redact_record, redact_text

MUST_REDACT = [
    ("contact jane.doe@acme-corp.com today", "contact <EMAIL> today", "EMAIL"),
    ("IR: investor.relations+q3@bank.co.uk.", "IR: <EMAIL>.", "EMAIL"),
    ("mail A_B@x.io", "mail <EMAIL>", "EMAIL"),
    ("call +1 212 555 0100 now", "call <PHONE> now", "PHONE"),
    ("call +44 20 7946 0958", "call <PHONE>", "PHONE"),
    ("tel +49-30-901820", "tel <PHONE>", "PHONE"),
    ("desk (212) 555-0199", "desk <PHONE>", "PHONE"),
    ("desk 212-555-0199.", "desk <PHONE>.", "PHONE"),
    ("desk 212.555.0199", "desk <PHONE>", "PHONE"),
    ("card 4111 1111 1111 1111 charged", "card <CARD> charged", "CARD"),
    ("card 4111-1111-1111-1111", "card <CARD>", "CARD"),
    ("card 5500005555555559", "card <CARD>", "CARD"),
    ("amex 378282246310005", "amex <CARD>", "CARD"),
    ("IBAN GB82 WEST 1234 5698 7654 32", "IBAN <IBAN>", "IBAN"),
    ("IBAN DE89370400440532013000", "IBAN <IBAN>", "IBAN"),
    ("to FR1420041010050500013M02606", "to <IBAN>", "IBAN"),
    ("SSN 123-45-6789 on file", "SSN <SSN> on file", "SSN"),
    ("ssn: 078-05-1120", "ssn: <SSN>", "SSN"),
    ("jo@x.com, +1 415 555 2671", "<EMAIL>, <PHONE>", "EMAIL"),
]

MUST_KEEP = [
    "Acme beats estimates with EPS of $1.23 vs $1.10 expected",
    "Shares rose 4.5% to $123.45 after the 10-K filing",
    "Revenue of $12,345,678,901 in fiscal 2024",
    "The company bought back 1,234,567 shares",
    "Q3 2024 results due 2024-10-15",
    "Price target raised to 1,250 from 1,100",
    "Deal valued at EUR 4.2bn, or 38.50 per share",
    "ISIN US0378331005 added to the index",
    "CUSIP 037833100 of Apple",
    "Order number 1234567890123 shipped",  # 13 digits that fail Luhn
    "Volume was 4,111,111,111,111 shares",  # commas: a figure, not a card
    "Share count 1234 5678 9012 3456 reported",  # fails Luhn
    "Guidance: 2025 EPS 5.10-5.30",
    "Index at 4,567.89, down 12.34 points",
    "Ratio of 3-2-1 crack spread widened",
    "Fund code GB82 is new",  # too short for an IBAN
    "IBAN-like GB00WEST12345698765432 fails its check digits",
    "Filed 2024-01-15, effective 01-31-2025",
    "Call option at 212.5 strike, 555 contracts",
    "Revenue rose 212-555 basis points",  # not a phone shape
    "Deal closes 12/31/2024 at 10:30",
    "Tickers AAPL, MSFT and BRK.B rallied",
    "Order 000-12-3456 is not an SSN",
    "Dividend of 0.25 per share payable 3/15",
    "Moody's cut the rating to Baa3 from Baa2",
    "Sales +12.5% y/y, margin +150bp",
    "The 2030 notes yield 5.125%",
    "Model 1100-200-3000 turbines ordered",  # 4-3-4 groups: not a phone
]


@pytest.mark.parametrize("text, expected, kind", MUST_REDACT)
def test_pii_is_replaced_by_its_placeholder(text, expected, kind):
    clean, counts = redact_text(text)
    assert clean == expected
    assert counts[kind] >= 1


@pytest.mark.parametrize("text", MUST_KEEP)
def test_financial_figures_are_kept(text):
    clean, counts = redact_text(text)
    assert clean == text and not counts


def test_table_is_big_enough_and_mostly_must_keep():
    assert len(MUST_REDACT) + len(MUST_KEEP) >= 40 and len(MUST_KEEP) >= len(MUST_REDACT)


def test_record_strings_are_redacted_everywhere_keys_untouched():
    record = {
        "workload_id": "w",
        "request": {"messages": [{"role": "user", "content": "write to a@b.com"}]},
        "response": {
            "choices": [{"message": {"role": "assistant", "content": "SSN 123-45-6789"}}],
            "tool": [{"args": json.dumps({"card": "4111111111111111"})}],
        },
    }
    counts = redact_record(record)
    assert counts == {"EMAIL": 1, "SSN": 1, "CARD": 1}
    assert record["request"]["messages"][0]["content"] == "write to <EMAIL>"
    assert "<CARD>" in record["response"]["tool"][0]["args"]
    assert placeholder_counts([json.dumps(record)]) == {"EMAIL": 1, "CARD": 1, "SSN": 1}


def test_load_with_redaction_counts_per_type(tmp_path):
    path = tmp_path / "pii.csv"
    path.write_text(
        "headline,label\n"
        "Acme CFO jo@acme.com resigns,Labour Issues\n"
        "Acme EPS of $1.23 beats,Earnings\n"
    )
    with LogStore(f"sqlite:///{tmp_path / 'l.db'}") as store:
        report = load_file(path, store, redact_pii=True)
        assert report.loaded == 2 and report.redacted == {"EMAIL": 1}
        texts = [json.dumps(r) for r in store.iter_records("news_classifier", "pii")]
    assert "jo@acme.com" not in "".join(texts) and "$1.23" in "".join(texts)


def test_cli_redacts_and_curation_manifest_counts(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from findistil.cli import app
    from findistil.config import DataSplitConfig
    from findistil.curate import curate_records

    monkeypatch.setenv("FINDISTIL_HOME", str(tmp_path / "home"))
    labels = ["Earnings", "Labour Issues", "Dividends", "Stock Movement"]
    rows = [f"Acme item {i} EPS $1.{i:02d},{labels[i % 4]}" for i in range(40)]
    rows[3] = "Acme CFO jo@acme.com resigns,Labour Issues"
    rows[7] = "Call desk +44 20 7946 0958 re dividend,Dividends"
    path = tmp_path / "app.csv"
    path.write_text("headline,label\n" + "\n".join(rows) + "\n")
    result = CliRunner().invoke(app, ["logs", "load", str(path), "--redact-pii"])
    assert result.exit_code == 0, result.output
    assert "redacted: EMAIL 1, PHONE 1" in result.output
    with open_logstore_for(tmp_path / "home") as store:
        records = list(store.iter_records("news_classifier", "app"))
    data = curate_records(
        records, DataSplitConfig(eval_size=10, val_ratio=0.1, min_total_records=10)
    )
    assert data.manifest["redacted_pii"] == {"EMAIL": 1, "PHONE": 1}
    plain = CliRunner().invoke(app, ["logs", "load", str(path), "--replace"])
    assert plain.exit_code == 0 and "redacted" not in plain.output


def open_logstore_for(home):
    from findistil.config import load_settings
    from findistil.logstore import open_logstore

    return open_logstore(load_settings())
