"""A synthetic tool-calling log written for this project: a finance assistant with four tools.

``tool_records(n)`` gives ``n`` upstream-format log records whose teacher answers call one of
the tools with arguments read from the user's question (so a student can learn them).
"""

from __future__ import annotations

import json
import random

TOOLS = [
    {"type": "function", "function": {
        "name": "get_quote", "description": "Latest share price of a ticker",
        "parameters": {"type": "object", "properties": {"ticker": {"type": "string"}},
                       "required": ["ticker"]}}},
    {"type": "function", "function": {
        "name": "get_news", "description": "Recent headlines about a ticker",
        "parameters": {"type": "object", "properties": {
            "ticker": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["ticker", "days"]}}},
    {"type": "function", "function": {
        "name": "convert_currency", "description": "Convert an amount between currencies",
        "parameters": {"type": "object", "properties": {
            "amount": {"type": "number"}, "source": {"type": "string"},
            "target": {"type": "string"}}, "required": ["amount", "source", "target"]}}},
    {"type": "function", "function": {
        "name": "get_dividend", "description": "Next dividend of a ticker",
        "parameters": {"type": "object", "properties": {"ticker": {"type": "string"}},
                       "required": ["ticker"]}}},
]  # fmt: skip
TICKERS = ["ACME", "BOLT", "CRUX", "DYNA", "EMBR", "FJRD", "GLNT", "HALO", "IRIS", "JADE"]
CURRENCIES = ["USD", "EUR", "GBP", "JPY", "CHF"]


def _question(rng: random.Random, i: int) -> tuple[str, str, dict]:
    ticker = rng.choice(TICKERS)
    kind = i % 4
    if kind == 0:
        return f"What is {ticker} trading at right now? (#{i})", "get_quote", {"ticker": ticker}
    if kind == 1:
        days = rng.choice([1, 3, 7, 30])
        args = {"ticker": ticker, "days": days}
        return f"Show me {ticker} news from the last {days} days (#{i})", "get_news", args
    if kind == 2:
        amount = rng.choice([100, 250, 1000, 5000])
        source, target = rng.sample(CURRENCIES, 2)
        args = {"amount": amount, "source": source, "target": target}
        return f"Convert {amount} {source} to {target} please (#{i})", "convert_currency", args
    return f"When does {ticker} pay its next dividend? (#{i})", "get_dividend", {"ticker": ticker}


def tool_records(n: int = 300, seed: int = 7, client_id: str = "tools") -> list[dict]:
    rng = random.Random(seed)
    records = []
    for i in range(n):
        question, name, args = _question(rng, i)
        call = {"id": f"call_{i}", "type": "function",
                "function": {"name": name, "arguments": json.dumps(args)}}  # fmt: skip
        records.append(
            {
                "timestamp": 1_700_000_000 + i,
                "workload_id": "finance_assistant",
                "client_id": client_id,
                "request": {
                    "model": "teacher",
                    "messages": [
                        {"role": "system", "content": "You are a finance assistant. Use tools."},
                        {"role": "user", "content": question},
                    ],
                    "tools": TOOLS,
                },
                "response": {
                    "choices": [
                        {"message": {"role": "assistant", "content": None, "tool_calls": [call]}}
                    ]
                },
            }
        )
    return records
