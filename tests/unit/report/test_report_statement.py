"""A customer's statement: a line per meter and GPU model, decimal amounts that add up to the total."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from kubemeter.report.html import statement_html
from kubemeter.report.pricing import Pricing
from kubemeter.report.statement import build_statement, month_bounds, statement_csv, statement_table
from kubemeter.report.usage import UsageRow

H100, H200 = "NVIDIA-H100-80GB-HBM3", "NVIDIA-H200"
PRICING = Pricing(
    currency="EUR",
    unit_prices={"GPU-hours": 2.0, "core-hours": 0.05},
    gpu_model_prices={H100: 3.9},
)


def usage(
    subject: str, event_type: str, unit: str, value: float, model: str = "", incomplete: int = 0
) -> UsageRow:
    return UsageRow(subject, event_type, unit, "ns", model, "2026-11-03", value, 1, incomplete)


USAGE = [
    usage("acme", "gpu-seconds", "gpu-seconds", 7200, H100),
    usage("acme", "gpu-seconds", "gpu-seconds", 1234, H100),
    usage("acme", "gpu-seconds", "gpu-seconds", 900, H200, incomplete=1),
    usage("acme", "cpu-core-seconds", "core-seconds", 3601),
    usage("acme", "memory-byte-seconds", "byte-seconds", 2**30 * 3600),
    usage("globex", "gpu-seconds", "gpu-seconds", 99999, H100),
]


def test_lines_per_meter_and_gpu_model_with_amounts_rounded_half_up_per_line() -> None:
    statement = build_statement(USAGE, "acme", PRICING)
    lines = {(line.event_type, line.gpu_model): line for line in statement.lines}
    assert set(lines) == {
        ("cpu-core-seconds", ""),
        ("gpu-seconds", H100),
        ("gpu-seconds", H200),
        ("memory-byte-seconds", ""),
    }
    h100 = lines[("gpu-seconds", H100)]
    assert h100.quantity == Decimal(8434) / Decimal(3600)  # 2.342777... GPU-hours, exact
    assert h100.unit_price == Decimal("3.9")
    assert h100.amount == Decimal("9.14")  # 9.13683... -> 9.14
    assert lines[("gpu-seconds", H200)].amount == Decimal("0.50")  # the GPU-hours price
    assert lines[("cpu-core-seconds", "")].amount == Decimal("0.05")  # 0.0500138... -> 0.05
    memory = lines[("memory-byte-seconds", "")]
    assert memory.unit_price is None and memory.amount is None  # listed, not silently free
    assert statement.total == Decimal("9.69")
    assert statement.incomplete_events == 1
    assert [line.event_type for line in statement.unpriced] == ["memory-byte-seconds"]


def test_half_a_cent_rounds_up() -> None:
    statement = build_statement(
        [usage("t", "cpu-core-seconds", "core-seconds", 3600 * 0.125)],
        "t",
        Pricing(unit_prices={"core-hours": 0.1}),
    )
    assert statement.lines[0].amount == Decimal("0.01")  # 0.0125 -> 0.01; 0.005 would be 0.01
    statement = build_statement(
        [usage("t", "cpu-core-seconds", "core-seconds", 3600 * 0.05)],
        "t",
        Pricing(unit_prices={"core-hours": 0.1}),
    )
    assert statement.lines[0].amount == Decimal("0.01")  # exactly half a cent


def test_csv_statement_carries_exact_quantities_and_the_total() -> None:
    rows = list(csv.reader(io.StringIO(statement_csv(build_statement(USAGE, "acme", PRICING)))))
    assert rows[0] == ["customer", "acme"] and rows[2] == ["currency", "EUR"]
    header = rows.index(
        ["meter", "gpu_model", "quantity", "unit", "unit_price", "amount", "incomplete_events"]
    )
    body = rows[header + 1 :]
    assert body[-1][0] == "total" and body[-1][5] == "9.69"
    assert sum(Decimal(row[5]) for row in body[:-1] if row[5]) == Decimal(body[-1][5])


def test_html_and_table_statements_show_every_line_and_the_amount_due() -> None:
    statement = build_statement(USAGE, "acme", PRICING, *month_bounds("2026-11"))
    page = statement_html(statement, "Statement for acme", [])
    assert page.count("<tr>") == 1 + 4 and "9.69 EUR" in page and "2026-11-01 to 2026-12-01" in page
    assert "No price for: memory-byte-seconds (GiB-hours)" in page
    assert "<td class=num>3.90</td>" in page  # unit prices at least to the cent
    priced = build_statement(USAGE, "acme", Pricing(unit_prices={"GiB-hours": 0.005}))
    assert "<td class=num>0.005</td>" in statement_html(priced, "s", [])  # and never rounded away
    text = statement_table(statement)
    assert text.splitlines()[-1].split() == ["total", "9.69"]


def test_month_bounds_cover_the_month_in_utc() -> None:
    assert month_bounds("2026-12") == (datetime(2026, 12, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC))
    assert month_bounds("2028-02")[1] == datetime(2028, 3, 1, tzinfo=UTC)
    with pytest.raises(ValueError, match="YYYY-MM"):
        month_bounds("November")
