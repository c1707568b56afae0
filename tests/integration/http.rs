//! The HTTP side: health, readiness, Prometheus metrics, the admin page;
//! the security headers on every response, the throttle on wrong admin
//! tokens, and HTTPS with the gRPC port's certificate.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hub::Settings;
use hub::guard::GuardSettings;
use hub::testing::TestPki;
use hub_proto::v1 as proto;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

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
    // A browser would not send a Secure cookie back over plain HTTP.
    assert!(!cookie_line.contains("Secure"), "{cookie_line}");
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

/// The value of header `name` in a raw HTTP/1.1 response.
fn header<'a>(response: &'a str, name: &str) -> Option<&'a str> {
    response
        .split("\r\n\r\n")
        .next()?
        .lines()
        .skip(1)
        .filter_map(|line| line.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim())
}

fn request(method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> String {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: hub\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    req
}

/// Sends `req` and reads until the server closes; whatever came back (a
/// reset or a TLS stream without close_notify ends the read, not the test).
async fn exchange(mut conn: impl AsyncRead + AsyncWrite + Unpin, req: &str) -> String {
    conn.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = conn.read_to_end(&mut out).await;
    String::from_utf8_lossy(&out).into_owned()
}

const FORM: (&str, &str) = ("Content-Type", "application/x-www-form-urlencoded");

/// `POST /login` with `token` from the address `from`.
async fn login_from(from: IpAddr, to: SocketAddr, token: &str) -> String {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(from, 0)).unwrap();
    let conn = socket.connect(to).await.unwrap();
    let body = format!("token={token}");
    exchange(conn, &request("POST", "/login", &[FORM], &body)).await
}

#[tokio::test]
async fn every_response_carries_the_security_headers() {
    let hub = TestHub::start().await;
    let bearer = format!("Bearer {ADMIN_TOKEN}");
    let requests = [
        request("GET", "/", &[], ""),
        request("GET", "/", &[("Authorization", &bearer)], ""),
        request("POST", "/login", &[FORM], "token=nope"),
        request("GET", "/healthz", &[], ""),
        request("GET", "/readyz", &[], ""),
        request("GET", "/metrics", &[], ""),
        request("GET", "/nope", &[], ""),
    ];
    for req in requests {
        let tcp = tokio::net::TcpStream::connect(hub.http_addr).await.unwrap();
        let response = exchange(tcp, &req).await;
        let path = req.lines().next().unwrap();
        let csp = header(&response, "Content-Security-Policy")
            .unwrap_or_else(|| panic!("{path}: no CSP in {response}"));
        // Only the hub's own script file (no inline script, no eval), no
        // foreign resources, no framing; the page's own inline style,
        // connections (the live stream) and forms to the hub only.
        for directive in [
            "default-src 'none'",
            "script-src 'self';",
            "connect-src 'self';",
            "style-src 'unsafe-inline'",
            "form-action 'self'",
            "frame-ancestors 'none'",
        ] {
            assert!(csp.contains(directive), "{path}: {csp}");
        }
        assert_eq!(csp.matches("unsafe-inline").count(), 1, "{csp}");
        assert!(!csp.contains("unsafe-eval"), "{csp}");
        assert_eq!(header(&response, "X-Frame-Options"), Some("DENY"), "{path}");
        assert_eq!(
            header(&response, "X-Content-Type-Options"),
            Some("nosniff"),
            "{path}"
        );
    }
}

#[tokio::test]
async fn wrong_admin_tokens_are_throttled_per_address_on_both_ports() {
    // Three failures allowed per hour: the block outlasts the test.
    // (`guard` tests how budgets refill with time.)
    const LIMIT: u32 = 3;
    let hub = TestHub::start_with(Settings {
        guard: GuardSettings {
            auth_failure_limit: LIMIT,
            auth_failure_window: Duration::from_secs(3600),
            ..GuardSettings::default()
        },
        ..Settings::default()
    })
    .await;
    let here: IpAddr = "127.0.0.1".parse().unwrap();
    let right_bearer = format!("Bearer {ADMIN_TOKEN}");
    let right = [("Authorization", right_bearer.as_str())];

    // Wrong tokens by form, by Bearer header and over gRPC count alike,
    // each answered as wrong: three, the limit.
    let wrong = login_from(here, hub.http_addr, "wrong").await;
    assert!(wrong.starts_with("HTTP/1.1 401"), "{wrong}");
    let wrong_bearer = [("Authorization", "Bearer not-the-admin-token")];
    let wrong = http(hub.http_addr, "GET", "/", &wrong_bearer, "").await;
    assert!(wrong.starts_with("HTTP/1.1 401"), "{wrong}");
    let req = authed(proto::ListSpokesRequest::default(), "not-the-admin-token");
    let status = hub.admin().await.list_spokes(req).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");

    // Now the right token is not looked at, by either way.
    let refused = login_from(here, hub.http_addr, ADMIN_TOKEN).await;
    assert!(refused.starts_with("HTTP/1.1 429"), "{refused}");
    let wait: u64 = header(&refused, "Retry-After").unwrap().parse().unwrap();
    assert!((1..=3600).contains(&wait), "{refused}");
    assert!(header(&refused, "Set-Cookie").is_none(), "{refused}");
    assert!(refused.contains("Too many wrong tokens"), "{refused}");
    let refused = http(hub.http_addr, "GET", "/", &right, "").await;
    assert!(refused.starts_with("HTTP/1.1 429"), "{refused}");
    assert!(!refused.contains("Spokes ("), "no page while throttled");

    // Another address is not held up (Linux routes all of 127/8 to lo),
    // and nor is a signed-in browser, whose cookie is no token.
    let there: IpAddr = "127.0.0.2".parse().unwrap();
    let login = login_from(there, hub.http_addr, ADMIN_TOKEN).await;
    assert!(login.starts_with("HTTP/1.1 303"), "{login}");
    let session = header(&login, "Set-Cookie")
        .unwrap()
        .split(';')
        .next()
        .unwrap();
    let page = http(hub.http_addr, "GET", "/", &[("Cookie", session)], "").await;
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
}

/// One request over TLS to `addr`, trusting `ca`.
async fn https(addr: SocketAddr, ca: &str, req: &str) -> Result<String, std::io::Error> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = ServerName::try_from(addr.ip().to_string()).unwrap();
    let tls = connector.connect(name, tcp).await?;
    Ok(exchange(tls, req).await)
}

#[tokio::test]
async fn the_http_port_serves_tls_and_the_session_cookie_is_secure() {
    let pki = TestPki::new();
    let hub = TestHub::start_with(Settings {
        tls: Some(pki.identity()),
        http_tls: true,
        ..Settings::default()
    })
    .await;
    let addr = hub.http_addr;

    let health = https(addr, &pki.ca, &request("GET", "/healthz", &[], ""))
        .await
        .unwrap();
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    assert_eq!(header(&health, "X-Frame-Options"), Some("DENY"));

    let body = format!("token={ADMIN_TOKEN}");
    let login = https(addr, &pki.ca, &request("POST", "/login", &[FORM], &body))
        .await
        .unwrap();
    assert!(login.starts_with("HTTP/1.1 303"), "{login}");
    let cookie = header(&login, "Set-Cookie").expect("a session cookie");
    assert!(
        cookie.contains("; Secure") && cookie.contains("HttpOnly"),
        "{cookie}"
    );
    let session = cookie.split(';').next().unwrap();
    let page = https(
        addr,
        &pki.ca,
        &request("GET", "/", &[("Cookie", session)], ""),
    )
    .await
    .unwrap();
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    let sign_out = format!("csrf={}", csrf_of(&page));
    let logout = https(
        addr,
        &pki.ca,
        &request("POST", "/logout", &[("Cookie", session), FORM], &sign_out),
    )
    .await
    .unwrap();
    assert!(header(&logout, "Set-Cookie").unwrap().contains("; Secure"));

    // Plain HTTP gets no HTTP answer; a client trusting another CA refuses
    // the certificate.
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let plain = exchange(tcp, &request("GET", "/healthz", &[], "")).await;
    assert!(!plain.contains("HTTP/1.1"), "{plain}");
    let err = https(
        addr,
        &TestPki::new().ca,
        &request("GET", "/healthz", &[], ""),
    )
    .await
    .expect_err("an untrusted certificate");
    assert!(err.to_string().contains("certificate"), "{err}");
    // Neither hurt the port.
    let health = https(addr, &pki.ca, &request("GET", "/readyz", &[], ""))
        .await
        .unwrap();
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
}

/// With --events-nats-url, the admin page and /metrics show the NATS
/// publisher: here a NATS that never answers, so it is not publishing,
/// says why, and is behind by every event the log holds.
#[tokio::test]
async fn the_admin_page_and_metrics_show_the_nats_publisher() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let hub = TestHub::start_with(Settings {
        nats: Some(hub::nats::NatsSettings {
            url: format!("nats://127.0.0.1:{port}"),
            subject_prefix: "hub.events".into(),
            stream: "HUB_EVENTS".into(),
            create_stream: true,
            source: "hub".into(),
            creds_file: None,
            token: None,
            tls_ca: None,
        }),
        ..Settings::default()
    })
    .await;
    hub.register("edge", &["t"], &[]).await;
    let bearer = format!("Bearer {ADMIN_TOKEN}");
    let mut page = String::new();
    for _ in 0..100 {
        page = http(hub.http_addr, "GET", "/", &[("Authorization", &bearer)], "").await;
        if page.contains("not publishing: connecting to NATS") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(page.contains("Events to NATS JetStream"), "{page}");
    assert!(
        page.contains("<td class=\"mono\">HUB_EVENTS</td>"),
        "{page}"
    );
    assert!(
        page.contains("not publishing: connecting to NATS"),
        "{page}"
    );
    assert!(
        page.contains("<tr><th>Behind the log</th><td>1</td></tr>"),
        "{page}"
    );
    let metrics = http(hub.http_addr, "GET", "/metrics", &[], "").await;
    assert!(metrics.contains("hub_events_nats_connected 0"), "{metrics}");
    assert!(metrics.contains("hub_events_nats_lag 1"), "{metrics}");
    assert!(
        metrics.contains("hub_events_nats_published_sequence 0"),
        "{metrics}"
    );
}

/// Signs in; answers the session cookie (`hub_session=...`).
async fn session(hub: &TestHub) -> String {
    let login = http(
        hub.http_addr,
        "POST",
        "/login",
        &[FORM],
        &format!("token={ADMIN_TOKEN}"),
    )
    .await;
    let line = login
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("set-cookie:"))
        .expect("a session cookie");
    line.split_once(": ")
        .unwrap()
        .1
        .split(';')
        .next()
        .unwrap()
        .to_owned()
}

/// The form token a console page carries for its session.
fn csrf_of(page: &str) -> String {
    let at = page.find("name=\"csrf\" value=\"").expect("a form token") + 19;
    page[at..at + page[at..].find('"').unwrap()].to_owned()
}

async fn spoke_health(hub: &TestHub, name: &str) -> i32 {
    hub.admin()
        .await
        .get_spoke(authed(
            proto::GetSpokeRequest {
                spoke_name: name.into(),
                ..Default::default()
            },
            ADMIN_TOKEN,
        ))
        .await
        .unwrap()
        .into_inner()
        .spoke
        .unwrap()
        .health
}

/// A console action needs the session's own form token, asks to be
/// confirmed when destructive, and answers errors as the CLI does.
#[tokio::test]
async fn console_actions_need_the_form_token_and_confirmation() {
    let hub = TestHub::start().await;
    hub.register("billing", &["sync_doc"], &[]).await;
    let cookie = session(&hub).await;
    let other = session(&hub).await;
    let page = http(
        hub.http_addr,
        "GET",
        "/spokes/billing",
        &[("Cookie", &cookie)],
        "",
    )
    .await;
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    let token = csrf_of(&page);
    let other_token = csrf_of(
        &http(
            hub.http_addr,
            "GET",
            "/spokes/billing",
            &[("Cookie", &other)],
            "",
        )
        .await,
    );
    assert_ne!(token, other_token, "each session has its own");

    // Without the token, or with another session's: refused, nothing done.
    for body in [
        "confirm=yes".to_owned(),
        format!("confirm=yes&csrf={other_token}"),
    ] {
        let forged = http(
            hub.http_addr,
            "POST",
            "/spokes/billing/revoke",
            &[("Cookie", &cookie), FORM],
            &body,
        )
        .await;
        assert!(forged.starts_with("HTTP/1.1 403"), "{forged}");
    }
    assert_eq!(
        spoke_health(&hub, "billing").await,
        proto::SpokeHealth::Online as i32
    );

    // With it: first a confirmation, then the revoke.
    let asked = http(
        hub.http_addr,
        "POST",
        "/spokes/billing/revoke",
        &[("Cookie", &cookie), FORM],
        &format!("csrf={token}"),
    )
    .await;
    assert!(asked.starts_with("HTTP/1.1 200"), "{asked}");
    assert!(asked.contains("name=\"confirm\" value=\"yes\""), "{asked}");
    assert_eq!(
        spoke_health(&hub, "billing").await,
        proto::SpokeHealth::Online as i32
    );

    // A send the hub refuses shows the hub's error, as the CLI prints it.
    let refused = http(
        hub.http_addr,
        "POST",
        "/spokes/billing/send",
        &[("Cookie", &cookie), FORM],
        &format!("csrf={token}&type=nope&payload=%7B%7D"),
    )
    .await;
    assert!(refused.starts_with("HTTP/1.1 409"), "{refused}");
    assert!(
        refused.contains("FAILED_PRECONDITION: spoke &quot;billing&quot; did not declare"),
        "{refused}"
    );
    let bad_json = http(
        hub.http_addr,
        "POST",
        "/spokes/billing/send",
        &[("Cookie", &cookie), FORM],
        &format!("csrf={token}&type=sync_doc&payload=%5B1%5D"),
    )
    .await;
    assert!(bad_json.starts_with("HTTP/1.1 400"), "{bad_json}");
    assert!(bad_json.contains("INVALID_ARGUMENT: payload"), "{bad_json}");
    let sent = http(
        hub.http_addr,
        "POST",
        "/spokes/billing/send",
        &[("Cookie", &cookie), FORM],
        &format!("csrf={token}&type=sync_doc&payload=%7B%22doc%22%3A1%7D&priority=3"),
    )
    .await;
    assert!(sent.starts_with("HTTP/1.1 303"), "{sent}");
    let location = header(&sent, "location").expect("to the directive's page");
    let id = location
        .strip_prefix("/directives/")
        .and_then(|l| l.strip_suffix("?done=sent"))
        .expect("the new directive's page");
    let created = hub.directive(id).await;
    assert_eq!(created.priority, 3);
    assert_eq!(created.r#type, "sync_doc");

    let revoked = http(
        hub.http_addr,
        "POST",
        "/spokes/billing/revoke",
        &[("Cookie", &cookie), FORM],
        &format!("csrf={token}&confirm=yes"),
    )
    .await;
    assert!(revoked.starts_with("HTTP/1.1 303"), "{revoked}");
    assert_eq!(
        spoke_health(&hub, "billing").await,
        proto::SpokeHealth::Revoked as i32
    );
    // Revoking a revoked spoke is fine; rotating its key is not.
    let rotate = http(
        hub.http_addr,
        "POST",
        "/spokes/billing/rotate",
        &[("Cookie", &cookie), FORM],
        &format!("csrf={token}&confirm=yes"),
    )
    .await;
    assert!(rotate.starts_with("HTTP/1.1 409"), "{rotate}");
    assert!(rotate.contains("FAILED_PRECONDITION"), "{rotate}");

    // Signing out needs the token too; then the session and its token
    // are done.
    let forged = http(hub.http_addr, "POST", "/logout", &[("Cookie", &cookie)], "").await;
    assert!(forged.starts_with("HTTP/1.1 403"), "{forged}");
    let out = http(
        hub.http_addr,
        "POST",
        "/logout",
        &[("Cookie", &cookie), FORM],
        &format!("csrf={token}"),
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 303"), "{out}");
    let after = http(
        hub.http_addr,
        "POST",
        "/spokes/billing/delete",
        &[("Cookie", &cookie), FORM],
        &format!("csrf={token}&confirm=yes"),
    )
    .await;
    assert!(after.starts_with("HTTP/1.1 401"), "{after}");
}

/// `/live` streams the event log after a sequence as Server-Sent Events.
#[tokio::test]
async fn the_live_stream_sends_events_after_the_one_named() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let hub = TestHub::start().await;
    hub.register("a", &["t"], &[]).await;
    hub.register("b", &["t"], &[]).await;
    let mut conn = tokio::net::TcpStream::connect(hub.http_addr).await.unwrap();
    let req = format!(
        "GET /live?after=1 HTTP/1.1\r\nHost: hub\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\n\r\n"
    );
    conn.write_all(req.as_bytes()).await.unwrap();
    // Event 2 (b registered), then a directive created while it streams.
    hub.send("a", "t", json!({})).await;
    let mut text = String::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !text.contains("id: 3\n") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no event 3 on the live stream: {text}"
        );
        if let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(200), conn.read(&mut buf)).await
        {
            text.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    }
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.to_ascii_lowercase()
            .contains("content-type: text/event-stream")
    );
    assert!(!text.contains("id: 1\n"), "{text}");
    assert!(text.contains("id: 2\n"), "{text}");
    assert!(text.contains("EVENT_TYPE_DIRECTIVE_CREATED"), "{text}");
}
