"""Customer-support demo tools (look up an order, create a ticket) over a real SQLite database.

Where the database lives: ``tools.support_db`` as given when absolute (``~`` expanded); a relative path (the packaged
``configs/support.yaml`` says ``support.sqlite3``) is resolved against the per-user data directory,
``$XDG_DATA_HOME/mimo-voice`` (by default ``~/.local/share/mimo-voice``), so the server finds the same file whatever
its working directory. The file is created from ``data/support_seed.sql`` the first time it is needed and kept
afterwards, so tickets persist across runs; delete it to start from the seed again.

Callers steer the model, so the tools protect the data themselves rather than trusting the prompt: an order is
shown only to a caller who gives its number with the customer's email or postcode (a wrong pair and an unknown
order get the same answer, so order numbers cannot be probed; after ``MAX_FAILED_PROOFS_PER_HOUR`` wrong proofs
an order is locked for the hour, so a postcode cannot be guessed by trial), a ticket about an order needs the same
proof, and
tickets are rate-limited from the database itself (``tools.support_max_tickets_per_hour`` in all, and
``MAX_TICKETS_PER_ORDER_PER_HOUR`` per order), so the limits hold across sessions, workers and restarts.
"""

from __future__ import annotations

import os
import re
import sqlite3
import tempfile
from collections.abc import Iterator
from contextlib import closing, contextmanager, suppress
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from langchain_core.tools import BaseTool, tool
from mimo_voice.configs import ConfigError

SEED_PATH = Path(__file__).resolve().parent / "data" / "support_seed.sql"
DEFAULT_DB_NAME = "support.sqlite3"
SUPPORT_TOOL_NAMES = ("lookup_order", "create_ticket")
REQUIRED_TABLES = frozenset({"customers", "orders", "order_items", "tickets"})
MAX_SUMMARY_CHARS = 1000
MAX_TICKETS_PER_ORDER_PER_HOUR = 3
MAX_FAILED_PROOFS_PER_HOUR = 5  # per order: guessing a postcode by trial stops here
TOO_MANY_FAILURES = (
    "too many wrong attempts for this order in the last hour; the caller must try again later, or you can open a "
    "ticket without the order number"
)
NOT_VERIFIED = (
    "no order matches that order number with that email or postcode; ask the caller to check both. "
    "Never reveal order details without them"
)


def data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "mimo-voice"


def resolve_db_path(path: str | Path | None) -> Path:
    """Absolute paths as given; relative ones (and None -> ``support.sqlite3``) under :func:`data_dir`."""
    resolved = Path(path or DEFAULT_DB_NAME).expanduser()
    return resolved if resolved.is_absolute() else data_dir() / resolved


def _create_from_seed(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target, then link it into place: a half-written file is never seen, and when two
    # processes race, the first database created wins instead of being replaced.
    fd, scratch = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        with closing(sqlite3.connect(scratch)) as conn:
            conn.executescript(SEED_PATH.read_text(encoding="utf-8"))
        with suppress(FileExistsError):
            os.link(scratch, path)
    finally:
        os.unlink(scratch)


def ensure_database(path: Path) -> Path:
    """Create ``path`` from the seed unless it exists; check that an existing file is a support database."""
    try:
        if not path.exists():
            _create_from_seed(path)
        with closing(sqlite3.connect(path)) as conn:
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except (OSError, sqlite3.Error) as exc:
        raise ConfigError(f"tools.support_db: cannot open {path}: {exc}") from None
    missing = sorted(REQUIRED_TABLES - tables)
    if not missing and not _has_postcodes(path):
        missing = ["customers.postcode (a database from an older seed)"]
    if missing:
        raise ConfigError(
            f"tools.support_db: {path} is not a support database (missing tables: {', '.join(missing)}); "
            "delete it to recreate it from the seed, or choose another file"
        )
    return path


def _has_postcodes(path: Path) -> bool:
    with closing(sqlite3.connect(path)) as conn:
        return any(row[1] == "postcode" for row in conn.execute("PRAGMA table_info(customers)"))


@contextmanager
def _connect(db: Path) -> Iterator[sqlite3.Connection]:
    """A short-lived connection per call: tools run in worker threads, and sqlite3 connections stay in theirs."""
    conn = sqlite3.connect(db, timeout=5.0)
    try:
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA foreign_keys = ON")
        with conn:  # one transaction: committed, or rolled back on error
            yield conn
    finally:
        conn.close()


def normalize_order_id(order_id: str) -> str:
    """Spoken or typed variants of one number: ``a-1001``, ``#A1001``, ``A 1001`` -> ``A1001``."""
    return re.sub(r"[\s#-]", "", order_id).upper()


def _same_postcode(given: str, stored: str) -> bool:
    def compact(code: str) -> str:
        return re.sub(r"[\s-]", "", code).upper()

    return compact(given) == compact(stored)


def verify_caller(conn: sqlite3.Connection, order_id: str, email_or_postcode: str) -> None:
    """LookupError (the same for an unknown order and a wrong proof) unless the email or postcode is the
    customer's; after ``MAX_FAILED_PROOFS_PER_HOUR`` wrong ones for an order, LookupError whatever is given."""
    since = (datetime.now(UTC) - timedelta(hours=1)).isoformat(timespec="seconds")
    ((failures,),) = conn.execute(
        "SELECT count(*) FROM failed_proofs WHERE order_id = ? AND failed_at >= ?", (order_id, since)
    ).fetchall()
    if failures >= MAX_FAILED_PROOFS_PER_HOUR:
        raise LookupError(TOO_MANY_FAILURES)
    row = conn.execute(
        "SELECT c.email, c.postcode FROM orders o JOIN customers c ON c.id = o.customer_id WHERE o.id = ?",
        (order_id,),
    ).fetchone()
    given = email_or_postcode.strip()
    if (
        row is None
        or not given
        or (given.casefold() != row["email"].casefold() and not _same_postcode(given, row["postcode"]))
    ):
        now = datetime.now(UTC).isoformat(timespec="seconds")
        conn.execute("INSERT INTO failed_proofs (order_id, failed_at) VALUES (?, ?)", (order_id, now))
        conn.commit()  # kept although the call fails (the failure rolls the rest back)
        raise LookupError(NOT_VERIFIED)


def _money(cents: int, currency: str) -> str:
    return f"{cents / 100:.2f} {currency}"


def _order_details(conn: sqlite3.Connection, order_id: str) -> dict[str, Any]:
    order = conn.execute(
        "SELECT o.*, c.name AS customer FROM orders o JOIN customers c ON c.id = o.customer_id WHERE o.id = ?",
        (order_id,),
    ).fetchone()
    if order is None:
        raise LookupError(f"there is no order {order_id}; order numbers look like A1001")
    items = conn.execute(
        "SELECT description, quantity, unit_price_cents FROM order_items WHERE order_id = ? ORDER BY rowid",
        (order_id,),
    ).fetchall()
    tickets = conn.execute(
        "SELECT id FROM tickets WHERE order_id = ? AND status != 'closed' ORDER BY id", (order_id,)
    ).fetchall()
    shipping = {key: order[key] for key in ("carrier", "tracking_number", "estimated_delivery") if order[key]}
    return {
        "order_id": order["id"],
        "customer": order["customer"],
        "placed_on": order["placed_on"],
        "status": order["status"],
        **shipping,
        "items": [
            {
                "description": item["description"],
                "quantity": item["quantity"],
                "unit_price": _money(item["unit_price_cents"], order["currency"]),
            }
            for item in items
        ],
        "total": _money(sum(item["quantity"] * item["unit_price_cents"] for item in items), order["currency"]),
        "open_tickets": [f"T-{ticket['id']}" for ticket in tickets],
    }


def _check_ticket_rate(conn: sqlite3.Connection, order_id: str | None, per_hour: int) -> None:
    since = (datetime.now(UTC) - timedelta(hours=1)).isoformat(timespec="seconds")
    ((recent,),) = conn.execute("SELECT count(*) FROM tickets WHERE created_at >= ?", (since,)).fetchall()
    if recent >= per_hour:
        raise ValueError("too many tickets were opened in the last hour; ask the caller to try again later")
    if order_id is not None:
        ((for_order,),) = conn.execute(
            "SELECT count(*) FROM tickets WHERE order_id = ? AND created_at >= ?", (order_id, since)
        ).fetchall()
        if for_order >= MAX_TICKETS_PER_ORDER_PER_HOUR:
            raise ValueError("this order already has recent tickets; tell the caller the team is on it")


def _insert_ticket(
    conn: sqlite3.Connection, summary: str, order_id: str | None, priority: str, per_hour: int
) -> dict[str, Any]:
    summary = summary.strip()
    if not summary:
        raise ValueError("the summary is empty; say what the customer needs")
    if len(summary) > MAX_SUMMARY_CHARS:
        raise ValueError(f"the summary is longer than {MAX_SUMMARY_CHARS} characters")
    _check_ticket_rate(conn, order_id, per_hour)
    created_at = datetime.now(UTC).isoformat(timespec="seconds")
    cursor = conn.execute(
        "INSERT INTO tickets (order_id, summary, priority, created_at) VALUES (?, ?, ?, ?)",
        (order_id, summary, priority, created_at),
    )
    return {"ticket_id": f"T-{cursor.lastrowid}", "status": "open", "priority": priority, "order_id": order_id}


def support_tools(db_path: str | Path | None, *, max_tickets_per_hour: int = 30) -> list[BaseTool]:
    """``lookup_order`` and ``create_ticket`` bound to the database at ``db_path`` (created from the seed if new)."""
    db = ensure_database(resolve_db_path(db_path))

    @tool(parse_docstring=True)
    def lookup_order(order_id: str, email_or_postcode: str) -> dict[str, Any]:
        """Look up an order: its status, items, total, shipping and tracking, and open support tickets. Ask the
        caller for the order number and the email or postcode of the order's customer first.

        Args:
            order_id: The order number, e.g. "A1001".
            email_or_postcode: The customer's email address or postcode, as the caller gives it.
        """
        order = normalize_order_id(order_id)
        with _connect(db) as conn:
            verify_caller(conn, order, email_or_postcode)
            return _order_details(conn, order)

    @tool(parse_docstring=True)
    def create_ticket(
        summary: str,
        order_id: str | None = None,
        email_or_postcode: str | None = None,
        priority: Literal["low", "normal", "high"] = "normal",
    ) -> dict[str, Any]:
        """Open a support ticket for the customer's problem and return its ticket number.

        Args:
            summary: One or two sentences on what the customer needs.
            order_id: The order the ticket is about, e.g. "A1001", if any.
            email_or_postcode: With order_id: the customer's email address or postcode, as the caller gives it.
            priority: How urgent the problem is.
        """
        order = normalize_order_id(order_id) if order_id else None
        with _connect(db) as conn:
            if order is not None:
                verify_caller(conn, order, email_or_postcode or "")
            return _insert_ticket(conn, summary, order, priority, max_tickets_per_hour)

    return [lookup_order, create_ticket]
