//! Collectives across real processes: `hcmoco-worker bench allreduce` runs one process per rank; a
//! rank killed with SIGKILL in the middle of a large all-reduce must make every other rank fail fast
//! (well inside the collective timeout), naming the dead peer or the rank that reported it.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use hcmoco_tests::bin;

fn kill_one_rank_mid_allreduce(transport: &str) {
    let mut parent = Command::new(bin("hcmoco-worker"))
        .args(["bench", "allreduce", "--world", "4", "--sizes", "64M", "--iters", "100000", "--warmup", "0"])
        .args(["--timeout-ms", "20000", "--transport", transport])
        .env("OMP_NUM_THREADS", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the benchmark");
    let stderr = parent.stderr.take().expect("stderr");
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut log = Vec::new();
    let mut pids = std::collections::BTreeMap::new();
    let mut formed = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while formed < 4 {
        let line = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())).unwrap_or_else(|_| {
            let _ = parent.kill();
            panic!("ranks did not form the ring:\n{}", log.join("\n"))
        });
        if let Some(rest) = line.strip_prefix("rank ") {
            let parts: Vec<&str> = rest.split_whitespace().collect();
            if parts.len() == 3 && parts[1] == "pid" {
                pids.insert(parts[0].parse::<u32>().expect("rank"), parts[2].parse::<u32>().expect("pid"));
            }
            if line.ends_with("ring formed") {
                formed += 1;
            }
        }
        log.push(line);
    }
    // Let the first large all-reduce get under way, then kill rank 1.
    std::thread::sleep(Duration::from_millis(300));
    let victim = pids[&1];
    let killed_at = Instant::now();
    let status = Command::new("kill").args(["-9", &victim.to_string()]).status().expect("kill");
    assert!(status.success());
    let exit = loop {
        if let Some(s) = parent.try_wait().expect("wait") {
            break s;
        }
        assert!(killed_at.elapsed() < Duration::from_secs(15), "ranks still running 15 s after the kill");
        std::thread::sleep(Duration::from_millis(20));
    };
    let took = killed_at.elapsed();
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(2)) {
        log.push(line);
    }
    let text = log.join("\n");
    assert!(!exit.success(), "the benchmark must fail:\n{text}");
    // Every survivor fails well before the 20 s collective timeout and says who failed: ranks 0 and 2
    // see the dead neighbour, rank 3 only learns of it through the abort that travels the ring.
    assert!(took < Duration::from_secs(10), "took {took:?}:\n{text}");
    // Each survivor's own error line (not the parent's summary, which lists every rank).
    for survivor in [0, 2, 3] {
        let prefix = format!("error: rank {survivor} failed: ");
        let own = text.lines().find_map(|l| l.strip_prefix(prefix.as_str()));
        let own = own.unwrap_or_else(|| panic!("no error from rank {survivor} itself:\n{text}"));
        assert!(own.contains("rank 1"), "rank {survivor}'s error should name rank 1: {own}\n{text}");
    }
}

#[test]
fn kill_9_during_a_large_allreduce_over_tcp_fails_every_rank_fast() {
    kill_one_rank_mid_allreduce("tcp");
}

#[test]
fn kill_9_during_a_large_allreduce_over_shared_memory_fails_every_rank_fast() {
    kill_one_rank_mid_allreduce("shm");
}
