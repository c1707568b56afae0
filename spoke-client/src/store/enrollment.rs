//! The spoke's key beyond its first registration: the key proposed at
//! enrollment, kept before `Register` is sent so that every retry proposes
//! the same one, and a key installed by the operator (after `hub
//! rotate-key`).

use super::{Registration, Store};
use crate::error::Result;

impl Store {
    /// The key proposed for spoke `name` and not yet confirmed by the hub.
    /// A key proposed for another name does not count.
    pub async fn proposed_key(&self, name: &str) -> Result<Option<String>> {
        let key =
            sqlx::query_scalar("SELECT proposed_key FROM enrollment WHERE id = 1 AND name = $1")
                .bind(name)
                .fetch_optional(&self.pool)
                .await?;
        Ok(key)
    }

    /// Keeps `key` as the one proposed for spoke `name`, replacing any
    /// other. Durable when it returns: only then may it be sent.
    pub async fn propose_key(&self, name: &str, key: &str, now_ms: i64) -> Result<()> {
        sqlx::query(
            "INSERT INTO enrollment (id, name, proposed_key, created_at) VALUES (1, $1, $2, $3) \
             ON CONFLICT (id) DO UPDATE SET name = $1, proposed_key = $2, created_at = $3",
        )
        .bind(name)
        .bind(key)
        .bind(now_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Saves the registration the hub answered an enrollment with and
    /// forgets the proposed key, in one transaction. A registration stored
    /// meanwhile (a key installed while the call ran) is kept: it is the
    /// operator's newer word. Answers the registration now stored.
    pub async fn enrolled(&self, reg: &Registration, now_ms: i64) -> Result<Registration> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO registration (id, name, spoke_id, spoke_key, registered_at) \
             VALUES (1, $1, $2, $3, $4) ON CONFLICT (id) DO NOTHING",
        )
        .bind(&reg.name)
        .bind(&reg.spoke_id)
        .bind(&reg.spoke_key)
        .bind(now_ms)
        .execute(&mut *tx)
        .await?;
        forget_proposal_and_read(tx).await
    }

    /// Installs `key` as spoke `name`'s key: replaces the stored key, or,
    /// in a state directory that never registered, stores a registration
    /// whose spoke id the next `Register` answers. Forgets any proposed key.
    /// Answers the registration now stored.
    pub async fn install_key(&self, name: &str, key: &str, now_ms: i64) -> Result<Registration> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO registration (id, name, spoke_id, spoke_key, registered_at) \
             VALUES (1, $1, '', $2, $3) ON CONFLICT (id) DO UPDATE SET spoke_key = $2",
        )
        .bind(name)
        .bind(key)
        .bind(now_ms)
        .execute(&mut *tx)
        .await?;
        forget_proposal_and_read(tx).await
    }
}

/// Ends an enrollment or a key install: forgets the proposed key, reads the
/// registration now stored and commits, all in `tx`.
async fn forget_proposal_and_read(
    mut tx: sqlx::Transaction<'_, sqlx::Sqlite>,
) -> Result<Registration> {
    sqlx::query("DELETE FROM enrollment")
        .execute(&mut *tx)
        .await?;
    let (name, spoke_id, spoke_key): (String, String, String) =
        sqlx::query_as("SELECT name, spoke_id, spoke_key FROM registration WHERE id = 1")
            .fetch_one(&mut *tx)
            .await?;
    tx.commit().await?;
    Ok(Registration {
        name,
        spoke_id,
        spoke_key,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(key: &str) -> Registration {
        Registration {
            name: "billing".into(),
            spoke_id: "id-1".into(),
            spoke_key: key.into(),
        }
    }

    #[tokio::test]
    async fn a_proposed_key_survives_reopening_until_the_registration_is_saved() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).await.unwrap();
        assert_eq!(store.proposed_key("billing").await.unwrap(), None);
        store.propose_key("billing", "k1", 1).await.unwrap();
        drop(store);
        let store = Store::open(dir.path()).await.unwrap();
        assert_eq!(
            store.proposed_key("billing").await.unwrap().as_deref(),
            Some("k1")
        );
        assert_eq!(store.proposed_key("other").await.unwrap(), None);
        assert_eq!(store.enrolled(&reg("k1"), 2).await.unwrap(), reg("k1"));
        assert_eq!(store.proposed_key("billing").await.unwrap(), None);
        assert_eq!(store.registration().await.unwrap(), Some(reg("k1")));
    }

    #[tokio::test]
    async fn an_installed_key_replaces_the_stored_one_and_wins_over_an_enrollment() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).await.unwrap();
        // Never registered: the spoke id is learned later.
        store.propose_key("billing", "k1", 1).await.unwrap();
        let installed = store.install_key("billing", "k2", 2).await.unwrap();
        assert_eq!(
            (installed.spoke_id.as_str(), installed.spoke_key.as_str()),
            ("", "k2")
        );
        assert_eq!(store.proposed_key("billing").await.unwrap(), None);
        // A late answer to the enrollment does not undo the installed key.
        assert_eq!(store.enrolled(&reg("k1"), 3).await.unwrap().spoke_key, "k2");
        store.save_registration(&reg("k2"), 4).await.unwrap();
        let again = store.install_key("billing", "k3", 5).await.unwrap();
        assert_eq!(again, reg("k3"));
        assert_eq!(store.registration().await.unwrap(), Some(reg("k3")));
    }
}
