//! The reconnect state machine step by step, on paused time.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::time::Instant;

use super::*;

/// What a scripted attempt does.
enum Script {
    Refuse(Code),
    /// Opens a stream that ends with this code, healthy or not, with an
    /// optional retry hint.
    Stream(bool, Code, Option<Duration>),
    /// Registers, bringing the hub's hint to use these endpoints, and
    /// opens a healthy stream that ends with this code.
    Hinted(Vec<&'static str>, Code),
    /// Stops the machine with an error that is not a gRPC status.
    Stop,
}

#[derive(Clone)]
struct Fake {
    script: Arc<Mutex<VecDeque<Script>>>,
    attempts: Arc<Mutex<Vec<(String, Duration)>>>,
    start: Instant,
    endpoints: Endpoints,
    /// `None`: attempts use the enrollment token. Otherwise a spoke key,
    /// and how long each new key takes to come; none left: stop.
    keys: Option<Arc<Mutex<VecDeque<Duration>>>>,
}

struct FakeStream(bool, Code, Option<Duration>);

impl Dial for Fake {
    type Stream = FakeStream;
    fn open(&mut self, endpoint: &str) -> impl Future<Output = Result<FakeStream>> + Send {
        self.attempts
            .lock()
            .unwrap()
            .push((endpoint.to_owned(), self.start.elapsed()));
        let next = self.script.lock().unwrap().pop_front();
        let endpoints = self.endpoints.clone();
        async move {
            match next {
                Some(Script::Refuse(code)) => Err(Status::new(code, "scripted").into()),
                Some(Script::Stream(healthy, code, hint)) => Ok(FakeStream(healthy, code, hint)),
                Some(Script::Hinted(list, code)) => {
                    endpoints.set(Some(list.iter().map(|e| e.to_string()).collect()));
                    Ok(FakeStream(true, code, None))
                }
                Some(Script::Stop) => Err(Error::config("script", "stop")),
                None => Err(Status::unauthenticated("script over").into()),
            }
        }
    }

    fn holds_key(&self) -> bool {
        self.keys.is_some()
    }

    fn new_key(&mut self) -> impl Future<Output = Result<()>> + Send {
        let next = self
            .keys
            .as_ref()
            .and_then(|k| k.lock().unwrap().pop_front());
        async move {
            let Some(after) = next else {
                return Err(Error::config("keys", "no new key"));
            };
            tokio::time::sleep(after).await;
            Ok(())
        }
    }
}

impl Watch for FakeStream {
    async fn run(self) -> StreamEnd {
        StreamEnd {
            healthy: self.0,
            error: Status::new(self.1, "stream ended").into(),
            retry_after: self.2,
        }
    }
}

/// Runs the machine over a script; answers the fatal error and every
/// attempt as (endpoint, seconds since start).
async fn play(endpoints: &[&str], script: Vec<Script>) -> (Error, Vec<(String, f64)>) {
    let (fatal, attempts, _) = play_hinted(endpoints, Duration::from_secs(120), script).await;
    (fatal, attempts)
}

/// Like `play`, with this fallback time; also answers the final status.
async fn play_hinted(
    endpoints: &[&str],
    fallback_after: Duration,
    script: Vec<Script>,
) -> (Error, Vec<(String, f64)>, crate::Status) {
    let status = Tracker::default();
    let configured = endpoints.iter().map(|e| e.to_string()).collect();
    let endpoints = Endpoints::new(configured, fallback_after, status.clone());
    let fake = Fake {
        script: Arc::new(Mutex::new(script.into())),
        attempts: Arc::default(),
        start: Instant::now(),
        endpoints: endpoints.clone(),
        keys: None,
    };
    let backoff = Backoff::new(Duration::from_secs(1), 1.6, 0.0, Duration::from_secs(120)).unwrap();
    let machine = Machine::new(fake.clone(), endpoints, backoff, status.clone());
    let fatal = machine.run().await;
    let attempts = fake
        .attempts
        .lock()
        .unwrap()
        .iter()
        .map(|(e, d)| (e.clone(), (d.as_secs_f64() * 1000.0).round() / 1000.0))
        .collect();
    (fatal, attempts, status.snapshot())
}

fn at(endpoint: &str, secs: f64) -> (String, f64) {
    (endpoint.to_owned(), secs)
}

#[tokio::test(start_paused = true)]
async fn backs_off_exponentially_and_resets_after_a_healthy_stream() {
    let (fatal, attempts) = play(
        &["a"],
        vec![
            Script::Refuse(Code::Unavailable),
            Script::Refuse(Code::Unavailable),
            Script::Refuse(Code::DeadlineExceeded),
            Script::Stream(true, Code::Unavailable, None),
            Script::Refuse(Code::Unavailable),
            Script::Stream(false, Code::Aborted, None),
        ],
    )
    .await;
    assert_eq!(
        attempts,
        vec![
            at("a", 0.0),
            at("a", 1.0),
            at("a", 2.6),
            at("a", 5.16),
            at("a", 6.16),
            at("a", 7.76),
            at("a", 10.32)
        ]
    );
    assert!(matches!(fatal, Error::Unauthenticated { .. }), "{fatal:?}");
}

#[tokio::test(start_paused = true)]
async fn fails_over_at_once_and_backs_off_after_a_full_round() {
    let (_, attempts) = play(
        &["a", "b"],
        vec![
            Script::Refuse(Code::Unavailable),
            Script::Refuse(Code::Unavailable),
            Script::Refuse(Code::Unavailable),
            Script::Stream(true, Code::Unavailable, None),
        ],
    )
    .await;
    assert_eq!(
        attempts,
        vec![
            at("a", 0.0),
            at("b", 0.0),
            at("a", 1.0),
            at("b", 1.0),
            at("a", 1.0)
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn a_retry_hint_is_a_floor_on_the_wait() {
    let (_, attempts) = play(
        &["a"],
        vec![Script::Stream(
            true,
            Code::Unavailable,
            Some(Duration::from_secs(30)),
        )],
    )
    .await;
    assert_eq!(attempts, vec![at("a", 0.0), at("a", 30.0)]);
}

#[tokio::test(start_paused = true)]
async fn a_huge_retry_hint_is_capped() {
    let huge = Duration::from_secs(u64::MAX);
    let (_, attempts) = play(
        &["a"],
        vec![Script::Stream(true, Code::Unavailable, Some(huge))],
    )
    .await;
    let capped = MAX_RETRY_AFTER.as_secs_f64();
    assert_eq!(attempts, vec![at("a", 0.0), at("a", capped)]);
}

#[tokio::test(start_paused = true)]
async fn a_refused_key_waits_for_a_new_one_then_connects_at_once() {
    let status = Tracker::default();
    let endpoints = Endpoints::new(vec!["a".into()], Duration::from_secs(120), status.clone());
    let fake = Fake {
        script: Arc::new(Mutex::new(
            vec![
                Script::Refuse(Code::Unavailable),
                Script::Stream(false, Code::Unauthenticated, None),
                Script::Refuse(Code::Unavailable),
                Script::Refuse(Code::Unauthenticated),
            ]
            .into(),
        )),
        attempts: Arc::default(),
        start: Instant::now(),
        endpoints: endpoints.clone(),
        keys: Some(Arc::new(Mutex::new(vec![Duration::from_secs(300)].into()))),
    };
    let backoff = Backoff::new(Duration::from_secs(1), 1.6, 0.0, Duration::from_secs(120)).unwrap();
    let machine = Machine::new(fake.clone(), endpoints, backoff, status.clone());
    let stopped = machine.run().await;
    assert!(stopped.to_string().contains("no new key"), "{stopped}");
    let attempts: Vec<f64> = fake
        .attempts
        .lock()
        .unwrap()
        .iter()
        .map(|(_, d)| d.as_secs_f64())
        .collect();
    // Refused at 1 s: no attempt until the key came 300 s later, then at
    // once, and the backoff starts over.
    assert_eq!(attempts, vec![0.0, 1.0, 301.0, 302.0]);
    let s = status.snapshot();
    assert_eq!(
        s.key,
        crate::KeyState::Refused {
            message: "scripted".into()
        }
    );
}

#[tokio::test(start_paused = true)]
async fn a_fatal_code_stops_at_once_with_a_clear_error() {
    let (fatal, attempts) = play(&["a", "b"], vec![Script::Refuse(Code::Unauthenticated)]).await;
    assert_eq!(attempts.len(), 1);
    assert!(fatal.to_string().contains("credentials"), "{fatal}");
    let (fatal, _) = play(
        &["a"],
        vec![Script::Stream(true, Code::PermissionDenied, None)],
    )
    .await;
    assert!(matches!(
        fatal,
        Error::Refused {
            code: Code::PermissionDenied,
            ..
        }
    ));
}

#[tokio::test(start_paused = true)]
async fn a_hint_is_dialed_from_the_next_connect_in_its_order() {
    let (_, attempts, status) = play_hinted(
        &["a"],
        Duration::from_secs(120),
        vec![
            Script::Hinted(vec!["h1", "h2"], Code::Unavailable),
            Script::Refuse(Code::Unavailable),
            Script::Stream(true, Code::Unavailable, None),
            Script::Stop,
        ],
    )
    .await;
    assert_eq!(
        attempts,
        vec![at("a", 0.0), at("h1", 1.0), at("h2", 1.0), at("h1", 1.0)]
    );
    assert_eq!(status.endpoints, ["h1", "h2"]);
    assert!(status.endpoints_from_hub);
}

#[tokio::test(start_paused = true)]
async fn a_dead_hint_falls_back_in_time_and_is_tried_again_later() {
    let mut script = vec![Script::Hinted(vec!["h"], Code::Unavailable)];
    script.extend((0..4).map(|_| Script::Refuse(Code::Unavailable)));
    // The configured hub answers, then goes away for good.
    script.push(Script::Stream(true, Code::Unavailable, None));
    script.extend((0..4).map(|_| Script::Refuse(Code::Unavailable)));
    script.push(Script::Stop);
    let (_, attempts, status) = play_hinted(&["a"], Duration::from_secs(10), script).await;
    assert_eq!(
        attempts,
        vec![
            at("a", 0.0),
            // The fallback clock starts at the first attempt; the last
            // wait is cut short so the switch comes 10 s after it.
            at("h", 1.0),
            at("h", 2.6),
            at("h", 5.16),
            at("h", 9.256),
            at("a", 11.0),
            // After a healthy stream the configured list is kept.
            at("a", 12.0),
            at("a", 13.6),
            at("a", 16.16),
            at("a", 20.256),
            at("h", 22.0),
        ]
    );
    assert_eq!(status.endpoints, ["h"]);
    assert!(status.endpoints_from_hub);
}

#[tokio::test(start_paused = true)]
async fn a_hinted_endpoint_that_refuses_the_spoke_cannot_stop_it() {
    let mut script = vec![Script::Hinted(vec!["h"], Code::Unavailable)];
    script.extend((0..4).map(|_| Script::Refuse(Code::Unauthenticated)));
    script.push(Script::Refuse(Code::Unauthenticated));
    let (fatal, attempts, status) = play_hinted(&["a"], Duration::from_secs(10), script).await;
    let endpoints: Vec<&str> = attempts.iter().map(|(e, _)| e.as_str()).collect();
    assert_eq!(endpoints, ["a", "h", "h", "h", "h", "a"]);
    // The configured endpoint has the last word.
    assert!(matches!(fatal, Error::Unauthenticated { .. }), "{fatal:?}");
    assert_eq!(status.endpoints, ["a"]);
    assert!(!status.endpoints_from_hub);
}

#[test]
fn classification_of_every_code() {
    use Disposition::{Fatal, Retry};
    let table = [
        (Code::Unauthenticated, Fatal),
        (Code::PermissionDenied, Fatal),
        (Code::InvalidArgument, Fatal),
        (Code::AlreadyExists, Fatal),
        (Code::Unimplemented, Fatal),
        (Code::Unavailable, Retry),
        (Code::DeadlineExceeded, Retry),
        (Code::ResourceExhausted, Retry),
        (Code::Aborted, Retry),
        (Code::Internal, Retry),
        (Code::Unknown, Retry),
        (Code::Cancelled, Retry),
        (Code::NotFound, Retry),
    ];
    for (code, want) in table {
        assert_eq!(classify(code), want, "{code:?}");
    }
}
