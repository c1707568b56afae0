-- One row per stamped metric batch (points whose batch_id is set) until the
-- hub answers for it: what a push of it sends, and what the hub may hold
-- under its id from pushes whose answer never came. A batch the hub refuses
-- for size is cut by these, never left to block the buffer, and never
-- counted twice (see spoke-client/src/store/metrics.rs).
--
-- send_upto: a push sends the batch's points with seq <= send_upto.
-- held_min, held_max: the hub holds nothing under this id, or the batch's
-- points with seq <= some bound between the two; both NULL: nothing for
-- sure. A batch stamped by an earlier version has no row: it may have been
-- pushed whole.
CREATE TABLE metric_batches (
    batch_id  TEXT    PRIMARY KEY,
    send_upto INTEGER NOT NULL,
    held_min  INTEGER,
    held_max  INTEGER
);
