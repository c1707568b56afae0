//! The one connection that writes ([`Writer`]), owned by the committer's
//! thread: the group commit, retention's purges between commits, and the
//! rebuild's read after a failed commit. On SQLite it is a rusqlite
//! connection whose statements run there and then on that thread; on
//! PostgreSQL one dedicated connection, made (and made again after a
//! failure) on that thread.
//!
//! Event sequences are given here, in commit order: a commit numbers its
//! events from the store's next sequence, and only a commit that succeeded
//! moves it on and publishes its last event.

use super::{Backend, Change, Committed, Cutoffs, Purged, Snapshot, Store, postgres, sqlite};
use crate::error::Result;

/// The one connection that writes, owned by the committer's thread.
pub struct Writer {
    store: Store,
    backend: WriterBackend,
}

enum WriterBackend {
    Sqlite(sqlite::Writer),
    Postgres(postgres::Writer),
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Writer(..)")
    }
}

impl Writer {
    pub(super) fn open(store: &Store) -> Result<Self> {
        let backend = match &store.backend {
            Backend::Sqlite(db) => WriterBackend::Sqlite(db.writer()?),
            Backend::Postgres(db) => WriterBackend::Postgres(db.writer()),
        };
        Ok(Self {
            store: store.clone(),
            backend,
        })
    }

    /// Commits `changes` in one transaction, in order, with one sync.
    /// Nothing is written if it fails.
    pub async fn commit(&mut self, changes: &[Change]) -> Result<Committed> {
        let first = self.store.next_seq();
        let (committed, next) = match &mut self.backend {
            WriterBackend::Sqlite(w) => w.commit(changes, first)?,
            WriterBackend::Postgres(w) => w.commit(changes, first).await?,
        };
        self.store.events_committed(next);
        Ok(committed)
    }

    /// Deletes up to one batch of each kind of row older than its cutoff.
    /// Returns what it deleted and whether more may be due; the committer
    /// calls it between commits until nothing is.
    pub async fn purge_step(&mut self, cutoffs: &Cutoffs) -> Result<(Purged, bool)> {
        match &mut self.backend {
            WriterBackend::Sqlite(w) => w.purge_step(cutoffs),
            WriterBackend::Postgres(w) => w.purge_step(cutoffs).await,
        }
    }

    /// A setting of the PostgreSQL writer's session (tests check the
    /// durability with it).
    #[cfg(test)]
    pub(crate) async fn postgres_setting(&mut self, name: &str) -> Result<String> {
        match &mut self.backend {
            WriterBackend::Sqlite(_) => panic!("not PostgreSQL"),
            WriterBackend::Postgres(w) => w.setting(name).await,
        }
    }

    /// Reads everything the ledger starts from, as committed (after a
    /// failed commit). On PostgreSQL through the writer's own connection,
    /// so the committer's thread never borrows the readers' connections.
    pub async fn snapshot(&mut self) -> Result<Snapshot> {
        match &mut self.backend {
            WriterBackend::Sqlite(_) => self.store.snapshot().await,
            WriterBackend::Postgres(w) => w.snapshot().await,
        }
    }
}
