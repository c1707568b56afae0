//! PushMetrics and QueryMetrics.

use hub::Settings;
use hub_proto::v1 as proto;
use pbjson_types::Timestamp;

use crate::support::*;

fn now() -> Timestamp {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    Timestamp {
        seconds: now.as_secs() as i64,
        nanos: now.subsec_nanos() as i32,
    }
}

pub fn point(domain: &str, name: &str, value: f64) -> proto::MetricPoint {
    proto::MetricPoint {
        domain: domain.into(),
        name: name.into(),
        value,
        unit: "count".into(),
        labels: [("shop".to_string(), "berlin".to_string())].into(),
        time: Some(now()),
    }
}

pub async fn push(
    spoke: &mut Spoke,
    batches: Vec<proto::PushMetricsRequest>,
) -> Result<proto::PushMetricsResponse, tonic::Status> {
    let req = spoke.req(tokio_stream::iter(batches));
    spoke.client.push_metrics(req).await.map(|r| r.into_inner())
}

#[tokio::test]
async fn batches_are_stored_once_and_bad_points_rejected_with_reasons() {
    let hub = TestHub::start().await;
    let mut spoke = hub.register("shop", &[], &[]).await;
    let batch = proto::PushMetricsRequest {
        batch_id: "b-1".into(),
        points: vec![
            point("statistics", "orders", 3.0),
            point("statistics", "orders", f64::INFINITY),
            point("compensation", "bonus_eur", 120.5),
            point("statistics", "bad name!", 1.0),
        ],
    };
    let res = push(&mut spoke, vec![batch.clone()]).await.unwrap();
    let result = &res.batches[0];
    assert_eq!(result.status, proto::BatchStatus::Accepted as i32);
    assert_eq!(result.accepted_points, 2);
    let rejected: Vec<_> = result
        .rejected
        .iter()
        .map(|r| (r.index, r.reason.clone()))
        .collect();
    assert_eq!(rejected.len(), 2);
    assert_eq!(rejected[0].0, 1);
    assert!(rejected[0].1.starts_with("value"), "{rejected:?}");
    assert_eq!(rejected[1].0, 3);
    assert!(rejected[1].1.starts_with("name"), "{rejected:?}");

    // The same batch again, plus a new one, in one call.
    let second = proto::PushMetricsRequest {
        batch_id: "b-2".into(),
        points: vec![point("statistics", "orders", 4.0)],
    };
    let res = push(&mut spoke, vec![batch, second]).await.unwrap();
    assert_eq!(res.batches[0].status, proto::BatchStatus::Duplicate as i32);
    assert_eq!(
        res.batches[0].accepted_points, 2,
        "reports what the first push stored"
    );
    assert_eq!(res.batches[1].status, proto::BatchStatus::Accepted as i32);

    let orders = hub
        .points(proto::QueryMetricsRequest {
            spoke_name: "shop".into(),
            domain: "statistics".into(),
            name: "orders".into(),
            ..Default::default()
        })
        .await;
    let values: Vec<f64> = orders
        .iter()
        .map(|p| p.point.as_ref().unwrap().value)
        .collect();
    assert_eq!(values, [3.0, 4.0], "stored once each");
    let p = orders[0].point.as_ref().unwrap();
    assert_eq!(p.labels["shop"], "berlin");
    assert_eq!(p.unit, "count");
    assert_eq!(orders[0].batch_id, "b-1");
    assert_eq!(orders[0].spoke_name, "shop");
}

#[tokio::test]
async fn query_filters_by_time_range_and_pages() {
    let hub = TestHub::start().await;
    let mut spoke = hub.register("shop", &[], &[]).await;
    let base = now().seconds - 3600;
    let points = (0..5)
        .map(|i| proto::MetricPoint {
            time: Some(Timestamp {
                seconds: base + i * 60,
                nanos: 0,
            }),
            ..point("statistics", "visits", i as f64)
        })
        .collect();
    push(
        &mut spoke,
        vec![proto::PushMetricsRequest {
            batch_id: "t".into(),
            points,
        }],
    )
    .await
    .unwrap();
    let window = hub
        .points(proto::QueryMetricsRequest {
            name: "visits".into(),
            start_time: Some(Timestamp {
                seconds: base + 60,
                nanos: 0,
            }),
            end_time: Some(Timestamp {
                seconds: base + 180,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await;
    let values: Vec<f64> = window
        .iter()
        .map(|p| p.point.as_ref().unwrap().value)
        .collect();
    assert_eq!(values, [1.0, 2.0], "start inclusive, end exclusive");

    let mut admin = hub.admin().await;
    let first = admin
        .query_metrics(authed(
            proto::QueryMetricsRequest {
                page_size: 3,
                ..Default::default()
            },
            ADMIN_TOKEN,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.points.len(), 3);
    let rest = admin
        .query_metrics(authed(
            proto::QueryMetricsRequest {
                page_size: 3,
                page_token: first.next_page_token,
                ..Default::default()
            },
            ADMIN_TOKEN,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rest.points.len(), 2);
    assert!(rest.next_page_token.is_empty());
}

#[tokio::test]
async fn query_pages_are_bounded_by_bytes_and_lose_nothing() {
    // A small message limit, and points with 16 wide labels (~4 KiB each):
    // a page of 1000 points would be far over it.
    let hub = TestHub::start_with(Settings {
        max_message_bytes: 64 * 1024,
        ..Settings::default()
    })
    .await;
    let mut spoke = hub.register("wide", &[], &[]).await;
    let wide = |i: usize| proto::MetricPoint {
        labels: (0..16)
            .map(|l| (format!("label{l}"), format!("{i}-{}", "v".repeat(250))))
            .collect(),
        ..point("statistics", "wide", i as f64)
    };
    for b in 0..10 {
        let batch = proto::PushMetricsRequest {
            batch_id: format!("wide-{b}"),
            points: (b * 5..b * 5 + 5).map(wide).collect(),
        };
        let reply = push(&mut spoke, vec![batch])
            .await
            .expect("a batch that fits");
        assert_eq!(reply.batches[0].accepted_points, 5);
    }
    let mut admin = hub.admin().await;
    let (mut seen, mut token, mut pages) = (Vec::new(), String::new(), 0);
    loop {
        let req = proto::QueryMetricsRequest {
            spoke_name: "wide".into(),
            page_size: 1000,
            page_token: token,
            ..Default::default()
        };
        let page = admin
            .query_metrics(authed(req, ADMIN_TOKEN))
            .await
            .expect("every page fits the message limit")
            .into_inner();
        pages += 1;
        assert!(!page.points.is_empty(), "a page is never empty");
        seen.extend(
            page.points
                .iter()
                .map(|p| p.point.as_ref().unwrap().value as usize),
        );
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert!(pages > 1, "the pages were cut by bytes");
    seen.sort_unstable();
    assert_eq!(seen, (0..50).collect::<Vec<_>>(), "every point once");
}
