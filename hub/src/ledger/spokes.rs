//! Spokes in the ledger: registration, keys, heartbeats, signs of life and
//! derived health. A spoke's row is written with the next commit after it
//! changes (the `dirty` set), so a heartbeat costs no write of its own.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use serde_json::json;
use uuid::Uuid;

use super::delivery::Stream;
use super::{Committed, Ledger, State};
use crate::directives::State as DState;
use crate::error::{Error, Result};
use crate::events::{Kind, NewEvent};
use crate::spokes::{
    Heartbeat, OFFLINE_AFTER_INTERVALS, Registration, STALE_AFTER_INTERVALS, SpokeInfo, SpokeLive,
    SpokeRecord, Webhook, WebhookAttempt, health_at, health_name,
};
use crate::store::Change;

/// A spoke and its share of the ledger.
pub(super) struct Spoke {
    pub(super) info: Arc<SpokeInfo>,
    pub(super) live: SpokeLive,
    /// Committed PENDING directives in delivery order: highest priority,
    /// then oldest (UUIDv7 ids sort by creation).
    pub(super) ready: BTreeSet<(std::cmp::Reverse<i32>, Uuid)>,
    /// Directives DELIVERED or IN_PROGRESS: the window's occupants.
    pub(super) delivered: BTreeSet<Uuid>,
    /// Directives not final.
    pub(super) outstanding: u32,
    /// Directives not final with a coalesce key, by key.
    pub(super) coalesce: HashMap<String, Vec<Uuid>>,
    /// The live stream and long polls, and notices waiting for them.
    pub(super) stream: Stream,
    /// The latest webhook request to it.
    pub(super) last_webhook: Option<WebhookAttempt>,
}

/// What a registration answers.
#[derive(Debug)]
pub struct Registered {
    /// The spoke as it is now.
    pub record: SpokeRecord,
    /// Its webhook secret, when this registration is to show it (see
    /// `RegisterResponse.webhook_secret`).
    pub webhook_secret: Option<String>,
}

/// What a spoke keeps across a rebuild of the ledger: its live stream.
pub(super) struct Detached(Stream);

impl Spoke {
    pub(super) fn new(info: Arc<SpokeInfo>, live: SpokeLive) -> Self {
        Self {
            info,
            live,
            ready: BTreeSet::new(),
            delivered: BTreeSet::new(),
            outstanding: 0,
            coalesce: HashMap::new(),
            stream: Stream::default(),
            last_webhook: None,
        }
    }

    pub(super) fn detach(self) -> Detached {
        Detached(self.stream)
    }

    pub(super) fn attach(&mut self, detached: Detached) {
        self.stream = detached.0;
    }

    pub(super) fn wake(&self) {
        self.stream.wake();
    }

    fn record(&self) -> SpokeRecord {
        let mut record = SpokeRecord::new(&self.info, &self.live, u64::from(self.outstanding));
        record.last_webhook.clone_from(&self.last_webhook);
        record
    }
}

/// A health change made by the sweeper.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthChange {
    /// The spoke.
    pub spoke_id: Uuid,
    /// Its new health's stored name.
    pub to: &'static str,
}

impl State {
    /// A spoke to change; NOT_FOUND if there is none.
    fn spoke_mut(&mut self, id: Uuid) -> Result<&mut Spoke> {
        self.spokes
            .get_mut(&id)
            .ok_or_else(|| Error::NotFound(format!("spoke {id} not found")))
    }

    pub(super) fn index_spoke(&mut self, spoke: &Spoke) {
        self.by_key
            .insert(spoke.info.key_hash.clone(), spoke.info.id);
        self.by_name.insert(spoke.info.name.clone(), spoke.info.id);
    }

    /// Records a sign of life: back to ONLINE (with an event) if the
    /// recorded health was STALE or OFFLINE.
    pub(super) fn seen(&mut self, id: Uuid, now_ms: i64) {
        let Some(spoke) = self.spokes.get_mut(&id) else {
            return;
        };
        if spoke.info.revoked_at.is_some() {
            return;
        }
        spoke.live.last_seen_at = Some(now_ms);
        let from = spoke.live.health;
        if matches!(from, "STALE" | "OFFLINE") {
            spoke.live.health = "ONLINE";
            self.health_event(id, from, "ONLINE", now_ms);
        }
        self.dirty.insert(id);
    }

    fn health_event(&mut self, id: Uuid, from: &str, to: &str, now_ms: i64) {
        let details = json!({"from": from, "to": to});
        self.spoke_event(id, Kind::SpokeHealthChanged, details, now_ms);
    }

    /// Replaces spoke `id`'s labels, capabilities, version, window and
    /// webhook, logging an update event if any changed; the spoke counts as
    /// seen. Answers the record, whether anything changed, and the webhook
    /// secret if this made one.
    fn update_registration(
        &mut self,
        id: Uuid,
        reg: Registration,
        now_ms: i64,
    ) -> Result<(SpokeRecord, bool, Option<String>)> {
        let spoke = self.spoke_mut(id)?;
        let old_url = spoke.info.webhook.as_ref().map(|w| w.url.as_str());
        let webhook_changed = old_url != reg.webhook_url.as_deref();
        let mut made_secret = None;
        let webhook = match (&spoke.info.webhook, reg.webhook_url.clone()) {
            (_, None) => None,
            (Some(old), Some(url)) => Some(Arc::new(Webhook {
                url,
                secret: old.secret.clone(),
            })),
            (None, Some(url)) => {
                let secret = crate::webhook::new_secret();
                made_secret = Some(secret.clone());
                Some(Arc::new(Webhook { url, secret }))
            }
        };
        let same = spoke.info.labels == reg.labels
            && spoke.info.capabilities == reg.capabilities
            && spoke.info.max_in_flight == reg.max_in_flight
            && spoke.live.version == reg.version
            && !webhook_changed;
        let left_webhook = spoke.info.webhook.is_some() && webhook.is_none();
        let mut changed = Vec::new();
        if !same {
            let old = &spoke.info;
            for (what, differs) in [
                ("labels", old.labels != reg.labels),
                ("capabilities", old.capabilities != reg.capabilities),
                ("max_in_flight", old.max_in_flight != reg.max_in_flight),
                ("version", spoke.live.version != reg.version),
                ("webhook_url", webhook_changed),
            ] {
                if differs {
                    changed.push(what);
                }
            }
            spoke.info = Arc::new(
                SpokeInfo::new(
                    id,
                    old.name.clone(),
                    old.key_hash.clone(),
                    reg.labels,
                    reg.capabilities,
                    reg.max_in_flight,
                    old.registered_at,
                    old.revoked_at,
                )
                .with_webhook(webhook),
            );
            spoke.live.version = reg.version;
            // A wider window may let more directives out.
            spoke.wake();
        }
        if left_webhook {
            self.release_webhook(id);
        }
        self.seen(id, now_ms);
        if !same {
            self.spoke_event(id, Kind::SpokeUpdated, json!({"changed": changed}), now_ms);
        }
        let record = self
            .spokes
            .get(&id)
            .map(Spoke::record)
            .ok_or_else(|| Error::NotFound(format!("spoke {id} not found")))?;
        Ok((record, !same, made_secret))
    }

    /// Logs an event about a spoke whose row changed.
    fn spoke_event(&mut self, id: Uuid, kind: Kind, details: serde_json::Value, now_ms: i64) {
        self.log.changes.push(Change::Event {
            event: NewEvent::spoke(kind, id, details),
            at: now_ms,
        });
        self.dirty.insert(id);
    }
}

impl Ledger {
    /// The spoke whose key hashes to `key_hash`, revoked or not.
    pub fn spoke_by_key(&self, key_hash: &str) -> Option<Arc<SpokeInfo>> {
        let state = self.lock();
        let id = state.by_key.get(key_hash)?;
        state.spokes.get(id).map(|s| s.info.clone())
    }

    /// A spoke by id, as it is now.
    pub fn spoke(&self, id: Uuid) -> Option<SpokeRecord> {
        self.lock().spokes.get(&id).map(Spoke::record)
    }

    /// A spoke by name, as it is now.
    pub fn spoke_by_name(&self, name: &str) -> Option<SpokeRecord> {
        let state = self.lock();
        let id = state.by_name.get(name)?;
        state.spokes.get(id).map(Spoke::record)
    }

    /// Up to `limit` spokes ordered by name, after `after_name`.
    pub fn list_spokes(&self, after_name: &str, limit: usize) -> Vec<SpokeRecord> {
        use std::ops::Bound::{Excluded, Unbounded};
        let state = self.lock();
        state
            .by_name
            .range::<str, _>((Excluded(after_name), Unbounded))
            .filter_map(|(_, id)| state.spokes.get(id))
            .take(limit)
            .map(Spoke::record)
            .collect()
    }

    /// Spokes per recorded health (ONLINE, STALE, OFFLINE, REVOKED).
    pub fn spokes_by_health(&self) -> Vec<(String, i64)> {
        let mut counts: HashMap<&'static str, i64> = HashMap::new();
        for spoke in self.lock().spokes.values() {
            *counts.entry(spoke.live.health).or_default() += 1;
        }
        counts.into_iter().map(|(h, n)| (h.to_owned(), n)).collect()
    }

    /// Creates a spoke with the key hashing to `key_hash`, ONLINE and seen
    /// now. A name taken by a spoke whose current key (not revoked) hashes
    /// to `key_hash` is the same enrollment retried with the key the spoke
    /// proposed: it is re-registered as [`Ledger::reregister`] does.
    /// Otherwise a taken name, or a key another spoke holds, is
    /// ALREADY_EXISTS. The record is answered once the commit holds it
    /// (for a retry: the commit after everything logged so far, so the first
    /// call's creation is stored before the key is handed out again).
    pub fn register(
        &self,
        reg: Registration,
        key_hash: String,
        now_ms: i64,
    ) -> Result<(Registered, Committed)> {
        let mut state = self.lock();
        state.writable()?;
        if let Some(&id) = state.by_name.get(&reg.name) {
            let spoke = state.spoke_mut(id)?;
            if spoke.info.revoked_at.is_none()
                && crate::auth::hashes_match(&spoke.info.key_hash, &key_hash)
            {
                let (record, changed, _) = state.update_registration(id, reg, now_ms)?;
                // A retried enrollment answers as the first: with the secret.
                let webhook_secret = state
                    .spokes
                    .get(&id)
                    .and_then(|s| s.info.webhook.as_ref())
                    .map(|w| w.secret.clone());
                if changed {
                    self.webhooks_may_have_changed();
                }
                let registered = Registered {
                    record,
                    webhook_secret,
                };
                return Ok((registered, self.commit_soon(state)));
            }
            return Err(Error::AlreadyExists(format!(
                "a spoke named {:?} exists; re-register with its key",
                reg.name
            )));
        }
        if state.by_key.contains_key(&key_hash) {
            return Err(Error::AlreadyExists(
                "proposed_key: another spoke holds this key; propose a new one".into(),
            ));
        }
        let id = Uuid::now_v7();
        let webhook = reg.webhook_url.map(|url| {
            Arc::new(Webhook {
                url,
                secret: crate::webhook::new_secret(),
            })
        });
        let webhook_secret = webhook.as_ref().map(|w| w.secret.clone());
        let info = SpokeInfo::new(
            id,
            reg.name,
            key_hash,
            reg.labels,
            reg.capabilities,
            reg.max_in_flight,
            now_ms,
            None,
        )
        .with_webhook(webhook);
        let spoke = Spoke::new(Arc::new(info), SpokeLive::registered(reg.version, now_ms));
        let record = spoke.record();
        state.index_spoke(&spoke);
        state.log.changes.push(Change::Event {
            event: NewEvent::spoke(Kind::SpokeRegistered, id, json!({"name": spoke.info.name})),
            at: now_ms,
        });
        state.spokes.insert(id, spoke);
        state.dirty.insert(id);
        let rx = state.waiter();
        drop(state);
        self.shared.kick.notify_one();
        if webhook_secret.is_some() {
            self.webhooks_may_have_changed();
        }
        let registered = Registered {
            record,
            webhook_secret,
        };
        Ok((registered, rx))
    }

    /// Replaces an existing spoke's labels, capabilities, version and
    /// window; the spoke counts as seen. Writes only when something changed
    /// (then the commit is waited for).
    pub fn reregister(
        &self,
        id: Uuid,
        reg: Registration,
        now_ms: i64,
    ) -> Result<(Registered, Option<Committed>)> {
        let mut state = self.lock();
        state.writable()?;
        let (record, changed, webhook_secret) = state.update_registration(id, reg, now_ms)?;
        let rx = changed.then(|| self.commit_soon(state));
        if changed {
            self.webhooks_may_have_changed();
        }
        let registered = Registered {
            record,
            webhook_secret,
        };
        Ok((registered, rx))
    }

    /// Records a sign of life (a stream opened or closed, a poll).
    pub fn seen(&self, id: Uuid, now_ms: i64) {
        self.lock().seen(id, now_ms);
    }

    /// Records a heartbeat; the spoke counts as seen. Written with the next
    /// commit; nobody waits for it.
    pub fn heartbeat(&self, id: Uuid, hb: Heartbeat, now_ms: i64) {
        let mut state = self.lock();
        if let Some(spoke) = state.spokes.get_mut(&id) {
            let live = &mut spoke.live;
            live.last_heartbeat_at = Some(now_ms);
            live.status = hb.status;
            live.status_message = hb.status_message;
            live.reported_in_flight = hb.in_flight;
            live.reported_buffered_points = hb.buffered_points;
            live.reported_failed_pushes = hb.failed_pushes;
            if let Some(version) = hb.version {
                live.version = version;
            }
        }
        state.seen(id, now_ms);
    }

    /// Revokes a spoke: its key stops working at once and its stream ends.
    /// Revoking twice changes nothing.
    pub fn revoke(&self, id: Uuid, now_ms: i64) -> Result<Option<Committed>> {
        let mut state = self.lock();
        state.writable()?;
        let spoke = state.spoke_mut(id)?;
        if spoke.info.revoked_at.is_some() {
            return Ok(None);
        }
        let mut info = SpokeInfo::clone(&spoke.info);
        info.revoked_at = Some(now_ms);
        spoke.info = Arc::new(info);
        spoke.live.health = "REVOKED";
        spoke
            .stream
            .end(super::End::KeyInvalidated("spoke key revoked"));
        state.spoke_event(id, Kind::SpokeRevoked, json!({}), now_ms);
        let committed = self.commit_soon(state);
        self.webhooks_may_have_changed();
        Ok(Some(committed))
    }

    /// Replaces a spoke's key, and its webhook secret if it has a webhook
    /// (answered: the new secret); the old key stops working at once and
    /// its stream ends.
    pub fn rotate_key(
        &self,
        id: Uuid,
        key_hash: String,
        now_ms: i64,
    ) -> Result<(Option<String>, Committed)> {
        let mut state = self.lock();
        state.writable()?;
        let spoke = state.spoke_mut(id)?;
        if spoke.info.revoked_at.is_some() {
            return Err(Error::FailedPrecondition(format!("spoke {id} is revoked")));
        }
        let mut info = SpokeInfo::clone(&spoke.info);
        let old = std::mem::replace(&mut info.key_hash, key_hash.clone());
        let secret = info.webhook.as_mut().map(|w| {
            let secret = crate::webhook::new_secret();
            Arc::make_mut(w).secret.clone_from(&secret);
            secret
        });
        spoke.info = Arc::new(info);
        spoke
            .stream
            .end(super::End::KeyInvalidated("spoke key rotated"));
        state.by_key.remove(&old);
        state.by_key.insert(key_hash, id);
        state.spoke_event(id, Kind::SpokeKeyRotated, json!({}), now_ms);
        Ok((secret, self.commit_soon(state)))
    }

    /// Deletes a spoke: its key stops working and its stream ends at once,
    /// its name is free, its directives that are not final become
    /// CANCELLED. Answers the spoke as it was and how many were cancelled.
    pub fn delete_spoke(&self, id: Uuid, now_ms: i64) -> Result<(SpokeRecord, u32, Committed)> {
        let mut state = self.lock();
        state.writable()?;
        let record = state.spoke_mut(id)?.record();
        let outstanding: Vec<Uuid> = state
            .directives
            .iter()
            .filter(|(_, d)| d.spoke_id == id)
            .map(|(id, _)| *id)
            .collect();
        let reason = "its spoke was deleted";
        for &directive in &outstanding {
            state.finish(directive, DState::Cancelled, None, reason, now_ms);
            state.log.changes.push(Change::Event {
                event: NewEvent::directive(
                    Kind::DirectiveCancelled,
                    id,
                    directive,
                    json!({"reason": reason}),
                ),
                at: now_ms,
            });
        }
        let Some(mut spoke) = state.spokes.remove(&id) else {
            return Err(Error::NotFound(format!("spoke {id} not found")));
        };
        spoke
            .stream
            .end(super::End::KeyInvalidated("spoke deleted"));
        state.by_key.remove(&spoke.info.key_hash);
        state.by_name.remove(&spoke.info.name);
        state.dirty.remove(&id);
        // The row stays for its history, its key hash does not: the store
        // keeps key hashes unique, and a key a spoke proposed must be free
        // again once its spoke is gone (a spoke still retrying the
        // enrollment that made it enrolls anew, not into a failed commit).
        let mut info = SpokeInfo::clone(&spoke.info);
        info.key_hash = format!("deleted:{id}");
        state
            .log
            .changes
            .push(Change::Spoke(Arc::new(info), spoke.live.clone()));
        state.log.changes.push(Change::Event {
            event: NewEvent::spoke(
                Kind::SpokeDeleted,
                id,
                json!({"name": spoke.info.name, "cancelled": outstanding.len()}),
            ),
            at: now_ms,
        });
        state
            .log
            .changes
            .push(Change::SpokeDeleted { id, at: now_ms });
        let cancelled = u32::try_from(outstanding.len()).unwrap_or(u32::MAX);
        let committed = self.commit_soon(state);
        self.webhooks_may_have_changed();
        Ok((record, cancelled, committed))
    }

    /// Moves spokes whose last sign of life is older than the thresholds to
    /// STALE or OFFLINE, recording each change; connected spokes count as
    /// seen instead. Returns the changes.
    pub fn sweep_health(&self, now_ms: i64, interval_ms: i64) -> Vec<HealthChange> {
        let stale_cutoff = now_ms - STALE_AFTER_INTERVALS * interval_ms;
        let offline_cutoff = now_ms - OFFLINE_AFTER_INTERVALS * interval_ms;
        let mut state = self.lock();
        let mut seen = Vec::new();
        let mut changes = Vec::new();
        for (id, spoke) in &state.spokes {
            if spoke.info.revoked_at.is_some() {
                continue;
            }
            let last = spoke.live.last_seen_at.unwrap_or(0);
            let due = match spoke.live.health {
                "ONLINE" => last < stale_cutoff,
                "STALE" => last < offline_cutoff,
                _ => false,
            };
            if !due {
                continue;
            }
            if spoke.stream.is_connected() {
                seen.push(*id);
                continue;
            }
            let to = health_name(health_at(
                spoke.live.last_seen_at,
                now_ms,
                interval_ms,
                false,
            ));
            if to != spoke.live.health {
                changes.push((*id, spoke.live.health, to));
            }
        }
        for id in seen {
            state.seen(id, now_ms);
        }
        let mut out = Vec::with_capacity(changes.len());
        for (id, from, to) in changes {
            if let Some(spoke) = state.spokes.get_mut(&id) {
                spoke.live.health = to;
            }
            state.health_event(id, from, to, now_ms);
            state.dirty.insert(id);
            out.push(HealthChange { spoke_id: id, to });
        }
        out
    }

    /// Every spoke that is not revoked, for resolving a fan-out.
    pub(super) fn active(state: &State) -> impl Iterator<Item = &Spoke> {
        state
            .by_name
            .values()
            .filter_map(|id| state.spokes.get(id))
            .filter(|s| s.info.revoked_at.is_none())
    }
}
