//! The job state machine.
//!
//! ```text
//! pending ──► running ──► completed
//!    │           ├──────► failed
//!    │           └──────► cancelled
//!    ├──────────────────► failed
//!    └──────────────────► cancelled
//! ```
//! Terminal states (completed, failed, cancelled) have no way out. A job becomes running when its first
//! generation is sealed, completed when its last step is committed by every rank.

use hcmoco_proto::pb;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobState {
    Pending,
    Running,
    Completed,
    Failed,
    Cancelled,
}

/// A transition the state machine does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("job cannot go from {from} to {to}")]
pub struct IllegalTransition {
    pub from: JobState,
    pub to: JobState,
}

impl JobState {
    pub fn is_terminal(self) -> bool {
        matches!(self, JobState::Completed | JobState::Failed | JobState::Cancelled)
    }

    /// Whether `self -> to` is a legal transition.
    pub fn can_become(self, to: JobState) -> bool {
        use JobState::*;
        matches!(
            (self, to),
            (Pending, Running)
                | (Pending, Failed)
                | (Pending, Cancelled)
                | (Running, Completed)
                | (Running, Failed)
                | (Running, Cancelled)
        )
    }

    /// The state after `self -> to`, or the reason it is refused.
    pub fn transition(self, to: JobState) -> Result<JobState, IllegalTransition> {
        if self.can_become(to) { Ok(to) } else { Err(IllegalTransition { from: self, to }) }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Pending => "pending",
            JobState::Running => "running",
            JobState::Completed => "completed",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<JobState> for pb::JobState {
    fn from(s: JobState) -> Self {
        match s {
            JobState::Pending => pb::JobState::Pending,
            JobState::Running => pb::JobState::Running,
            JobState::Completed => pb::JobState::Completed,
            JobState::Failed => pb::JobState::Failed,
            JobState::Cancelled => pb::JobState::Cancelled,
        }
    }
}

/// Display name of a wire state (for clients).
pub fn wire_state_name(state: i32) -> &'static str {
    match pb::JobState::try_from(state) {
        Ok(pb::JobState::Pending) => "pending",
        Ok(pb::JobState::Running) => "running",
        Ok(pb::JobState::Completed) => "completed",
        Ok(pb::JobState::Failed) => "failed",
        Ok(pb::JobState::Cancelled) => "cancelled",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::JobState::{self, *};

    const ALL: [JobState; 5] = [Pending, Running, Completed, Failed, Cancelled];

    #[test]
    fn legal_transitions() {
        for (from, to) in [
            (Pending, Running),
            (Pending, Failed),
            (Pending, Cancelled),
            (Running, Completed),
            (Running, Failed),
            (Running, Cancelled),
        ] {
            assert_eq!(from.transition(to), Ok(to), "{from} -> {to}");
        }
    }

    #[test]
    fn illegal_transitions_are_refused() {
        let legal = |a: JobState, b: JobState| {
            matches!((a, b), (Pending, Running | Failed | Cancelled) | (Running, Completed | Failed | Cancelled))
        };
        for from in ALL {
            for to in ALL {
                if !legal(from, to) {
                    let err = from.transition(to).expect_err("illegal");
                    assert_eq!(err.to_string(), format!("job cannot go from {from} to {to}"));
                }
            }
        }
        // In particular: terminal states are final and a pending job cannot complete without running.
        for t in [Completed, Failed, Cancelled] {
            assert!(t.is_terminal());
            assert!(ALL.iter().all(|&to| !t.can_become(to)));
        }
        assert!(!Pending.can_become(Completed));
        assert!(!Running.can_become(Pending));
    }
}
