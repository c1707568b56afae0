//! Which hub endpoints the client dials: its configured list, or the list
//! the hub told it to use from now on (`HubHints.endpoints`), so a hub can
//! move — a new address, folded into another service, replicas added —
//! without a spoke being redeployed.
//!
//! [`Endpoints`] holds the hint. A hint is checked as the builder checks
//! endpoints (URLs, one scheme, and never `http://` when the configured ones
//! are `https://`: a hub must not be able to move a key into the clear); a
//! bad one is logged and ignored. A good one is kept in the state directory
//! before it is used, from the next connection on, also after a restart. A
//! hint naming exactly the configured endpoints clears it; a start with a
//! different configured list drops it (the new configuration is the newer
//! word).
//!
//! [`Route`] is the reconnect machine's choice between the two lists. It
//! dials the hinted list while there is one; if no endpoint of the list in
//! use answers (Register and the directive stream) within
//! `endpoint_fallback_after` of the first attempt since the last success, it
//! switches to the other list, and back again the same way. So neither a
//! hint naming a dead endpoint nor an old hub that is gone for good can
//! strand a spoke, and a hint keeps being tried after a fallback.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use crate::config::{check_endpoint, check_one_scheme};
use crate::status::Tracker;
use crate::store::{EndpointHint, Store};
use crate::wire::now_ms;

/// Most endpoints a hint may name (the contract's bound).
const MAX_HINTED: usize = 16;
/// Longest hinted URL (the contract's bound).
const MAX_URL_CHARS: usize = 1024;

/// The configured endpoints and the hub's hint; cheap to clone.
#[derive(Clone)]
pub(crate) struct Endpoints {
    configured: Arc<Vec<String>>,
    fallback_after: Duration,
    status: Tracker,
    hint: Arc<Mutex<Hinted>>,
}

/// The hint in force, numbered so the reconnect machine sees each change.
#[derive(Clone, Default)]
struct Hinted {
    list: Option<Arc<Vec<String>>>,
    generation: u64,
}

/// What a hint from the hub means here.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// No hint, or the one in force: nothing to do.
    Keep,
    /// A new list to use from the next connection on.
    Adopt(Vec<String>),
    /// The configured endpoints again: forget the hint.
    Clear,
    /// Unusable; why.
    Invalid(String),
}

impl Endpoints {
    /// The configured endpoints (validated by the builder), no hint yet.
    pub fn new(configured: Vec<String>, fallback_after: Duration, status: Tracker) -> Self {
        let endpoints = Self {
            configured: Arc::new(configured),
            fallback_after,
            status,
            hint: Arc::default(),
        };
        endpoints.publish(&endpoints.configured, false);
        endpoints
    }

    /// Takes up the hint kept in the state directory, if it still applies.
    pub async fn load(&self, store: &Store) -> crate::Result<()> {
        let Some(stored) = store.endpoint_hint().await? else {
            return Ok(());
        };
        if !same_set(&stored.configured, &self.configured) {
            tracing::info!(hinted = ?stored.endpoints, "the configured endpoints changed since the hub's hint; dropping the hint");
            return store.clear_endpoint_hint().await;
        }
        match self.judge(&stored.endpoints) {
            Verdict::Adopt(list) => {
                tracing::info!(endpoints = ?list, "dialing the endpoints the hub named earlier");
                self.publish(&list, true);
                self.set(Some(list));
                Ok(())
            }
            Verdict::Invalid(why) => {
                tracing::warn!(%why, "dropping the stored endpoint hint");
                store.clear_endpoint_hint().await
            }
            Verdict::Keep | Verdict::Clear => store.clear_endpoint_hint().await,
        }
    }

    /// Handles the endpoints of a hint from the hub: keeps a new list in the
    /// state directory and uses it from the next connection on. Never
    /// fails: a bad hint, or one that cannot be kept, is logged and ignored
    /// (the hub repeats it on the next Register).
    pub async fn offer(&self, urls: &[String], store: &Store) {
        match self.judge(urls) {
            Verdict::Keep => {}
            Verdict::Invalid(why) => {
                tracing::warn!(hinted = ?urls, %why, "ignoring the hub's endpoint hint");
            }
            Verdict::Adopt(list) => {
                let hint = EndpointHint {
                    endpoints: list.clone(),
                    configured: self.configured.to_vec(),
                };
                match store.save_endpoint_hint(&hint, now_ms()).await {
                    Ok(()) => {
                        tracing::info!(endpoints = ?list, "the hub moved this spoke; dialing its endpoints from the next connection on");
                        self.set(Some(list));
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "could not keep the hub's endpoint hint; ignoring it for now");
                    }
                }
            }
            Verdict::Clear => match store.clear_endpoint_hint().await {
                Ok(()) => {
                    tracing::info!(
                        "the hub named the configured endpoints; dialing them from the next connection on"
                    );
                    self.set(None);
                }
                Err(e) => {
                    tracing::error!(error = %e, "could not clear the endpoint hint; keeping it for now");
                }
            },
        }
    }

    /// What `urls` would change: checked as the builder checks endpoints,
    /// duplicates dropped, compared with the configured list (in any order)
    /// and with the hint in force.
    pub fn judge(&self, urls: &[String]) -> Verdict {
        if urls.is_empty() {
            return Verdict::Keep;
        }
        if urls.len() > MAX_HINTED {
            return Verdict::Invalid(format!("more than {MAX_HINTED} endpoints"));
        }
        let mut list: Vec<String> = Vec::with_capacity(urls.len());
        for url in urls {
            if url.chars().count() > MAX_URL_CHARS {
                return Verdict::Invalid(format!("a URL longer than {MAX_URL_CHARS} characters"));
            }
            if let Err(e) = check_endpoint(url) {
                return Verdict::Invalid(e.to_string());
            }
            if !list.contains(url) {
                list.push(url.clone());
            }
        }
        if let Err(e) = check_one_scheme(&list) {
            return Verdict::Invalid(e.to_string());
        }
        let tls_configured = self.configured.iter().any(|u| u.starts_with("https://"));
        if tls_configured && list.iter().any(|u| !u.starts_with("https://")) {
            return Verdict::Invalid(
                "http:// endpoints, while the configured ones are https://: the spoke's key \
                 would travel in clear"
                    .into(),
            );
        }
        let current = self.hinted().1;
        if same_set(&list, &self.configured) {
            return match current {
                Some(_) => Verdict::Clear,
                None => Verdict::Keep,
            };
        }
        match current {
            Some(hint) if *hint == list => Verdict::Keep,
            _ => Verdict::Adopt(list),
        }
    }

    /// Puts `hint` in force (`None`: the configured list).
    pub fn set(&self, hint: Option<Vec<String>>) {
        let mut hinted = self.hint.lock().unwrap_or_else(PoisonError::into_inner);
        hinted.list = hint.map(Arc::new);
        hinted.generation += 1;
    }

    /// The hint in force and its number.
    fn hinted(&self) -> (u64, Option<Arc<Vec<String>>>) {
        let hinted = self.hint.lock().unwrap_or_else(PoisonError::into_inner);
        (hinted.generation, hinted.list.clone())
    }

    /// Shows the list in use in [`Client::status`](crate::Client::status).
    fn publish(&self, list: &[String], from_hub: bool) {
        let list = list.to_vec();
        self.status.update(|s| {
            s.endpoints = list;
            s.endpoints_from_hub = from_hub;
        });
    }
}

/// Whether `a` and `b` name the same endpoints, in any order.
fn same_set(a: &[String], b: &[String]) -> bool {
    a.iter().all(|u| b.contains(u)) && b.iter().all(|u| a.contains(u))
}

/// The reconnect machine's choice of list (see the module docs).
pub(crate) struct Route {
    endpoints: Endpoints,
    /// The hint generation last taken up; `None` before the first connect.
    seen: Option<u64>,
    on_hint: bool,
    list: Arc<Vec<String>>,
    /// The first attempt since the last success (or since the list in use
    /// changed): the fallback clock runs from here.
    trying_since: Option<Instant>,
}

impl Route {
    pub fn new(endpoints: Endpoints) -> Self {
        assert!(
            !endpoints.configured.is_empty(),
            "the builder requires an endpoint"
        );
        let list = endpoints.configured.clone();
        Self {
            endpoints,
            seen: None,
            on_hint: false,
            list,
            trying_since: None,
        }
    }

    /// Called before each attempt: takes up a hint that changed since the
    /// last attempt, or switches lists when the one in use has not answered
    /// for `endpoint_fallback_after`. True when the list in use changed, so
    /// the caller starts from its first endpoint.
    pub fn before_attempt(&mut self) -> bool {
        let (generation, hint) = self.endpoints.hinted();
        let now = Instant::now();
        let changed = if self.seen != Some(generation) {
            self.seen = Some(generation);
            self.on_hint = hint.is_some();
            true
        } else if let Some(hint) = &hint
            && self
                .trying_since
                .is_some_and(|since| now.duration_since(since) >= self.endpoints.fallback_after)
        {
            self.on_hint = !self.on_hint;
            let (from, to) = if self.on_hint {
                ("configured", "hinted")
            } else {
                ("hinted", "configured")
            };
            tracing::warn!(
                after = ?self.endpoints.fallback_after,
                hinted = ?hint,
                configured = ?self.endpoints.configured,
                "no {from} endpoint answered; trying the {to} endpoints"
            );
            true
        } else {
            false
        };
        if changed {
            self.list = match (&hint, self.on_hint) {
                (Some(hint), true) => hint.clone(),
                _ => self.endpoints.configured.clone(),
            };
            self.trying_since = None;
            self.endpoints.publish(&self.list, self.on_hint);
        }
        self.trying_since.get_or_insert(now);
        changed
    }

    /// A connection opened: the fallback clock stops.
    pub fn connected(&mut self) {
        self.trying_since = None;
    }

    /// The list in use.
    pub fn list(&self) -> &[String] {
        &self.list
    }

    /// Whether the list in use is the hub's hint.
    pub fn on_hint(&self) -> bool {
        self.on_hint
    }

    /// How long until the list in use would be given up, when there is
    /// another one to switch to: a wait never runs past it.
    pub fn time_left(&self) -> Option<Duration> {
        self.endpoints.hinted().1.as_ref()?;
        let since = self.trying_since?;
        Some(
            self.endpoints
                .fallback_after
                .saturating_sub(since.elapsed()),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoints(configured: &[&str]) -> Endpoints {
        let configured = configured.iter().map(|s| s.to_string()).collect();
        Endpoints::new(configured, Duration::from_secs(120), Tracker::default())
    }

    fn urls(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_hint_is_judged_against_the_configured_list_and_the_one_in_force() {
        let e = endpoints(&["http://hub-a:1", "http://hub-a2:1"]);
        assert_eq!(e.judge(&[]), Verdict::Keep);
        assert_eq!(
            e.judge(&urls(&[
                "http://hub-b:1",
                "http://hub-b:1",
                "http://hub-c:1"
            ])),
            Verdict::Adopt(urls(&["http://hub-b:1", "http://hub-c:1"]))
        );
        // The configured list, in any order, with no hint in force: nothing.
        assert_eq!(
            e.judge(&urls(&["http://hub-a2:1", "http://hub-a:1"])),
            Verdict::Keep
        );
        e.set(Some(urls(&["http://hub-b:1"])));
        assert_eq!(e.judge(&urls(&["http://hub-b:1"])), Verdict::Keep);
        assert_eq!(
            e.judge(&urls(&["http://hub-a2:1", "http://hub-a:1"])),
            Verdict::Clear
        );
        // An upgrade to TLS is fine.
        assert_eq!(
            e.judge(&urls(&["https://hub-b:1"])),
            Verdict::Adopt(urls(&["https://hub-b:1"]))
        );
    }

    #[test]
    fn a_bad_hint_is_invalid_with_a_reason() {
        let e = endpoints(&["https://hub-a:1"]);
        let invalid = |list: &[&str]| match e.judge(&urls(list)) {
            Verdict::Invalid(why) => why,
            other => panic!("{list:?}: expected invalid, got {other:?}"),
        };
        assert!(invalid(&["hub-b:1"]).contains("http:// or https://"));
        assert!(invalid(&["https://"]).contains("no host"));
        assert!(invalid(&["https://hub b:1"]).contains("hub b"));
        assert!(invalid(&["https://b:1", "http://c:1"]).contains("mixed"));
        assert!(invalid(&["http://hub-b:1"]).contains("in clear"));
        let many: Vec<String> = (0..17).map(|i| format!("https://hub-{i}:1")).collect();
        assert!(matches!(e.judge(&many), Verdict::Invalid(why) if why.contains("16")));
        let long = format!("https://{}:1", "h".repeat(1100));
        assert!(matches!(e.judge(&[long]), Verdict::Invalid(why) if why.contains("1024")));
    }

    #[tokio::test]
    async fn a_stored_hint_is_taken_up_at_start_unless_the_configuration_changed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).await.unwrap();
        let status = Tracker::default();
        let e = Endpoints::new(
            urls(&["http://hub-a:1"]),
            Duration::from_secs(120),
            status.clone(),
        );
        e.offer(&urls(&["http://hub-b:1"]), &store).await;
        let again = Endpoints::new(
            urls(&["http://hub-a:1"]),
            Duration::from_secs(120),
            status.clone(),
        );
        again.load(&store).await.unwrap();
        assert_eq!(
            again.hinted().1.as_deref(),
            Some(&urls(&["http://hub-b:1"]))
        );

        let redeployed =
            Endpoints::new(urls(&["http://hub-z:1"]), Duration::from_secs(120), status);
        redeployed.load(&store).await.unwrap();
        assert_eq!(redeployed.hinted().1, None);
        assert_eq!(store.endpoint_hint().await.unwrap(), None);
    }

    #[tokio::test]
    async fn an_invalid_hint_changes_nothing_and_the_configured_list_clears_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).await.unwrap();
        let status = Tracker::default();
        let e = Endpoints::new(
            urls(&["http://hub-a:1"]),
            Duration::from_secs(120),
            status.clone(),
        );
        e.offer(&urls(&["ftp://hub-b:1"]), &store).await;
        assert_eq!(store.endpoint_hint().await.unwrap(), None);
        assert_eq!(e.hinted().0, 0, "nothing was put in force");
        e.offer(&urls(&["http://hub-b:1"]), &store).await;
        assert!(store.endpoint_hint().await.unwrap().is_some());
        e.offer(&urls(&["http://hub-a:1"]), &store).await;
        assert_eq!(store.endpoint_hint().await.unwrap(), None);
        assert_eq!(e.hinted().1, None);
    }
}
