//! Scenario `job-store`: the embedded job store, redb (what `tollgate-jobs` ships) against
//! SQLite through `rusqlite` (the bundled library), doing the gateway's work on the same
//! machine in one run: a batch of N jobs in one transaction, then every job claimed and
//! finished (two durable transactions each) by one worker and by four, and the batch
//! listed. Both commit durably (redb's default; SQLite in WAL mode with
//! `synchronous=FULL`), so each commit waits for its fsync.
//!
//! SQLite needs the `sqlite` feature (its C library is built, so it stays out of the
//! default build): `cargo run --release -p tollgate-bench --features sqlite -- job-store`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tollgate_core::store::{Job, JobState, JobStore};

use crate::Args;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const LEASE: Duration = Duration::from_secs(300);

fn job(id: String, created_ms: u64) -> Job {
    let mut j = tollgate_testkit::job_store::job(&id, created_ms);
    j.body = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"a line of a batch, about this long"}]}"#.into();
    j
}

/// What one store did.
struct Row {
    name: &'static str,
    enqueue_ms: f64,
    one_worker_us: f64,
    four_workers_per_s: f64,
    list_ms: f64,
    bytes: u64,
}

async fn measure(
    name: &'static str,
    store: Arc<dyn JobStore>,
    n: u64,
    file: &std::path::Path,
) -> Result<Row, BoxError> {
    let answer = r#"{"id":"chatcmpl-1","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":1,"total_tokens":10}}"#;
    let run = |prefix: &str| {
        (0..n)
            .map(|i| job(format!("{prefix}_{i:06}"), i))
            .collect::<Vec<_>>()
    };
    // One worker.
    let t = Instant::now();
    store.enqueue_many(run("batch-a")).await?;
    let enqueue_ms = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    let mut done = 0u64;
    while let Some(j) = store.claim(1, LEASE).await? {
        store
            .finish(&j.id, j.claims, JobState::Completed, 200, answer.into(), 2)
            .await?;
        done += 1;
    }
    let one_worker_us = t.elapsed().as_secs_f64() * 1e6 / done.max(1) as f64;
    if done != n {
        return Err(format!("{name}: {done} of {n} jobs claimed").into());
    }
    // Four workers.
    store.enqueue_many(run("batch-b")).await?;
    let t = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..4 {
        let store = Arc::clone(&store);
        workers.push(tokio::spawn(async move {
            let mut done = 0u64;
            while let Some(j) = store.claim(3, LEASE).await? {
                store
                    .finish(&j.id, j.claims, JobState::Completed, 200, answer.into(), 4)
                    .await?;
                done += 1;
            }
            Ok::<_, tollgate_core::store::StoreError>(done)
        }));
    }
    let mut all = 0;
    for w in workers {
        all += w.await??;
    }
    let four_workers_per_s = all as f64 / t.elapsed().as_secs_f64();
    if all != n {
        return Err(format!("{name}: {all} of {n} jobs claimed by four workers").into());
    }
    let t = Instant::now();
    let listed = store.list("batch-a_").await?.len() as u64;
    let list_ms = t.elapsed().as_secs_f64() * 1e3;
    if listed != n {
        return Err(format!("{name}: {listed} of {n} jobs listed").into());
    }
    let bytes = dir_bytes(file);
    Ok(Row {
        name,
        enqueue_ms,
        one_worker_us,
        four_workers_per_s,
        list_ms,
        bytes,
    })
}

/// The store's file and its companions (`-wal`, `-shm`).
fn dir_bytes(file: &std::path::Path) -> u64 {
    let Some(dir) = file.parent() else { return 0 };
    let stem = file
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().starts_with(&stem))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

pub(crate) async fn run(args: &Args) -> Result<(), BoxError> {
    let n = args.requests.unwrap_or(if args.quick { 500 } else { 2000 });
    let dir = std::env::temp_dir().join(format!("tollgate-bench-store-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let mut rows = Vec::new();
    let redb_file = dir.join("jobs.redb");
    let redb: Arc<dyn JobStore> = Arc::new(tollgate_jobs::FileStore::open(&redb_file)?);
    rows.push(measure("redb", redb, n, &redb_file).await?);
    #[cfg(feature = "sqlite")]
    {
        let file = dir.join("jobs.sqlite");
        let s: Arc<dyn JobStore> = Arc::new(sqlite::SqliteStore::open(&file)?);
        rows.push(measure("sqlite", s, n, &file).await?);
    }
    #[cfg(not(feature = "sqlite"))]
    println!("job-store: SQLite is left out; build with `--features sqlite` to compare");
    println!();
    println!(
        "  {:<8} {:>14} {:>20} {:>18} {:>10} {:>10}",
        "store",
        "enqueue N, ms",
        "claim+finish, µs/job",
        "4 workers, jobs/s",
        "list, ms",
        "file, KB"
    );
    for r in &rows {
        println!(
            "  {:<8} {:>14.1} {:>20.0} {:>18.0} {:>10.1} {:>10}",
            r.name,
            r.enqueue_ms,
            r.one_worker_us,
            r.four_workers_per_s,
            r.list_ms,
            r.bytes / 1024
        );
    }
    let mut line = format!("RESULT job-store jobs={n}");
    for r in &rows {
        line.push_str(&format!(
            " {0}_enqueue_ms={1:.1} {0}_job_us={2:.0} {0}_4w_jobs_per_s={3:.0}",
            r.name, r.enqueue_ms, r.one_worker_us, r.four_workers_per_s
        ));
    }
    println!("{line}");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// The same store over SQLite, written only to be measured against redb: one table, the
/// job as JSON beside the columns a claim reads, an index in claim order.
#[cfg(feature = "sqlite")]
mod sqlite {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use rusqlite::{params, Connection, OptionalExtension};
    use tollgate_core::store::{Job, JobState, JobStore, StoreError, StoreFuture};

    pub(crate) struct SqliteStore {
        conn: Arc<Mutex<Connection>>,
    }

    fn err(e: impl std::fmt::Display) -> StoreError {
        StoreError::new(e)
    }

    impl SqliteStore {
        pub(crate) fn open(path: &std::path::Path) -> Result<Self, StoreError> {
            let conn = Connection::open(path).map_err(err)?;
            conn.execute_batch(
                "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;
                 CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, created INTEGER NOT NULL,
                   pending INTEGER NOT NULL, lease_until INTEGER, job TEXT NOT NULL);
                 CREATE INDEX IF NOT EXISTS pending_order ON jobs (pending, created, id);",
            )
            .map_err(err)?;
            Ok(Self {
                conn: Arc::new(Mutex::new(conn)),
            })
        }

        fn blocking<T: Send + 'static>(
            &self,
            f: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
        ) -> StoreFuture<Result<T, StoreError>> {
            let conn = Arc::clone(&self.conn);
            Box::pin(async move {
                tokio::task::spawn_blocking(move || {
                    let mut c = conn.lock().map_err(|_| err("poisoned"))?;
                    f(&mut c)
                })
                .await
                .map_err(err)?
            })
        }
    }

    fn enc(j: &Job) -> Result<String, StoreError> {
        serde_json::to_string(j).map_err(err)
    }

    fn dec(s: &str) -> Result<Job, StoreError> {
        serde_json::from_str(s).map_err(err)
    }

    /// The job `id`, if claim `claim` is the one in force on it.
    fn in_force(
        tx: &rusqlite::Transaction<'_>,
        id: &str,
        claim: u32,
    ) -> Result<Option<Job>, StoreError> {
        let text: Option<String> = tx
            .query_row("SELECT job FROM jobs WHERE id = ?1", params![id], |r| {
                r.get(0)
            })
            .optional()
            .map_err(err)?;
        let Some(text) = text else { return Ok(None) };
        let job = dec(&text)?;
        Ok((job.state == JobState::InProgress && job.claims == claim).then_some(job))
    }

    impl JobStore for SqliteStore {
        fn enqueue(&self, job: Job) -> StoreFuture<Result<(), StoreError>> {
            self.enqueue_many(vec![job])
        }

        fn enqueue_many(&self, jobs: Vec<Job>) -> StoreFuture<Result<(), StoreError>> {
            self.blocking(move |c| {
                let tx = c.transaction().map_err(err)?;
                {
                    let mut ins = tx
                        .prepare(
                            "INSERT INTO jobs (id, created, pending, job) VALUES (?1, ?2, 1, ?3)",
                        )
                        .map_err(err)?;
                    for j in &jobs {
                        ins.execute(params![j.id, j.created_ms as i64, enc(j)?])
                            .map_err(err)?;
                    }
                }
                tx.commit().map_err(err)
            })
        }

        fn claim(
            &self,
            now_ms: u64,
            lease: Duration,
        ) -> StoreFuture<Result<Option<Job>, StoreError>> {
            let lease_ms = lease.as_millis() as i64;
            self.blocking(move |c| {
                let tx = c
                    .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                    .map_err(err)?;
                let found: Option<(String, String)> = tx
                    .query_row(
                        "SELECT id, job FROM jobs WHERE pending = 1 AND (lease_until IS NULL OR lease_until <= ?1)
                         ORDER BY created, id LIMIT 1",
                        params![now_ms as i64],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .optional()
                    .map_err(err)?;
                let Some((id, text)) = found else {
                    return Ok(None);
                };
                let mut job = dec(&text)?;
                job.state = JobState::InProgress;
                job.claims += 1;
                job.started_ms = Some(now_ms);
                job.lease_until_ms = Some(now_ms + lease_ms as u64);
                tx.execute(
                    "UPDATE jobs SET lease_until = ?2, job = ?3 WHERE id = ?1",
                    params![id, now_ms as i64 + lease_ms, enc(&job)?],
                )
                .map_err(err)?;
                tx.commit().map_err(err)?;
                Ok(Some(job))
            })
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
            let id = id.to_owned();
            self.blocking(move |c| {
                let tx = c
                    .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                    .map_err(err)?;
                let Some(mut job) = in_force(&tx, &id, claim)? else {
                    return Ok(false);
                };
                job.state = state;
                job.status = Some(status);
                job.response = Some(response);
                job.finished_ms = Some(now_ms);
                job.lease_until_ms = None;
                tx.execute(
                    "UPDATE jobs SET pending = 0, lease_until = NULL, job = ?2 WHERE id = ?1",
                    params![id, enc(&job)?],
                )
                .map_err(err)?;
                tx.commit().map_err(err)?;
                Ok(true)
            })
        }

        fn renew(
            &self,
            id: &str,
            claim: u32,
            now_ms: u64,
            lease: Duration,
        ) -> StoreFuture<Result<bool, StoreError>> {
            let id = id.to_owned();
            let until = now_ms as i64 + lease.as_millis() as i64;
            self.blocking(move |c| {
                let tx = c
                    .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                    .map_err(err)?;
                let Some(mut job) = in_force(&tx, &id, claim)? else {
                    return Ok(false);
                };
                job.lease_until_ms = Some(until as u64);
                tx.execute(
                    "UPDATE jobs SET lease_until = ?2, job = ?3 WHERE id = ?1",
                    params![id, until, enc(&job)?],
                )
                .map_err(err)?;
                tx.commit().map_err(err)?;
                Ok(true)
            })
        }

        fn get(&self, id: &str) -> StoreFuture<Result<Option<Job>, StoreError>> {
            let id = id.to_owned();
            self.blocking(move |c| {
                let text: Option<String> = c
                    .query_row("SELECT job FROM jobs WHERE id = ?1", params![id], |r| {
                        r.get(0)
                    })
                    .optional()
                    .map_err(err)?;
                text.map(|t| dec(&t)).transpose()
            })
        }

        fn cancel(&self, _id: &str, _now_ms: u64) -> StoreFuture<Result<Option<Job>, StoreError>> {
            Box::pin(async { Err(err("not measured")) })
        }

        fn expire(&self, _id: &str, _now_ms: u64) -> StoreFuture<Result<Option<Job>, StoreError>> {
            Box::pin(async { Err(err("not measured")) })
        }

        fn list(&self, prefix: &str) -> StoreFuture<Result<Vec<Job>, StoreError>> {
            let prefix = prefix.to_owned();
            self.blocking(move |c| {
                let mut upper = prefix.clone();
                upper.push(char::MAX);
                let mut q = c
                    .prepare("SELECT job FROM jobs WHERE id >= ?1 AND id < ?2 ORDER BY id")
                    .map_err(err)?;
                let rows = q
                    .query_map(params![prefix, upper], |r| r.get::<_, String>(0))
                    .map_err(err)?;
                let mut out = Vec::new();
                for r in rows {
                    out.push(dec(&r.map_err(err)?)?);
                }
                Ok(out)
            })
        }
    }
}
