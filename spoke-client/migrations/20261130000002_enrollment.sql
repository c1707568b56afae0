-- Enrollment safe to retry: the key this spoke proposes to the hub
-- (RegisterRequest.proposed_key) is kept here before the first Register is
-- sent, and sent again on every retry, so a lost reply or a crash before the
-- registration was saved cannot lock the spoke out of its name (the hub
-- answers a retry with the name's current key as it answered the first
-- call). Removed in the transaction that saves the registration.

-- At most one row: the name the key was proposed for, and the key.
CREATE TABLE enrollment (
    id           INTEGER PRIMARY KEY CHECK (id = 1),
    name         TEXT    NOT NULL,
    proposed_key TEXT    NOT NULL,
    created_at   INTEGER NOT NULL
);
