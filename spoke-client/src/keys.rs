//! The spoke's key after the first start.
//!
//! **Enrollment.** On its first start the client makes its own key
//! ([`new_key`]) and keeps it in the state directory *before* it calls
//! `Register` with the enrollment token and that key as
//! `proposed_key`; every retry sends the same key. The hub answers a retry
//! whose key is the name's current key as it answered the first call, so a
//! lost reply, or a crash before the registration was saved, never locks
//! the spoke out of its name. The registration is saved with the key the
//! reply carries (an older hub ignores the proposal and sends its own).
//!
//! **A new key.** After `hub rotate-key NAME` (which prints the new key),
//! hand the key to the spoke in one of two ways:
//!
//! - call [`Client::install_key`](crate::Client::install_key), or
//! - write it into the file [`NEW_KEY_FILE`] (`new-key`) in the state
//!   directory. The client reads that file when it starts and, while the hub
//!   refuses its key, every [`KEY_FILE_INTERVAL`]; it installs the key and
//!   removes the file. An empty file is left for the next look (it may be
//!   being written); one that holds anything but a key is renamed
//!   `new-key.invalid` and the error logged.
//!
//! ```sh
//! # The key is the last line `hub rotate-key` prints.
//! hub rotate-key billing | tail -n 1 > /var/lib/billing/spoke/new-key
//! ```
//!
//! Either way the key is kept in the state directory's database, the next
//! connection uses it, and a client waiting after the hub refused its key
//! connects at once. While it waits, [`Status::key`](crate::Status::key) is
//! [`KeyState::Refused`](crate::KeyState::Refused) with the hub's message.

use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use tokio::sync::watch;

use crate::error::{Error, Result};
use crate::session::Shared;
use crate::status::KeyState;
use crate::store::{Registration, Store};
use crate::wire::now_ms;

/// The file in the state directory an operator writes a new key into.
pub const NEW_KEY_FILE: &str = "new-key";

/// How often a client whose key the hub refused looks for [`NEW_KEY_FILE`].
pub const KEY_FILE_INTERVAL: Duration = Duration::from_secs(1);

/// Where an unusable [`NEW_KEY_FILE`] is moved, so it is reported once.
const INVALID_KEY_FILE: &str = "new-key.invalid";

/// A new key for this spoke to propose: 32 bytes from `rand`'s thread-local
/// generator (a CSPRNG seeded by the operating system) as 64 lowercase hex
/// characters, the form of the hub's own keys.
pub(crate) fn new_key() -> String {
    use std::fmt::Write;
    let bytes: [u8; 32] = rand::random();
    bytes.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Whether `key` can be a spoke key (the contract's form for proposed keys,
/// which the hub's own keys have too).
fn check(key: &str) -> Result<()> {
    if hub_proto::rules::is_spoke_key(key) {
        Ok(())
    } else {
        Err(Error::config(
            "key",
            format!(
                "a spoke key is {} to {} characters of A-Z, a-z, 0-9, '-', '_', '.', '~' \
                 (as `hub rotate-key` prints it)",
                hub_proto::rules::MIN_SPOKE_KEY_CHARS,
                hub_proto::rules::MAX_SPOKE_KEY_CHARS
            ),
        ))
    }
}

/// Counts installed keys, so that a client the hub refused knows when a key
/// newer than the one refused is there; cheap to clone.
#[derive(Clone)]
pub(crate) struct Keys {
    generation: Arc<watch::Sender<u64>>,
    dir: PathBuf,
}

impl Keys {
    /// Keys of the state directory `dir`.
    pub fn new(dir: &Path) -> Self {
        Self {
            generation: Arc::new(watch::Sender::new(0)),
            dir: dir.to_path_buf(),
        }
    }

    /// The number of keys installed so far in this process.
    pub fn generation(&self) -> u64 {
        *self.generation.borrow()
    }

    /// Installs the key of [`NEW_KEY_FILE`], if there is one, then removes
    /// the file; answers the registration it stored. A file without a valid
    /// key is moved aside and reported, not installed.
    pub async fn take_file(&self, store: &Store, name: &str) -> Result<Option<Registration>> {
        let path = self.dir.join(NEW_KEY_FILE);
        let io = |source| Error::Io {
            path: path.clone(),
            source,
        };
        let text = match tokio::fs::read_to_string(&path).await {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            // Not UTF-8: certainly not a key.
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => String::new(),
            Err(e) => return Err(io(e)),
        };
        let key = text.trim();
        if key.is_empty() {
            // Being written (a shell redirection creates the file first):
            // look again next time.
            return Ok(None);
        }
        if let Err(e) = check(key) {
            tracing::error!(file = %path.display(), error = %e, "the new-key file holds no valid key; moved it to {INVALID_KEY_FILE}");
            tokio::fs::rename(&path, self.dir.join(INVALID_KEY_FILE))
                .await
                .map_err(io)?;
            return Ok(None);
        }
        let reg = store.install_key(name, key, now_ms()).await?;
        // Removed only once the key is kept: a crash before installs the
        // same key again at the next start.
        tokio::fs::remove_file(&path).await.map_err(io)?;
        self.bump();
        tracing::info!(file = %path.display(), "installed the key from the new-key file");
        Ok(Some(reg))
    }

    fn bump(&self) {
        self.generation.send_modify(|g| *g += 1);
    }

    /// Completes once a key newer than `generation` was installed.
    async fn newer_than(&self, generation: u64) {
        let mut rx = self.generation.subscribe();
        // The sender lives in `self`: the wait cannot fail.
        let _ = rx.wait_for(|g| *g > generation).await;
    }
}

/// Installs `key` as the spoke's key: kept in the state directory, used by
/// the next connection, and wakes a client waiting for a key.
pub(crate) async fn install(shared: &Shared, key: &str) -> Result<()> {
    let key = key.trim();
    check(key)?;
    let reg = shared
        .store
        .install_key(&shared.config.name, key, now_ms())
        .await?;
    installed(shared, reg);
    shared.keys.bump();
    tracing::info!("installed a new spoke key");
    Ok(())
}

/// Makes `reg` (a key just installed) the one the next connection uses.
fn installed(shared: &Shared, reg: Registration) {
    *shared
        .registration
        .lock()
        .unwrap_or_else(PoisonError::into_inner) = Some(reg);
    shared.status.update(|s| s.key = KeyState::Pending);
}

/// Waits until a key newer than `generation` (the one the hub refused) is
/// installed: by [`install`], or from [`NEW_KEY_FILE`], looked for every
/// [`KEY_FILE_INTERVAL`].
pub(crate) async fn wait_for_new(shared: &Shared, generation: u64) -> Result<()> {
    let keys = &shared.keys;
    let mut reported = None;
    loop {
        if keys.generation() > generation {
            return Ok(());
        }
        match keys.take_file(&shared.store, &shared.config.name).await {
            Ok(Some(reg)) => {
                installed(shared, reg);
                return Ok(());
            }
            Ok(None) => {}
            // A file we cannot read or move is the operator's to fix; the
            // wait goes on (reported once, not every second).
            Err(e @ Error::Io { .. }) => {
                let text = e.to_string();
                if reported.as_ref() != Some(&text) {
                    tracing::error!(error = %text, "cannot take the new-key file");
                    shared.status.error(&text);
                    reported = Some(text);
                }
            }
            Err(e) => return Err(e),
        }
        tokio::select! {
            () = keys.newer_than(generation) => return Ok(()),
            () = tokio::time::sleep(KEY_FILE_INTERVAL) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_keys_are_distinct_and_have_the_contract_form() {
        let (a, b) = (new_key(), new_key());
        assert_ne!(a, b);
        assert_eq!(a.len(), 64);
        assert!(hub_proto::rules::is_spoke_key(&a));
    }

    #[tokio::test]
    async fn the_key_file_is_installed_once_and_a_bad_one_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).await.unwrap();
        let keys = Keys::new(dir.path());
        assert_eq!(keys.take_file(&store, "billing").await.unwrap(), None);

        std::fs::write(dir.path().join(NEW_KEY_FILE), "\n").unwrap();
        assert_eq!(keys.take_file(&store, "billing").await.unwrap(), None);
        assert!(dir.path().join(NEW_KEY_FILE).exists(), "left to be written");

        std::fs::write(dir.path().join(NEW_KEY_FILE), "short\n").unwrap();
        assert_eq!(keys.take_file(&store, "billing").await.unwrap(), None);
        assert!(!dir.path().join(NEW_KEY_FILE).exists());
        assert!(dir.path().join(INVALID_KEY_FILE).exists());
        assert_eq!(
            (keys.generation(), store.registration().await.unwrap()),
            (0, None)
        );

        let key = new_key();
        std::fs::write(dir.path().join(NEW_KEY_FILE), format!("{key}\n")).unwrap();
        let reg = keys.take_file(&store, "billing").await.unwrap().unwrap();
        assert_eq!(
            (reg.name.as_str(), reg.spoke_key.as_str()),
            ("billing", &*key)
        );
        assert_eq!(store.registration().await.unwrap(), Some(reg));
        assert!(!dir.path().join(NEW_KEY_FILE).exists());
        assert_eq!(keys.generation(), 1);
    }
}
