//! The HTTP side: health, readiness, Prometheus metrics, the admin page.

use hub_proto::v1 as proto;
use serde_json::json;

use crate::support::*;

#[tokio::test]
async fn health_and_readiness() {
    let hub = TestHub::start().await;
    for path in ["/healthz", "/readyz"] {
        let response = http(hub.http_addr, "GET", path, &[], "").await;
        assert!(response.starts_with("HTTP/1.1 200"), "{path}: {response}");
    }
    assert!(
        http(hub.http_addr, "GET", "/nope", &[], "")
            .await
            .starts_with("HTTP/1.1 404")
    );
}

/// The value of one sample line `name{labels} value` in exposition text.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .unwrap_or_else(|| panic!("no sample {series} in:\n{text}"))
        .parse()
        .unwrap()
}

#[tokio::test]
async fn metrics_move_as_directives_are_created_and_acked() {
    let hub = TestHub::start().await;
    let scrape = || async { http(hub.http_addr, "GET", "/metrics", &[], "").await };
    let before = scrape().await;
    assert!(before.starts_with("HTTP/1.1 200"), "{before}");
    assert!(
        before.contains("content-type: application/openmetrics-text"),
        "{before}"
    );
    assert!(before.trim_end().ends_with("# EOF"));
    assert_eq!(sample(&before, "hub_deliveries_total"), 0.0);
    assert_eq!(sample(&before, r#"hub_spokes{health="ONLINE"}"#), 0.0);

    let mut spoke = hub.register("worker", &["t"], &[]).await;
    let d = hub.send("worker", "t", json!({})).await;
    let mut stream = spoke.watch().await;
    next_directive(&mut stream).await;
    spoke
        .ack(&d.id, proto::AckOutcome::Completed, json!({}))
        .await
        .unwrap();
    crate::metrics::push(
        &mut spoke,
        vec![proto::PushMetricsRequest {
            batch_id: "b".into(),
            points: vec![crate::metrics::point("statistics", "orders", 1.0)],
        }],
    )
    .await
    .unwrap();

    let after = scrape().await;
    assert_eq!(sample(&after, "hub_deliveries_total"), 1.0);
    assert_eq!(sample(&after, "hub_redeliveries_total"), 0.0);
    assert_eq!(
        sample(&after, r#"hub_acks_total{outcome="completed"}"#),
        1.0
    );
    assert_eq!(
        sample(&after, r#"hub_metric_points_total{result="accepted"}"#),
        1.0
    );
    assert_eq!(sample(&after, r#"hub_directives{state="COMPLETED"}"#), 1.0);
    assert_eq!(sample(&after, r#"hub_directives{state="PENDING"}"#), 0.0);
    assert_eq!(sample(&after, r#"hub_spokes{health="ONLINE"}"#), 1.0);
    assert_eq!(sample(&after, "hub_connected_streams"), 1.0);
    assert_eq!(
        sample(
            &after,
            r#"hub_rpc_duration_seconds_count{method="hub.v1.SpokeService/Ack",code="OK"}"#
        ),
        1.0
    );
    // Every sample line is `name{labels} value` with a numeric value.
    let body = after.split("\r\n\r\n").nth(1).unwrap();
    for line in body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let value = line.rsplit(' ').next().unwrap();
        assert!(value.parse::<f64>().is_ok(), "bad sample line {line:?}");
    }
}

#[tokio::test]
async fn the_admin_page_needs_the_token_and_escapes_what_it_shows() {
    let hub = TestHub::start().await;
    let mut spoke = hub
        .register("billing", &["t"], &[("team", "<i>fin</i>")])
        .await;
    let hb = spoke.req(proto::HeartbeatRequest {
        status: proto::SpokeStatus::Degraded.into(),
        status_message: "<script>alert('pwned')</script>".into(),
        ..Default::default()
    });
    spoke.client.heartbeat(hb).await.unwrap();
    let d = hub
        .send(
            "billing",
            "t",
            json!({"html": "<img src=x onerror=alert(1)>"}),
        )
        .await;

    let refused = http(hub.http_addr, "GET", "/", &[], "").await;
    assert!(refused.starts_with("HTTP/1.1 401"), "{refused}");
    assert!(
        refused.contains("name=\"token\""),
        "the sign-in form: {refused}"
    );
    assert!(!refused.contains("billing"));

    let bearer = format!("Bearer {ADMIN_TOKEN}");
    let page = http(hub.http_addr, "GET", "/", &[("Authorization", &bearer)], "").await;
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(page.contains("<td>billing</td>"));
    assert!(page.contains("health ONLINE"));
    assert!(page.contains(&d.id), "outstanding directive listed");
    assert!(
        page.contains("DEGRADED: &lt;script&gt;alert(&#39;pwned&#39;)&lt;/script&gt;"),
        "{page}"
    );
    assert!(page.contains("team=&lt;i&gt;fin&lt;/i&gt;"));
    assert!(page.contains("&lt;img src=x onerror=alert(1)&gt;"));
    assert!(!page.contains("<script>alert") && !page.contains("<img src=x"));
    assert!(page.contains("SPOKE_REGISTERED"), "recent events");

    let wrong = http(
        hub.http_addr,
        "POST",
        "/login",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        "token=nope",
    )
    .await;
    assert!(wrong.starts_with("HTTP/1.1 401"), "{wrong}");
    assert!(!wrong.to_ascii_lowercase().contains("set-cookie"));
    let login = http(
        hub.http_addr,
        "POST",
        "/login",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        &format!("token={ADMIN_TOKEN}"),
    )
    .await;
    assert!(login.starts_with("HTTP/1.1 303"), "{login}");
    let cookie_line = login
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("set-cookie:"))
        .expect("a session cookie");
    assert!(
        cookie_line.contains("HttpOnly") && cookie_line.contains("SameSite=Strict"),
        "{cookie_line}"
    );
    let cookie = cookie_line
        .split_once(": ")
        .unwrap()
        .1
        .split(';')
        .next()
        .unwrap();
    let page = http(hub.http_addr, "GET", "/", &[("Cookie", cookie)], "").await;
    assert!(page.starts_with("HTTP/1.1 200") && page.contains("<td>billing</td>"));
    let forged = http(
        hub.http_addr,
        "GET",
        "/",
        &[("Cookie", "hub_session=forged")],
        "",
    )
    .await;
    assert!(forged.starts_with("HTTP/1.1 401"));
}
