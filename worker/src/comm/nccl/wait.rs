//! Waiting for an NCCL operation without ever blocking in NCCL or CUDA: poll, check the abort flag,
//! charge the time to the timeout, back off. Pure: the probe and the clock are passed in, so the
//! timeout and abort behaviour is tested without a GPU.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// What one poll of an operation in flight sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Progress {
    /// Work queued before the operation on its stream (libtorch's kernels) has not finished: the
    /// operation has not started, and this time is not charged to its timeout.
    Queued,
    /// NCCL is working on it (enqueueing, connecting, or its kernel is running).
    Running,
    Done,
}

/// One operation in flight: `poll` must not block. An `Err` is a failure reported by NCCL or CUDA.
pub(super) trait Probe {
    fn poll(&mut self) -> Result<Progress, String>;
}

/// Time, for the waiting loop.
pub(super) trait Clock {
    /// Time since some fixed origin.
    fn now(&self) -> Duration;
    /// Waits about `d`; `Duration::ZERO` yields the thread.
    fn pause(&self, d: Duration);
}

/// The real clock.
#[derive(Debug)]
pub(super) struct SystemClock {
    origin: Instant,
}

impl SystemClock {
    pub(super) fn new() -> SystemClock {
        SystemClock { origin: Instant::now() }
    }
}

impl Clock for SystemClock {
    fn now(&self) -> Duration {
        self.origin.elapsed()
    }

    fn pause(&self, d: Duration) {
        if d.is_zero() {
            std::thread::yield_now();
        } else {
            std::thread::sleep(d);
        }
    }
}

/// The abort request shared between a communicator and its `AbortHandle`s. The first reason wins.
#[derive(Debug, Default)]
pub(super) struct AbortState {
    requested: AtomicBool,
    reason: Mutex<Option<String>>,
}

impl AbortState {
    pub(super) fn request(&self, reason: &str) {
        let mut slot = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        slot.get_or_insert_with(|| reason.to_owned());
        self.requested.store(true, Ordering::Release);
    }

    /// The reason, once an abort was requested. Cheap when none was (one atomic load).
    pub(super) fn reason(&self) -> Option<String> {
        if !self.requested.load(Ordering::Acquire) {
            return None;
        }
        self.reason.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Why a wait ended without the operation completing. The caller aborts the NCCL communicator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum WaitError {
    /// An `AbortHandle` asked for it; the reason it gave.
    Aborted(String),
    /// The operation was running for `charged` (at least the timeout) without completing.
    TimedOut { charged: Duration },
    /// NCCL or CUDA reported an error.
    Failed(String),
}

/// Pause after the `polls`-th unfinished poll: yield at first (small collectives finish within
/// microseconds), then sleep briefly. The longest pause bounds how late an abort is noticed.
pub(super) fn backoff(polls: u32) -> Duration {
    match polls {
        0..32 => Duration::ZERO,
        32..256 => Duration::from_micros(20),
        _ => Duration::from_micros(200),
    }
}

/// Polls `probe` until it is done, the abort flag is raised, or it has been running for `timeout`.
/// Time while the probe reports `Queued` (earlier local work) is not charged.
pub(super) fn wait(
    probe: &mut impl Probe,
    abort: &AbortState,
    timeout: Duration,
    clock: &impl Clock,
) -> Result<(), WaitError> {
    let mut charged = Duration::ZERO;
    let mut last = clock.now();
    let mut running = false;
    let mut polls: u32 = 0;
    loop {
        let progress = probe.poll().map_err(WaitError::Failed)?;
        let now = clock.now();
        if running {
            charged += now.saturating_sub(last);
        }
        last = now;
        match progress {
            Progress::Done => return Ok(()),
            Progress::Queued => running = false,
            Progress::Running => running = true,
        }
        if let Some(reason) = abort.reason() {
            return Err(WaitError::Aborted(reason));
        }
        if charged >= timeout {
            return Err(WaitError::TimedOut { charged });
        }
        clock.pause(backoff(polls));
        polls = polls.saturating_add(1);
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    /// A clock that only moves when paused; a zero pause (a yield) costs a microsecond.
    struct FakeClock {
        now: Cell<Duration>,
    }

    impl FakeClock {
        fn new() -> FakeClock {
            FakeClock { now: Cell::new(Duration::ZERO) }
        }
    }

    impl Clock for FakeClock {
        fn now(&self) -> Duration {
            self.now.get()
        }
        fn pause(&self, d: Duration) {
            self.now.set(self.now.get() + d.max(Duration::from_micros(1)));
        }
    }

    /// Replays `script`, then repeats `then` forever; `on_poll` runs before each poll.
    struct Scripted<'a> {
        script: Vec<Result<Progress, String>>,
        then: Progress,
        polls: usize,
        on_poll: Box<dyn FnMut(usize) + 'a>,
    }

    impl<'a> Scripted<'a> {
        fn new(script: Vec<Result<Progress, String>>, then: Progress) -> Self {
            Scripted { script, then, polls: 0, on_poll: Box::new(|_| {}) }
        }
    }

    impl Probe for Scripted<'_> {
        fn poll(&mut self) -> Result<Progress, String> {
            (self.on_poll)(self.polls);
            self.polls += 1;
            if self.script.is_empty() { Ok(self.then) } else { self.script.remove(0) }
        }
    }

    const TIMEOUT: Duration = Duration::from_secs(2);

    #[test]
    fn completes_when_the_probe_is_done() {
        let mut probe = Scripted::new(vec![Ok(Progress::Running), Ok(Progress::Queued)], Progress::Done);
        assert_eq!(wait(&mut probe, &AbortState::default(), TIMEOUT, &FakeClock::new()), Ok(()));
        assert_eq!(probe.polls, 3);
    }

    #[test]
    fn a_stuck_operation_times_out_close_to_the_timeout() {
        let clock = FakeClock::new();
        let mut probe = Scripted::new(vec![], Progress::Running);
        match wait(&mut probe, &AbortState::default(), TIMEOUT, &clock) {
            Err(WaitError::TimedOut { charged }) => {
                assert!(charged >= TIMEOUT && charged <= TIMEOUT + backoff(u32::MAX), "{charged:?}")
            }
            other => panic!("expected a timeout, got {other:?}"),
        }
        assert!(clock.now() <= TIMEOUT + backoff(u32::MAX));
    }

    #[test]
    fn time_spent_behind_earlier_local_work_is_not_charged() {
        // 10 s of queued libtorch work, then a collective that finishes after 1.5 s of running.
        let clock = FakeClock::new();
        let queued_for = Duration::from_secs(10);
        let runs_for = Duration::from_millis(1500);
        struct Phased<'c> {
            clock: &'c FakeClock,
            queued_for: Duration,
            runs_for: Duration,
        }
        impl Probe for Phased<'_> {
            fn poll(&mut self) -> Result<Progress, String> {
                let now = self.clock.now();
                Ok(if now < self.queued_for {
                    Progress::Queued
                } else if now < self.queued_for + self.runs_for {
                    Progress::Running
                } else {
                    Progress::Done
                })
            }
        }
        let mut probe = Phased { clock: &clock, queued_for, runs_for };
        assert_eq!(wait(&mut probe, &AbortState::default(), TIMEOUT, &clock), Ok(()));
        assert!(clock.now() >= queued_for + runs_for);
    }

    #[test]
    fn an_abort_from_another_handle_ends_the_wait_at_the_next_poll() {
        let abort = AbortState::default();
        let clock = FakeClock::new();
        let mut probe = Scripted::new(vec![], Progress::Running);
        probe.on_poll = Box::new(|polls| {
            if polls == 40 {
                abort.request("generation 4 opened");
                abort.request("a later reason is ignored");
            }
        });
        assert_eq!(
            wait(&mut probe, &abort, TIMEOUT, &clock),
            Err(WaitError::Aborted("generation 4 opened".to_owned()))
        );
        assert_eq!(probe.polls, 41);
        assert!(clock.now() < Duration::from_millis(1), "noticed after {:?}", clock.now());
    }

    #[test]
    fn an_abort_is_noticed_while_queued_behind_local_work() {
        let abort = AbortState::default();
        abort.request("job failed");
        let mut probe = Scripted::new(vec![], Progress::Queued);
        assert_eq!(
            wait(&mut probe, &abort, TIMEOUT, &FakeClock::new()),
            Err(WaitError::Aborted("job failed".to_owned()))
        );
    }

    #[test]
    fn an_nccl_error_ends_the_wait_with_its_message() {
        let mut probe =
            Scripted::new(vec![Ok(Progress::Running), Err("ncclRemoteError: peer closed".to_owned())], Progress::Done);
        assert_eq!(
            wait(&mut probe, &AbortState::default(), TIMEOUT, &FakeClock::new()),
            Err(WaitError::Failed("ncclRemoteError: peer closed".to_owned()))
        );
    }

    #[test]
    fn backoff_is_bounded() {
        assert_eq!(backoff(0), Duration::ZERO);
        assert!((0..10_000).map(backoff).all(|d| d <= Duration::from_micros(200)));
    }
}
