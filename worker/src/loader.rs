//! Sample loading off the training thread: a pool of threads reads, decodes and augments the samples
//! of submitted steps, and the training thread takes a step's samples when it needs them.
//!
//! The training loop submits step `s + 1` as soon as it knows its work, before training step `s`, so
//! decoding overlaps compute (bounded prefetch: the loop keeps at most one step ahead). Results come
//! back in slot order whatever thread produced them; augmentation is seeded by `(seed, epoch, slot)`,
//! so the pool size never changes the data.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;

use anyhow::{Context, bail};
use hcmoco_data::augment::{AugmentConfig, augment};
use hcmoco_data::{Dataset, Sample};

/// One sample to load.
#[derive(Debug, Clone)]
pub struct Request {
    pub step: u64,
    /// Position in the step's slice.
    pub position: usize,
    pub dataset: usize,
    pub index: u64,
    pub epoch: u64,
    pub slot: u64,
    /// Set by [`Loader::submit`]: results of requests made before [`Loader::clear`] are dropped.
    pub ticket: u64,
}

/// (ticket, step, position, sample).
type Loaded = (u64, u64, usize, anyhow::Result<Sample>);

/// The pool.
pub struct Loader {
    jobs: Option<Sender<Request>>,
    results: Receiver<Loaded>,
    /// Per submitted step: how many samples, and those already back.
    pending: BTreeMap<u64, (usize, BTreeMap<usize, anyhow::Result<Sample>>)>,
    threads: Vec<JoinHandle<()>>,
    ticket: u64,
}

impl Loader {
    /// `augment`: `None` uses images as stored.
    pub fn new(datasets: Arc<Vec<Dataset>>, augment_cfg: Option<AugmentConfig>, seed: u64, threads: usize) -> Loader {
        let (jobs, job_rx) = channel::<Request>();
        let job_rx = Arc::new(std::sync::Mutex::new(job_rx));
        let (done_tx, results) = channel::<Loaded>();
        let threads = (0..threads.max(1))
            .map(|i| {
                let (job_rx, done_tx, datasets, cfg) =
                    (job_rx.clone(), done_tx.clone(), datasets.clone(), augment_cfg.clone());
                std::thread::Builder::new()
                    .name(format!("hcmoco-load-{i}"))
                    .spawn(move || {
                        loop {
                            let job = match job_rx.lock().unwrap_or_else(|p| p.into_inner()).recv() {
                                Ok(job) => job,
                                Err(_) => return, // the loader was dropped
                            };
                            let result = load(&datasets, cfg.as_ref(), seed, &job);
                            if done_tx.send((job.ticket, job.step, job.position, result)).is_err() {
                                return;
                            }
                        }
                    })
                    .expect("spawn a loader thread")
            })
            .collect();
        Loader { jobs: Some(jobs), results, pending: BTreeMap::new(), threads, ticket: 0 }
    }

    /// Queues the samples of `step` (in slot order).
    pub fn submit(&mut self, step: u64, requests: Vec<Request>) -> anyhow::Result<()> {
        if self.pending.contains_key(&step) {
            return Ok(());
        }
        self.pending.insert(step, (requests.len(), BTreeMap::new()));
        let jobs = self.jobs.as_ref().context("loader stopped")?;
        for mut r in requests {
            r.ticket = self.ticket;
            jobs.send(r).ok().context("loader threads are gone")?;
        }
        Ok(())
    }

    /// Drops every submitted step (a new generation slices steps anew); samples still loading for
    /// them are discarded when they arrive.
    pub fn clear(&mut self) {
        self.pending.clear();
        self.ticket += 1;
    }

    pub fn is_submitted(&self, step: u64) -> bool {
        self.pending.contains_key(&step)
    }

    /// The samples of a submitted `step`, in slot order (blocks until all are loaded); a sample that
    /// failed is its error, naming the slot (and, from the dataset, the shard and sample key).
    pub fn take(&mut self, step: u64) -> anyhow::Result<Vec<anyhow::Result<Sample>>> {
        let Some((want, _)) = self.pending.get(&step) else { bail!("step {step} was never submitted to the loader") };
        let want = *want;
        while self.pending.get(&step).map_or(0, |(_, got)| got.len()) < want {
            let (ticket, s, position, result) = self.results.recv().context("loader threads are gone")?;
            if ticket != self.ticket {
                continue; // submitted before a clear: stale
            }
            if let Some((_, got)) = self.pending.get_mut(&s) {
                got.insert(position, result);
            }
        }
        let (_, got) = self.pending.remove(&step).unwrap_or_default();
        Ok(got.into_values().collect())
    }
}

fn load(datasets: &[Dataset], cfg: Option<&AugmentConfig>, seed: u64, r: &Request) -> anyhow::Result<Sample> {
    let d =
        datasets.get(r.dataset).with_context(|| format!("slot {}: dataset {} is not in the job", r.slot, r.dataset))?;
    let sample =
        d.get(r.index).with_context(|| format!("slot {} (dataset {}, sample {})", r.slot, r.dataset, r.index))?;
    Ok(match cfg {
        Some(cfg) => augment(&sample, cfg, seed, r.epoch, r.slot),
        None => sample,
    })
}

impl Drop for Loader {
    fn drop(&mut self) {
        self.jobs = None; // threads see the channel close and exit
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dataset(n: u64) -> (tempfile::TempDir, Arc<Vec<Dataset>>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = hcmoco_data::SynthConfig { samples: n, image_size: 24, shard_size: 5, ..Default::default() };
        hcmoco_data::generate(&cfg, dir.path()).expect("synth");
        let d = Dataset::open(dir.path().join("manifest.json")).expect("open");
        (dir, Arc::new(vec![d]))
    }

    fn requests(step: u64, slots: std::ops::Range<u64>) -> Vec<Request> {
        slots
            .enumerate()
            .map(|(p, slot)| Request {
                step,
                position: p,
                dataset: 0,
                index: (slot * 7) % 12,
                epoch: 1,
                slot,
                ticket: 0,
            })
            .collect()
    }

    #[test]
    fn results_come_back_in_slot_order_and_do_not_depend_on_the_pool_size() {
        let (_dir, ds) = dataset(12);
        let cfg = Some(AugmentConfig { size: 16, ..Default::default() });
        let mut one = Loader::new(ds.clone(), cfg.clone(), 3, 1);
        let mut four = Loader::new(ds, cfg, 3, 4);
        for l in [&mut one, &mut four] {
            l.submit(0, requests(0, 0..6)).expect("submit");
            l.submit(1, requests(1, 6..12)).expect("submit ahead");
        }
        let ok =
            |v: Vec<anyhow::Result<Sample>>| v.into_iter().collect::<anyhow::Result<Vec<Sample>>>().expect("all load");
        let (a1, b1) = (ok(one.take(1).expect("take")), ok(four.take(1).expect("take")));
        let (a0, b0) = (ok(one.take(0).expect("take")), ok(four.take(0).expect("take")));
        assert_eq!(a0, b0);
        assert_eq!(a1, b1);
        assert_eq!(a0.len(), 6);
        assert!(a0.iter().all(|s| s.rgb.width == 16));
        let keys: Vec<String> = a0.iter().map(|s| s.key.clone()).collect();
        let want: Vec<String> = (0..6u64).map(|slot| hcmoco_data::synth::sample_key((slot * 7) % 12)).collect();
        assert_eq!(keys, want);
    }

    #[test]
    fn a_bad_sample_is_an_error_naming_the_slot() {
        let (_dir, ds) = dataset(4);
        let mut l = Loader::new(ds, None, 0, 2);
        let mut reqs = requests(0, 0..2);
        reqs[1].index = 99;
        l.submit(0, reqs).expect("submit");
        let got = l.take(0).expect("take");
        assert!(got[0].is_ok());
        let err = format!("{:#}", got[1].as_ref().expect_err("out of range"));
        assert!(err.contains("slot 1"), "{err}");
        assert!(l.take(5).is_err());
    }

    #[test]
    fn a_clear_drops_stale_results_even_for_a_resubmitted_step() {
        let (_dir, ds) = dataset(12);
        let mut l = Loader::new(ds, None, 0, 2);
        l.submit(0, requests(0, 0..6)).expect("submit");
        l.clear();
        assert!(!l.is_submitted(0));
        // Step 0 again, sliced differently: only the new request's samples come back.
        l.submit(0, requests(0, 3..5)).expect("resubmit");
        let got = l.take(0).expect("take");
        let keys: Vec<String> = got.into_iter().map(|s| s.expect("loads").key).collect();
        let want: Vec<String> = (3..5u64).map(|slot| hcmoco_data::synth::sample_key((slot * 7) % 12)).collect();
        assert_eq!(keys, want);
    }
}
