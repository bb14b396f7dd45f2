-- Customer-support demo database: a small online shop.
-- mimo_voice.tools.support creates the SQLite file from this script on first use.
-- Money is stored in integer cents; dates are ISO 8601 text.

PRAGMA foreign_keys = ON;

CREATE TABLE customers (
    id       TEXT PRIMARY KEY,
    name     TEXT NOT NULL,
    email    TEXT NOT NULL UNIQUE,
    postcode TEXT NOT NULL          -- with the email, what a caller gives to prove an order is theirs
);

CREATE TABLE orders (
    id                 TEXT PRIMARY KEY,
    customer_id        TEXT NOT NULL REFERENCES customers(id),
    placed_on          TEXT NOT NULL,
    status             TEXT NOT NULL
                       CHECK (status IN ('processing', 'shipped', 'delivered', 'cancelled', 'returned')),
    carrier            TEXT,
    tracking_number    TEXT,
    estimated_delivery TEXT,
    currency           TEXT NOT NULL DEFAULT 'EUR'
);

CREATE TABLE order_items (
    order_id         TEXT NOT NULL REFERENCES orders(id),
    description      TEXT NOT NULL,
    quantity         INTEGER NOT NULL CHECK (quantity > 0),
    unit_price_cents INTEGER NOT NULL CHECK (unit_price_cents >= 0)
);

-- Failed attempts to prove an order is the caller's: a few per order per hour, then look-ups of it are refused.
CREATE TABLE failed_proofs (
    order_id  TEXT NOT NULL,
    failed_at TEXT NOT NULL
);

CREATE TABLE tickets (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    order_id   TEXT REFERENCES orders(id),
    summary    TEXT NOT NULL CHECK (length(summary) > 0),
    priority   TEXT NOT NULL DEFAULT 'normal' CHECK (priority IN ('low', 'normal', 'high')),
    status     TEXT NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'pending', 'closed')),
    created_at TEXT NOT NULL
);

INSERT INTO customers (id, name, email, postcode) VALUES
    ('C001', 'Ana Garcia',   'ana.garcia@example.com', '28013'),
    ('C002', 'Wei Zhang',    'wei.zhang@example.com',  'SW1A 1AA'),
    ('C003', 'Priya Nair',   'priya.nair@example.com', '560001'),
    ('C004', 'Tom Becker',   'tom.becker@example.com', '10115');

INSERT INTO orders (id, customer_id, placed_on, status, carrier, tracking_number, estimated_delivery) VALUES
    ('A1001', 'C001', '2025-05-26', 'delivered',  'DHL',  'JD014600003512', '2025-05-29'),
    ('A1002', 'C001', '2025-06-02', 'shipped',    'UPS',  '1Z999AA10123456784', '2025-06-06'),
    ('A1003', 'C002', '2025-06-03', 'processing', NULL,   NULL,             '2025-06-10'),
    ('A1004', 'C003', '2025-05-20', 'returned',   'DPD',  '05222004611234', '2025-05-23'),
    ('A1005', 'C004', '2025-06-01', 'cancelled',  NULL,   NULL,             NULL),
    ('A1006', 'C002', '2025-05-30', 'shipped',    'GLS',  '6H12345678',     '2025-06-05');

INSERT INTO order_items (order_id, description, quantity, unit_price_cents) VALUES
    ('A1001', 'Wireless earbuds',         1, 7990),
    ('A1001', 'Charging case cover',      2,  990),
    ('A1002', 'Mechanical keyboard',      1, 12900),
    ('A1003', 'USB-C hub',                1, 3450),
    ('A1003', 'HDMI cable, 2 m',          2,  899),
    ('A1004', 'Running shoes, size 42',   1, 11000),
    ('A1005', 'Desk lamp',                1, 4500),
    ('A1006', 'Smart watch',              1, 19900);

-- Ticket numbers start at 1001; new tickets continue from the highest one.
INSERT INTO tickets (id, order_id, summary, priority, status, created_at) VALUES
    (1001, 'A1004', 'Refund for returned running shoes not received yet', 'normal', 'open',   '2025-05-27T09:15:00+00:00'),
    (1002, 'A1001', 'One earbud does not charge',                         'high',   'closed', '2025-05-31T16:40:00+00:00');
