-- Which hub replica leads (ARCHITECTURE.md, "Replicas"). A replica that
-- takes the leader lock raises the epoch and writes the URL the other
-- replicas forward calls to; every commit reads the epoch with FOR SHARE
-- in its transaction and writes only under the epoch its replica led
-- with, so a replica that was replaced writes nothing more. The secret
-- marks calls a replica forwards (they carry the caller's address).
CREATE TABLE hub_leader (
    only_row boolean     PRIMARY KEY DEFAULT true CHECK (only_row),
    epoch    bigint      NOT NULL,
    grpc_url text,
    since    timestamptz,
    secret   text        NOT NULL DEFAULT replace(gen_random_uuid()::text, '-', '')
                                  || replace(gen_random_uuid()::text, '-', '')
);
INSERT INTO hub_leader (epoch) VALUES (0);
