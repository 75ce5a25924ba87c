//! Human-readable job status for `hcmoco status` and the launcher's summary.

use std::fmt::Write;

use hcmoco_proto::pb;

use crate::job::wire_state_name;

/// Display order of the loss terms.
const TERM_ORDER: [&str; 6] = ["rgb_depth", "depth_rgb", "depth_kp", "kp_depth", "rgb_kp", "kp_rgb"];

/// One ledger entry as a JSON object (the keys `hcmoco ledger` documents).
pub fn ledger_line(e: &pb::LedgerEntry) -> String {
    serde_json::json!({
        "epoch": e.epoch,
        "slot": e.slot,
        "dataset": e.dataset,
        "index": e.index,
        "step": e.step,
        "generation": e.generation,
        "rank": e.rank,
        "skipped": e.skipped,
    })
    .to_string()
}

/// How many membership events `hcmoco status` shows.
const EVENTS_SHOWN: usize = 8;

/// One line per job (for `hcmoco status` without `--job`).
pub fn render_line(s: &pb::JobStatus) -> String {
    let loss = s.latest.as_ref().map_or("-".to_string(), |m| format!("{:.4}", m.loss_total));
    format!(
        "{:<10} {:<20} {:<10} step {:>6}/{:<6} workers {:>2} loss {}",
        s.job_id,
        s.name,
        wire_state_name(s.state),
        s.committed_steps,
        s.total_steps,
        s.workers.len(),
        loss
    )
}

/// The full status of one job: state, progress, latest global metrics, per-rank progress and timings.
pub fn render(s: &pb::JobStatus) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "job {} ({}): {}", s.job_id, s.name, wire_state_name(s.state));
    if !s.message.is_empty() {
        let _ = writeln!(out, "  message: {}", s.message);
    }
    let _ = writeln!(
        out,
        "  step {}/{}  epoch {}  generation {}  world {} (min {}, max {})  global batch {}  dataset {} samples",
        s.committed_steps,
        s.total_steps,
        s.epoch,
        s.generation,
        s.world_size,
        s.min_workers,
        s.max_workers,
        s.global_batch,
        s.dataset_samples
    );
    if let Some(m) = &s.latest {
        let mut terms: Vec<(&String, &f64)> = m.loss_terms.iter().collect();
        // The method's order (anchor modality first), then any other term by name.
        terms.sort_by_key(|(k, _)| (TERM_ORDER.iter().position(|t| t == k).unwrap_or(TERM_ORDER.len()), k.as_str()));
        let terms: Vec<String> = terms.iter().map(|(k, v)| format!("{k} {v:.4}")).collect();
        let _ = writeln!(out, "  loss {:.4}  [{}]", m.loss_total, terms.join(", "));
        let _ = writeln!(out, "  lr {:.5}  {:.1} samples/s", m.learning_rate, m.samples_per_sec);
    }
    if s.skipped_samples > 0 {
        let _ = writeln!(
            out,
            "  skipped {} unreadable samples (data.on_error = skip; see the worker logs)",
            s.skipped_samples
        );
    }
    if !s.latest_checkpoint.is_empty() {
        let _ = writeln!(out, "  checkpoint {}", s.latest_checkpoint);
    }
    let _ = writeln!(
        out,
        "  {:>4}  {:<8} {:<12} {:<7} {:>6} {:>9} {:>8} {:>9} {:>8} {:>10}",
        "rank", "worker", "host", "device", "steps", "step_ms", "data_ms", "compute_ms", "comm_ms", "loss"
    );
    let mut workers: Vec<&pb::WorkerStatus> = s.workers.iter().collect();
    workers.sort_by_key(|w| (w.rank < 0, w.rank));
    for w in workers {
        let rank = if w.rank < 0 { "-".to_string() } else { w.rank.to_string() };
        let (step_ms, data_ms, compute_ms, comm_ms, loss) = w.latest.as_ref().map_or_else(
            || ("-".into(), "-".into(), "-".into(), "-".into(), "-".into()),
            |m| {
                (
                    format!("{:.1}", m.step_ms),
                    format!("{:.1}", m.data_ms),
                    format!("{:.1}", m.compute_ms),
                    format!("{:.1}", m.comm_ms),
                    format!("{:.4}", m.loss_total),
                )
            },
        );
        let _ = writeln!(
            out,
            "  {:>4}  {:<8} {:<12} {:<7} {:>6} {:>9} {:>8} {:>9} {:>8} {:>10}",
            rank, w.worker_id, w.host_id, w.device, w.reported_steps, step_ms, data_ms, compute_ms, comm_ms, loss
        );
    }
    if !s.events.is_empty() {
        let _ = writeln!(out, "  events (latest {}):", s.events.len().min(EVENTS_SHOWN));
        for e in s.events.iter().rev().take(EVENTS_SHOWN).rev() {
            let who = if e.worker_id.is_empty() {
                String::new()
            } else if e.rank >= 0 {
                format!(" {} (rank {})", e.worker_id, e.rank)
            } else {
                format!(" {}", e.worker_id)
            };
            let why = if e.reason.is_empty() { String::new() } else { format!(": {}", e.reason) };
            let _ = writeln!(out, "    step {:>6}  gen {:>3}  {}{who}{why}", e.step, e.generation, e.kind);
        }
    }
    out
}
