//! The durable state store behind coordinator failover: etcd v3.
//!
//! Layout under the prefix (`--etcd-prefix`, default `/hcmoco`):
//! - `PREFIX/leader`: the leader's `--advertise` address, attached to its lease (`--election-ttl-secs`);
//! - `PREFIX/counters`: the job and worker id counters (ids never repeat, across failovers too);
//! - `PREFIX/jobs/JOB`: one JSON [`crate::record::JobRecord`] per job.
//!
//! Election: a coordinator creates the leader key only if it does not exist (a transaction on its
//! create revision), with its lease; the others are standbys and poll. Every write is a transaction
//! that succeeds only while the leader key still has the create revision this coordinator made, so a
//! deposed leader (its lease expired, another took over) cannot write: its write fails, and it stops.

use std::time::{Duration, Instant};

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, Txn, TxnOp};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("deposed: another coordinator leads now (the leader key is no longer ours)")]
    Deposed,
    #[error("{0}")]
    Corrupt(String),
}

/// Where a leading coordinator keeps its durable state: etcd ([`EtcdStore`]) for failover, or
/// memory ([`MemoryStore`], for tests and single-process runs that want the persistence path).
pub trait StateStore: Send + Sync + std::fmt::Debug {
    /// Everything a new leader needs.
    fn load(&self) -> BoxFuture<'_, Result<Loaded, StoreError>>;
    /// Writes job records (id, JSON) and the id counters `(next_job, next_worker)` at once, only
    /// while this coordinator leads (else [`StoreError::Deposed`]).
    fn put<'a>(&'a self, jobs: &'a [(String, Vec<u8>)], counters: (u64, u64)) -> BoxFuture<'a, Result<(), StoreError>>;
}

pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// A store in memory: the records as the coordinator wrote them.
#[derive(Debug, Default)]
pub struct MemoryStore {
    state: std::sync::Mutex<(u64, u64, std::collections::BTreeMap<String, Vec<u8>>)>,
}

impl StateStore for MemoryStore {
    fn load(&self) -> BoxFuture<'_, Result<Loaded, StoreError>> {
        let (next_job, next_worker, jobs) = self.state.lock().unwrap_or_else(|p| p.into_inner()).clone();
        Box::pin(async move { Ok(Loaded { next_job, next_worker, jobs: jobs.into_values().collect() }) })
    }

    fn put<'a>(&'a self, jobs: &'a [(String, Vec<u8>)], counters: (u64, u64)) -> BoxFuture<'a, Result<(), StoreError>> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.0 = counters.0;
        st.1 = counters.1;
        for (id, bytes) in jobs {
            st.2.insert(id.clone(), bytes.clone());
        }
        Box::pin(async { Ok(()) })
    }
}

impl StateStore for EtcdStore {
    fn load(&self) -> BoxFuture<'_, Result<Loaded, StoreError>> {
        Box::pin(EtcdStore::load(self))
    }

    fn put<'a>(&'a self, jobs: &'a [(String, Vec<u8>)], counters: (u64, u64)) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(EtcdStore::put(self, jobs, counters))
    }
}

/// What a new leader reads back.
#[derive(Debug, Default)]
pub struct Loaded {
    pub next_job: u64,
    pub next_worker: u64,
    /// Job records, as stored.
    pub jobs: Vec<Vec<u8>>,
}

/// A connected store that has won the election.
pub struct EtcdStore {
    client: Mutex<Client>,
    prefix: String,
    /// The leader key's create revision this coordinator made.
    leader_rev: i64,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore").field("prefix", &self.prefix).field("leader_rev", &self.leader_rev).finish()
    }
}

/// How long `connect` keeps trying by default (`hcmoco serve --etcd-connect-timeout-secs`).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);

/// Connects to etcd, retrying for up to `patience`; the error names the endpoints.
pub async fn connect(endpoints: &[String], patience: Duration) -> anyhow::Result<Client> {
    let deadline = Instant::now() + patience;
    let opts =
        || ConnectOptions::new().with_connect_timeout(Duration::from_secs(2)).with_timeout(Duration::from_secs(5));
    let mut attempts = 0;
    loop {
        attempts += 1;
        let err = match Client::connect(endpoints, Some(opts())).await {
            Ok(mut c) => match c.get("/", Some(GetOptions::new().with_count_only())).await {
                Ok(_) => return Ok(c),
                Err(e) => e.to_string(),
            },
            Err(e) => e.to_string(),
        };
        if Instant::now() >= deadline {
            anyhow::bail!(
                "cannot reach etcd at {} after {attempts} attempts over {patience:.0?}: {err}",
                endpoints.join(",")
            );
        }
        tracing::warn!(endpoints = %endpoints.join(","), error = %err, "etcd not reachable yet, retrying");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The election: grants a lease of `ttl_secs`, keeps it alive (cancelling `deposed` when it cannot),
/// and returns once this coordinator leads. `on_standby` is told the leader's address while waiting.
pub async fn campaign(
    mut client: Client,
    prefix: &str,
    advertise: &str,
    ttl_secs: i64,
    deposed: CancellationToken,
    on_standby: impl Fn(&str),
) -> anyhow::Result<EtcdStore> {
    let lease = client.lease_grant(ttl_secs, None).await?.id();
    let (mut keeper, mut answers) = client.lease_keep_alive(lease).await?;
    let every = Duration::from_millis((ttl_secs.max(1) as u64 * 1000) / 3);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            let alive = match keeper.keep_alive().await {
                Ok(()) => matches!(answers.message().await, Ok(Some(r)) if r.ttl() > 0),
                Err(_) => false,
            };
            if !alive {
                tracing::error!("the election lease could not be renewed: stepping down");
                deposed.cancel();
                return;
            }
        }
    });
    let leader_key = format!("{prefix}/leader");
    loop {
        let txn = Txn::new()
            .when([Compare::create_revision(leader_key.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(leader_key.as_str(), advertise, Some(PutOptions::new().with_lease(lease)))])
            .or_else([TxnOp::get(leader_key.as_str(), None)]);
        let resp = client.txn(txn).await?;
        if resp.succeeded() {
            let leader_rev = resp.header().map(|h| h.revision()).unwrap_or_default();
            tracing::info!(prefix, advertise, "elected leader");
            return Ok(EtcdStore { client: Mutex::new(client), prefix: prefix.to_string(), leader_rev });
        }
        let leader = resp
            .op_responses()
            .into_iter()
            .find_map(|r| match r {
                etcd_client::TxnOpResponse::Get(g) => {
                    g.kvs().first().map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
                }
                _ => None,
            })
            .unwrap_or_default();
        on_standby(&leader);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

impl EtcdStore {
    /// Everything a new leader needs.
    pub async fn load(&self) -> Result<Loaded, StoreError> {
        let mut c = self.client.lock().await;
        let mut loaded = Loaded::default();
        let counters = c.get(format!("{}/counters", self.prefix), None).await?;
        if let Some(kv) = counters.kvs().first() {
            let v: serde_json::Value = serde_json::from_slice(kv.value())
                .map_err(|e| StoreError::Corrupt(format!("{}/counters: {e}", self.prefix)))?;
            loaded.next_job = v["next_job"].as_u64().unwrap_or(0);
            loaded.next_worker = v["next_worker"].as_u64().unwrap_or(0);
        }
        let jobs = c.get(format!("{}/jobs/", self.prefix), Some(GetOptions::new().with_prefix())).await?;
        loaded.jobs = jobs.kvs().iter().map(|kv| kv.value().to_vec()).collect();
        Ok(loaded)
    }

    /// Writes job records and the id counters in one transaction, only while this coordinator leads.
    pub async fn put(&self, jobs: &[(String, Vec<u8>)], counters: (u64, u64)) -> Result<(), StoreError> {
        let mut ops: Vec<TxnOp> = jobs
            .iter()
            .map(|(id, bytes)| TxnOp::put(format!("{}/jobs/{id}", self.prefix), bytes.clone(), None))
            .collect();
        let counters = serde_json::json!({ "next_job": counters.0, "next_worker": counters.1 }).to_string();
        ops.push(TxnOp::put(format!("{}/counters", self.prefix), counters, None));
        let txn = Txn::new()
            .when([Compare::create_revision(format!("{}/leader", self.prefix), CompareOp::Equal, self.leader_rev)])
            .and_then(ops);
        let resp = self.client.lock().await.txn(txn).await?;
        if resp.succeeded() { Ok(()) } else { Err(StoreError::Deposed) }
    }
}
