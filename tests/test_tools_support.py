"""The support demo tools: order look-up and tickets on their sqlite database."""

import json
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest
from mimo_voice.configs import ConfigError
from mimo_voice.tools import ToolCallError, ToolRegistry
from mimo_voice.tools.support import (
    SEED_PATH,
    SUPPORT_TOOL_NAMES,
    ensure_database,
    normalize_order_id,
    resolve_db_path,
    support_tools,
)


def seed_rows(sql: str) -> list[tuple]:
    """Run a query against a fresh in-memory copy of the seed, independently of the tools."""
    with closing(sqlite3.connect(":memory:")) as conn:
        conn.executescript(SEED_PATH.read_text(encoding="utf-8"))
        return conn.execute(sql).fetchall()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "support.sqlite3"


@pytest.fixture
def registry(db_path: Path) -> ToolRegistry:
    registry = ToolRegistry(timeout_secs=5.0)
    for tool in support_tools(db_path):
        registry.add(tool)
    return registry


def proof(order_id: str) -> str:
    """The email of the order's customer, from the seed."""
    order = normalize_order_id(order_id)
    rows = seed_rows(f"SELECT c.email FROM orders o JOIN customers c ON c.id = o.customer_id WHERE o.id = '{order}'")
    return rows[0][0] if rows else "nobody@example.com"


async def lookup(registry: ToolRegistry, order_id: str, email_or_postcode: str | None = None) -> dict:
    given = proof(order_id) if email_or_postcode is None else email_or_postcode
    arguments = {"order_id": order_id, "email_or_postcode": given}
    return json.loads(await registry.call("lookup_order", arguments))


def test_tool_names_match_the_declared_names(db_path):
    assert tuple(tool.name for tool in support_tools(db_path)) == SUPPORT_TOOL_NAMES


def test_database_is_created_from_the_seed(db_path):
    assert not db_path.exists()
    support_tools(db_path)
    with closing(sqlite3.connect(db_path)) as conn:
        assert conn.execute("SELECT count(*) FROM orders").fetchone() == seed_rows("SELECT count(*) FROM orders")[0]
    assert [p.name for p in db_path.parent.iterdir()] == [db_path.name]  # no scratch file left behind


@pytest.mark.parametrize("order_id", [row[0] for row in seed_rows("SELECT id FROM orders")])
async def test_lookup_returns_every_seeded_order_as_stored(registry, order_id):
    ((customer, placed_on, status),) = seed_rows(
        f"SELECT c.name, o.placed_on, o.status FROM orders o JOIN customers c ON c.id = o.customer_id "
        f"WHERE o.id = '{order_id}'"
    )
    items = seed_rows(f"SELECT description, quantity, unit_price_cents FROM order_items WHERE order_id = '{order_id}'")
    order = await lookup(registry, order_id)
    assert (order["order_id"], order["customer"], order["placed_on"], order["status"]) == (
        order_id,
        customer,
        placed_on,
        status,
    )
    assert [(item["description"], item["quantity"]) for item in order["items"]] == [(d, q) for d, q, _ in items]
    assert order["total"] == f"{sum(q * cents for _, q, cents in items) / 100:.2f} EUR"


async def test_lookup_shows_shipping_and_open_tickets(registry):
    order = await lookup(registry, "A1002")
    assert order["carrier"] == "UPS" and order["tracking_number"] == "1Z999AA10123456784"
    assert order["items"] == [{"description": "Mechanical keyboard", "quantity": 1, "unit_price": "129.00 EUR"}]
    assert (await lookup(registry, "A1004"))["open_tickets"] == ["T-1001"]
    assert (await lookup(registry, "A1001"))["open_tickets"] == []  # its ticket is closed
    assert "carrier" not in await lookup(registry, "A1003")  # not shipped yet


@pytest.mark.parametrize("spoken", ["a1002", "A-1002", "#A1002", " A 1002 "])
async def test_order_numbers_are_normalized(registry, spoken):
    assert normalize_order_id(spoken) == "A1002"
    assert (await lookup(registry, spoken))["order_id"] == "A1002"


async def test_unknown_order(registry):
    with pytest.raises(ToolCallError, match="no order matches that order number"):
        await lookup(registry, "Z9999")


@pytest.mark.parametrize("given", ["wei.zhang@example.com", "28014", "", "   ", "%", "' OR 1=1 --"])
async def test_an_unverified_lookup_is_refused_like_an_unknown_order(registry, given):
    with pytest.raises(ToolCallError) as refused:
        await lookup(registry, "A1001", given)  # Ana Garcia's order
    assert "no order matches that order number" in str(refused.value)
    assert "Ana" not in str(refused.value) and "JD014600003512" not in str(refused.value)


@pytest.mark.parametrize("given", ["ana.garcia@example.com", "ANA.GARCIA@example.com ", "28013", " 28013 "])
async def test_the_customers_email_or_postcode_verifies_the_caller(registry, given):
    assert (await lookup(registry, "A1001", given))["customer"] == "Ana Garcia"
    assert (await lookup(registry, "A1003", "sw1a1aa"))["customer"] == "Wei Zhang"  # postcodes without spaces too


async def test_a_lookup_without_the_proof_is_an_argument_error(registry):
    with pytest.raises(ToolCallError, match="missing argument 'email_or_postcode'"):
        await registry.call("lookup_order", {"order_id": "A1001"})


async def test_tickets_about_an_order_need_the_proof_and_are_rate_limited(db_path):
    registry = ToolRegistry(timeout_secs=5.0)
    for tool in support_tools(db_path, max_tickets_per_hour=5):
        registry.add(tool)
    with pytest.raises(ToolCallError, match="no order matches"):
        await registry.call("create_ticket", {"summary": "Refund me", "order_id": "A1002"})
    about_order = {"summary": "Broken", "order_id": "A1002", "email_or_postcode": "28013"}
    for _ in range(3):
        await registry.call("create_ticket", about_order)
    with pytest.raises(ToolCallError, match="already has recent tickets"):
        await registry.call("create_ticket", about_order)
    for _ in range(2):
        await registry.call("create_ticket", {"summary": "A question"})
    with pytest.raises(ToolCallError, match="too many tickets"):
        await registry.call("create_ticket", {"summary": "One more"})


async def test_create_ticket_is_stored_and_numbered_after_the_seed(registry, db_path):
    ((highest,),) = seed_rows("SELECT max(id) FROM tickets")
    first = json.loads(
        await registry.call(
            "create_ticket",
            {
                "summary": "Keyboard arrived broken",
                "order_id": "a1002",
                "email_or_postcode": "28013",
                "priority": "high",
            },
        )
    )
    second = json.loads(await registry.call("create_ticket", {"summary": "How do I change my email?"}))
    assert first == {"ticket_id": f"T-{highest + 1}", "status": "open", "priority": "high", "order_id": "A1002"}
    assert second["ticket_id"] == f"T-{highest + 2}" and second["order_id"] is None and second["priority"] == "normal"
    with closing(sqlite3.connect(db_path)) as conn:
        stored = conn.execute("SELECT order_id, summary, priority, status FROM tickets WHERE id = ?", (highest + 1,))
        assert stored.fetchone() == ("A1002", "Keyboard arrived broken", "high", "open")
    assert f"T-{highest + 1}" in (await lookup(registry, "A1002"))["open_tickets"]


async def test_tickets_persist_across_restarts(registry, db_path):
    lost = {"summary": "Lost parcel", "order_id": "A1006", "email_or_postcode": "wei.zhang@example.com"}
    created = json.loads(await registry.call("create_ticket", lost))
    restarted = ToolRegistry()
    for tool in support_tools(db_path):
        restarted.add(tool)
    assert created["ticket_id"] in (await lookup(restarted, "A1006"))["open_tickets"]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"summary": "Broken", "order_id": "Z1", "email_or_postcode": "28013"}, "no order matches"),
        ({"summary": "   "}, "summary is empty"),
        ({"summary": "x" * 1001}, "longer than 1000"),
        ({"summary": "Broken", "priority": "urgent"}, "priority: Input should be 'low', 'normal' or 'high'"),
        ({"order_id": "A1001"}, "missing argument 'summary'"),
    ],
)
async def test_create_ticket_rejects_bad_input_and_stores_nothing(registry, db_path, arguments, message):
    with pytest.raises(ToolCallError, match=message):
        await registry.call("create_ticket", arguments)
    with closing(sqlite3.connect(db_path)) as conn:
        assert conn.execute("SELECT count(*) FROM tickets").fetchone() == seed_rows("SELECT count(*) FROM tickets")[0]


def test_relative_paths_live_in_the_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert resolve_db_path("support.sqlite3") == tmp_path / "data" / "mimo-voice" / "support.sqlite3"
    assert resolve_db_path(None) == tmp_path / "data" / "mimo-voice" / "support.sqlite3"
    assert resolve_db_path(tmp_path / "abs.db") == tmp_path / "abs.db"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_db_path("x.db") == tmp_path / "home" / ".local" / "share" / "mimo-voice" / "x.db"
    assert resolve_db_path("~/y.db") == tmp_path / "home" / "y.db"


def test_a_file_that_is_not_a_support_database_is_refused(tmp_path):
    garbage = tmp_path / "garbage.sqlite3"
    garbage.write_text("not a database at all" * 100)
    with pytest.raises(ConfigError, match="cannot open"):
        ensure_database(garbage)
    other = tmp_path / "other.sqlite3"
    with closing(sqlite3.connect(other)) as conn:
        conn.execute("CREATE TABLE orders (id TEXT)")
    with pytest.raises(ConfigError, match="missing tables: customers, order_items, tickets"):
        ensure_database(other)


def test_an_unwritable_location_is_a_config_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="cannot open"):
        ensure_database(blocker / "support.sqlite3")


async def test_guessing_the_proof_is_stopped_after_a_few_tries(registry):
    for guess in ("10001", "10002", "10003", "10004", "10005"):
        with pytest.raises(ToolCallError, match="no order matches"):
            await lookup(registry, "A1004", guess)
    with pytest.raises(ToolCallError, match="too many wrong attempts"):
        await lookup(registry, "A1004", "560001")  # even the right postcode, now
    assert (await lookup(registry, "A1003", "SW1A 1AA"))["customer"] == "Wei Zhang"  # other orders are unaffected


def test_a_database_from_the_seed_without_postcodes_is_refused(tmp_path):
    old = tmp_path / "old.sqlite3"
    with closing(sqlite3.connect(old)) as conn:
        conn.executescript(SEED_PATH.read_text(encoding="utf-8"))
        conn.execute("ALTER TABLE customers DROP COLUMN postcode")
    with pytest.raises(ConfigError, match=r"older seed.*delete it to recreate it"):
        ensure_database(old)
