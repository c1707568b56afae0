-- Which hub replica leads (ARCHITECTURE.md, "Replicas"). A replica that
-- takes the leader lock raises the epoch; every commit reads the epoch
-- with FOR SHARE in its transaction and writes only under the epoch its
-- replica led with, so a replica that was replaced writes nothing more.
CREATE TABLE hub_leader (
    only_row boolean     PRIMARY KEY DEFAULT true CHECK (only_row),
    epoch    bigint      NOT NULL,
    since    timestamptz
);
INSERT INTO hub_leader (epoch) VALUES (0);
