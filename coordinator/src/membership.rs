//! Membership: the workers of a job, its sealed generations, and the rules that form the next one.
//!
//! A generation is a fixed membership (ranks 0..N-1) that trains a contiguous run of steps. Any change
//! (a join, a leave, a failure, a lost lease, a scale request) opens the *next* generation at a step
//! boundary:
//!
//! - **drain** (join, leave, scale): the members keep training the old generation until the boundary,
//!   the first step no member has fetched, then rendezvous; nothing is lost or redone;
//! - **break** (failure, lost lease): the old generation's collectives are gone, so it accepts no more
//!   reports; the new generation starts at the first step not committed and trains it again.
//!
//! The next generation holds the old members that rendezvous within `rendezvous.rejoin_ms` of the
//! window's start, then admitted joiners up to the target; old members beyond the target are released.
//! A failure report alone evicts nobody: only silence at the rendezvous does.

use std::collections::HashMap;

use hcmoco_proto::domain::{HeldState, Neighbour, StateSource, StepMetrics, WorkerId};
use tokio::time::Instant;

/// A joined worker.
#[derive(Debug)]
pub(crate) struct Worker {
    pub id: WorkerId,
    pub host_id: String,
    pub collective_addr: String,
    pub device: String,
    pub last_seen: Instant,
    pub last_seen_unix_ms: u64,
    /// Set while the worker waits in a rendezvous (cleared when a generation takes it in).
    pub offer: Option<Offer>,
    pub reported_steps: u64,
    pub latest: Option<StepMetrics>,
    /// It called `Leave`: it finishes the steps before the boundary and is no candidate after.
    pub leaving: bool,
    /// Found gone while the next generation forms after a break: its collective listener refused a
    /// connection, so its process has exited and the rejoin window does not wait for it. Never set
    /// with an `offer`: only a worker not in a rendezvous is marked, and any call it makes (a
    /// rendezvous included) clears the mark first. Runtime only, cleared when a generation is sealed,
    /// as is `probed`.
    pub gone: bool,
    /// Its collective address was probed during this break.
    pub probed: bool,
}

/// What a worker brings to a rendezvous.
#[derive(Debug, Clone)]
pub(crate) struct Offer {
    pub bootstrap: Vec<u8>,
    pub state: Option<HeldState>,
}

/// One sealed membership.
#[derive(Debug, Clone)]
pub(crate) struct Generation {
    pub number: u64,
    pub members: Vec<WorkerId>,
    /// Rank of each member.
    pub ranks: HashMap<WorkerId, u32>,
    /// Per rank: (ranks on its host before it, ranks on its host).
    pub local: Vec<(u32, u32)>,
    /// Rank 0's offer.
    pub bootstrap: Vec<u8>,
    pub start_step: u64,
    pub source: StateSource,
    /// One past the largest step any member fetched (the drain boundary of a join or leave).
    pub fetched_end: u64,
}

impl Generation {
    pub fn new(
        number: u64,
        members: Vec<WorkerId>,
        hosts: &[&str],
        bootstrap: Vec<u8>,
        start_step: u64,
        source: StateSource,
    ) -> Generation {
        let ranks = members.iter().enumerate().map(|(r, m)| (m.clone(), r as u32)).collect();
        Generation {
            number,
            local: local_ranks(hosts),
            members,
            ranks,
            bootstrap,
            start_step,
            source,
            fetched_end: start_step,
        }
    }

    pub fn rank_of(&self, id: &WorkerId) -> Option<u32> {
        self.ranks.get(id).copied()
    }

    pub fn world(&self) -> u32 {
        self.members.len() as u32
    }
}

/// Why a next generation is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Change {
    Join,
    Leave,
    Scale,
    Failure,
    Lost,
    /// A new coordinator took over: every worker rendezvouses again with it.
    Takeover,
}

impl Change {
    /// Whether the old generation keeps training until the boundary (else it is broken).
    pub fn drains(self) -> bool {
        matches!(self, Change::Join | Change::Leave | Change::Scale)
    }
}

/// The generation being formed.
#[derive(Debug, Clone)]
pub(crate) struct Next {
    pub number: u64,
    pub change: Change,
    /// The first step of the new generation (for a break: the first step not committed).
    pub boundary: u64,
    /// When the rejoin window started (a drain: when the boundary was committed).
    pub window_from: Option<Instant>,
    /// When the candidates were first found below `workers.min`.
    pub below_min_since: Option<Instant>,
    pub reason: String,
}

impl Next {
    pub fn drain(&self) -> bool {
        self.change.drains()
    }
}

/// Rank order: workers sharing a host are adjacent (hosts in order of first appearance), then the
/// given order. Returns indices into `hosts`.
pub(crate) fn rank_order(hosts: &[&str]) -> Vec<usize> {
    let mut first: HashMap<&str, usize> = HashMap::new();
    for (i, h) in hosts.iter().enumerate() {
        first.entry(h).or_insert(i);
    }
    let mut order: Vec<usize> = (0..hosts.len()).collect();
    order.sort_by_key(|&i| (first[hosts[i]], i));
    order
}

/// Per rank (hosts in rank order): how many ranks before it share its host, and how many do in all.
pub(crate) fn local_ranks(hosts: &[&str]) -> Vec<(u32, u32)> {
    let mut total: HashMap<&str, u32> = HashMap::new();
    for h in hosts {
        *total.entry(h).or_default() += 1;
    }
    let mut seen: HashMap<&str, u32> = HashMap::new();
    hosts
        .iter()
        .map(|h| {
            let n = seen.entry(h).or_default();
            let local = *n;
            *n += 1;
            (local, total[h])
        })
        .collect()
}

/// The neighbour entry of a worker.
pub(crate) fn neighbour(w: &Worker) -> Neighbour {
    Neighbour { worker_id: w.id.0.clone(), host_id: w.host_id.clone(), collective_addr: w.collective_addr.clone() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_adjacent_in_first_appearance_order() {
        let hosts = ["b", "a", "b", "c", "a"];
        let order = rank_order(&hosts);
        assert_eq!(order, [0, 2, 1, 4, 3]);
        let ranked: Vec<&str> = order.iter().map(|&i| hosts[i]).collect();
        assert_eq!(local_ranks(&ranked), [(0, 2), (1, 2), (0, 2), (1, 2), (0, 1)]);
    }
}
