//! The local state: one SQLite file, `spoke.db`, in the state directory.
//! Only this module touches sqlx. It holds the registration and key (and,
//! until the hub confirms it, the key proposed at enrollment), every
//! received directive with its status, the outbound metric buffer and the
//! hub's endpoint hint, so a restarted spoke loses nothing. Migrations live in
//! `spoke-client/migrations/` and are embedded and applied at open.

mod directives;
mod endpoints;
mod enrollment;
mod metrics;

use std::path::Path;
use std::time::Duration;

use sqlx::SqlitePool;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

pub(crate) use directives::LocalStatus;
pub(crate) use endpoints::EndpointHint;
pub(crate) use metrics::PendingBatch;

use crate::error::{Error, Result};

/// The database file inside the state directory.
pub const DB_FILE: &str = "spoke.db";

static MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Handle to the local state; cheap to clone.
#[derive(Clone, Debug)]
pub(crate) struct Store {
    pool: SqlitePool,
}

/// Who this state directory belongs to.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Registration {
    pub name: String,
    pub spoke_id: String,
    pub spoke_key: String,
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registration")
            .field("name", &self.name)
            .field("spoke_id", &self.spoke_id)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (creating if needed) the state in `dir`, readable by its owner
    /// only: it holds the spoke's key.
    pub async fn open(dir: &Path) -> Result<Self> {
        let io = |source| Error::Io {
            path: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
        }
        let options = SqliteConnectOptions::new()
            .filename(dir.join(DB_FILE))
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: a recorded outcome survives power loss, not only a crash.
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10));
        // One connection: every write is small, and one writer never meets
        // SQLite's busy errors.
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options)
            .await?;
        MIGRATIONS.run(&pool).await?;
        #[cfg(unix)]
        for file in [DB_FILE, "spoke.db-wal", "spoke.db-shm"] {
            use std::os::unix::fs::PermissionsExt;
            let path = dir.join(file);
            if path.exists() {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                    .map_err(io)?;
            }
        }
        Ok(Self { pool })
    }

    /// The stored registration, if the spoke registered before.
    pub async fn registration(&self) -> Result<Option<Registration>> {
        let row: Option<(String, String, String)> =
            sqlx::query_as("SELECT name, spoke_id, spoke_key FROM registration WHERE id = 1")
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.map(|(name, spoke_id, spoke_key)| Registration {
            name,
            spoke_id,
            spoke_key,
        }))
    }

    /// Keeps the registration and key the hub issued.
    pub async fn save_registration(&self, reg: &Registration, now_ms: i64) -> Result<()> {
        sqlx::query(
            "INSERT INTO registration (id, name, spoke_id, spoke_key, registered_at) \
             VALUES (1, $1, $2, $3, $4) \
             ON CONFLICT (id) DO UPDATE SET name = $1, spoke_id = $2, spoke_key = $3, registered_at = $4",
        )
        .bind(&reg.name)
        .bind(&reg.spoke_id)
        .bind(&reg.spoke_key)
        .bind(now_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_registration_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).await.unwrap();
        assert_eq!(store.registration().await.unwrap(), None);
        let reg = Registration {
            name: "billing".into(),
            spoke_id: "id-1".into(),
            spoke_key: "secret".into(),
        };
        store.save_registration(&reg, 1).await.unwrap();
        drop(store);
        let store = Store::open(dir.path()).await.unwrap();
        assert_eq!(store.registration().await.unwrap(), Some(reg));
        assert!(!format!("{:?}", store.registration().await.unwrap()).contains("secret"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode(dir.path()), 0o700);
            assert_eq!(mode(&dir.path().join(DB_FILE)), 0o600);
        }
    }
}
