-- no-transaction
-- Hub hardening. A deleted spoke keeps its row (its directives, metrics and
-- events refer to it until retention removes them) but frees its name, so
-- names are unique only among spokes that are not deleted: SQLite cannot
-- drop a UNIQUE constraint in place, so the table is rebuilt, with foreign
-- keys off around the rebuild as SQLite's documentation prescribes.
PRAGMA foreign_keys = OFF;
BEGIN;

CREATE TABLE spokes_new (
    id                       TEXT    PRIMARY KEY,
    name                     TEXT    NOT NULL,
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
    reported_failed_pushes   INTEGER NOT NULL DEFAULT 0,
    health                   TEXT    NOT NULL DEFAULT 'OFFLINE',
    last_seen_at             INTEGER,
    deleted_at               INTEGER
);
INSERT INTO spokes_new (id, name, key_hash, labels, capabilities, version, max_in_flight,
    registered_at, revoked_at, last_heartbeat_at, status, status_message, reported_in_flight,
    reported_buffered_points, reported_failed_pushes, health, last_seen_at)
SELECT id, name, key_hash, labels, capabilities, version, max_in_flight,
    registered_at, revoked_at, last_heartbeat_at, status, status_message, reported_in_flight,
    reported_buffered_points, reported_failed_pushes, health, last_seen_at
FROM spokes;
DROP TABLE spokes;
ALTER TABLE spokes_new RENAME TO spokes;
CREATE UNIQUE INDEX spokes_by_name ON spokes (name) WHERE deleted_at IS NULL;

-- A fan-out stores its payload once, here, and its directives an empty
-- payload that means "the group's". (A single-target create keeps its
-- payload in its own row.)
CREATE TABLE directive_groups (
    group_id   TEXT    PRIMARY KEY,
    payload    TEXT    NOT NULL,
    created_at INTEGER NOT NULL
);

-- An idempotency key remembers what its create asked for, so a different
-- request with a used key is refused; keys are pruned by age.
ALTER TABLE idempotency_keys ADD COLUMN fingerprint TEXT NOT NULL DEFAULT '';
CREATE INDEX idempotency_keys_by_time ON idempotency_keys (created_at);

PRAGMA foreign_key_check;
COMMIT;
PRAGMA foreign_keys = ON;
