//! The PostgreSQL cluster `run.sh` starts (`--postgres`, `--postgres-pid`),
//! shared by the hub on PostgreSQL and the plain job queue: a fresh database
//! for each run, dropped after it (so no run inherits another's tables or
//! bloat), the postmaster whose process tree is the database's CPU, and the
//! settings that say what durability both sides run with.

use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, bail};
use sqlx::postgres::PgConnectOptions;
use sqlx::{AssertSqlSafe, Connection, PgConnection};

use crate::proc::Pid;

/// A running PostgreSQL cluster to measure on.
#[derive(Debug, Clone)]
pub struct Cluster {
    /// A URL of one of its databases, as a superuser (`postgres`): the
    /// databases of the runs are made and dropped through it.
    pub url: String,
    /// The postmaster's process, for CPU readings.
    pub pid: Option<u32>,
}

/// A database made for one run.
#[derive(Debug)]
pub struct Database {
    name: String,
    url: String,
    admin: String,
}

impl Cluster {
    /// The postmaster, whose process tree is the database's CPU.
    pub fn postmaster(&self) -> Option<Pid> {
        self.pid.map(|p| Pid(Some(p)))
    }

    async fn admin(&self) -> anyhow::Result<PgConnection> {
        PgConnection::connect(&self.url)
            .await
            .context("connecting to PostgreSQL (--postgres)")
    }

    /// The version and the settings that decide durability, for the
    /// output: the figures mean little without them.
    pub async fn describe(&self) -> anyhow::Result<String> {
        let mut conn = self.admin().await?;
        let mut parts = Vec::new();
        for name in [
            "server_version",
            "fsync",
            "synchronous_commit",
            "full_page_writes",
            "wal_sync_method",
            "shared_buffers",
            "max_connections",
        ] {
            let value: String = sqlx::query_scalar("SELECT current_setting($1)")
                .bind(name)
                .fetch_one(&mut conn)
                .await
                .with_context(|| format!("reading {name}"))?;
            parts.push(format!("{name}={value}"));
        }
        let _ = conn.close().await;
        Ok(parts.join(" "))
    }

    /// Makes an empty database named after `what` and this process.
    pub async fn fresh_database(&self, what: &str) -> anyhow::Result<Database> {
        static RUN: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "bench_{what}_{}_{}",
            std::process::id(),
            RUN.fetch_add(1, Ordering::Relaxed)
        );
        let mut conn = self.admin().await?;
        // The name is made here from a word and two numbers: nothing to quote.
        sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .with_context(|| format!("CREATE DATABASE {name}"))?;
        let _ = conn.close().await;
        Ok(Database {
            url: with_database(&self.url, &name)?,
            name,
            admin: self.url.clone(),
        })
    }
}

impl Database {
    /// Its URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// How to connect to it.
    pub fn options(&self) -> anyhow::Result<PgConnectOptions> {
        PgConnectOptions::from_str(&self.url).context("parsing the database URL")
    }

    /// Drops it, ending every connection still open on it.
    pub async fn drop(self) -> anyhow::Result<()> {
        let mut conn = PgConnection::connect(&self.admin)
            .await
            .context("connecting to PostgreSQL (--postgres)")?;
        sqlx::query(AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        )))
        .execute(&mut conn)
        .await
        .with_context(|| format!("DROP DATABASE {}", self.name))?;
        let _ = conn.close().await;
        Ok(())
    }
}

/// `url` with its database (the last path segment) replaced by `name`.
fn with_database(url: &str, name: &str) -> anyhow::Result<String> {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let Some(authority) = base
        .strip_prefix("postgres://")
        .or_else(|| base.strip_prefix("postgresql://"))
    else {
        bail!("--postgres must be a postgres:// URL");
    };
    let host = authority.split('/').next().unwrap_or(authority);
    let scheme = &base[..base.len() - authority.len()];
    let mut out = format!("{scheme}{host}/{name}");
    if let Some(query) = query {
        out.push('?');
        out.push_str(query);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn a_run_database_replaces_the_one_in_the_url() {
        let cases = [
            (
                "postgres://postgres@127.0.0.1:5432/postgres",
                "postgres://postgres@127.0.0.1:5432/b",
            ),
            ("postgres://u:p@h:1", "postgres://u:p@h:1/b"),
            (
                "postgresql://h/x?sslmode=disable",
                "postgresql://h/b?sslmode=disable",
            ),
        ];
        for (url, want) in cases {
            assert_eq!(with_database(url, "b").unwrap(), want, "{url}");
        }
        assert!(with_database("mysql://h/x", "b").is_err());
    }
}
