//! The hub's endpoint hint (`HubHints.endpoints`), kept across restarts
//! with the configured endpoints it was received under.

use super::Store;
use crate::error::{Error, Result};

/// A stored endpoint hint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct EndpointHint {
    /// The endpoints the hub named, in its order.
    pub endpoints: Vec<String>,
    /// The spoke's configured endpoints when the hint came.
    pub configured: Vec<String>,
}

impl Store {
    /// The stored hint, if any.
    pub async fn endpoint_hint(&self) -> Result<Option<EndpointHint>> {
        let row: Option<(String, String)> =
            sqlx::query_as("SELECT endpoints, configured FROM endpoint_hint WHERE id = 1")
                .fetch_optional(&self.pool)
                .await?;
        let Some((endpoints, configured)) = row else {
            return Ok(None);
        };
        let list = |text: &str| {
            serde_json::from_str::<Vec<String>>(text)
                .map_err(|e| Error::Corrupt(format!("the stored endpoint hint: {e}")))
        };
        Ok(Some(EndpointHint {
            endpoints: list(&endpoints)?,
            configured: list(&configured)?,
        }))
    }

    /// Keeps `hint`, replacing any earlier one.
    pub async fn save_endpoint_hint(&self, hint: &EndpointHint, now_ms: i64) -> Result<()> {
        let json = |list: &[String]| serde_json::to_string(list).expect("strings serialize");
        sqlx::query(
            "INSERT INTO endpoint_hint (id, endpoints, configured, received_at) \
             VALUES (1, $1, $2, $3) \
             ON CONFLICT (id) DO UPDATE SET endpoints = $1, configured = $2, received_at = $3",
        )
        .bind(json(&hint.endpoints))
        .bind(json(&hint.configured))
        .bind(now_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Forgets the hint: the configured endpoints apply again.
    pub async fn clear_endpoint_hint(&self) -> Result<()> {
        sqlx::query("DELETE FROM endpoint_hint")
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_hint_survives_reopening_until_cleared() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).await.unwrap();
        assert_eq!(store.endpoint_hint().await.unwrap(), None);
        let hint = EndpointHint {
            endpoints: vec!["https://hub-b:7443".into(), "https://hub-c:7443".into()],
            configured: vec!["https://hub-a:7443".into()],
        };
        store.save_endpoint_hint(&hint, 1).await.unwrap();
        let newer = EndpointHint {
            endpoints: vec!["https://hub-d:7443".into()],
            ..hint
        };
        store.save_endpoint_hint(&newer, 2).await.unwrap();
        drop(store);
        let store = Store::open(dir.path()).await.unwrap();
        assert_eq!(store.endpoint_hint().await.unwrap(), Some(newer));
        store.clear_endpoint_hint().await.unwrap();
        assert_eq!(store.endpoint_hint().await.unwrap(), None);
    }
}
