-- How far each NATS JetStream stream the hub publishes its events to has
-- acknowledged them (hub --events-nats-url): the publisher resumes after
-- it. Written with the group commit; it only moves forward.
CREATE TABLE event_publisher (
    stream    text   PRIMARY KEY,
    published bigint NOT NULL
);
