//! The group commit on PostgreSQL: everything the ledger decided since the
//! last commit goes into one statement on the writer's own connection
//! ([`COMMIT`]: a multi-row `UNNEST` of one array per column for each kind
//! of row), so a commit is one round trip however many rows it holds.
//!
//! The connection is made on the committer's thread at the first use and
//! dropped after any failure (the server rolls back what it held); the
//! next commit connects again. A new connection first reads the highest
//! event sequence stored: a commit whose answer was lost with the
//! connection may have landed, and its sequences must not be given again.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgArguments, PgConnectOptions};
use sqlx::{Arguments, Encode, PgConnection, Postgres, Row, Type};

use super::super::batch::{Rows, UpdateRow};
use super::super::{Change, Committed, Durability, Snapshot};
use super::{UNREACHABLE, connect, load, metrics};
use crate::error::{Error, Result, causes};

/// The one connection that writes, owned by the committer's thread.
pub(in crate::store) struct Writer {
    conn: Option<PgConnection>,
    options: Arc<PgConnectOptions>,
    durability: Durability,
    connect_timeout: Duration,
    /// The connection is new: the next commit reads the sequence stored.
    resync: bool,
}

impl Writer {
    pub(super) fn new(
        options: Arc<PgConnectOptions>,
        durability: Durability,
        connect_timeout: Duration,
    ) -> Self {
        Self {
            conn: None,
            options,
            durability,
            connect_timeout,
            resync: true,
        }
    }

    /// The connection, made now if there is none.
    pub(super) async fn connection(&mut self) -> Result<&mut PgConnection> {
        let conn = match self.conn.take() {
            Some(conn) => conn,
            None => {
                self.resync = true;
                self.connect().await.map_err(|e| {
                    tracing::warn!(error = %causes(&e), "the writer cannot connect to PostgreSQL");
                    Error::Unavailable(UNREACHABLE)
                })?
            }
        };
        Ok(self.conn.insert(conn))
    }

    async fn connect(&self) -> Result<PgConnection> {
        let mut conn = connect(&self.options, self.connect_timeout).await?;
        let sql = match self.durability {
            // Answered once the commit is on the server's disk: the
            // server's setting, unless it is `off` (any other value
            // flushes locally, some wait for standbys as well).
            Durability::Full => {
                "SELECT set_config('synchronous_commit', 'on', false) \
                 WHERE current_setting('synchronous_commit') = 'off'"
            }
            // Answered once the commit reached the server, not its disk: a
            // killed hub loses nothing; a server crash may lose the last
            // moments.
            Durability::Normal => "SET synchronous_commit = off",
        };
        sqlx::query(sql).execute(&mut conn).await?;
        Ok(conn)
    }

    /// Forgets the connection after `result` failed (the server rolls back
    /// what it held): the next use connects again.
    pub(super) fn settle<T>(&mut self, result: Result<T>) -> Result<T> {
        if let Err(e) = &result
            && self.conn.take().is_some()
        {
            tracing::warn!(error = %causes(e), "the writer's PostgreSQL connection failed; the next commit connects again");
        }
        result
    }

    /// Commits `changes` in one statement (so one transaction), in order,
    /// their events numbered from `first_seq` (or after the highest
    /// stored, on a new connection); returns what the commit decided and
    /// the sequence the next event gets. Nothing is written if the
    /// statement fails; an error after it (see `Batches::decide`) leaves
    /// the commit done but unanswered, as a lost answer would.
    pub(in crate::store) async fn commit(
        &mut self,
        changes: &[Change],
        first_seq: i64,
    ) -> Result<(Committed, i64)> {
        let result = self.try_commit(changes, first_seq).await;
        if result.is_ok() {
            self.resync = false;
        }
        self.settle(result)
    }

    async fn try_commit(&mut self, changes: &[Change], first_seq: i64) -> Result<(Committed, i64)> {
        let resync = self.resync;
        let conn = self.connection().await?;
        let mut rows = Rows::gather(changes);
        let batches = metrics::Batches::new(&rows.metrics);
        let args = arguments(&rows, &batches, first_seq, resync)?;
        let answer = sqlx::query_with(COMMIT, args).fetch_one(&mut *conn).await?;
        let first: i64 = answer.try_get("first_seq")?;
        let written: i64 = answer.try_get("written")?;
        let stored: Vec<bool> = answer.try_get("stored")?;
        let before: Vec<Option<i64>> = answer.try_get("before")?;
        let outcomes = batches.decide(conn, &stored, &before).await?;
        let committed = rows.settle_metrics(outcomes)?;
        let next = rows.number_events(first);
        if next - first != written {
            return Err(Error::Corrupt(
                "the commit numbered its events otherwise than the hub".into(),
            ));
        }
        Ok((committed, next))
    }

    /// A setting of the writer's session.
    #[cfg(test)]
    pub(in crate::store) async fn setting(&mut self, name: &str) -> Result<String> {
        let conn = self.connection().await?;
        Ok(sqlx::query_scalar("SELECT current_setting($1)")
            .bind(name)
            .fetch_one(conn)
            .await?)
    }

    /// Reads everything the ledger starts from through the writer's own
    /// connection.
    pub(in crate::store) async fn snapshot(&mut self) -> Result<Snapshot> {
        let result = match self.connection().await {
            Ok(conn) => load::snapshot(conn).await,
            Err(e) => Err(e),
        };
        self.settle(result)
    }
}

/// The whole commit as one statement: a data-modifying CTE per kind of
/// row, each taking one array per column (empty when the commit has none
/// of that kind), so the text is the same every commit and its prepared
/// statement is reused. One statement is atomic on its own: no BEGIN, no
/// COMMIT, one round trip.
///
/// The CTEs see the same snapshot and not each other's rows, so no kind
/// may depend on another written here, with two exceptions made explicit
/// by what they read: the spoke upsert reads `deleted` first (a deleted
/// spoke's name may be taken again in this same commit), and metric points
/// and events read `stored`, the batches the batch insert did insert.
/// Nothing else depends: `Rows` merges a row's changes, so a directive is
/// inserted or updated, never both, and the spokes deleted apart are not
/// upserted. Foreign keys are checked at the statement's end, when every
/// CTE's rows are there.
///
/// Events are numbered here as `Rows::number_events` numbers them after
/// `settle_metrics`: from `$1` (or after the stored high-water mark, when
/// `$2`), consecutively, without the events of batches not stored. The
/// answer is that first sequence, how many events were written, and for
/// each tried batch whether it was stored now and what an earlier commit
/// accepted for it.
const COMMIT: &str = "WITH \
    seq AS (SELECT CASE WHEN $2::boolean THEN GREATEST($1::bigint, last + 1) \
        ELSE $1::bigint END AS first_seq FROM event_sequence), \
    deleted AS (UPDATE spokes SET deleted_at = u.at \
        FROM UNNEST($3::uuid[], $4::bigint[]) AS u (id, at) WHERE spokes.id = u.id RETURNING 1), \
    spoke_rows AS (INSERT INTO spokes (id, name, key_hash, labels, capabilities, version, \
        max_in_flight, registered_at, revoked_at, last_heartbeat_at, last_seen_at, status, \
        status_message, reported_in_flight, reported_buffered_points, reported_failed_pushes, \
        health, deleted_at) \
        SELECT * FROM UNNEST($5::uuid[], $6::text[], $7::text[], $8::text[], $9::text[], \
        $10::text[], $11::bigint[], $12::bigint[], $13::bigint[], $14::bigint[], $15::bigint[], \
        $16::bigint[], $17::text[], $18::bigint[], $19::bigint[], $20::bigint[], $21::text[], \
        $22::bigint[]) \
        WHERE (SELECT count(*) FROM deleted) >= 0 \
        ON CONFLICT (id) DO UPDATE SET name = excluded.name, key_hash = excluded.key_hash, \
        labels = excluded.labels, capabilities = excluded.capabilities, \
        version = excluded.version, max_in_flight = excluded.max_in_flight, \
        revoked_at = excluded.revoked_at, last_heartbeat_at = excluded.last_heartbeat_at, \
        last_seen_at = excluded.last_seen_at, status = excluded.status, \
        status_message = excluded.status_message, \
        reported_in_flight = excluded.reported_in_flight, \
        reported_buffered_points = excluded.reported_buffered_points, \
        reported_failed_pushes = excluded.reported_failed_pushes, health = excluded.health, \
        deleted_at = COALESCE(excluded.deleted_at, spokes.deleted_at)), \
    group_rows AS (INSERT INTO directive_groups (group_id, payload, created_at) \
        SELECT * FROM UNNEST($23::uuid[], $24::text[], $25::bigint[])), \
    created AS (INSERT INTO directives (id, spoke_id, type, payload, max_attempts, priority, \
        created_at, expires_at, ack_deadline_ms, group_id, idempotency_key, coalesce_key, \
        state, attempts, updated_at, ack_due_at, result, error, progress, progress_message) \
        SELECT * FROM UNNEST($26::uuid[], $27::uuid[], $28::text[], $29::text[], \
        $30::bigint[], $31::bigint[], $32::bigint[], $33::bigint[], $34::bigint[], \
        $35::uuid[], $36::text[], $37::text[], $38::text[], $39::bigint[], $40::bigint[], \
        $41::bigint[], $42::text[], $43::text[], $44::bigint[], $45::text[])), \
    updated AS (UPDATE directives d SET state = u.state, attempts = u.attempts, \
        updated_at = u.updated_at, ack_due_at = u.ack_due_at, result = u.result, \
        error = u.error, progress = u.progress, progress_message = u.progress_message \
        FROM UNNEST($46::uuid[], $47::text[], $48::bigint[], $49::bigint[], $50::bigint[], \
        $51::text[], $52::text[], $53::bigint[], $54::text[]) \
        AS u (id, state, attempts, updated_at, ack_due_at, result, error, progress, \
        progress_message) WHERE d.id = u.id), \
    key_rows AS (INSERT INTO idempotency_keys (key, group_id, fingerprint, created_at) \
        SELECT * FROM UNNEST($55::text[], $56::uuid[], $57::text[], $58::bigint[])), \
    tried AS (SELECT * FROM UNNEST($59::uuid[], $60::text[], $61::bigint[], $62::bigint[], \
        $63::bigint[]) WITH ORDINALITY \
        AS t (spoke_id, batch_id, accepted, rejected, received_at, ord)), \
    batch_rows AS (INSERT INTO metric_batches (spoke_id, batch_id, accepted, rejected, \
        received_at) SELECT spoke_id, batch_id, accepted, rejected, received_at FROM tried \
        ON CONFLICT (spoke_id, batch_id) DO NOTHING RETURNING spoke_id, batch_id), \
    stored AS (SELECT t.ord FROM tried t \
        JOIN batch_rows b ON b.spoke_id = t.spoke_id AND b.batch_id = t.batch_id), \
    point_rows AS (INSERT INTO metric_points (spoke_id, batch_id, domain, name, value, unit, \
        labels, time_ns) \
        SELECT t.spoke_id, t.batch_id, p.domain, p.name, p.value, p.unit, p.labels, p.time_ns \
        FROM UNNEST($64::bigint[], $65::text[], $66::text[], $67::float8[], $68::text[], \
        $69::text[], $70::bigint[]) WITH ORDINALITY \
        AS p (batch, domain, name, value, unit, labels, time_ns, ord) \
        JOIN tried t ON t.ord = p.batch WHERE p.batch IN (SELECT ord FROM stored) \
        ORDER BY p.ord), \
    kept AS (SELECT e.type, e.time, e.spoke_id, e.directive_id, e.details, \
        row_number() OVER (ORDER BY e.ord) - 1 AS n \
        FROM UNNEST($71::text[], $72::bigint[], $73::uuid[], $74::uuid[], $75::text[], \
        $76::bigint[]) WITH ORDINALITY \
        AS e (type, time, spoke_id, directive_id, details, batch, ord) \
        WHERE e.batch IS NULL OR e.batch IN (SELECT ord FROM stored)), \
    event_rows AS (INSERT INTO events (seq, type, time, spoke_id, directive_id, details) \
        SELECT s.first_seq + k.n, k.type, k.time, k.spoke_id, k.directive_id, k.details \
        FROM kept k CROSS JOIN seq s), \
    high AS (UPDATE event_sequence \
        SET last = GREATEST(last, (SELECT first_seq FROM seq) + (SELECT count(*) FROM kept) - 1) \
        WHERE EXISTS (SELECT 1 FROM kept)) \
    SELECT (SELECT first_seq FROM seq) AS first_seq, (SELECT count(*) FROM kept) AS written, \
    ARRAY(SELECT s.ord IS NOT NULL FROM tried t LEFT JOIN stored s ON s.ord = t.ord \
        ORDER BY t.ord) AS stored, \
    ARRAY(SELECT m.accepted FROM tried t LEFT JOIN metric_batches m \
        ON m.spoke_id = t.spoke_id AND m.batch_id = t.batch_id ORDER BY t.ord) AS before";

/// Adds one parameter.
pub(super) fn add<'t, T: Encode<'t, Postgres> + Type<Postgres>>(
    args: &mut PgArguments,
    value: T,
) -> Result<()> {
    args.add(value).map_err(sqlx::Error::Encode)?;
    Ok(())
}

/// One column of `rows`, as an array parameter.
fn col<'r, R, T>(rows: &'r [R], f: impl Fn(&'r R) -> T) -> Vec<T> {
    rows.iter().map(f).collect()
}

/// The parameters of [`COMMIT`], in its order.
fn arguments(
    rows: &Rows<'_>,
    batches: &metrics::Batches<'_, '_>,
    first: i64,
    resync: bool,
) -> Result<PgArguments> {
    let mut args = PgArguments::default();
    add(&mut args, first)?;
    add(&mut args, resync)?;
    add(&mut args, col(&rows.deleted, |(id, _)| *id))?;
    add(&mut args, col(&rows.deleted, |(_, at)| *at))?;
    spokes(&mut args, rows)?;
    add(&mut args, col(&rows.groups, |g| g.0))?;
    add(&mut args, col(&rows.groups, |g| g.1))?;
    add(&mut args, col(&rows.groups, |g| g.2))?;
    created(&mut args, rows)?;
    add(&mut args, col(&rows.updated, |r| r.id))?;
    let updated: Vec<&UpdateRow> = rows.updated.iter().collect();
    directive_states(&mut args, &updated)?;
    add(&mut args, col(&rows.keys, |k| k.key))?;
    add(&mut args, col(&rows.keys, |k| k.group_id))?;
    add(&mut args, col(&rows.keys, |k| k.fingerprint))?;
    add(&mut args, col(&rows.keys, |k| k.created_at))?;
    batches.bind(&mut args)?;
    events(&mut args, rows, batches)?;
    Ok(args)
}

fn spokes(args: &mut PgArguments, rows: &Rows<'_>) -> Result<()> {
    let s = &rows.spokes;
    let big = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    add(args, col(s, |r| r.info.id))?;
    add(args, col(s, |r| r.info.name.as_str()))?;
    add(args, col(s, |r| r.info.key_hash.as_str()))?;
    add(args, col(s, |r| r.info.labels_json.as_str()))?;
    add(args, col(s, |r| r.info.capabilities_json.as_str()))?;
    add(args, col(s, |r| r.live.version.as_str()))?;
    add(args, col(s, |r| i64::from(r.info.max_in_flight)))?;
    add(args, col(s, |r| r.info.registered_at))?;
    add(args, col(s, |r| r.info.revoked_at))?;
    add(args, col(s, |r| r.live.last_heartbeat_at))?;
    add(args, col(s, |r| r.live.last_seen_at))?;
    add(args, col(s, |r| r.live.status as i64))?;
    add(args, col(s, |r| r.live.status_message.as_str()))?;
    add(args, col(s, |r| i64::from(r.live.reported_in_flight)))?;
    add(args, col(s, |r| big(r.live.reported_buffered_points)))?;
    add(args, col(s, |r| big(r.live.reported_failed_pushes)))?;
    add(args, col(s, |r| r.live.health))?;
    add(args, col(s, |r| r.deleted_at))
}

/// New directives: their fixed columns, then their state's.
fn created(args: &mut PgArguments, rows: &Rows<'_>) -> Result<()> {
    let c = &rows.created;
    add(args, col(c, |r| r.id))?;
    add(args, col(c, |r| r.spoke_id))?;
    add(args, col(c, |r| r.fixed.directive_type.as_str()))?;
    add(args, col(c, |r| r.payload))?;
    add(args, col(c, |r| i64::from(r.fixed.max_attempts)))?;
    add(args, col(c, |r| i64::from(r.fixed.priority)))?;
    add(args, col(c, |r| r.fixed.created_at))?;
    add(args, col(c, |r| r.fixed.expires_at))?;
    add(args, col(c, |r| r.fixed.ack_deadline_ms))?;
    add(args, col(c, |r| r.fixed.group_id))?;
    add(args, col(c, |r| r.fixed.idempotency_key.as_deref()))?;
    add(args, col(c, |r| r.fixed.coalesce_key.as_deref()))?;
    let states: Vec<&UpdateRow> = c.iter().map(|r| &r.state).collect();
    directive_states(args, &states)
}

/// Directives' mutable columns, without their ids.
fn directive_states(args: &mut PgArguments, u: &[&UpdateRow<'_>]) -> Result<()> {
    add(args, col(u, |r| r.state))?;
    add(args, col(u, |r| i64::from(r.attempts)))?;
    add(args, col(u, |r| r.updated_at))?;
    add(args, col(u, |r| r.ack_due_at))?;
    add(args, col(u, |r| r.result))?;
    add(args, col(u, |r| r.error))?;
    add(args, col(u, |r| i64::from(r.progress)))?;
    add(args, col(u, |r| r.progress_message))
}

/// The events, in order; a metric batch's names its batch's ordinal (it is
/// written only if the statement stores the batch) and carries the details
/// of a stored batch. A batch repeated in this commit records no event:
/// its event is not sent.
fn events(
    args: &mut PgArguments,
    rows: &Rows<'_>,
    batches: &metrics::Batches<'_, '_>,
) -> Result<()> {
    let batch_of: HashMap<usize, usize> = rows
        .metrics
        .iter()
        .enumerate()
        .map(|(i, m)| (m.event, i))
        .collect();
    let details: Vec<String> = rows.metrics.iter().map(|m| m.accepted_details()).collect();
    let (mut kind, mut time, mut spoke, mut directive) = (vec![], vec![], vec![], vec![]);
    let (mut detail, mut batch) = (vec![], vec![]);
    for (n, e) in rows.events.iter().enumerate() {
        let (ordinal, text) = match batch_of.get(&n) {
            None => (None, e.details.as_str()),
            Some(&i) => match batches.ordinal(i) {
                Some(k) => (Some(k), details[i].as_str()),
                None => continue,
            },
        };
        kind.push(e.kind.as_str());
        time.push(e.time);
        spoke.push(e.spoke_id);
        directive.push(e.directive_id);
        detail.push(text);
        batch.push(ordinal);
    }
    add(args, kind)?;
    add(args, time)?;
    add(args, spoke)?;
    add(args, directive)?;
    add(args, detail)?;
    add(args, batch)
}
