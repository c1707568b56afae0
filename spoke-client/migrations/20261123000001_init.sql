-- The spoke client's local state on SQLite: its registration, every
-- directive it received with its status, and the outbound metric buffer.
-- Times are Unix milliseconds (metric point times: nanoseconds).

-- At most one row: who this state directory belongs to, and its key.
CREATE TABLE registration (
    id            INTEGER PRIMARY KEY CHECK (id = 1),
    name          TEXT    NOT NULL,
    spoke_id      TEXT    NOT NULL,
    spoke_key     TEXT    NOT NULL,
    registered_at INTEGER NOT NULL
);

-- status: RECEIVED (recorded, handler not started), RUNNING (handler
-- started), FINISHED (outcome recorded, ack not confirmed by the hub), ACKED
-- (the hub took the ack), CLOSED (the hub refused acks: cancelled, expired
-- or unknown; see note).
CREATE TABLE directives (
    id          TEXT    PRIMARY KEY,
    type        TEXT    NOT NULL,
    payload     TEXT    NOT NULL,
    attempt     INTEGER NOT NULL,
    runs        INTEGER NOT NULL DEFAULT 0,
    status      TEXT    NOT NULL,
    outcome     TEXT,
    result      TEXT,
    error       TEXT,
    note        TEXT    NOT NULL DEFAULT '',
    received_at INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL
);

CREATE INDEX directives_by_status ON directives (status, updated_at);

-- Points recorded and not yet accepted by the hub, oldest first. batch_id is
-- set when a flush takes the point, and kept until the hub answers, so a
-- failed flush is retried with the same batch id and the same points.
CREATE TABLE metric_points (
    seq      INTEGER PRIMARY KEY AUTOINCREMENT,
    domain   TEXT    NOT NULL,
    name     TEXT    NOT NULL,
    value    REAL    NOT NULL,
    unit     TEXT    NOT NULL,
    labels   TEXT    NOT NULL,
    time_ns  INTEGER NOT NULL,
    batch_id TEXT
);

CREATE INDEX metric_points_by_batch ON metric_points (batch_id);
