"""``kubemeter report``: chargeback from a kubemeter sink or an OpenMeter-compatible usage API.

Examples:
  kubemeter report --url http://localhost:8090 --group-by subject --price GPU-hours=2.5
  kubemeter report --url https://openmeter.example --token-file token --pricing prices.yaml \\
      --group-by subject,gpu_model --format html --output report.html
  kubemeter report --url http://localhost:8090 --pricing examples/report/pricing.yaml \\
      --customer acme --month 2026-11 --format html --output acme-2026-11.html
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from kubemeter.report.compute import (
    DEFAULT_IDLE_SUBJECT,
    Dimension,
    build_report,
)
from kubemeter.report.html import Page, statement_html, to_html
from kubemeter.report.pricing import (
    PRICING_EXAMPLE,
    Pricing,
    PricingError,
    load_pricing,
    parse_assignments,
)
from kubemeter.report.render import to_csv, to_json, to_table
from kubemeter.report.statement import (
    build_statement,
    month_bounds,
    period_text,
    statement_csv,
    statement_table,
)
from kubemeter.report.usage import DEFAULT_GPU_MODEL_KEY, Period, UsageApi, UsageApiError, UsageRow

FORMATS = ("table", "csv", "json", "html")


def parse_moment(text: str) -> datetime:
    """RFC 3339, or a date (midnight UTC)."""
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a time; give 2026-11-01 or 2026-11-01T00:00:00Z"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def parse_group_by(values: Sequence[str]) -> list[Dimension]:
    names = [name.strip() for value in values for name in value.split(",") if name.strip()]
    choices = ", ".join(d.value for d in Dimension)
    dimensions = []
    for name in names or ["subject"]:
        try:
            dimension = Dimension(name.replace("-", "_"))
        except ValueError:
            raise PricingError(f"--group-by {name!r}: choose from {choices}") from None
        if dimension not in dimensions:
            dimensions.append(dimension)
    return dimensions


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kubemeter report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", required=True, help="the usage API, e.g. http://localhost:8090")
    parser.add_argument(
        "--api", choices=("auto", "sink", "openmeter"), default="auto", help="which query API it serves"
    )
    parser.add_argument("--token-file", type=Path, help="a file holding the API token (sent as Bearer)")
    parser.add_argument(
        "--group-by",
        action="append",
        default=[],
        help="subject, namespace, meter, gpu_model, day; comma-separated or repeated (default: subject)",
    )
    parser.add_argument("--from", dest="start", type=parse_moment, help="start, inclusive (date or RFC 3339)")
    parser.add_argument("--to", dest="end", type=parse_moment, help="end, exclusive (date or RFC 3339)")
    parser.add_argument("--pricing", type=Path, help="a YAML/JSON pricing file:\n" + PRICING_EXAMPLE)
    parser.add_argument("--price", action="append", default=[], help="UNIT=PRICE, e.g. core-hours=0.04")
    parser.add_argument("--gpu-price", action="append", default=[], help="GPU-MODEL=PRICE per GPU-hour")
    parser.add_argument(
        "--meter-price", action="append", default=[], help="EVENT-TYPE=PRICE per display unit"
    )
    parser.add_argument("--currency", help="currency code shown with costs (default USD, or the file's)")
    parser.add_argument(
        "--gpu-model-key", default=DEFAULT_GPU_MODEL_KEY, help="the event dimension holding the GPU model"
    )
    parser.add_argument(
        "--idle-subject",
        default=DEFAULT_IDLE_SUBJECT,
        help="the subject the idle-capacity meter bills; shown as its own row, not as a customer",
    )
    parser.add_argument(
        "--customer", help="one customer's statement (lines per meter and GPU model) instead of the report"
    )
    parser.add_argument(
        "--month", help="YYYY-MM: the period is that month (UTC); with --customer, default this month"
    )
    parser.add_argument("--format", choices=FORMATS, default="table")
    parser.add_argument("--output", "-o", type=Path, help="write here instead of stdout")
    parser.add_argument("--title", help="page title (default: kubemeter chargeback report, or statement)")
    return parser


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    try:
        group_by = parse_group_by(args.group_by)
        pricing = load_pricing(args.pricing) if args.pricing else Pricing()
        flags = Pricing(
            unit_prices=parse_assignments("--price", args.price),
            gpu_model_prices=parse_assignments("--gpu-price", args.gpu_price),
            meter_prices=parse_assignments("--meter-price", args.meter_price),
        )
        pricing = pricing.merged(flags, currency=args.currency)
        token = args.token_file.read_text().strip() if args.token_file else None
        if args.month and (args.start or args.end):
            raise PricingError("--month sets --from and --to; give one or the other")
        if args.month or (args.customer and not (args.start or args.end)):
            month = args.month or datetime.now(UTC).strftime("%Y-%m")
            args.start, args.end = month_bounds(month)
    except (PricingError, OSError, ValueError) as error:
        print(f"kubemeter report: {error}", file=sys.stderr)
        return 2
    period = Period(args.start, args.end)
    now = datetime.now(UTC)
    api = UsageApi(args.url, kind=args.api, token=token, gpu_model_key=args.gpu_model_key)
    bucket_s = 0
    try:
        if args.format == "html" and not args.customer:
            usage, bucket_s = api.rows_over_time(period, now=now)
        else:
            usage = api.rows(period)
    except UsageApiError as error:
        print(f"kubemeter report: {error}", file=sys.stderr)
        return 1
    finally:
        api.close()
    generated = now.replace(microsecond=0).isoformat()
    if args.customer:
        text = _statement(args, usage, pricing, generated)
    else:
        text = _report(args, usage, group_by, pricing, generated, bucket_s)
    if args.output:
        args.output.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def _statement(args: argparse.Namespace, usage: list[UsageRow], pricing: Pricing, generated: str) -> str:
    statement = build_statement(usage, args.customer, pricing, args.start, args.end)
    if args.format == "html":
        title = args.title or f"Statement for {args.customer}"
        return statement_html(statement, title, [f"source: {args.url}", f"generated: {generated}"])
    if args.format == "csv":
        return statement_csv(statement)
    if args.format == "json":
        return (
            json.dumps(
                {
                    "customer": statement.customer,
                    "period": period_text(statement),
                    "currency": statement.currency,
                    "lines": [
                        {
                            "meter": line.event_type,
                            "gpuModel": line.gpu_model,
                            "quantity": str(line.quantity),
                            "unit": line.unit,
                            "unitPrice": None if line.unit_price is None else str(line.unit_price),
                            "amount": None if line.amount is None else str(line.amount),
                            "incompleteEvents": line.incomplete_events,
                        }
                        for line in statement.lines
                    ],
                    "total": str(statement.total),
                },
                indent=2,
            )
            + "\n"
        )
    return statement_table(statement)


def _report(
    args: argparse.Namespace,
    usage: list[UsageRow],
    group_by: list[Dimension],
    pricing: Pricing,
    generated: str,
    bucket_s: int,
) -> str:
    report = build_report(usage, group_by, pricing, args.idle_subject)
    start = args.start.isoformat() if args.start else "the beginning"
    span = f"{start} to {args.end.isoformat() if args.end else 'now'}"
    if args.format == "table":
        text = to_table(report)
    elif args.format == "csv":
        text = to_csv(report)
    elif args.format == "json":
        meta = {
            "source": args.url,
            "from": args.start.isoformat() if args.start else None,
            "to": args.end.isoformat() if args.end else None,
            "generatedAt": generated,
        }
        text = to_json(report, meta)
    else:
        page = Page.of(usage, bucket_s, pricing, args.idle_subject)
        lines = [f"source: {args.url}", f"period: {span}", f"generated: {generated}"]
        text = to_html(report, args.title or "kubemeter chargeback report", lines, page)
    return text
