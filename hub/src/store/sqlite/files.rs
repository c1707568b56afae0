//! The database's files on disk. They hold payloads, results and metrics,
//! so only the hub's user may read them: `hub.db` is created mode 0600
//! before SQLite opens it, and SQLite gives the `-wal` and `-shm` files the
//! mode of the database file. Files left readable by others (a database
//! from an older hub, or restored from a backup) are made private at open;
//! a directory others can read is only warned about, since it may be
//! shared on purpose and its files are private anyway. The process's umask
//! is left alone: the library changes no process state.

use std::path::Path;

/// Makes the database at `db` and its `-wal` and `-shm` files private,
/// creating an empty `db` (which SQLite takes as a new database) if there
/// is none. Problems are logged, not returned: SQLite reports an unusable
/// path itself, and a mode that cannot be changed is no reason to stop.
#[cfg(unix)]
pub(super) fn make_private(db: &Path) {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};

    let name = db.to_string_lossy();
    // In-memory databases (`sqlite::memory:`, `mode=memory`) have no file.
    if name.is_empty() || name.starts_with(':') || name.starts_with("file:") {
        return;
    }
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(db)
    {
        Ok(_) => return,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => {
            tracing::debug!(file = %db.display(), error = %e, "could not create the database file");
            return;
        }
    }
    for suffix in ["", "-wal", "-shm"] {
        let file = format!("{name}{suffix}");
        let Ok(meta) = std::fs::metadata(&file) else {
            continue;
        };
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 == 0 {
            continue;
        }
        let private = std::fs::Permissions::from_mode(mode & 0o700);
        match std::fs::set_permissions(&file, private) {
            Ok(()) => tracing::warn!(
                %file,
                was = format!("{mode:o}"),
                "the database file was readable by others; made it private (mode {:o})",
                mode & 0o700
            ),
            Err(e) => tracing::warn!(
                %file,
                mode = format!("{mode:o}"),
                error = %e,
                "the database file is readable by others and its mode cannot be changed"
            ),
        }
    }
    let dir = match db.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    if let Ok(meta) = std::fs::metadata(dir) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                dir = %dir.display(),
                mode = format!("{mode:o}"),
                "the database's directory is open to other users (its files are private); \
                 `chmod 700` it unless it is shared on purpose"
            );
        }
    }
}

/// File modes are a Unix matter.
#[cfg(not(unix))]
pub(super) fn make_private(_db: &Path) {}

/// Held for as long as a hub process serves from an SQLite database: an
/// exclusive lock on `<database>.lock` beside it. SQLite lets two processes
/// share a file, but two hubs on one database would each run every timer
/// and each keep its own picture of the fleet, so the second one refuses to
/// start. The operating system releases the lock when the process ends,
/// however it ends, so a killed hub never leaves a stale lock behind.
#[derive(Debug)]
pub struct ProcessLock {
    _file: std::fs::File,
    path: std::path::PathBuf,
}

impl ProcessLock {
    /// Takes the lock for the database file `db`, or says who holds it.
    pub(super) fn take(db: &Path) -> Result<Option<Self>, String> {
        let name = db.to_string_lossy();
        if name.is_empty() || name.starts_with(':') || name.starts_with("file:") {
            return Ok(None);
        }
        let path = std::path::PathBuf::from(format!("{name}.lock"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        match file.try_lock() {
            Ok(()) => Ok(Some(Self { _file: file, path })),
            Err(std::fs::TryLockError::WouldBlock) => Err(format!(
                "another hub is already serving from {} (it holds {}): stop it first; \
                 to run several replicas use PostgreSQL (--database-url postgres://...)",
                db.display(),
                path.display()
            )),
            Err(std::fs::TryLockError::Error(e)) => {
                Err(format!("cannot lock {}: {e}", path.display()))
            }
        }
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}
