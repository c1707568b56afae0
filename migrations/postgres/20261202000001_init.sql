-- The hub's schema on PostgreSQL: the SQLite schema after all its
-- migrations, in PostgreSQL's types. Times are Unix milliseconds (metric
-- point times: nanoseconds) and every integer is BIGINT; ids are UUIDv7
-- as uuid (their byte order is their creation order, as their text's is
-- on SQLite); JSON is stored as the text the hub wrote.

CREATE TABLE spokes (
    id                       uuid    PRIMARY KEY,
    name                     text    NOT NULL,
    key_hash                 text    NOT NULL UNIQUE,
    labels                   text    NOT NULL,
    capabilities             text    NOT NULL,
    version                  text    NOT NULL,
    max_in_flight            bigint  NOT NULL,
    registered_at            bigint  NOT NULL,
    revoked_at               bigint,
    last_heartbeat_at        bigint,
    status                   bigint  NOT NULL DEFAULT 0,
    status_message           text    NOT NULL DEFAULT '',
    reported_in_flight       bigint  NOT NULL DEFAULT 0,
    reported_buffered_points bigint  NOT NULL DEFAULT 0,
    reported_failed_pushes   bigint  NOT NULL DEFAULT 0,
    health                   text    NOT NULL DEFAULT 'OFFLINE',
    last_seen_at             bigint,
    -- A deleted spoke keeps its row (its directives, metrics and events
    -- refer to it until retention removes them) but frees its name.
    deleted_at               bigint
);
CREATE UNIQUE INDEX spokes_by_name ON spokes (name) WHERE deleted_at IS NULL;

-- A fan-out stores its payload once, here, and its directives an empty
-- payload that means "the group's".
CREATE TABLE directive_groups (
    group_id   uuid   PRIMARY KEY,
    payload    text   NOT NULL,
    created_at bigint NOT NULL
);

CREATE TABLE directives (
    id               uuid   PRIMARY KEY,
    spoke_id         uuid   NOT NULL REFERENCES spokes (id),
    type             text   NOT NULL,
    payload          text   NOT NULL,
    state            text   NOT NULL,
    attempts         bigint NOT NULL DEFAULT 0,
    max_attempts     bigint NOT NULL,
    priority         bigint NOT NULL,
    created_at       bigint NOT NULL,
    updated_at       bigint NOT NULL,
    expires_at       bigint,
    ack_deadline_ms  bigint NOT NULL,
    ack_due_at       bigint,
    group_id         uuid   NOT NULL,
    idempotency_key  text,
    coalesce_key     text,
    result           text,
    error            text   NOT NULL DEFAULT '',
    progress         bigint NOT NULL DEFAULT 0,
    progress_message text   NOT NULL DEFAULT ''
);
-- A spoke's directives, newest first (and the foreign key's checks).
-- Due times, states and delivery order live in the hub's memory: no index
-- for them, each would cost a write per change on the hot path.
CREATE INDEX directives_by_spoke ON directives (spoke_id, id);
CREATE INDEX directives_by_group ON directives (group_id);

-- A create with an idempotency key maps the key to the group it made and
-- remembers what it asked for; keys are pruned by age.
CREATE TABLE idempotency_keys (
    key         text   PRIMARY KEY,
    group_id    uuid   NOT NULL,
    created_at  bigint NOT NULL,
    fingerprint text   NOT NULL DEFAULT ''
);
CREATE INDEX idempotency_keys_by_time ON idempotency_keys (created_at);

CREATE TABLE metric_batches (
    spoke_id    uuid   NOT NULL REFERENCES spokes (id),
    batch_id    text   NOT NULL,
    accepted    bigint NOT NULL,
    rejected    bigint NOT NULL,
    received_at bigint NOT NULL,
    PRIMARY KEY (spoke_id, batch_id)
);
CREATE INDEX metric_batches_by_time ON metric_batches (received_at);

CREATE TABLE metric_points (
    id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    spoke_id uuid   NOT NULL REFERENCES spokes (id),
    batch_id text   NOT NULL,
    domain   text   NOT NULL,
    name     text   NOT NULL,
    value    double precision NOT NULL,
    unit     text   NOT NULL,
    labels   text   NOT NULL,
    time_ns  bigint NOT NULL
);
CREATE INDEX metric_points_by_name ON metric_points (domain, name, time_ns);
CREATE INDEX metric_points_by_spoke ON metric_points (spoke_id, time_ns);
CREATE INDEX metric_points_by_time ON metric_points (time_ns);

-- Sequences are given by the hub at commit, in commit order. Retention
-- deletes the oldest events by sequence (sequences follow time).
CREATE TABLE events (
    seq          bigint PRIMARY KEY,
    type         text   NOT NULL,
    time         bigint NOT NULL,
    spoke_id     uuid,
    directive_id uuid,
    details      text   NOT NULL
);

-- The highest event sequence ever given, written in the transaction of the
-- events it numbers: a sequence is never given twice, even after retention
-- deleted its event (SQLite's AUTOINCREMENT keeps the same mark).
CREATE TABLE event_sequence (
    only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    last     bigint  NOT NULL
);
INSERT INTO event_sequence (last) VALUES (0);
