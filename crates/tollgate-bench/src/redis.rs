//! Scenario `redis`: decisions per second and their latency against the local Redis, plain
//! (one script call per decision) and pooled (slices spent in process), with the Redis
//! calls each decision cost, read from `INFO commandstats`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tollgate_core::key::Key;
use tollgate_core::store::{RateCell, RateDecision, RateStore};
use tollgate_redis::{PooledStore, RedisStore};

use crate::load::{self, Outcome, Plan};
use crate::report;
use crate::Args;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The quota under test, per tenant: a million a second, 10,000 at once (the finest rate
/// the scripts express, one cell a microsecond); 16 tenants. Far more than one round trip
/// per decision can reach, which is what pooling is for; pooled mode must still never
/// admit more than it.
const INTERVAL: Duration = Duration::from_micros(1);
const BURST: u32 = 10_000;
const TENANTS: usize = 16;

/// Script calls Redis has served so far (`EVALSHA` and `EVAL`).
async fn script_calls(conn: &mut redis::aio::MultiplexedConnection) -> Result<u64, BoxError> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await?;
    let mut total = 0;
    for line in info.lines() {
        if let Some(rest) = line
            .strip_prefix("cmdstat_evalsha:")
            .or_else(|| line.strip_prefix("cmdstat_eval:"))
        {
            let calls = rest
                .split(',')
                .find_map(|kv| kv.strip_prefix("calls="))
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0);
            total += calls;
        }
    }
    Ok(total)
}

struct Run {
    outcome: Outcome,
    admitted: u64,
    calls: u64,
}

async fn run(
    store: Arc<dyn RateStore>,
    plan: Plan,
    conn: &mut redis::aio::MultiplexedConnection,
) -> Result<Run, BoxError> {
    let cells: Arc<Vec<Arc<[RateCell]>>> = Arc::new(
        (0..TENANTS)
            .map(|t| {
                Arc::from(vec![RateCell {
                    key: Key::new(format!("bench:tenant-{t}")),
                    interval: INTERVAL,
                    burst: BURST,
                }])
            })
            .collect(),
    );
    let admitted = Arc::new(AtomicU64::new(0));
    let before = script_calls(conn).await?;
    let counted = Arc::clone(&admitted);
    let outcome = load::run(plan, move |i| {
        let cells = Arc::clone(&cells[i as usize % TENANTS]);
        let (store, admitted) = (Arc::clone(&store), Arc::clone(&counted));
        async move {
            match store.acquire(cells).await {
                Ok(RateDecision::Admitted) => {
                    admitted.fetch_add(1, Ordering::Relaxed);
                    Ok(())
                }
                Ok(RateDecision::Denied { .. }) => Ok(()),
                Err(e) => Err(e.to_string()),
            }
        }
    })
    .await;
    let calls = script_calls(conn).await? - before;
    Ok(Run {
        outcome,
        admitted: admitted.load(Ordering::Relaxed),
        calls,
    })
}

pub(crate) async fn run_scenario(args: &Args) -> Result<(), BoxError> {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let client = redis::Client::open(url.as_str())?;
    let mut conn = tokio::time::timeout(
        Duration::from_secs(2),
        client.get_multiplexed_async_connection(),
    )
    .await
    .map_err(|_| format!("Redis at {url} did not answer within 2 s"))??;
    let concurrency = args.concurrency.unwrap_or(64);
    let (plain_n, pooled_n, secs) = if args.quick {
        (50_000, 1_000_000, 10)
    } else {
        (300_000, 5_000_000, 30)
    };
    let plan = |n: u64| Plan {
        concurrency,
        warmup: 1_000,
        requests: args.requests.unwrap_or(n),
        max_duration: Duration::from_secs(secs),
    };
    let namespace = |mode: &str| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        format!("bench:{mode}:{nanos}")
    };

    let plain_store = RedisStore::open(&url)?.namespace(&namespace("plain"));
    let plain = run(Arc::new(plain_store), plan(plain_n), &mut conn).await?;
    let pooled_store =
        PooledStore::new(RedisStore::open(&url)?.namespace(&namespace("pooled"))).slice(100);
    let started = Instant::now();
    let pooled = run(Arc::new(pooled_store), plan(pooled_n), &mut conn).await?;
    let pooled_span = started.elapsed();

    let dps = |r: &Run| r.outcome.rps();
    let p99 = |r: &Run| r.outcome.latency_us.value_at_quantile(0.99);
    // The calls were counted over the warm-up too.
    let decisions = |r: &Run| (r.outcome.ok + r.outcome.errors + 1_000).max(1);
    let plain_calls = plain.calls as f64 / decisions(&plain) as f64;
    let pooled_calls = pooled.calls as f64 / decisions(&pooled) as f64;
    // Everything pooled mode admitted, warm-up included, against what the quota allowed
    // over the same time.
    let allowed =
        TENANTS as f64 * (BURST as f64 + pooled_span.as_secs_f64() / INTERVAL.as_secs_f64());
    let held = pooled.admitted as f64 <= allowed;
    let speedup = dps(&pooled) / dps(&plain).max(1e-9);
    report::table(
        &format!("redis: decisions against {url} at concurrency {concurrency}; 16 tenants, each 1,000,000/s with a burst of 10,000"),
        &[
            ("plain", format!("{:.0} decisions/s, p99 {} µs, {:.3} Redis calls per decision, {} admitted", dps(&plain), p99(&plain), plain_calls, plain.admitted)),
            ("pooled", format!("{:.0} decisions/s, p99 {} µs, {:.4} Redis calls per decision, {} admitted", dps(&pooled), p99(&pooled), pooled_calls, pooled.admitted)),
            ("pooled ÷ plain", format!("{speedup:.1}× (goal ≥ 10×)")),
            ("quota held (pooled)", format!("{held}: {} admitted (the measured run), at most {allowed:.0} allowed over {:.2} s", pooled.admitted, pooled_span.as_secs_f64())),
        ],
    );
    for e in [&plain.outcome.first_error, &pooled.outcome.first_error]
        .into_iter()
        .flatten()
    {
        println!("first error: {e}");
    }
    report::result_line(
        "redis",
        &[
            ("plain_dps", format!("{:.0}", dps(&plain))),
            ("plain_p99_us", p99(&plain).to_string()),
            ("pooled_dps", format!("{:.0}", dps(&pooled))),
            ("pooled_p99_us", p99(&pooled).to_string()),
            ("calls_per_decision", format!("{plain_calls:.3}")),
            ("pooled_calls_per_decision", format!("{pooled_calls:.4}")),
            ("speedup", format!("{speedup:.1}")),
            ("quota_held", held.to_string()),
        ],
    );
    if plain.outcome.errors + pooled.outcome.errors > 0 {
        return Err("some decisions failed".into());
    }
    Ok(())
}
