//! The hub's clock. Production reads the system time; tests use a manual
//! clock they advance, which also wakes the background timers so that
//! deadlines, expiry and health changes happen at once and deterministically.

use std::sync::Arc;

use tokio::sync::watch;

/// Source of "now" for everything the hub stores or compares with stored
/// times.
#[derive(Clone, Debug, Default)]
pub struct Clock {
    manual: Option<Arc<watch::Sender<i64>>>,
}

/// Notices advances of a manual clock (never fires for the system clock).
#[derive(Debug)]
pub struct Ticks(Option<watch::Receiver<i64>>);

impl Clock {
    /// The system clock.
    pub fn system() -> Self {
        Self::default()
    }

    /// A manual clock starting at `start_ms` (Unix ms); only `advance`
    /// moves it.
    pub fn manual(start_ms: i64) -> Self {
        Self {
            manual: Some(Arc::new(watch::Sender::new(start_ms))),
        }
    }

    /// Now, in Unix milliseconds.
    pub fn now_ms(&self) -> i64 {
        match &self.manual {
            Some(m) => *m.borrow(),
            None => chrono::Utc::now().timestamp_millis(),
        }
    }

    /// Moves a manual clock forward. Panics on the system clock (a test-only
    /// call).
    pub fn advance(&self, by: std::time::Duration) {
        let m = self.manual.as_ref().expect("advance needs a manual clock");
        let by = i64::try_from(by.as_millis()).unwrap_or(i64::MAX);
        m.send_modify(|now| *now = now.saturating_add(by));
    }

    /// A listener for advances made from now on.
    pub fn ticks(&self) -> Ticks {
        Ticks(self.manual.as_ref().map(|m| m.subscribe()))
    }
}

impl Ticks {
    /// Completes at the next advance of a manual clock; never otherwise.
    pub async fn changed(&mut self) {
        if let Some(rx) = &mut self.0
            && rx.changed().await.is_ok()
        {
            return;
        }
        std::future::pending().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_manual_clock_moves_only_when_advanced() {
        let clock = Clock::manual(1_000);
        let mut ticks = clock.ticks();
        assert_eq!(clock.now_ms(), 1_000);
        clock.advance(std::time::Duration::from_secs(2));
        // The advance is noticed even though nobody was waiting yet.
        ticks.changed().await;
        assert_eq!(clock.now_ms(), 3_000);
    }
}
