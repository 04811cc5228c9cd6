//! Where limits, budgets and cached answers keep their state when instances must share it:
//! every store trait, in one home.
//!
//! The in-process limiter, budget and cache keep their own state. A shared store (Redis,
//! in `tollgate-redis`, which depends on this crate alone) implements these traits so that
//! every instance draws on one quota and reads one cache: [`RateStore`] for the rate
//! limiter, [`TokenStore`] for the token budget, [`CacheStore`] for the response cache,
//! [`JobStore`] for a gateway's jobs (durable work run later through the same quotas).
//! The limits call theirs once per decision and fall back on a stated policy when it
//! cannot answer ([`OnStoreFailure`]); a cache that cannot reach its store misses.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::key::Key;

/// A boxed future returned by a store; `'static`, so a response future can hold it.
pub type StoreFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// A store that could not answer: unreachable, too slow, or it said something unexpected.
#[derive(Clone, Debug)]
pub struct StoreError {
    message: Arc<str>,
}

impl StoreError {
    /// An error saying `message`.
    pub fn new(message: impl fmt::Display) -> Self {
        Self {
            message: message.to_string().into(),
        }
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "shared store unavailable: {}", self.message)
    }
}

impl std::error::Error for StoreError {}

/// What a layer does when its shared store cannot answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnStoreFailure {
    /// Refuse the request with a [`StoreError`] (a 503 from a gateway). Nothing passes
    /// that the shared quota has not counted.
    Closed,
    /// Go on with this instance's share of the quota, kept in process: the quota divided
    /// by `instances`. Instances never pass more together than the whole quota, however
    /// long the store is away.
    Open {
        /// How many instances share the quota.
        instances: u32,
    },
}

/// One GCRA bucket a decision takes a cell from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RateCell {
    /// Whose bucket: the limit's name and the request's key, as the layer names it.
    pub key: Key,
    /// One cell comes back every `interval`.
    pub interval: Duration,
    /// The cells that may go at once (at least 1).
    pub burst: u32,
}

/// A store's answer to [`RateStore::acquire`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RateDecision {
    /// A cell was taken from every bucket.
    Admitted,
    /// None was taken: the bucket at `binding` (an index into the cells) is the one
    /// furthest from admitting, and all would admit after `retry_after`.
    Denied {
        /// The binding cell's index.
        binding: usize,
        /// How long until every bucket would admit.
        retry_after: Duration,
    },
}

/// A shared GCRA limiter: one cell from each bucket, all or nothing, in one round trip.
pub trait RateStore: Send + Sync + 'static {
    /// Takes a cell from every bucket in `cells`, or none.
    fn acquire(&self, cells: Arc<[RateCell]>) -> StoreFuture<Result<RateDecision, StoreError>>;
}

/// One token bucket a reservation draws on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenCell {
    /// Whose bucket, as the layer names it.
    pub key: Key,
    /// The tokens it holds when full.
    pub capacity: u64,
    /// The time it takes to refill from empty.
    pub window: Duration,
}

/// A store's answer to [`TokenStore::reserve`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenDecision {
    /// The tokens were taken from every bucket and are held until settled.
    Reserved {
        /// The store's name for this reservation, given back to
        /// [`TokenStore::settle`] (0 from a store that keeps no record per reservation).
        hold: u64,
    },
    /// None were taken; the bucket at `binding` binds. `retry_after` is when all would
    /// have enough, or `None` when the amount is more than a bucket can ever hold.
    Denied {
        /// The binding cell's index.
        binding: usize,
        /// How long until every bucket would have enough.
        retry_after: Option<Duration>,
    },
}

/// A shared token budget: reserve before the call, settle with what was used after it.
/// Reserved tokens are *held*: they neither refill nor count as free until settled.
pub trait TokenStore: Send + Sync + 'static {
    /// Takes `amount` from every bucket, or nothing.
    fn reserve(
        &self,
        cells: Arc<[TokenCell]>,
        amount: u64,
    ) -> StoreFuture<Result<TokenDecision, StoreError>>;

    /// Releases the reservation `hold` of `reserved` tokens of which `used` were spent: the
    /// rest goes back, or, when more was used, the difference is taken too.
    fn settle(
        &self,
        cells: Arc<[TokenCell]>,
        hold: u64,
        reserved: u64,
        used: u64,
    ) -> StoreFuture<Result<(), StoreError>>;
}

/// One cost budget a decision holds money in: a key's spend in one fixed window (a
/// calendar day, a month), counted in nanodollars.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CostCell {
    /// Whose budget: the budget's name and the request's key, as the layer names them.
    pub key: Key,
    /// The budget per window, in nanodollars.
    pub amount: u64,
    /// The window this decision falls in, in seconds since the Unix epoch: its start
    /// (which names the window's account) and its end (when the account may go).
    pub window_start: u64,
    /// See `window_start`.
    pub window_end: u64,
}

/// A store's answer to [`CostStore::hold`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CostDecision {
    /// The cost is held in every budget until settled.
    Held,
    /// Nothing was held; the budget at `binding` has not enough left in its window.
    Denied {
        /// The binding cell's index.
        binding: usize,
    },
}

/// Shared cost budgets: hold the estimate before the call, settle with the real cost
/// after, so many instances spend one budget.
pub trait CostStore: Send + Sync + 'static {
    /// Holds `cost` nanodollars in every cell, or nothing.
    fn hold(
        &self,
        cells: Arc<[CostCell]>,
        cost: u64,
    ) -> StoreFuture<Result<CostDecision, StoreError>>;

    /// Releases a hold of `held` and charges `cost` in every cell.
    fn settle(
        &self,
        cells: Arc<[CostCell]>,
        held: u64,
        cost: u64,
    ) -> StoreFuture<Result<(), StoreError>>;

    /// Where each cell stands now, summed over every instance: `(spent, held)` in
    /// nanodollars, one pair per cell (zeros for a window nobody has spent in).
    fn standing(&self, cells: Arc<[CostCell]>) -> StoreFuture<Result<Vec<(u64, u64)>, StoreError>>;
}

/// After a store fails, requests go straight to the failure policy for this long; then
/// one request asks the store again, so recovery follows within a second of its return.
pub const RETRY_STORE_AFTER: std::time::Duration = std::time::Duration::from_millis(500);

/// Whether a layer's store is answering: shared by the layer's services, so one failure
/// spares every other request the wait for a store that is down.
#[derive(Debug)]
pub struct StoreHealth {
    /// When the store failed last, in ms after `epoch`; 0 while it answers.
    down_since_ms: std::sync::atomic::AtomicU64,
    /// Whether a request is asking the store while it is marked down.
    probing: std::sync::atomic::AtomicBool,
    epoch: tokio::time::Instant,
}

impl StoreHealth {
    /// A healthy store, times counted from `now`.
    pub fn new(now: tokio::time::Instant) -> Self {
        Self {
            down_since_ms: std::sync::atomic::AtomicU64::new(0),
            probing: std::sync::atomic::AtomicBool::new(false),
            epoch: now,
        }
    }

    fn ms(&self, now: tokio::time::Instant) -> u64 {
        // Never 0, which means "answering".
        u64::try_from(now.saturating_duration_since(self.epoch).as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    /// Whether a request should ask the store now: always while it answers; once it has
    /// been down for [`RETRY_STORE_AFTER`], one request at a time, to see if it is back.
    pub fn should_ask(&self, now: tokio::time::Instant) -> bool {
        use std::sync::atomic::Ordering;
        let since = self.down_since_ms.load(Ordering::Acquire);
        if since == 0 {
            return true;
        }
        let retry_at = since.saturating_add(RETRY_STORE_AFTER.as_millis() as u64);
        self.ms(now) >= retry_at
            && self
                .probing
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
    }

    /// The store answered.
    pub fn answered(&self, what: &str) {
        use std::sync::atomic::Ordering;
        if self.down_since_ms.swap(0, Ordering::AcqRel) != 0 {
            tracing::info!(store = what, "the shared store answers again");
        }
        self.probing.store(false, Ordering::Release);
    }

    /// The store failed.
    pub fn failed(&self, now: tokio::time::Instant, what: &str, error: &StoreError) {
        use std::sync::atomic::Ordering;
        let was = self.down_since_ms.swap(self.ms(now), Ordering::AcqRel);
        self.probing.store(false, Ordering::Release);
        if was == 0 {
            tracing::warn!(store = what, %error, "the shared store failed");
        }
    }
}

/// A cache key: 32 bytes of SHA-256 over what makes two requests the same question (the
/// response cache computes it; a store only keeps answers under it).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct CacheKey(pub [u8; 32]);

/// Hashes eight of the 32 bytes: they are already uniform, so hashing all of them again
/// only costs time (the maps keyed by it are on every request's path).
impl std::hash::Hash for CacheKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let mut first = [0u8; 8];
        first.copy_from_slice(&self.0[..8]);
        state.write_u64(u64::from_le_bytes(first));
    }
}

impl fmt::Debug for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        f.write_str("…")
    }
}

/// A stored answer: its status, the headers worth replaying, and its body as the frames
/// it arrived in (so a stream replays event by event).
#[derive(Clone, Debug)]
pub struct Stored {
    /// The status (always 2xx).
    pub status: http::StatusCode,
    /// `content-type` and the like; never per-request headers such as rate-limit state.
    pub headers: http::HeaderMap,
    /// The body's frames.
    pub frames: Vec<bytes::Bytes>,
    /// Whether it was a streamed (SSE) answer.
    pub stream: bool,
}

impl Stored {
    /// The body's size in bytes.
    pub fn size(&self) -> usize {
        self.frames.iter().map(bytes::Bytes::len).sum()
    }
}

/// Keeps answers for a time, for the response cache. Its in-memory store is the default;
/// a Redis store implements the same trait so instances share one cache. A store that
/// cannot answer says "not stored" (`None`): a cache fails open.
pub trait CacheStore: Send + Sync + 'static {
    /// The answer stored under `key`, unless it has expired.
    fn get(&self, key: &CacheKey) -> StoreFuture<Option<Arc<Stored>>>;
    /// Stores `value` under `key` for `ttl`.
    fn put(&self, key: CacheKey, value: Arc<Stored>, ttl: Duration) -> StoreFuture<()>;

    /// [`get`](Self::get) without a future, for a store that answers at once (in
    /// memory): `Some(answer)`, or `None` for "ask with `get`" (the default). The cache
    /// tries it first, and spares a boxed future per lookup.
    fn get_now(&self, _key: &CacheKey) -> Option<Option<Arc<Stored>>> {
        None
    }

    /// [`put`](Self::put) without a future, for a store that writes at once: `true` when
    /// it stored the value, `false` (the default) for "write with `put`".
    fn put_now(&self, _key: CacheKey, _value: &Arc<Stored>, _ttl: Duration) -> bool {
        false
    }
}

/// Where a job stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum JobState {
    /// Waiting for a worker.
    Queued,
    /// Claimed by a worker, whose lease has not run out.
    InProgress,
    /// Answered; the answer is kept.
    Completed,
    /// Could not be answered (the answer, an error, is kept).
    Failed,
    /// Cancelled before it was answered.
    Cancelled,
    /// Not run before its deadline (a batch's `completion_window` ran out).
    Expired,
}

impl JobState {
    /// Whether the job is over (completed, failed, cancelled or expired).
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Self::Completed | Self::Failed | Self::Cancelled | Self::Expired
        )
    }
}

/// A model request to run later: what the caller sent, and what came of it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Job {
    /// Its id (`job_…`).
    pub id: String,
    /// Who submitted it: only they may read or cancel it.
    pub tenant: String,
    /// The request's path (`/v1/chat/completions`).
    pub path: String,
    /// The request's JSON body, as sent.
    pub body: String,
    /// Where it stands.
    pub state: JobState,
    /// The answer's status, once answered.
    pub status: Option<u16>,
    /// The answer's body, once answered.
    pub response: Option<String>,
    /// When it was submitted, started and ended (Unix milliseconds).
    pub created_ms: u64,
    /// When a worker last claimed it.
    pub started_ms: Option<u64>,
    /// When it ended.
    pub finished_ms: Option<u64>,
    /// How many times a worker claimed it (more than once only after a worker died).
    pub claims: u32,
    /// Until when the current claim holds (Unix milliseconds); past it, another worker
    /// may take the job over.
    pub lease_until_ms: Option<u64>,
    /// Where to POST the job once it is over, if anywhere.
    #[serde(default)]
    pub callback: Option<String>,
    /// When the job must have run by (Unix milliseconds), if ever: a worker that claims
    /// it later ends it as [`JobState::Expired`] without running it.
    #[serde(default)]
    pub deadline_ms: Option<u64>,
}

/// The durable home of jobs and their queue, behind which a single gateway keeps its work
/// across restarts (an embedded file) or many gateways share it.
///
/// The rules every store keeps: a job is claimed by one worker at a time (a claim holds
/// until its lease runs out, and a job whose lease ran out may be claimed again — the
/// worker died); a worker alive keeps its claim by renewing the lease while it runs the
/// job; its answer is recorded once (`finish` succeeds only for the claim in force); a
/// final job never changes again.
pub trait JobStore: Send + Sync + 'static {
    /// Adds a queued job.
    fn enqueue(&self, job: Job) -> StoreFuture<Result<(), StoreError>>;
    /// The oldest job a worker may take now (queued, or in progress with its lease run
    /// out), claimed for `lease` from `now_ms`: in progress, its claim count raised.
    fn claim(&self, now_ms: u64, lease: Duration) -> StoreFuture<Result<Option<Job>, StoreError>>;
    /// Records the answer of the claim numbered `claim` (the job's `claims` when it was
    /// claimed): `false` when that claim is no longer in force (the job was taken over,
    /// cancelled, or is over) and nothing was recorded.
    fn finish(
        &self,
        id: &str,
        claim: u32,
        state: JobState,
        status: u16,
        response: String,
        now_ms: u64,
    ) -> StoreFuture<Result<bool, StoreError>>;
    /// Extends the lease of the claim numbered `claim` to `lease` from `now_ms`, so a
    /// call that runs long is not taken over while its worker lives: `false` when that
    /// claim is no longer in force (taken over, cancelled, over) and nothing changed.
    fn renew(
        &self,
        id: &str,
        claim: u32,
        now_ms: u64,
        lease: Duration,
    ) -> StoreFuture<Result<bool, StoreError>>;
    /// The job, if there is one of that id.
    fn get(&self, id: &str) -> StoreFuture<Result<Option<Job>, StoreError>>;
    /// Cancels a job that is not over; the job as it now stands.
    fn cancel(&self, id: &str, now_ms: u64) -> StoreFuture<Result<Option<Job>, StoreError>>;
    /// Ends a job that is not over as [`JobState::Expired`] (its deadline passed); the
    /// job as it now stands.
    fn expire(&self, id: &str, now_ms: u64) -> StoreFuture<Result<Option<Job>, StoreError>>;
    /// Adds many queued jobs at once (a batch's lines): all or none.
    fn enqueue_many(&self, jobs: Vec<Job>) -> StoreFuture<Result<(), StoreError>>;
    /// Every job whose id starts with `prefix` (a batch's lines), in id order.
    fn list(&self, prefix: &str) -> StoreFuture<Result<Vec<Job>, StoreError>>;
}
