-- The hub's schema on SQLite. Times are Unix milliseconds (metric point
-- times: nanoseconds), ids are UUIDv7 text, JSON is stored as text.

CREATE TABLE spokes (
    id                       TEXT    PRIMARY KEY,
    name                     TEXT    NOT NULL UNIQUE,
    key_hash                 TEXT    NOT NULL UNIQUE,
    labels                   TEXT    NOT NULL,
    capabilities             TEXT    NOT NULL,
    version                  TEXT    NOT NULL,
    max_in_flight            INTEGER NOT NULL,
    registered_at            INTEGER NOT NULL,
    revoked_at               INTEGER,
    last_heartbeat_at        INTEGER,
    status                   INTEGER NOT NULL DEFAULT 0,
    status_message           TEXT    NOT NULL DEFAULT '',
    reported_in_flight       INTEGER NOT NULL DEFAULT 0,
    reported_buffered_points INTEGER NOT NULL DEFAULT 0,
    reported_failed_pushes   INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE directives (
    id               TEXT    PRIMARY KEY,
    spoke_id         TEXT    NOT NULL REFERENCES spokes (id),
    type             TEXT    NOT NULL,
    payload          TEXT    NOT NULL,
    state            TEXT    NOT NULL,
    attempts         INTEGER NOT NULL DEFAULT 0,
    max_attempts     INTEGER NOT NULL,
    priority         INTEGER NOT NULL,
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL,
    expires_at       INTEGER,
    ack_deadline_ms  INTEGER NOT NULL,
    ack_due_at       INTEGER,
    group_id         TEXT    NOT NULL,
    idempotency_key  TEXT,
    coalesce_key     TEXT,
    result           TEXT,
    error            TEXT    NOT NULL DEFAULT '',
    progress         INTEGER NOT NULL DEFAULT 0,
    progress_message TEXT    NOT NULL DEFAULT ''
);

-- Outstanding directives of one spoke, in delivery order.
CREATE INDEX directives_by_spoke ON directives (spoke_id, state, priority DESC, id);
CREATE INDEX directives_by_group ON directives (group_id);
-- Due times for the redelivery and expiry timers.
CREATE INDEX directives_by_ack_due ON directives (ack_due_at) WHERE ack_due_at IS NOT NULL;
CREATE INDEX directives_by_expiry ON directives (expires_at) WHERE expires_at IS NOT NULL;

-- A create with an idempotency key maps the key to the group it made.
CREATE TABLE idempotency_keys (
    key        TEXT    PRIMARY KEY,
    group_id   TEXT    NOT NULL,
    created_at INTEGER NOT NULL
);

CREATE TABLE metric_batches (
    spoke_id    TEXT    NOT NULL REFERENCES spokes (id),
    batch_id    TEXT    NOT NULL,
    accepted    INTEGER NOT NULL,
    rejected    INTEGER NOT NULL,
    received_at INTEGER NOT NULL,
    PRIMARY KEY (spoke_id, batch_id)
);

CREATE TABLE metric_points (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    spoke_id TEXT    NOT NULL REFERENCES spokes (id),
    batch_id TEXT    NOT NULL,
    domain   TEXT    NOT NULL,
    name     TEXT    NOT NULL,
    value    REAL    NOT NULL,
    unit     TEXT    NOT NULL,
    labels   TEXT    NOT NULL,
    time_ns  INTEGER NOT NULL
);

CREATE INDEX metric_points_by_name ON metric_points (domain, name, time_ns);
CREATE INDEX metric_points_by_spoke ON metric_points (spoke_id, time_ns);
