//! Heartbeats: one right after connecting, then one per interval, where the
//! interval is whatever the hub's latest reply said (the hub sets it, not
//! the spoke), and one at once when the application changes its reported
//! status. A failed heartbeat is not the heartbeat's business unless it is
//! fatal (a revoked key): a dead hub is noticed by the stream.

use std::future::Future;
use std::time::Duration;

use tokio::sync::Notify;
use tonic::Status;

use crate::reconnect::{Disposition, classify};

/// The shortest interval honoured, whatever the hub says.
const MIN_INTERVAL: Duration = Duration::from_millis(100);

/// Sends heartbeats with `beat` until one fails fatally; returns that
/// status. `beat` answers the hub's next interval, if it gave one. `now`
/// sends the next one without waiting for the interval.
pub(crate) async fn run<F, Fut>(mut beat: F, mut interval: Duration, now: &Notify) -> Status
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<Duration>, Status>>,
{
    loop {
        match beat().await {
            Ok(Some(next)) => interval = next,
            Ok(None) => {}
            Err(status) if classify(status.code()) == Disposition::Fatal => return status,
            Err(status) => tracing::debug!(error = %status, "heartbeat failed"),
        }
        tokio::select! {
            () = tokio::time::sleep(interval.max(MIN_INTERVAL)) => {}
            () = now.notified() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tokio::time::Instant;
    use tonic::Code;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn beats_at_once_then_at_the_interval_the_hub_sets() {
        let start = Instant::now();
        let sent = Arc::new(Mutex::new(Vec::new()));
        // The hub answers 10 s, then 2 s, then fails (transient), then
        // revokes the key.
        let replies = Arc::new(Mutex::new(vec![
            Err(Status::unauthenticated("spoke key revoked")),
            Err(Status::unavailable("busy")),
            Ok(Some(Duration::from_secs(2))),
            Ok(Some(Duration::from_secs(10))),
        ]));
        let beat = || {
            let (sent, replies) = (sent.clone(), replies.clone());
            async move {
                sent.lock().unwrap().push(start.elapsed());
                replies.lock().unwrap().pop().unwrap()
            }
        };
        // Paused time advances by itself whenever every task waits on a timer.
        let fatal = run(beat, Duration::from_secs(5), &Notify::new()).await;
        assert_eq!(fatal.code(), Code::Unauthenticated);
        let secs: Vec<u64> = sent.lock().unwrap().iter().map(|d| d.as_secs()).collect();
        // A transient failure keeps the last interval (2 s).
        assert_eq!(secs, vec![0, 10, 12, 14]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_nudge_beats_at_once_and_the_interval_starts_again() {
        let start = Instant::now();
        let sent = Arc::new(Mutex::new(Vec::new()));
        let now = Arc::new(Notify::new());
        let beat = || {
            let (sent, now) = (sent.clone(), now.clone());
            async move {
                let mut sent = sent.lock().unwrap();
                sent.push(start.elapsed());
                match sent.len() {
                    // Nudged between the first and the second beat.
                    1 => {
                        tokio::spawn(async move {
                            tokio::time::sleep(Duration::from_secs(3)).await;
                            now.notify_one();
                        });
                        Ok(None)
                    }
                    4 => Err(Status::unauthenticated("revoked")),
                    _ => Ok(None),
                }
            }
        };
        run(beat, Duration::from_secs(10), &now).await;
        let secs: Vec<u64> = sent.lock().unwrap().iter().map(|d| d.as_secs()).collect();
        assert_eq!(secs, vec![0, 3, 13, 23]);
    }
}
