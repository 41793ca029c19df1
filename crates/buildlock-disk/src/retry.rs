//! A wait that tries again and again: soft locks (no kernel wake-up exists for them), and
//! OS-lock waits that may end early (a deadline, a [`Cancel`]). One place for the pause between
//! tries (doubling up to a cap), the deadline (the last try is at it), the reports about once a
//! second, and the cancel (looked at before every retry, so nothing is taken after it).

use std::time::{Duration, Instant};

use crate::Cancel;

/// How often a waiter reports who holds the lock.
pub(crate) const REPORT_EVERY: Duration = Duration::from_secs(1);

/// Why a wait stopped without the lock.
pub(crate) enum Stop {
    /// The deadline passed; how long it waited.
    TimedOut(Duration),
    Cancelled,
}

pub(crate) struct Retry<'a> {
    start: Instant,
    deadline: Option<Instant>,
    pause: Duration,
    max: Duration,
    next_report: Instant,
    cancel: Option<&'a Cancel>,
}

impl<'a> Retry<'a> {
    /// A wait starting now: `first` apart at first, doubling up to `max`.
    pub(crate) fn new(first: Duration, max: Duration, deadline: Option<Instant>, cancel: Option<&'a Cancel>) -> Self {
        let start = Instant::now();
        Retry { start, deadline, pause: first, max, next_report: start + REPORT_EVERY, cancel }
    }

    /// After a failed try: stops past the deadline or once cancelled; else calls `report` with
    /// the time waited when a report is due, and sleeps until the next try.
    pub(crate) fn pause(&mut self, report: impl FnOnce(Duration)) -> Result<(), Stop> {
        self.check_cancel()?;
        let now = Instant::now();
        let mut nap = self.pause;
        if let Some(d) = self.deadline {
            if now >= d {
                return Err(Stop::TimedOut(now - self.start));
            }
            nap = nap.min(d - now);
        }
        if now >= self.next_report {
            report(now - self.start);
            self.next_report = now + REPORT_EVERY;
        }
        std::thread::sleep(nap);
        self.pause = (self.pause * 2).min(self.max);
        // Cancelled while asleep: no further try.
        self.check_cancel()
    }

    fn check_cancel(&self) -> Result<(), Stop> {
        match self.cancel.is_some_and(Cancel::is_cancelled) {
            true => Err(Stop::Cancelled),
            false => Ok(()),
        }
    }
}
