//! What each client subcommand asks the hub and prints.

use std::collections::HashMap;
use std::io::Write;

use hub_proto::v1 as proto;
use serde_json::json;

use super::render::{self, Table, ago, labels, time};
use super::{Admin, CliError, ClientCommand, Connection, SendArgs, batch};

/// Runs one client subcommand, writing its output to `out`.
pub async fn run(
    conn: &Connection,
    cmd: ClientCommand,
    out: &mut (dyn Write + Send),
) -> Result<(), CliError> {
    let mut admin = conn.connect().await?;
    let now = chrono::Utc::now().timestamp_millis();
    let json = conn.json;
    match cmd {
        ClientCommand::Spokes => spokes(&mut admin, json, now, out).await,
        ClientCommand::Spoke { name } => spoke(&mut admin, &name, json, now, out).await,
        ClientCommand::Send(args) => send(&mut admin, *args, json, now, out).await,
        ClientCommand::Directives {
            spoke,
            state,
            directive_type,
            limit,
        } => {
            let req = proto::ListDirectivesRequest {
                spoke_name: spoke.unwrap_or_default(),
                state: match state {
                    Some(s) => parse_enum(&s, "DIRECTIVE_STATE_", "--state", |n| {
                        proto::DirectiveState::from_str_name(n).map(|s| s as i32)
                    })?,
                    None => 0,
                },
                r#type: directive_type.unwrap_or_default(),
                page_size: limit.clamp(1, 1000),
                ..Default::default()
            };
            let list = admin.list_directives(req).await?.into_inner().directives;
            directives_table(&list, json, now, out, "no directives")
        }
        ClientCommand::Directive { id } => {
            let req = proto::GetDirectiveRequest { directive_id: id };
            let d = admin
                .get_directive(req)
                .await?
                .into_inner()
                .directive
                .unwrap_or_default();
            directive(&d, json, now, out)
        }
        ClientCommand::Cancel { id, reason } => {
            let req = proto::CancelDirectiveRequest {
                directive_id: id,
                reason,
            };
            let d = admin
                .cancel_directive(req)
                .await?
                .into_inner()
                .directive
                .unwrap_or_default();
            if json {
                render::write_json(out, &d)?;
            } else {
                writeln!(
                    out,
                    "directive {} is {}: {}",
                    d.id,
                    render::state(d.state),
                    d.error
                )?;
            }
            Ok(())
        }
        ClientCommand::Metrics {
            spoke,
            domain,
            name,
            since,
            limit,
        } => {
            let req = proto::QueryMetricsRequest {
                spoke_name: spoke.unwrap_or_default(),
                domain: domain.unwrap_or_default(),
                name: name.unwrap_or_default(),
                start_time: since.map(|d| crate::wire::timestamp_ms(now - d.as_millis() as i64)),
                page_size: limit.clamp(1, 1000),
                ..Default::default()
            };
            let points = admin.query_metrics(req).await?.into_inner().points;
            if json {
                render::write_json(out, &points)?;
                return Ok(());
            }
            let mut t = Table::new(&["TIME", "SPOKE", "DOMAIN", "NAME", "VALUE", "UNIT", "LABELS"]);
            for p in &points {
                let point = p.point.clone().unwrap_or_default();
                t.row(vec![
                    time(point.time.as_ref()),
                    p.spoke_name.clone(),
                    point.domain,
                    point.name,
                    point.value.to_string(),
                    point.unit,
                    labels(&point.labels),
                ]);
            }
            Ok(t.print(out, "no metric points")?)
        }
        ClientCommand::Events {
            follow,
            types,
            spoke,
            after,
        } => events(&mut admin, follow, types, spoke, after, json, out).await,
        ClientCommand::Revoke { name } => {
            let req = proto::RevokeSpokeRequest {
                spoke_name: name.clone(),
                ..Default::default()
            };
            let res = admin.revoke_spoke(req).await?.into_inner();
            if json {
                render::write_json(out, &res)?;
            } else {
                writeln!(out, "spoke {name} revoked: its key no longer works")?;
            }
            Ok(())
        }
        ClientCommand::DeleteSpoke { name, yes } => {
            if !yes {
                return Err(CliError::Usage(format!(
                    "deleting spoke {name} cancels its outstanding directives and cannot be \
                     undone; run again with --yes"
                )));
            }
            let req = proto::DeleteSpokeRequest {
                spoke_name: name.clone(),
                ..Default::default()
            };
            let res = admin.delete_spoke(req).await?.into_inner();
            if json {
                render::write_json(out, &res)?;
            } else {
                writeln!(
                    out,
                    "spoke {name} deleted ({} outstanding directives cancelled); the name is free",
                    res.cancelled_directives
                )?;
            }
            Ok(())
        }
        ClientCommand::RotateKey { name } => {
            let req = proto::RotateSpokeKeyRequest {
                spoke_name: name.clone(),
                ..Default::default()
            };
            let res = admin.rotate_spoke_key(req).await?.into_inner();
            if json {
                render::write_json(out, &res)?;
            } else {
                writeln!(
                    out,
                    "new key for spoke {name} (shown once; the old key no longer works):"
                )?;
                writeln!(out, "{}", res.spoke_key)?;
            }
            Ok(())
        }
    }
}

async fn spokes(
    admin: &mut Admin,
    json: bool,
    now: i64,
    out: &mut (dyn Write + Send),
) -> Result<(), CliError> {
    let mut all = Vec::new();
    let mut page_token = String::new();
    loop {
        let req = proto::ListSpokesRequest {
            page_size: 1000,
            page_token,
            ..Default::default()
        };
        let page = admin.list_spokes(req).await?.into_inner();
        all.extend(page.spokes);
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    if json {
        return Ok(render::write_json(out, &all)?);
    }
    let mut t = Table::new(&[
        "NAME",
        "HEALTH",
        "LAST HEARTBEAT",
        "VERSION",
        "LABELS",
        "OUTSTANDING",
    ]);
    for s in &all {
        t.row(vec![
            s.name.clone(),
            render::health(s.health),
            ago(s.last_heartbeat_at.as_ref(), now),
            if s.version.is_empty() {
                "-".into()
            } else {
                s.version.clone()
            },
            labels(&s.labels),
            s.outstanding_directives.to_string(),
        ]);
    }
    Ok(t.print(out, "no spokes registered")?)
}

async fn spoke(
    admin: &mut Admin,
    name: &str,
    json: bool,
    now: i64,
    out: &mut (dyn Write + Send),
) -> Result<(), CliError> {
    let req = proto::GetSpokeRequest {
        spoke_name: name.to_owned(),
        ..Default::default()
    };
    let s = admin
        .get_spoke(req)
        .await?
        .into_inner()
        .spoke
        .unwrap_or_default();
    let req = proto::ListDirectivesRequest {
        spoke_name: name.to_owned(),
        page_size: 10,
        ..Default::default()
    };
    let recent = admin.list_directives(req).await?.into_inner().directives;
    if json {
        let value = json!({
            "spoke": serde_json::to_value(&s).map_err(std::io::Error::other)?,
            "recentDirectives": serde_json::to_value(&recent).map_err(std::io::Error::other)?,
        });
        return Ok(render::write_json(out, &value)?);
    }
    let status = match (render::status(s.status).as_str(), s.status_message.as_str()) {
        ("UNSPECIFIED", _) => "-".to_owned(),
        (st, "") => st.to_owned(),
        (st, msg) => format!("{st}: {msg}"),
    };
    let rows = [
        ("name", s.name.clone()),
        ("id", s.id.clone()),
        (
            "health",
            format!(
                "{}{}",
                render::health(s.health),
                if s.connected { " (stream open)" } else { "" }
            ),
        ),
        ("status", status),
        ("last heartbeat", ago(s.last_heartbeat_at.as_ref(), now)),
        ("registered", time(s.registered_at.as_ref())),
        ("version", s.version.clone()),
        ("labels", labels(&s.labels)),
        ("in-flight window", s.max_in_flight.to_string()),
        ("delivery", delivery(&s)),
        ("last webhook", last_webhook(s.last_webhook.as_ref(), now)),
        ("outstanding", s.outstanding_directives.to_string()),
        (
            "reported",
            format!(
                "{} in flight, {} buffered points, {} failed pushes",
                s.reported_in_flight, s.reported_buffered_points, s.reported_failed_pushes
            ),
        ),
    ];
    for (k, v) in rows {
        writeln!(out, "{:<18}{v}", format!("{k}:"))?;
    }
    writeln!(out, "\ncapabilities:")?;
    let mut caps = Table::new(&["TYPE", "VERSION"]);
    for c in &s.capabilities {
        caps.row(vec![c.directive_type.clone(), c.version.clone()]);
    }
    caps.print(out, "(none declared)")?;
    writeln!(out, "\nrecent directives:")?;
    directives_table(&recent, false, now, out, "(none)")
}

/// How the spoke gets its directives.
fn delivery(s: &proto::Spoke) -> String {
    match proto::DeliveryMode::try_from(s.delivery_mode) {
        Ok(proto::DeliveryMode::Webhook) => format!("webhook {}", s.webhook_url),
        _ if s.connected => "stream (open)".to_owned(),
        _ => "stream / poll".to_owned(),
    }
}

/// The latest webhook request: result, status, attempt, error, age.
fn last_webhook(w: Option<&proto::WebhookAttempt>, now: i64) -> String {
    let Some(w) = w else {
        return "-".to_owned();
    };
    let mut text = w.result.clone();
    if w.http_status != 0 {
        text.push_str(&format!(" (HTTP {})", w.http_status));
    }
    text.push_str(&format!(", attempt {} of {}", w.attempt, w.directive_id));
    if !w.error.is_empty() {
        text.push_str(&format!(": {}", w.error));
    }
    format!("{text}, {}", ago(w.at.as_ref(), now))
}

fn directives_table(
    list: &[proto::Directive],
    json: bool,
    now: i64,
    out: &mut (dyn Write + Send),
    empty: &str,
) -> Result<(), CliError> {
    if json {
        return Ok(render::write_json(out, &list)?);
    }
    let mut t = Table::new(&["ID", "SPOKE", "TYPE", "STATE", "ATTEMPT", "CREATED"]);
    for d in list {
        t.row(vec![
            d.id.clone(),
            d.spoke_name.clone(),
            d.r#type.clone(),
            render::state(d.state),
            d.attempt.to_string(),
            ago(d.created_at.as_ref(), now),
        ]);
    }
    Ok(t.print(out, empty)?)
}

fn directive(
    d: &proto::Directive,
    json: bool,
    now: i64,
    out: &mut (dyn Write + Send),
) -> Result<(), CliError> {
    if json {
        return Ok(render::write_json(out, d)?);
    }
    let rows = [
        ("id", d.id.clone()),
        ("spoke", format!("{} ({})", d.spoke_name, d.spoke_id)),
        ("type", d.r#type.clone()),
        ("state", render::state(d.state)),
        ("attempt", format!("{} of {}", d.attempt, d.max_attempts)),
        ("priority", d.priority.to_string()),
        (
            "created",
            format!(
                "{} ({})",
                time(d.created_at.as_ref()),
                ago(d.created_at.as_ref(), now)
            ),
        ),
        ("updated", time(d.updated_at.as_ref())),
        ("expires", time(d.expires_at.as_ref())),
        ("ack due", time(d.ack_due_at.as_ref())),
        ("group", d.group_id.clone()),
        ("payload", render::json(d.payload.as_ref())),
        (
            "result",
            d.result
                .as_ref()
                .map_or_else(|| "-".to_owned(), |r| render::json(Some(r))),
        ),
        (
            "error",
            if d.error.is_empty() {
                "-".into()
            } else {
                d.error.clone()
            },
        ),
        (
            "progress",
            format!("{}% {}", d.progress, d.progress_message)
                .trim_end()
                .to_owned(),
        ),
    ];
    for (k, v) in rows {
        writeln!(out, "{:<10}{v}", format!("{k}:"))?;
    }
    Ok(())
}

async fn send(
    admin: &mut Admin,
    args: SendArgs,
    json: bool,
    now: i64,
    out: &mut (dyn Write + Send),
) -> Result<(), CliError> {
    use proto::directive_target::Target;
    if let Some(from) = &args.from {
        return batch::send_from(admin, from, json, out).await;
    }
    let Some(directive_type) = args.directive_type else {
        return Err(CliError::Usage(
            "give the directive TYPE, or --from FILE".into(),
        ));
    };
    let target = match (&args.to, &args.selector, args.all) {
        (Some(name), None, false) => Target::SpokeName(name.clone()),
        (None, Some(sel), false) => Target::Selector(proto::LabelSelector {
            match_labels: parse_selector(sel)?,
        }),
        (None, None, true) => Target::AllSpokes(true),
        _ => {
            return Err(CliError::Usage(
                "give exactly one of --to, --selector, --all".into(),
            ));
        }
    };
    let payload_text = match args.payload.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path)
            .map_err(|e| CliError::Usage(format!("--payload @{path}: {e}")))?,
        None => args.payload.clone(),
    };
    let payload = match serde_json::from_str(&payload_text) {
        Ok(value @ serde_json::Value::Object(_)) => crate::wire::struct_of_value(value),
        Ok(_) => {
            return Err(CliError::Usage(
                "--payload must be a JSON object, e.g. '{\"doc\": \"a\"}'".into(),
            ));
        }
        Err(e) => {
            return Err(CliError::Usage(format!(
                "--payload must be a JSON object: {e}"
            )));
        }
    };
    let ms = |d: std::time::Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
    let req = proto::CreateDirectiveRequest {
        target: Some(proto::DirectiveTarget {
            target: Some(target),
        }),
        r#type: directive_type,
        payload: Some(payload),
        priority: args.priority,
        expires_at: args
            .expires_in
            .map(|d| crate::wire::timestamp_ms(now.saturating_add(ms(d)))),
        ack_deadline: args.ack_deadline.map(crate::wire::duration_std),
        max_attempts: args.max_attempts.unwrap_or(0),
        idempotency_key: args.idempotency_key.unwrap_or_default(),
        coalesce_key: args.coalesce_key.unwrap_or_default(),
        force: args.force,
    };
    let res = admin.create_directive(req).await?.into_inner();
    if json {
        return Ok(render::write_json(out, &res)?);
    }
    if !res.directives.is_empty() {
        directives_table(&res.directives, false, now, out, "")?;
    }
    let mut summary = if res.idempotent_replay {
        format!(
            "idempotency key seen before: nothing new created (group {})",
            res.group_id
        )
    } else {
        format!(
            "{} directive(s) created in group {}",
            res.directives.len(),
            res.group_id
        )
    };
    if res.skipped_spokes > 0 {
        summary.push_str(&format!(
            "; {} matching spoke(s) skipped: they did not declare this type (use --force)",
            res.skipped_spokes
        ));
    }
    writeln!(out, "{summary}")?;
    Ok(())
}

async fn events(
    admin: &mut Admin,
    follow: bool,
    types: Vec<String>,
    spoke: Option<String>,
    after: u64,
    json: bool,
    out: &mut (dyn Write + Send),
) -> Result<(), CliError> {
    let types = types
        .iter()
        .map(|t| {
            parse_enum(t, "EVENT_TYPE_", "--type", |n| {
                proto::EventType::from_str_name(n).map(|e| e as i32)
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let spoke_id = match &spoke {
        Some(name) => {
            let req = proto::GetSpokeRequest {
                spoke_name: name.clone(),
                ..Default::default()
            };
            admin
                .get_spoke(req)
                .await?
                .into_inner()
                .spoke
                .unwrap_or_default()
                .id
        }
        None => String::new(),
    };
    let req = proto::WatchEventsRequest {
        after_sequence: after,
        types,
        spoke_id,
        stop_after_replay: !follow,
    };
    let mut stream = admin.watch_events(req).await?.into_inner();
    let mut names = SpokeNames::default();
    let mut collected = Vec::new();
    let mut t = Table::new(&["SEQ", "TIME", "TYPE", "SPOKE", "DIRECTIVE", "DETAILS"]);
    while let Some(msg) = stream.message().await? {
        let Some(e) = msg.event else { continue };
        if json {
            if follow {
                // One object per line, so a follower can be piped.
                serde_json::to_writer(&mut *out, &e).map_err(std::io::Error::other)?;
                writeln!(out)?;
                out.flush()?;
            } else {
                collected.push(e);
            }
            continue;
        }
        let row = vec![
            e.sequence.to_string(),
            time(e.time.as_ref()),
            render::event_type(e.r#type),
            names.name(admin, &e.spoke_id).await,
            if e.directive_id.is_empty() {
                "-".into()
            } else {
                e.directive_id.clone()
            },
            render::json(e.details.as_ref()),
        ];
        if follow {
            writeln!(out, "{}", row.join("  "))?;
            out.flush()?;
        } else {
            t.row(row);
        }
    }
    if json {
        render::write_json(out, &collected)?;
    } else if !follow {
        t.print(out, "no events")?;
    }
    Ok(())
}

/// Spoke names by id, looked up once each.
#[derive(Default)]
struct SpokeNames(HashMap<String, String>);

impl SpokeNames {
    async fn name(&mut self, admin: &mut Admin, id: &str) -> String {
        if id.is_empty() {
            return "-".to_owned();
        }
        if let Some(name) = self.0.get(id) {
            return name.clone();
        }
        let req = proto::GetSpokeRequest {
            spoke_id: id.to_owned(),
            ..Default::default()
        };
        let name = match admin.get_spoke(req).await {
            Ok(res) => res
                .into_inner()
                .spoke
                .map_or_else(|| id.to_owned(), |s| s.name),
            Err(_) => id.to_owned(),
        };
        self.0.insert(id.to_owned(), name.clone());
        name
    }
}

/// `k=v,k2=v2` into a map.
fn parse_selector(s: &str) -> Result<HashMap<String, String>, CliError> {
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.trim().to_owned())),
            _ => Err(CliError::Usage(format!(
                "--selector: {pair:?} is not key=value"
            ))),
        })
        .collect()
}

/// An enum value by its short or full name, any case.
fn parse_enum(
    s: &str,
    prefix: &str,
    flag: &str,
    lookup: impl Fn(&str) -> Option<i32>,
) -> Result<i32, CliError> {
    let upper = s.trim().to_ascii_uppercase().replace('-', "_");
    let full = if upper.starts_with(prefix) {
        upper
    } else {
        format!("{prefix}{upper}")
    };
    lookup(&full)
        .filter(|v| *v != 0)
        .ok_or_else(|| CliError::Usage(format!("{flag}: unknown value {s:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_and_enum_names_parse() {
        let sel = parse_selector("region=eu, tier=gold").unwrap();
        assert_eq!(sel["region"], "eu");
        assert_eq!(sel["tier"], "gold");
        assert!(parse_selector("region").is_err());
        let state = |s| {
            parse_enum(s, "DIRECTIVE_STATE_", "--state", |n| {
                proto::DirectiveState::from_str_name(n).map(|s| s as i32)
            })
        };
        assert_eq!(
            state("completed").unwrap(),
            proto::DirectiveState::Completed as i32
        );
        assert_eq!(
            state("IN-PROGRESS").unwrap(),
            proto::DirectiveState::InProgress as i32
        );
        assert!(state("done").is_err());
        assert!(state("unspecified").is_err());
    }
}
