-- The endpoints the hub told this spoke to use from now on
-- (HubHints.endpoints), kept so that a restarted spoke dials them too.

-- At most one row. endpoints: the hinted URLs in order, a JSON array.
-- configured: the spoke's configured endpoints when the hint came, a JSON
-- array; a start with a different configured list drops the hint (the new
-- configuration is the newer word).
CREATE TABLE endpoint_hint (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    endpoints   TEXT    NOT NULL,
    configured  TEXT    NOT NULL,
    received_at INTEGER NOT NULL
);
