//! The reads operators and the ledger make, each answered by the backend's
//! own SQL (`sqlite/`, `postgres/`) and decoded the same way
//! (`records.rs`).

use std::collections::HashMap;

use hub_proto::v1 as proto;
use uuid::Uuid;

use super::{Backend, DirectiveFilter, MetricFilter, Snapshot, Store};
use crate::directives::{DirectiveRecord, State};
use crate::error::Result;
use crate::events::{EventFilter, EventRecord};

/// Runs `$call` on the store's backend database, bound to `$db`.
macro_rules! on_backend {
    ($store:expr, $db:ident => $call:expr) => {
        match &$store.backend {
            Backend::Sqlite($db) => $call,
            Backend::Postgres($db) => $call,
        }
    };
}

impl Store {
    /// Reads everything the ledger starts from, as committed.
    pub async fn snapshot(&self) -> Result<Snapshot> {
        on_backend!(self, db => db.snapshot().await)
    }

    /// One directive by id.
    pub async fn directive(&self, id: Uuid) -> Result<Option<DirectiveRecord>> {
        on_backend!(self, db => db.directive(id).await)
    }

    /// A directive's spoke and state, as committed.
    pub async fn directive_state(&self, id: Uuid) -> Result<Option<(Uuid, State)>> {
        on_backend!(self, db => db.directive_state(id).await)
    }

    /// The payloads of `ids` (JSON text), for deliveries whose payload the
    /// ledger does not hold in memory.
    pub async fn payloads(&self, ids: &[Uuid]) -> Result<HashMap<Uuid, String>> {
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        on_backend!(self, db => db.payloads(ids).await)
    }

    /// The directives of one create call, oldest first.
    pub async fn group(&self, group_id: Uuid) -> Result<Vec<DirectiveRecord>> {
        let filter = DirectiveFilter {
            group_id: Some(group_id),
            ..Default::default()
        };
        let mut directives = self.list_directives(&filter, u32::MAX).await?;
        directives.sort_by_key(|d| d.id);
        Ok(directives)
    }

    /// Directives matching `filter`, newest first, at most `limit`.
    pub async fn list_directives(
        &self,
        filter: &DirectiveFilter,
        limit: u32,
    ) -> Result<Vec<DirectiveRecord>> {
        on_backend!(self, db => db.list_directives(filter, limit).await)
    }

    /// Events matching `filter` with `after < seq <= upto`, oldest first, at
    /// most `limit`.
    pub async fn events_between(
        &self,
        after: i64,
        upto: i64,
        filter: &EventFilter,
        limit: u32,
    ) -> Result<Vec<EventRecord>> {
        on_backend!(self, db => db.events_between(after, upto, filter, limit).await)
    }

    /// The latest `limit` events, newest first.
    pub async fn recent_events(&self, limit: u32) -> Result<Vec<EventRecord>> {
        on_backend!(self, db => db.recent_events(limit).await)
    }

    /// The oldest stored event's sequence, if any is stored.
    pub async fn oldest_event(&self) -> Result<Option<i64>> {
        on_backend!(self, db => db.oldest_event().await)
    }

    /// The highest event sequence the NATS JetStream stream `stream` has
    /// acknowledged, with every one before it (0: none yet).
    pub async fn published_events(&self, stream: &str) -> Result<i64> {
        on_backend!(self, db => db.published_events(stream).await)
    }

    /// Points matching `filter`, oldest first (by arrival), with their row
    /// ids for paging.
    pub async fn query_points(
        &self,
        filter: &MetricFilter,
        limit: u32,
    ) -> Result<Vec<(i64, proto::StoredMetricPoint)>> {
        on_backend!(self, db => db.query_points(filter, limit).await)
    }
}
