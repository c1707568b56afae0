//! `hub.v1.AdminService`: what operators call. The admin token is checked
//! by an interceptor before any method runs (see `crate::server`).

use std::pin::Pin;

use hub_proto::v1 as proto;
use hub_proto::v1::admin_service_server::AdminService;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::{Hub, acks};
use crate::auth::{generate_secret, hash_secret};
use crate::directives::{DirectiveRecord, NewDirective, State, parse_id};
use crate::error::{Error, Result};
use crate::events::{EventFilter, Kind};
use crate::ledger::{self, CancelStep, CreateStep};
use crate::spokes::{SpokeRecord, check_labels, check_len};
use crate::store::{DirectiveFilter, MetricFilter};
use crate::wire::ns_of;

/// The AdminService implementation.
#[derive(Clone)]
pub struct AdminApi {
    hub: Hub,
}

impl AdminApi {
    /// A service over `hub`.
    pub fn new(hub: Hub) -> Self {
        Self { hub }
    }

    /// A spoke named by exactly one of `spoke_id` / `spoke_name`.
    fn spoke_ref(&self, spoke_id: &str, spoke_name: &str) -> Result<SpokeRecord> {
        match (spoke_id.is_empty(), spoke_name.is_empty()) {
            (false, false) => Err(Error::invalid(
                "spoke_name",
                "set spoke_id or spoke_name, not both",
            )),
            (true, true) => Err(Error::invalid("spoke_id", "required (or spoke_name)")),
            (false, true) => self.spoke_by_id(parse_id(spoke_id, "spoke_id")?),
            (true, false) => self
                .hub
                .ledger()
                .spoke_by_name(spoke_name)
                .ok_or_else(|| Error::NotFound(format!("spoke {spoke_name:?} not found"))),
        }
    }

    /// An optional spoke filter: `None` when neither field is set.
    fn spoke_filter(&self, spoke_id: &str, spoke_name: &str) -> Result<Option<Uuid>> {
        if spoke_id.is_empty() && spoke_name.is_empty() {
            return Ok(None);
        }
        Ok(Some(self.spoke_ref(spoke_id, spoke_name)?.id))
    }

    fn spoke_by_id(&self, id: Uuid) -> Result<SpokeRecord> {
        self.hub
            .ledger()
            .spoke(id)
            .ok_or_else(|| Error::NotFound(format!("spoke {id} not found")))
    }
}

/// Most items in one CreateDirectives call.
const MAX_CREATE_ITEMS: usize = 1000;

/// Every directive in a CreateDirectives reply.
fn created_directives(
    reply: &mut proto::CreateDirectivesResponse,
) -> impl Iterator<Item = &mut proto::Directive> {
    reply.results.iter_mut().flat_map(|r| match &mut r.outcome {
        Some(proto::create_directives_result::Outcome::Created(c)) => c.directives.iter_mut(),
        _ => [].iter_mut(),
    })
}

impl AdminApi {
    /// The reply to a create, once its directives are committed (or, for a
    /// repeated idempotency key, the directives the first create made).
    async fn created(
        &self,
        new: &NewDirective,
        step: CreateStep,
        payloads: bool,
    ) -> Result<proto::CreateDirectiveResponse> {
        let (group_id, created, skipped, replay) = match step {
            CreateStep::Created(created, done) => {
                // Confirmed only once committed; the commit itself makes
                // them deliverable, whether or not this caller waits.
                ledger::committed(done).await?;
                tracing::debug!(group_id = %created.group_id, count = created.directives.len(), r#type = %new.directive_type, "directives created");
                (created.group_id, created.directives, created.skipped, false)
            }
            CreateStep::Replay(group_id) => {
                self.hub.ledger().barrier().await?;
                (group_id, self.hub.store().group(group_id).await?, 0, true)
            }
        };
        let directives = created
            .iter()
            .map(|d| {
                if payloads {
                    d.to_proto()
                } else {
                    d.to_proto_without_payload()
                }
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(proto::CreateDirectiveResponse {
            directive_count: u32::try_from(directives.len()).unwrap_or(u32::MAX),
            directives,
            group_id: group_id.to_string(),
            skipped_spokes: skipped,
            idempotent_replay: replay,
            payloads_omitted: false,
            directives_omitted: false,
        })
    }

    /// The largest reply this hub sends, with room for the framing.
    fn reply_limit(&self) -> usize {
        self.hub.settings().max_message_bytes.saturating_sub(1024)
    }

    /// Shrinks a create's reply to fit the message size limit: committed
    /// work is never reported as failed. Payloads go first, then the
    /// directives; `group_id` and the counts always stay.
    fn fit(&self, reply: &mut proto::CreateDirectiveResponse) {
        let limit = self.reply_limit();
        if prost::Message::encoded_len(reply) > limit {
            reply.payloads_omitted = true;
            for d in &mut reply.directives {
                d.payload = None;
            }
        }
        if prost::Message::encoded_len(reply) > limit {
            reply.directives_omitted = true;
            reply.directives.clear();
        }
    }
}

/// Page size from a request: 0 means 100, capped at 1000.
fn page_size(requested: u32) -> u32 {
    match requested {
        0 => 100,
        n => n.min(1000),
    }
}

/// How many of `items`, in order, one reply page holds: at most `size`,
/// within `limit` bytes, and never none when there is one (a single item
/// over the limit is the reply-size layer's to refuse).
fn fitting<T: prost::Message>(items: &[T], size: usize, limit: usize) -> usize {
    let mut bytes = 0;
    for (i, item) in items.iter().enumerate() {
        // The field's tag and length prefix: a few bytes at most.
        let len = item.encoded_len() + 8;
        if i == size || (i > 0 && bytes + len > limit) {
            return i;
        }
        bytes += len;
    }
    items.len()
}

type EventStream = Pin<Box<dyn Stream<Item = Result<proto::WatchEventsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AdminService for AdminApi {
    async fn create_directive(
        &self,
        request: Request<proto::CreateDirectiveRequest>,
    ) -> Result<Response<proto::CreateDirectiveResponse>, Status> {
        let now = self.hub.now_ms();
        let new = NewDirective::parse(request.into_inner(), self.hub.create_defaults(), now)?;
        let step = self.hub.ledger().create(&new, now)?;
        let mut reply = self.created(&new, step, true).await?;
        self.fit(&mut reply);
        Ok(Response::new(reply))
    }

    async fn create_directives(
        &self,
        request: Request<proto::CreateDirectivesRequest>,
    ) -> Result<Response<proto::CreateDirectivesResponse>, Status> {
        use proto::create_directives_result::Outcome;
        let req = request.into_inner();
        if req.items.is_empty() || req.items.len() > MAX_CREATE_ITEMS {
            return Err(Error::invalid(
                "items",
                format!("1 to {MAX_CREATE_ITEMS} items, got {}", req.items.len()),
            )
            .into());
        }
        let now = self.hub.now_ms();
        // Every item is decided first, in order, so they share commits.
        let decided: Vec<_> = req
            .items
            .into_iter()
            .map(|item| {
                let new = NewDirective::parse(item, self.hub.create_defaults(), now)?;
                let step = self.hub.ledger().create(&new, now)?;
                Ok((new, step))
            })
            .collect::<Vec<Result<_>>>();
        let mut results = Vec::with_capacity(decided.len());
        for item in decided {
            let outcome = match item {
                Ok((new, step)) => match self.created(&new, step, req.include_payloads).await {
                    Ok(created) => Outcome::Created(created),
                    Err(e) => Outcome::Error(acks::item_error(e)),
                },
                Err(e) => Outcome::Error(acks::item_error(e)),
            };
            results.push(proto::CreateDirectivesResult {
                outcome: Some(outcome),
            });
        }
        let include_payloads = req.include_payloads;
        let mut reply = proto::CreateDirectivesResponse {
            results,
            payloads_omitted: false,
            directives_omitted: false,
        };
        // Committed work is never reported as failed: the reply shrinks to
        // fit instead.
        let limit = self.reply_limit();
        if include_payloads && prost::Message::encoded_len(&reply) > limit {
            reply.payloads_omitted = true;
            for d in created_directives(&mut reply) {
                d.payload = None;
            }
        }
        if prost::Message::encoded_len(&reply) > limit {
            reply.directives_omitted = true;
            for result in &mut reply.results {
                if let Some(Outcome::Created(created)) = &mut result.outcome {
                    created.directives.clear();
                }
            }
        }
        Ok(Response::new(reply))
    }

    async fn cancel_directive(
        &self,
        request: Request<proto::CancelDirectiveRequest>,
    ) -> Result<Response<proto::CancelDirectiveResponse>, Status> {
        let req = request.into_inner();
        let id = parse_id(&req.directive_id, "directive_id")?;
        tracing::Span::current().record("directive_id", tracing::field::display(id));
        check_len(&req.reason, 1024, "reason")?;
        let reason = match req.reason.trim() {
            "" => "cancelled by an operator".to_owned(),
            r => r.to_owned(),
        };
        let hub = &self.hub;
        match hub.ledger().cancel(id, &reason, hub.now_ms())? {
            CancelStep::Logged {
                committed,
                was_delivered,
            } => {
                ledger::committed(committed).await?;
                tracing::info!(directive_id = %id, told_spoke = was_delivered, "directive cancelled");
            }
            CancelStep::Unknown => hub.ledger().barrier().await?,
        }
        let directive = hub
            .store()
            .directive(id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("directive {id} not found")))?;
        match directive.state {
            State::Cancelled => {}
            s => {
                return Err(Error::FailedPrecondition(format!(
                    "directive {id} is {}: only a directive that is not final can be cancelled",
                    s.as_str()
                ))
                .into());
            }
        }
        Ok(Response::new(proto::CancelDirectiveResponse {
            directive: Some(directive.to_proto()?),
        }))
    }

    async fn get_directive(
        &self,
        request: Request<proto::GetDirectiveRequest>,
    ) -> Result<Response<proto::GetDirectiveResponse>, Status> {
        let id = parse_id(&request.into_inner().directive_id, "directive_id")?;
        // Reads see every change logged before this call.
        self.hub.ledger().barrier().await?;
        let directive = self
            .hub
            .store()
            .directive(id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("directive {id} not found")))?;
        Ok(Response::new(proto::GetDirectiveResponse {
            directive: Some(directive.to_proto()?),
        }))
    }

    async fn list_directives(
        &self,
        request: Request<proto::ListDirectivesRequest>,
    ) -> Result<Response<proto::ListDirectivesResponse>, Status> {
        let req = request.into_inner();
        let filter = DirectiveFilter {
            spoke_id: self.spoke_filter(&req.spoke_id, &req.spoke_name)?,
            state: State::from_proto(req.state, "state")?,
            directive_type: Some(req.r#type).filter(|t| !t.is_empty()),
            group_id: match req.group_id.as_str() {
                "" => None,
                g => Some(parse_id(g, "group_id")?),
            },
            before_id: match req.page_token.as_str() {
                "" => None,
                t => Some(
                    Uuid::parse_str(t)
                        .map_err(|_| Error::invalid("page_token", "not a token from this API"))?,
                ),
            },
        };
        let size = page_size(req.page_size) as usize;
        self.hub.ledger().barrier().await?;
        let page = self
            .hub
            .store()
            .list_directives(&filter, size as u32 + 1)
            .await?;
        // A page is bounded by bytes as well as by count: large payloads
        // make it shorter (never empty), and the token continues after the
        // last directive sent.
        let mut directives = page
            .iter()
            .map(DirectiveRecord::to_proto)
            .collect::<Result<Vec<_>>>()?;
        let fits = fitting(&directives, size, self.reply_limit());
        let more = directives.len() > fits;
        directives.truncate(fits);
        let next_page_token = match directives.last() {
            Some(last) if more => last.id.clone(),
            _ => String::new(),
        };
        Ok(Response::new(proto::ListDirectivesResponse {
            directives,
            next_page_token,
        }))
    }

    async fn list_spokes(
        &self,
        request: Request<proto::ListSpokesRequest>,
    ) -> Result<Response<proto::ListSpokesResponse>, Status> {
        let req = request.into_inner();
        let selector = req.selector.map(|s| s.match_labels).unwrap_or_default();
        check_labels(&selector, "selector.match_labels")?;
        let selector = selector.into_iter().collect();
        let health = match proto::SpokeHealth::try_from(req.health) {
            Ok(proto::SpokeHealth::Unspecified) => None,
            Ok(h) => Some(h),
            Err(_) => {
                return Err(
                    Error::invalid("health", format!("unknown health {}", req.health)).into(),
                );
            }
        };
        let size = page_size(req.page_size) as usize;
        let mut after = crate::spokes::page_after(&req.page_token)?.to_owned();
        let mut spokes = Vec::new();
        // Health is derived, not stored, so filtering happens here; read
        // pages until this one is full or the spokes run out.
        let next_page_token = 'pages: loop {
            let chunk = self.hub.ledger().list_spokes(&after, size);
            let exhausted = chunk.len() < size;
            let mut chunk = chunk.into_iter().peekable();
            while let Some(spoke) = chunk.next() {
                after.clone_from(&spoke.name);
                let wire = self.hub.spoke_to_proto(&spoke);
                let keep =
                    spoke.matches(&selector) && health.is_none_or(|h| wire.health == h as i32);
                if keep {
                    spokes.push(wire);
                }
                if spokes.len() == size {
                    let more = chunk.peek().is_some() || !exhausted;
                    break 'pages if more { after } else { String::new() };
                }
            }
            if exhausted {
                break String::new();
            }
        };
        Ok(Response::new(proto::ListSpokesResponse {
            spokes,
            next_page_token,
        }))
    }

    async fn get_spoke(
        &self,
        request: Request<proto::GetSpokeRequest>,
    ) -> Result<Response<proto::GetSpokeResponse>, Status> {
        let req = request.into_inner();
        let spoke = self.spoke_ref(&req.spoke_id, &req.spoke_name)?;
        Ok(Response::new(proto::GetSpokeResponse {
            spoke: Some(self.hub.spoke_to_proto(&spoke)),
        }))
    }

    async fn revoke_spoke(
        &self,
        request: Request<proto::RevokeSpokeRequest>,
    ) -> Result<Response<proto::RevokeSpokeResponse>, Status> {
        let req = request.into_inner();
        let spoke = self.spoke_ref(&req.spoke_id, &req.spoke_name)?;
        if let Some(done) = self.hub.ledger().revoke(spoke.id, self.hub.now_ms())? {
            ledger::committed(done).await?;
            tracing::info!(spoke_id = %spoke.id, spoke = %spoke.name, "spoke revoked");
        }
        let spoke = self.spoke_by_id(spoke.id)?;
        Ok(Response::new(proto::RevokeSpokeResponse {
            spoke: Some(self.hub.spoke_to_proto(&spoke)),
        }))
    }

    async fn rotate_spoke_key(
        &self,
        request: Request<proto::RotateSpokeKeyRequest>,
    ) -> Result<Response<proto::RotateSpokeKeyResponse>, Status> {
        let req = request.into_inner();
        let spoke = self.spoke_ref(&req.spoke_id, &req.spoke_name)?;
        let key = generate_secret();
        let (webhook_secret, done) =
            self.hub
                .ledger()
                .rotate_key(spoke.id, hash_secret(&key), self.hub.now_ms())?;
        ledger::committed(done).await?;
        tracing::info!(spoke_id = %spoke.id, spoke = %spoke.name, "spoke key rotated");
        Ok(Response::new(proto::RotateSpokeKeyResponse {
            spoke: Some(self.hub.spoke_to_proto(&spoke)),
            spoke_key: key,
            webhook_secret: webhook_secret.unwrap_or_default(),
        }))
    }

    async fn delete_spoke(
        &self,
        request: Request<proto::DeleteSpokeRequest>,
    ) -> Result<Response<proto::DeleteSpokeResponse>, Status> {
        let req = request.into_inner();
        let spoke = self.spoke_ref(&req.spoke_id, &req.spoke_name)?;
        let wire = self.hub.spoke_to_proto(&spoke);
        let (_, cancelled, done) = self
            .hub
            .ledger()
            .delete_spoke(spoke.id, self.hub.now_ms())?;
        ledger::committed(done).await?;
        tracing::info!(spoke_id = %spoke.id, spoke = %spoke.name, cancelled, "spoke deleted");
        Ok(Response::new(proto::DeleteSpokeResponse {
            spoke: Some(wire),
            cancelled_directives: cancelled,
        }))
    }

    async fn query_metrics(
        &self,
        request: Request<proto::QueryMetricsRequest>,
    ) -> Result<Response<proto::QueryMetricsResponse>, Status> {
        let req = request.into_inner();
        let filter = MetricFilter {
            spoke_id: self.spoke_filter(&req.spoke_id, &req.spoke_name)?,
            domain: Some(req.domain).filter(|d| !d.is_empty()),
            name: Some(req.name).filter(|n| !n.is_empty()),
            start_ns: req
                .start_time
                .as_ref()
                .map(|t| ns_of(t, "start_time"))
                .transpose()?,
            end_ns: req
                .end_time
                .as_ref()
                .map(|t| ns_of(t, "end_time"))
                .transpose()?,
            after_row: match req.page_token.as_str() {
                "" => None,
                t => Some(
                    t.parse()
                        .map_err(|_| Error::invalid("page_token", "not a token from this API"))?,
                ),
            },
        };
        let size = page_size(req.page_size);
        let rows = self.hub.store().query_points(&filter, size + 1).await?;
        // Bounded by bytes as well as by count, as ListDirectives' pages:
        // wide labels make a page shorter (never empty).
        let (rows, mut points): (Vec<i64>, Vec<_>) = rows.into_iter().unzip();
        let fits = fitting(&points, size as usize, self.reply_limit());
        let next_page_token = if points.len() > fits {
            points.truncate(fits);
            rows[fits - 1].to_string()
        } else {
            String::new()
        };
        Ok(Response::new(proto::QueryMetricsResponse {
            points,
            next_page_token,
        }))
    }

    type WatchEventsStream = EventStream;

    async fn watch_events(
        &self,
        request: Request<proto::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let req = request.into_inner();
        let filter = EventFilter {
            kinds: req
                .types
                .iter()
                .map(|t| Kind::from_proto(*t, "types"))
                .collect::<Result<_>>()?,
            spoke_id: match req.spoke_id.as_str() {
                "" => None,
                id => Some(parse_id(id, "spoke_id")?),
            },
        };
        let after = i64::try_from(req.after_sequence)
            .map_err(|_| Error::invalid("after_sequence", "out of range"))?;
        check_retained(&self.hub, after).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(EVENT_BUFFER);
        let follow = !req.stop_after_replay;
        tokio::spawn(stream_events(self.hub.clone(), filter, after, follow, tx));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

/// OUT_OF_RANGE when retention removed events right after `after`: a
/// replay from there would silently skip them. (0 means "from the oldest
/// retained", so it always is.)
async fn check_retained(hub: &Hub, after: i64) -> Result<()> {
    if after == 0 {
        return Ok(());
    }
    let committed = hub.store().last_event();
    let oldest = hub.store().oldest_event().await?;
    // With nothing stored, the next event to be written is the oldest.
    let oldest = oldest.unwrap_or(committed + 1);
    if after + 1 < oldest {
        return Err(Error::OutOfRange(format!(
            "after_sequence: events {}..={} were removed by retention; the oldest stored \
             event is {oldest}: resume from {} to skip the gap knowingly, or from 0",
            after + 1,
            oldest - 1,
            oldest - 1
        )));
    }
    Ok(())
}

/// Events per query while replaying.
const EVENT_PAGE: u32 = 500;
/// Events buffered per WatchEvents stream.
const EVENT_BUFFER: usize = 64;

/// Feeds one WatchEvents stream: stored events after `after`, then (when
/// `follow`) each newly committed range. Every event up to the published sequence is
/// committed and readable, so reading ranges `(after, committed]` leaves
/// no gap and sends nothing twice.
async fn stream_events(
    hub: Hub,
    filter: EventFilter,
    mut after: i64,
    follow: bool,
    tx: tokio::sync::mpsc::Sender<Result<proto::WatchEventsResponse, Status>>,
) {
    let mut committed = hub.store().committed_events();
    let mut shutdown = hub.shutdown();
    loop {
        let upto = *committed.borrow_and_update();
        while after < upto {
            let page = match hub
                .store()
                .events_between(after, upto, &filter, EVENT_PAGE)
                .await
            {
                Ok(page) => page,
                Err(e) => {
                    let _ = tx.send(Err(e.into())).await;
                    return;
                }
            };
            for event in &page {
                let event = match event.to_proto() {
                    Ok(event) => event,
                    Err(e) => {
                        let _ = tx.send(Err(e.into())).await;
                        return;
                    }
                };
                if tx
                    .send(Ok(proto::WatchEventsResponse { event: Some(event) }))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            after = match page.last() {
                Some(last) if page.len() == EVENT_PAGE as usize => last.seq,
                _ => upto,
            };
        }
        if !follow {
            return;
        }
        tokio::select! {
            changed = committed.changed() => if changed.is_err() { return },
            () = shutdown.wait() => {
                let _ = tx.send(Err(Status::unavailable("hub is shutting down; resume with after_sequence"))).await;
                return;
            }
            () = tx.closed() => return,
        }
    }
}
