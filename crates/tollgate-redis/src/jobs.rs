//! [`RedisJobStore`]: the gateway's jobs in Redis, so many gateway instances share one
//! queue and take over each other's work.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::streams::{StreamAutoClaimReply, StreamReadReply};
use redis::{Script, Value};
use tollgate_core::store::{Job, JobState, JobStore, StoreError, StoreFuture};

use crate::RedisStore;

/// The consumer group every instance's workers read the queue in.
const GROUP: &str = "workers";

/// Claims one entry: drops it when its job is over (cancelled, expired, or answered
/// after a takeover), else marks the job in progress under a new claim.
const CLAIM: &str = r"
local st = redis.call('HGET', KEYS[1], 'state')
if (not st) or (st ~= 'queued' and st ~= 'in_progress') then
  redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
  redis.call('XDEL', KEYS[2], ARGV[2])
  return false
end
redis.call('HINCRBY', KEYS[1], 'claims', 1)
redis.call('HSET', KEYS[1], 'state', 'in_progress', 'started', ARGV[3], 'lease_until', ARGV[4], 'entry', ARGV[2])
return redis.call('HGETALL', KEYS[1])
";

/// Records the answer of claim ARGV[2], if it is still the claim in force.
const FINISH: &str = r"
if redis.call('HGET', KEYS[1], 'state') ~= 'in_progress' then return 0 end
if redis.call('HGET', KEYS[1], 'claims') ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[3], 'status', ARGV[4], 'response', ARGV[5], 'finished', ARGV[6])
redis.call('HDEL', KEYS[1], 'lease_until')
local e = redis.call('HGET', KEYS[1], 'entry')
if e then
  redis.call('XACK', KEYS[2], ARGV[1], e)
  redis.call('XDEL', KEYS[2], e)
end
return 1
";

/// Extends the lease of claim ARGV[2], if it is still the claim in force: the stream
/// entry is claimed again by this consumer (ARGV[3]) with `XCLAIM … 0 JUSTID`, which
/// sets its idle time to zero, so `XAUTOCLAIM` leaves it for another lease.
const RENEW: &str = r"
if redis.call('HGET', KEYS[1], 'state') ~= 'in_progress' then return 0 end
if redis.call('HGET', KEYS[1], 'claims') ~= ARGV[2] then return 0 end
local e = redis.call('HGET', KEYS[1], 'entry')
if e then
  local c = redis.call('XCLAIM', KEYS[2], ARGV[1], ARGV[3], 0, e, 'JUSTID')
  if #c == 0 then return 0 end
end
redis.call('HSET', KEYS[1], 'lease_until', ARGV[4])
return 1
";

/// Ends a job that is not over as ARGV[2] (cancelled, expired).
const STOP: &str = r"
local st = redis.call('HGET', KEYS[1], 'state')
if not st then return false end
if st == 'queued' or st == 'in_progress' then
  redis.call('HSET', KEYS[1], 'state', ARGV[2], 'finished', ARGV[3])
  redis.call('HDEL', KEYS[1], 'lease_until')
  local e = redis.call('HGET', KEYS[1], 'entry')
  if e then
    redis.call('XACK', KEYS[2], ARGV[1], e)
    redis.call('XDEL', KEYS[2], e)
  end
end
return redis.call('HGETALL', KEYS[1])
";

/// Adds jobs all or none: KEYS are the id index, the stream, then one hash per job;
/// ARGV holds each job's id and JSON.
const ENQUEUE: &str = r"
for i = 3, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    return redis.error_reply('a job `' .. ARGV[(i - 3) * 2 + 1] .. '` exists already')
  end
end
for i = 3, #KEYS do
  local id = ARGV[(i - 3) * 2 + 1]
  redis.call('HSET', KEYS[i], 'job', ARGV[(i - 3) * 2 + 2], 'state', 'queued', 'claims', 0)
  redis.call('ZADD', KEYS[1], 0, id)
  redis.call('XADD', KEYS[2], '*', 'id', id)
end
return #KEYS - 2
";

/// Jobs and their queue in Redis, for many gateway instances.
///
/// - **The queue** is a Redis Stream read by one consumer group; each store (each gateway
///   instance) is one consumer. A worker takes new work with `XREADGROUP`, and first looks
///   for work another consumer has held longer than the lease with `XAUTOCLAIM`: an
///   instance that died mid-call leaves its entries pending, and another instance takes
///   them over once they have been idle for the lease, measured by the Redis server's
///   clock (so the instances' clocks do not matter).
/// - **A job** is a hash: what was submitted (JSON, written once), and its state, claim
///   count, answer and times. Every change is one Lua script, so the rules of
///   [`JobStore`] hold across instances: an answer is recorded only for the claim in
///   force, and a job that is over never changes.
/// - A sorted set indexes the ids, so a batch's lines are listed by their prefix
///   (`ZRANGEBYLEX`).
///
/// A worker renews its lease while its call runs ([`JobStore::renew`], which also resets
/// the entry's idle time), so a long call is not taken over. A job may reach the provider
/// twice only when the instance running it died (or lost Redis for longer than the lease)
/// mid-call; its answer is recorded once.
///
/// Keys live under the store's namespace (`{tollgate}` unless
/// [`RedisStore::namespace`] set another) and do not expire: a finished job stays until
/// it is deleted by an operator. The ids are not secret; the request bodies are stored as
/// sent.
#[derive(Clone)]
pub struct RedisJobStore {
    conn: ConnectionManager,
    namespace: Arc<str>,
    consumer: Arc<str>,
    timeout: Duration,
    scripts: Arc<[Script; 5]>,
    /// The group has been made (or found) on this connection's Redis.
    grouped: Arc<tokio::sync::OnceCell<()>>,
}

impl std::fmt::Debug for RedisJobStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisJobStore")
            .field("namespace", &self.namespace)
            .field("consumer", &self.consumer)
            .finish_non_exhaustive()
    }
}

impl RedisJobStore {
    /// A job store on `redis`'s connection and namespace. Its calls may take up to
    /// 5 seconds (a batch of 50,000 lines goes in as one script) before they fail.
    pub fn new(redis: &RedisStore) -> Self {
        Self {
            conn: redis.conn.clone(),
            namespace: Arc::clone(&redis.namespace),
            consumer: format!("{:016x}{:08x}", redis.nonce, fastrand::u32(..)).into(),
            timeout: Duration::from_secs(5),
            scripts: Arc::new([
                Script::new(CLAIM),
                Script::new(FINISH),
                Script::new(STOP),
                Script::new(ENQUEUE),
                Script::new(RENEW),
            ]),
            grouped: Arc::new(tokio::sync::OnceCell::new()),
        }
    }

    /// The longest a call may take (5 s by default).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// This store's consumer name in the group: one per instance.
    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    fn stream(&self) -> String {
        format!("{}:jobs:queue", self.namespace)
    }

    fn index(&self) -> String {
        format!("{}:jobs:ids", self.namespace)
    }

    fn hash(&self, id: &str) -> String {
        format!("{}:job:{id}", self.namespace)
    }

    /// Makes the consumer group once (reading from the stream's start, so work queued
    /// before the first worker started is not skipped).
    async fn group(&self) -> Result<(), StoreError> {
        self.grouped
            .get_or_try_init(|| async {
                let mut conn = self.conn.clone();
                let made: Result<(), StoreError> = RedisStore::timed(
                    self.timeout,
                    redis::cmd("XGROUP")
                        .arg("CREATE")
                        .arg(self.stream())
                        .arg(GROUP)
                        .arg("0")
                        .arg("MKSTREAM")
                        .query_async(&mut conn),
                )
                .await;
                match made {
                    Err(e) if !e.to_string().contains("BUSYGROUP") => Err(e),
                    _ => Ok(()),
                }
            })
            .await
            .copied()
    }

    /// The next entry this consumer may work on: one idle past the lease (its consumer
    /// died), else a new one.
    async fn next_entry(&self, lease: Duration) -> Result<Option<(String, String)>, StoreError> {
        self.group().await?;
        let mut conn = self.conn.clone();
        let lease_ms = u64::try_from(lease.as_millis()).unwrap_or(u64::MAX).max(1);
        let taken: StreamAutoClaimReply = RedisStore::timed(
            self.timeout,
            redis::cmd("XAUTOCLAIM")
                .arg(self.stream())
                .arg(GROUP)
                .arg(&*self.consumer)
                .arg(lease_ms)
                .arg("0-0")
                .arg("COUNT")
                .arg(1)
                .query_async(&mut conn),
        )
        .await?;
        let entry = match taken.claimed.into_iter().next() {
            Some(e) => Some(e),
            None => {
                let read: Option<StreamReadReply> = RedisStore::timed(
                    self.timeout,
                    redis::cmd("XREADGROUP")
                        .arg("GROUP")
                        .arg(GROUP)
                        .arg(&*self.consumer)
                        .arg("COUNT")
                        .arg(1)
                        .arg("STREAMS")
                        .arg(self.stream())
                        .arg(">")
                        .query_async(&mut conn),
                )
                .await?;
                read.and_then(|r| r.keys.into_iter().next())
                    .and_then(|k| k.ids.into_iter().next())
            }
        };
        Ok(entry.map(|e| {
            let id = e.get::<String>("id").unwrap_or_default();
            (e.id, id)
        }))
    }

    async fn stop(
        &self,
        id: &str,
        state: JobState,
        now_ms: u64,
    ) -> Result<Option<Job>, StoreError> {
        let mut conn = self.conn.clone();
        let mut inv = self.scripts[2].key(self.hash(id));
        inv.key(self.stream())
            .arg(GROUP)
            .arg(state_name(state))
            .arg(now_ms);
        let v: Value = RedisStore::timed(self.timeout, inv.invoke_async(&mut conn)).await?;
        decode(&v)
    }

    async fn add(&self, jobs: Vec<Job>) -> Result<(), StoreError> {
        let mut seen = std::collections::HashSet::new();
        if let Some(j) = jobs.iter().find(|j| !seen.insert(j.id.as_str())) {
            return Err(StoreError::new(format!("a job `{}` comes twice", j.id)));
        }
        let mut conn = self.conn.clone();
        let mut inv = self.scripts[3].key(self.index());
        inv.key(self.stream());
        for j in &jobs {
            let json = serde_json::to_string(j).map_err(StoreError::new)?;
            inv.key(self.hash(&j.id)).arg(&j.id).arg(json);
        }
        let _: i64 = RedisStore::timed(self.timeout, inv.invoke_async(&mut conn)).await?;
        Ok(())
    }

    async fn read(&self, id: &str) -> Result<Option<Job>, StoreError> {
        let mut conn = self.conn.clone();
        let v: Value = RedisStore::timed(
            self.timeout,
            redis::cmd("HGETALL")
                .arg(self.hash(id))
                .query_async(&mut conn),
        )
        .await?;
        decode(&v)
    }

    async fn listed(&self, prefix: &str) -> Result<Vec<Job>, StoreError> {
        let mut conn = self.conn.clone();
        let mut upper = prefix.as_bytes().to_vec();
        upper.push(0xff);
        let mut lower = b"[".to_vec();
        lower.extend_from_slice(prefix.as_bytes());
        let mut high = b"(".to_vec();
        high.extend_from_slice(&upper);
        let ids: Vec<String> = RedisStore::timed(
            self.timeout,
            redis::cmd("ZRANGEBYLEX")
                .arg(self.index())
                .arg(lower)
                .arg(high)
                .query_async(&mut conn),
        )
        .await?;
        let mut out = Vec::with_capacity(ids.len());
        // A thousand jobs a round trip.
        for chunk in ids.chunks(1000) {
            let mut pipe = redis::pipe();
            for id in chunk {
                pipe.cmd("HGETALL").arg(self.hash(id));
            }
            let all: Vec<Value> =
                RedisStore::timed(self.timeout, pipe.query_async(&mut conn)).await?;
            for v in &all {
                out.extend(decode(v)?);
            }
        }
        Ok(out)
    }

    async fn take(&self, now_ms: u64, lease: Duration) -> Result<Option<Job>, StoreError> {
        let lease_ms = u64::try_from(lease.as_millis()).unwrap_or(u64::MAX);
        // Entries of jobs already over are dropped as they come; give up after a few so a
        // call stays short (the next one goes on).
        for _ in 0..64 {
            let Some((entry, id)) = self.next_entry(lease).await? else {
                return Ok(None);
            };
            let mut conn = self.conn.clone();
            let mut inv = self.scripts[0].key(self.hash(&id));
            inv.key(self.stream())
                .arg(GROUP)
                .arg(&entry)
                .arg(now_ms)
                .arg(now_ms.saturating_add(lease_ms));
            let v: Value = RedisStore::timed(self.timeout, inv.invoke_async(&mut conn)).await?;
            if let Some(job) = decode(&v)? {
                return Ok(Some(job));
            }
        }
        Ok(None)
    }
}

fn state_name(s: JobState) -> &'static str {
    match s {
        JobState::Queued => "queued",
        JobState::InProgress => "in_progress",
        JobState::Completed => "completed",
        JobState::Failed => "failed",
        JobState::Cancelled => "cancelled",
        _ => "expired",
    }
}

fn parse_state(s: &str) -> Result<JobState, StoreError> {
    Ok(match s {
        "queued" => JobState::Queued,
        "in_progress" => JobState::InProgress,
        "completed" => JobState::Completed,
        "failed" => JobState::Failed,
        "cancelled" => JobState::Cancelled,
        "expired" => JobState::Expired,
        other => return Err(StoreError::new(format!("a stored job's state `{other}`"))),
    })
}

/// A job from its hash (`HGETALL`'s field-value list); `None` for no hash.
fn decode(v: &Value) -> Result<Option<Job>, StoreError> {
    let fields: Vec<(String, String)> = match v {
        Value::Nil => return Ok(None),
        Value::Array(items) if items.is_empty() => return Ok(None),
        Value::Map(_) | Value::Array(_) => {
            redis::from_redis_value_ref::<std::collections::HashMap<String, String>>(v)
                .map_err(StoreError::new)?
                .into_iter()
                .collect()
        }
        other => return Err(StoreError::new(format!("a stored job reads as {other:?}"))),
    };
    let get = |name: &str| {
        fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let num = |name: &str| get(name).and_then(|v| v.parse::<u64>().ok());
    let mut job: Job = serde_json::from_str(get("job").unwrap_or_default())
        .map_err(|e| StoreError::new(format!("a stored job does not read: {e}")))?;
    job.state = parse_state(get("state").unwrap_or("queued"))?;
    job.claims = num("claims")
        .and_then(|c| u32::try_from(c).ok())
        .unwrap_or(0);
    job.started_ms = num("started");
    job.finished_ms = num("finished");
    job.lease_until_ms = num("lease_until");
    job.status = num("status").and_then(|s| u16::try_from(s).ok());
    job.response = get("response").map(str::to_owned);
    Ok(Some(job))
}

impl JobStore for RedisJobStore {
    fn enqueue(&self, job: Job) -> StoreFuture<Result<(), StoreError>> {
        self.enqueue_many(vec![job])
    }

    fn enqueue_many(&self, jobs: Vec<Job>) -> StoreFuture<Result<(), StoreError>> {
        let this = self.clone();
        Box::pin(async move { this.add(jobs).await })
    }

    fn claim(&self, now_ms: u64, lease: Duration) -> StoreFuture<Result<Option<Job>, StoreError>> {
        let this = self.clone();
        Box::pin(async move { this.take(now_ms, lease).await })
    }

    fn finish(
        &self,
        id: &str,
        claim: u32,
        state: JobState,
        status: u16,
        response: String,
        now_ms: u64,
    ) -> StoreFuture<Result<bool, StoreError>> {
        let this = self.clone();
        let id = id.to_owned();
        Box::pin(async move {
            let mut conn = this.conn.clone();
            let mut inv = this.scripts[1].key(this.hash(&id));
            inv.key(this.stream())
                .arg(GROUP)
                .arg(claim)
                .arg(state_name(state))
                .arg(status)
                .arg(response)
                .arg(now_ms);
            let done: i64 = RedisStore::timed(this.timeout, inv.invoke_async(&mut conn)).await?;
            Ok(done == 1)
        })
    }

    fn renew(
        &self,
        id: &str,
        claim: u32,
        now_ms: u64,
        lease: Duration,
    ) -> StoreFuture<Result<bool, StoreError>> {
        let this = self.clone();
        let id = id.to_owned();
        let lease_ms = u64::try_from(lease.as_millis()).unwrap_or(u64::MAX);
        Box::pin(async move {
            let mut conn = this.conn.clone();
            let mut inv = this.scripts[4].key(this.hash(&id));
            inv.key(this.stream())
                .arg(GROUP)
                .arg(claim)
                .arg(&*this.consumer)
                .arg(now_ms.saturating_add(lease_ms));
            let done: i64 = RedisStore::timed(this.timeout, inv.invoke_async(&mut conn)).await?;
            Ok(done == 1)
        })
    }

    fn get(&self, id: &str) -> StoreFuture<Result<Option<Job>, StoreError>> {
        let this = self.clone();
        let id = id.to_owned();
        Box::pin(async move { this.read(&id).await })
    }

    fn cancel(&self, id: &str, now_ms: u64) -> StoreFuture<Result<Option<Job>, StoreError>> {
        let this = self.clone();
        let id = id.to_owned();
        Box::pin(async move { this.stop(&id, JobState::Cancelled, now_ms).await })
    }

    fn expire(&self, id: &str, now_ms: u64) -> StoreFuture<Result<Option<Job>, StoreError>> {
        let this = self.clone();
        let id = id.to_owned();
        Box::pin(async move { this.stop(&id, JobState::Expired, now_ms).await })
    }

    fn list(&self, prefix: &str) -> StoreFuture<Result<Vec<Job>, StoreError>> {
        let this = self.clone();
        let prefix = prefix.to_owned();
        Box::pin(async move { this.listed(&prefix).await })
    }
}
