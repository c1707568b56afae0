//! The operator CLI against a real hub: tables, `--json`, and errors.

use clap::Parser;
use hub::cli::CliError;
use hub::config::{Cli, Command};
use hub_proto::v1 as proto;
use serde_json::{Value, json};

use crate::support::*;

/// Runs `hub ARGS...` against `hub` (flags as an operator would type them);
/// returns stdout, or the error with its exit status.
async fn hub_cli(hub: &TestHub, args: &[&str]) -> Result<String, (i32, String)> {
    let (out, result) = hub_cli_output(hub, args).await;
    result.map(|()| out)
}

/// Runs `hub ARGS...`; returns stdout, and the error with its exit status
/// (the error line goes to stderr, after stdout).
async fn hub_cli_output(hub: &TestHub, args: &[&str]) -> (String, Result<(), (i32, String)>) {
    let addr = hub.addr.to_string();
    let mut argv = vec!["hub", "--addr", addr.as_str(), "--admin-token", ADMIN_TOKEN];
    argv.extend_from_slice(args);
    let cli = match Cli::try_parse_from(argv) {
        Ok(cli) => cli,
        Err(e) => return (String::new(), Err((2, e.to_string()))),
    };
    let Command::Client(cmd) = cli.command else {
        panic!("not a client command: {args:?}");
    };
    let mut out = Vec::new();
    let result = hub::cli::run(&cli.global, cmd, &mut out)
        .await
        .map_err(|e| (e.exit_code(), e.to_string()));
    (String::from_utf8(out).unwrap(), result)
}

async fn ok(hub: &TestHub, args: &[&str]) -> String {
    hub_cli(hub, args)
        .await
        .unwrap_or_else(|e| panic!("hub {args:?} failed: {e:?}"))
}

async fn json_of(hub: &TestHub, args: &[&str]) -> Value {
    let mut args = args.to_vec();
    args.push("--json");
    serde_json::from_str(&ok(hub, &args).await).expect("valid JSON")
}

fn lines(text: &str) -> Vec<Vec<&str>> {
    text.lines()
        .map(|l| l.split_whitespace().collect())
        .collect()
}

#[tokio::test]
async fn spokes_send_and_directives_as_tables_and_json() {
    let hub = TestHub::start().await;
    let mut spoke = hub
        .register("billing", &["sync_doc"], &[("region", "eu")])
        .await;
    hub.register("payroll", &["ai_task"], &[("region", "us")])
        .await;
    let hb = spoke.req(proto::HeartbeatRequest {
        status: proto::SpokeStatus::Ok.into(),
        version: "2.0.0".into(),
        ..Default::default()
    });
    spoke.client.heartbeat(hb).await.unwrap();

    let sent = ok(
        &hub,
        &[
            "send",
            "sync_doc",
            "--to",
            "billing",
            "--payload",
            r#"{"doc":"a/b"}"#,
            "--priority",
            "5",
        ],
    )
    .await;
    assert!(sent.contains("1 directive(s) created in group"), "{sent}");
    let table = ok(&hub, &["spokes"]).await;
    let rows = lines(&table);
    assert_eq!(
        rows[0],
        [
            "NAME",
            "HEALTH",
            "LAST",
            "HEARTBEAT",
            "VERSION",
            "LABELS",
            "OUTSTANDING"
        ]
    );
    assert_eq!(rows[1][..2], ["billing", "ONLINE"]);
    assert!(
        rows[1][2].ends_with("s") && rows[1][3] == "ago",
        "last heartbeat like '0s ago': {table}"
    );
    assert_eq!(rows[1][4..], ["2.0.0", "region=eu", "1"]);
    assert_eq!(rows[2][0], "payroll");
    assert_eq!(rows[2][2..], ["never", "1.0.0", "region=us", "0"]);
    // Columns line up: every row starts its HEALTH column at the same offset.
    let col = table.lines().next().unwrap().find("HEALTH").unwrap();
    assert!(
        table
            .lines()
            .skip(1)
            .all(|l| l[col..].starts_with(['O', 'S'])),
        "{table}"
    );

    let spokes = json_of(&hub, &["spokes"]).await;
    assert_eq!(spokes[0]["name"], "billing");
    assert_eq!(spokes[0]["health"], "SPOKE_HEALTH_ONLINE");
    assert_eq!(spokes[0]["outstandingDirectives"], "1");

    let fan_out = json_of(
        &hub,
        &[
            "send",
            "sync_doc",
            "--selector",
            "region=eu,tier=",
            "--force",
        ],
    )
    .await;
    // proto3 JSON leaves out empty lists.
    assert_eq!(
        fan_out["directives"],
        Value::Null,
        "tier= matches no spoke: {fan_out}"
    );
    assert!(fan_out["groupId"].is_string());
    let all = ok(&hub, &["send", "ai_task", "--all"]).await;
    assert!(
        all.contains("1 directive(s) created") && all.contains("1 matching spoke(s) skipped"),
        "{all}"
    );

    let listed = json_of(
        &hub,
        &["directives", "--spoke", "billing", "--state", "pending"],
    )
    .await;
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["payload"], json!({"doc": "a/b"}));
    assert_eq!(listed[0]["priority"], 5);
    let id = listed[0]["id"].as_str().unwrap().to_owned();
    let table = ok(&hub, &["directives", "--type", "sync_doc"]).await;
    assert_eq!(
        lines(&table)[1][..4],
        [id.as_str(), "billing", "sync_doc", "PENDING"]
    );

    let shown = ok(&hub, &["directive", &id]).await;
    assert!(shown.contains(r#"payload:  {"doc":"a/b"}"#), "{shown}");
    assert!(shown.contains("state:    PENDING"), "{shown}");
    let detail = ok(&hub, &["spoke", "billing"]).await;
    assert!(detail.contains("labels:           region=eu"), "{detail}");
    assert!(detail.contains("sync_doc  1"), "{detail}");
    assert!(detail.contains(&id), "recent directives: {detail}");

    let cancelled = ok(&hub, &["cancel", &id, "--reason", "typo"]).await;
    assert_eq!(
        cancelled.trim(),
        format!("directive {id} is CANCELLED: typo")
    );
}

#[tokio::test]
async fn events_metrics_revoke_and_rotate() {
    let hub = TestHub::start().await;
    let mut spoke = hub.register("shop", &["t"], &[]).await;
    crate::metrics::push(
        &mut spoke,
        vec![proto::PushMetricsRequest {
            batch_id: "b".into(),
            points: vec![crate::metrics::point("statistics", "orders", 7.0)],
        }],
    )
    .await
    .unwrap();
    let metrics = ok(&hub, &["metrics", "--spoke", "shop", "--since", "1h"]).await;
    let rows = lines(&metrics);
    assert_eq!(
        rows[0],
        ["TIME", "SPOKE", "DOMAIN", "NAME", "VALUE", "UNIT", "LABELS"]
    );
    assert_eq!(
        rows[1][1..],
        ["shop", "statistics", "orders", "7", "count", "shop=berlin"]
    );
    assert_eq!(
        json_of(&hub, &["metrics", "--name", "nothing"]).await,
        json!([])
    );

    let events = ok(&hub, &["events", "--type", "metrics_received"]).await;
    let rows = lines(&events);
    assert_eq!(rows.len(), 2, "{events}");
    assert_eq!(rows[1][2..4], ["METRICS_RECEIVED", "shop"]);
    let all = json_of(&hub, &["events", "--spoke", "shop"]).await;
    assert_eq!(
        all.as_array().unwrap().len(),
        2,
        "registered and metrics received"
    );

    let rotated = ok(&hub, &["rotate-key", "shop"]).await;
    let new_key = rotated.lines().nth(1).unwrap().trim().to_owned();
    assert_eq!(new_key.len(), 64, "{rotated}");
    assert_code(
        spoke
            .client
            .heartbeat(spoke.req(proto::HeartbeatRequest::default()))
            .await,
        tonic::Code::Unauthenticated,
        "unknown spoke key",
    );
    assert_eq!(
        ok(&hub, &["revoke", "shop"]).await.trim(),
        "spoke shop revoked: its key no longer works"
    );
    assert!(ok(&hub, &["spokes"]).await.contains("REVOKED"));
}

#[tokio::test]
async fn delete_spoke_asks_for_yes_then_frees_the_name() {
    let hub = TestHub::start().await;
    hub.register("old", &["t"], &[]).await;
    hub.send("old", "t", serde_json::json!({})).await;
    let (code, message) = hub_cli(&hub, &["delete-spoke", "old"]).await.unwrap_err();
    assert_eq!(code, 2, "{message}");
    assert!(message.contains("--yes"), "{message}");
    assert!(
        ok(&hub, &["spokes"]).await.contains("old"),
        "nothing changed"
    );
    assert_eq!(
        ok(&hub, &["delete-spoke", "old", "--yes"]).await.trim(),
        "spoke old deleted (1 outstanding directives cancelled); the name is free"
    );
    assert!(!ok(&hub, &["spokes"]).await.contains("old"));
    hub.register("old", &["t"], &[]).await;
}

#[tokio::test]
async fn errors_are_one_line_with_the_code_and_a_failing_status() {
    let hub = TestHub::start().await;
    let (code, msg) = hub_cli(&hub, &["spoke", "nobody"]).await.unwrap_err();
    assert_eq!(
        (code, msg.as_str()),
        (1, r#"NOT_FOUND: spoke "nobody" not found"#)
    );
    let (code, msg) = hub_cli(&hub, &["send", "t", "--to", "nobody"])
        .await
        .unwrap_err();
    assert_eq!(code, 1);
    assert!(msg.starts_with("NOT_FOUND: "), "{msg}");
    let (code, msg) = hub_cli(&hub, &["send", "t", "--to", "x", "--payload", "[1]"])
        .await
        .unwrap_err();
    assert_eq!(code, 2);
    assert!(msg.starts_with("--payload must be a JSON object"), "{msg}");
    let (code, _) = hub_cli(&hub, &["send", "t"]).await.unwrap_err();
    assert_eq!(code, 2, "a target is required");
    assert!(!msg.contains('\n'));

    // The wrong admin token.
    let cli = Cli::try_parse_from([
        "hub",
        "--addr",
        &hub.addr.to_string(),
        "--admin-token",
        "not-the-token",
        "spokes",
    ])
    .unwrap();
    let Command::Client(cmd) = cli.command else {
        unreachable!()
    };
    let err = hub::cli::run(&cli.global, cmd, &mut Vec::new())
        .await
        .unwrap_err();
    assert!(matches!(err, CliError::Status(_)));
    assert_eq!(
        (err.exit_code(), err.to_string().as_str()),
        (1, "UNAUTHENTICATED: wrong admin token")
    );

    // Nothing listening.
    let cli = Cli::try_parse_from([
        "hub",
        "--addr",
        "127.0.0.1:1",
        "--admin-token",
        ADMIN_TOKEN,
        "spokes",
    ])
    .unwrap();
    let Command::Client(cmd) = cli.command else {
        unreachable!()
    };
    let err = hub::cli::run(&cli.global, cmd, &mut Vec::new())
        .await
        .unwrap_err();
    assert_eq!(err.exit_code(), 1);
    assert!(
        err.to_string()
            .starts_with("cannot reach the hub at http://127.0.0.1:1"),
        "{err}"
    );
}

/// A file of JSON lines for `hub send --from`.
fn jsonl(lines: &[&str]) -> tempfile::NamedTempFile {
    use std::io::Write;
    let mut file = tempfile::NamedTempFile::new().unwrap();
    for line in lines {
        writeln!(file, "{line}").unwrap();
    }
    file
}

#[tokio::test]
async fn send_from_a_file_creates_each_line_with_its_own_row_and_fails_if_one_failed() {
    let hub = TestHub::start().await;
    hub.register("billing", &["sync_doc"], &[("region", "eu")])
        .await;
    hub.register("payroll", &["ai_task"], &[("region", "eu")])
        .await;
    let file = jsonl(&[
        r#"{"target": {"spokeName": "billing"}, "type": "sync_doc", "payload": {"doc": "a/b"}, "priority": 3}"#,
        "",
        r#"{"target": {"spoke_name": "nobody"}, "type": "sync_doc"}"#,
        r#"{"target": {"selector": {"matchLabels": {"region": "eu"}}}, "type": "sync_doc"}"#,
        r#"{"target": {"spokeName": "billing"}, "type": "sync_doc", "idempotency_key": "k1", "expiresAt": "2999-01-01T00:00:00Z"}"#,
        // The same create again (the key must come with the same request).
        r#"{"target": {"spokeName": "billing"}, "type": "sync_doc", "idempotencyKey": "k1", "expiresAt": "2999-01-01T00:00:00Z"}"#,
        r#"{"target": {"spokeName": "billing"}, "type": "no spaces"}"#,
    ]);
    let path = file.path().to_str().unwrap();
    let (table, result) = hub_cli_output(&hub, &["send", "--from", path]).await;
    let (code, summary) = result.expect_err("two lines failed");
    assert_eq!(code, 1);
    assert_eq!(
        summary,
        "2 of 6 line(s) failed (lines 3, 7): 3 directive(s) created, \
         1 line(s) with an idempotency key seen before, \
         1 matching spoke(s) skipped: they did not declare the type"
    );

    let rows = lines(&table);
    assert_eq!(rows[0], ["LINE", "RESULT", "GROUP", "DETAILS"]);
    assert_eq!(rows.len(), 7, "a row per line that is not blank: {table}");
    let numbers: Vec<&str> = rows[1..].iter().map(|r| r[0]).collect();
    assert_eq!(numbers, ["1", "3", "4", "5", "6", "7"]);
    // Created: the group, then the directives' ids.
    assert_eq!(rows[1][1], "created");
    assert_eq!(rows[1].len(), 4, "{table}");
    assert_eq!(
        rows[2][1..],
        [
            "failed",
            "-",
            "NOT_FOUND:",
            "spoke",
            "\"nobody\"",
            "not",
            "found"
        ]
    );
    // The selector matched both; payroll did not declare the type.
    assert_eq!(rows[3][1], "created");
    let fan_out_id = rows[3][3].strip_suffix(';').unwrap();
    assert!(
        table.lines().nth(3).unwrap().ends_with(
            "; 1 matching spoke(s) skipped: they did not declare this type (\"force\": true)"
        ),
        "{table}"
    );
    assert_eq!(rows[4][1], "created");
    assert_eq!(rows[5][1], "replayed");
    assert_eq!(
        rows[5][2..],
        rows[4][2..],
        "the same key answers the same group and directive"
    );
    assert_eq!(rows[6][1..4], ["failed", "-", "INVALID_ARGUMENT:"]);

    // What the operator then sees: each created line as it was written.
    let first = hub.directive(rows[1][3]).await;
    assert_eq!(first.spoke_name, "billing");
    assert_eq!(first.group_id, rows[1][2]);
    assert_eq!(first.priority, 3);
    assert_eq!(
        struct_json(first.payload.as_ref().unwrap()),
        json!({"doc": "a/b"})
    );
    assert_eq!(hub.directive(fan_out_id).await.spoke_name, "billing");
    assert!(hub.directive(rows[4][3]).await.expires_at.is_some());
    assert_eq!(hub.all_directives().await.len(), 3);
}

#[tokio::test]
async fn send_from_prints_one_create_directives_response_as_json() {
    let hub = TestHub::start().await;
    hub.register("billing", &["sync_doc"], &[]).await;
    let file = jsonl(&[
        r#"{"target": {"spokeName": "billing"}, "type": "sync_doc", "payload": {"doc": "a"}}"#,
        r#"{"target": {"spokeName": "billing"}, "type": "sync_doc", "payload": {"doc": "b"}}"#,
    ]);
    let path = file.path().to_str().unwrap();
    let reply = json_of(&hub, &["send", "--from", path]).await;
    let results = reply["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    for (result, doc) in results.iter().zip(["a", "b"]) {
        let id = result["created"]["directives"][0]["id"].as_str().unwrap();
        let stored = hub.directive(id).await;
        assert_eq!(
            struct_json(stored.payload.as_ref().unwrap()),
            json!({"doc": doc})
        );
    }
    // Payloads are not echoed; nothing had to be left out.
    assert_eq!(
        results[0]["created"]["directives"][0]["payload"],
        Value::Null
    );
    assert_eq!(reply["directivesOmitted"], Value::Null);

    let table = ok(&hub, &["send", "--from", path]).await;
    assert_eq!(
        table.lines().last().unwrap(),
        "2 line(s) sent: 2 directive(s) created"
    );
}

#[tokio::test]
async fn send_from_reports_a_malformed_line_before_sending_anything() {
    let hub = TestHub::start().await;
    hub.register("billing", &["sync_doc"], &[]).await;
    let file = jsonl(&[
        r#"{"target": {"spokeName": "billing"}, "type": "sync_doc"}"#,
        r#"{"target": {"spokeName": "billing"}, "typo": "sync_doc"}"#,
        r#"[{"target": {"spokeName": "billing"}}]"#,
        r#"{"target": {"spokeName": "billing"}, "type": "sync_doc""#,
    ]);
    let path = file.path().to_str().unwrap();
    let (code, msg) = hub_cli(&hub, &["send", "--from", path]).await.unwrap_err();
    assert_eq!(code, 2);
    assert!(
        msg.starts_with(&format!("--from {path}: line 2: unknown field `typo`")),
        "{msg}"
    );
    assert!(
        msg.ends_with("; nothing was sent (malformed too: lines 3, 4)"),
        "{msg}"
    );
    assert!(!msg.contains('\n'), "{msg}");
    assert!(hub.all_directives().await.is_empty(), "nothing was sent");

    let (code, msg) = hub_cli(&hub, &["send", "--from", "/no/such/file.jsonl"])
        .await
        .unwrap_err();
    assert_eq!(code, 2);
    assert!(msg.starts_with("--from /no/such/file.jsonl: "), "{msg}");
    let empty = jsonl(&["", "  "]);
    let (code, msg) = hub_cli(&hub, &["send", "--from", empty.path().to_str().unwrap()])
        .await
        .unwrap_err();
    assert_eq!(
        (
            code,
            msg.ends_with("no directives in it: expected one JSON object per line")
        ),
        (2, true),
        "{msg}"
    );
}

#[tokio::test]
async fn send_from_sends_more_than_1000_lines_in_chunks() {
    let hub = TestHub::start().await;
    hub.register("billing", &["sync_doc"], &[]).await;
    let line = r#"{"target": {"spokeName": "billing"}, "type": "sync_doc"}"#;
    let file = jsonl(&[line; 2001]);
    let path = file.path().to_str().unwrap();
    let out = ok(&hub, &["send", "--from", path]).await;
    assert_eq!(
        out.lines().last().unwrap(),
        "2001 line(s) sent: 2001 directive(s) created"
    );
    assert_eq!(lines(&out)[2001][0], "2001");
    // At most 1000 items a call: three calls.
    let metrics = http(hub.http_addr, "GET", "/metrics", &[], "").await;
    assert!(
        metrics.contains(
            r#"hub_rpc_duration_seconds_count{method="hub.v1.AdminService/CreateDirectives",code="OK"} 3"#
        ),
        "{metrics}"
    );
}

#[tokio::test]
async fn send_from_excludes_the_single_directive_options() {
    let hub = TestHub::start().await;
    for args in [
        &["send", "--from", "f.jsonl", "sync_doc"][..],
        &["send", "--from", "f.jsonl", "--to", "billing"],
        &["send", "--from", "f.jsonl", "--selector", "a=b"],
        &["send", "--from", "f.jsonl", "--all"],
        &["send", "--from", "f.jsonl", "--payload", "{}"],
        &["send", "--from", "f.jsonl", "--priority", "5"],
        &["send", "--from", "f.jsonl", "--force"],
        &["send", "--to", "billing"],
    ] {
        let (code, msg) = hub_cli(&hub, args).await.unwrap_err();
        assert_eq!(code, 2, "{args:?}: {msg}");
    }
}

/// A webhook endpoint that answers every request 503, counting them.
async fn refusing_endpoint() -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hub/directives", listener.local_addr().unwrap());
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                let mut got = Vec::new();
                // Headers, then as many body bytes as content-length says.
                loop {
                    let Ok(n) = conn.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    got.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&got);
                    if let Some(end) = text.find("\r\n\r\n") {
                        let len = text[..end]
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                            })
                            .unwrap_or(0);
                        if got.len() >= end + 4 + len {
                            break;
                        }
                    }
                }
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let _ = conn
                    .write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                    .await;
            });
        }
    });
    (url, seen)
}

/// `hub spoke NAME`, the admin page and /metrics show a spoke's webhook
/// delivery and what its latest request came to.
#[tokio::test]
async fn a_webhook_spokes_mode_and_latest_request_are_shown() {
    let hub = TestHub::start().await;
    let (url, requests) = refusing_endpoint().await;
    let reply = hub
        .spoke_client()
        .await
        .register(authed(
            proto::RegisterRequest {
                name: "fn-billing".into(),
                capabilities: vec![proto::Capability {
                    directive_type: "sync_doc".into(),
                    version: "1".into(),
                }],
                webhook_url: url.clone(),
                ..Default::default()
            },
            ENROLLMENT_TOKEN,
        ))
        .await
        .expect("register")
        .into_inner();
    assert!(reply.webhook_secret.starts_with("whsec_"), "{reply:?}");
    let stream_spoke = hub.register("streamer", &["sync_doc"], &[]).await;
    let sent = hub
        .send("fn-billing", "sync_doc", json!({"doc": "a"}))
        .await;
    let last = eventually("a webhook request to be answered", || async {
        let mut admin = hub.admin().await;
        let spoke = admin
            .get_spoke(authed(
                proto::GetSpokeRequest {
                    spoke_name: "fn-billing".into(),
                    ..Default::default()
                },
                ADMIN_TOKEN,
            ))
            .await
            .unwrap()
            .into_inner()
            .spoke
            .unwrap();
        spoke.last_webhook
    })
    .await;
    assert!(requests.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    assert_eq!(last.result, "http_error");
    assert_eq!(last.http_status, 503);
    assert_eq!(last.directive_id, sent.id);

    let detail = ok(&hub, &["spoke", "fn-billing"]).await;
    assert!(
        detail.contains(&format!("delivery:         webhook {url}")),
        "{detail}"
    );
    assert!(
        detail.contains(&format!(
            "last webhook:     http_error (HTTP 503), attempt 1 of {}",
            sent.id
        )),
        "{detail}"
    );
    let other = ok(&hub, &["spoke", "streamer"]).await;
    assert!(other.contains("delivery:         stream / poll"), "{other}");
    assert!(other.contains("last webhook:     -"), "{other}");
    drop(stream_spoke);

    let bearer = format!("Bearer {ADMIN_TOKEN}");
    let page = http(hub.http_addr, "GET", "/", &[("Authorization", &bearer)], "").await;
    assert!(
        page.contains(&format!("webhook <span class=\"mono\">{url}</span>")),
        "{page}"
    );
    assert!(
        page.contains("last: http_error (HTTP 503), attempt 1"),
        "{page}"
    );
    let metrics = http(hub.http_addr, "GET", "/metrics", &[], "").await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("hub_webhook_attempts_total{result=\"http_error\"} ")),
        "{metrics}"
    );
}
