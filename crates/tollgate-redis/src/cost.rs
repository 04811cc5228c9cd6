//! Cost budgets in Redis: one hash per key and window (`s`: spent, `h`: held, in
//! nanodollars), expiring a day after its window ends.

use std::sync::Arc;

use tollgate_core::store::{CostCell, CostDecision, CostStore, StoreError, StoreFuture};

use crate::RedisStore;

/// Holds ARGV[1] in every budget or in none: returns the index of the first budget that
/// has not enough left (0-based), or -1 when held. ARGV[2i], ARGV[2i+1]: budget i's amount
/// and when its key may expire (Unix ms).
pub(crate) const HOLD: &str = r"
local cost = tonumber(ARGV[1])
for i = 1, #KEYS do
  local spent = tonumber(redis.call('HGET', KEYS[i], 's') or '0')
  local held = tonumber(redis.call('HGET', KEYS[i], 'h') or '0')
  if spent + held + cost > tonumber(ARGV[2 * i]) then
    return i - 1
  end
end
for i = 1, #KEYS do
  redis.call('HINCRBY', KEYS[i], 'h', cost)
  redis.call('PEXPIREAT', KEYS[i], ARGV[2 * i + 1])
end
return -1
";

/// Releases a hold of ARGV[1] and charges ARGV[2] in every budget.
pub(crate) const SETTLE: &str = r"
local held = tonumber(ARGV[1])
for i = 1, #KEYS do
  local h = tonumber(redis.call('HGET', KEYS[i], 'h') or '0')
  redis.call('HINCRBY', KEYS[i], 'h', -math.min(h, held))
  redis.call('HINCRBY', KEYS[i], 's', ARGV[2])
  redis.call('PEXPIREAT', KEYS[i], ARGV[2 + i])
end
return 0
";

impl RedisStore {
    /// The keys and expiry arguments of `cells`.
    fn cost_keys(&self, cells: &[CostCell]) -> Vec<(String, u64, u64)> {
        cells
            .iter()
            .map(|c| {
                let key = self.redis_key("cost", &format!("{}@{}", c.key.as_str(), c.window_start));
                // A day past the window's end, so a settlement in flight finds its hold.
                let expire_ms = (c.window_end + 86_400).saturating_mul(1000);
                (key, c.amount, expire_ms)
            })
            .collect()
    }
}

impl CostStore for RedisStore {
    fn hold(
        &self,
        cells: Arc<[CostCell]>,
        cost: u64,
    ) -> StoreFuture<Result<CostDecision, StoreError>> {
        let this = self.clone();
        Box::pin(async move {
            let mut inv = this.scripts.cost_hold.prepare_invoke();
            inv.arg(cost);
            for (key, amount, expire) in this.cost_keys(&cells) {
                inv.key(key).arg(amount).arg(expire);
            }
            let mut conn = this.conn.clone();
            let at: i64 = RedisStore::timed(this.timeout, inv.invoke_async(&mut conn)).await?;
            Ok(match usize::try_from(at) {
                Ok(binding) => CostDecision::Denied { binding },
                Err(_) => CostDecision::Held,
            })
        })
    }

    fn settle(
        &self,
        cells: Arc<[CostCell]>,
        held: u64,
        cost: u64,
    ) -> StoreFuture<Result<(), StoreError>> {
        let this = self.clone();
        Box::pin(async move {
            let mut inv = this.scripts.cost_settle.prepare_invoke();
            inv.arg(held).arg(cost);
            let keys = this.cost_keys(&cells);
            for (key, _, _) in &keys {
                inv.key(key);
            }
            for (_, _, expire) in &keys {
                inv.arg(*expire);
            }
            let mut conn = this.conn.clone();
            let _: i64 = RedisStore::timed(this.timeout, inv.invoke_async(&mut conn)).await?;
            Ok(())
        })
    }

    fn standing(&self, cells: Arc<[CostCell]>) -> StoreFuture<Result<Vec<(u64, u64)>, StoreError>> {
        let this = self.clone();
        Box::pin(async move {
            let mut pipe = redis::pipe();
            for (key, _, _) in this.cost_keys(&cells) {
                pipe.cmd("HMGET").arg(key).arg("s").arg("h");
            }
            let mut conn = this.conn.clone();
            let all: Vec<(Option<i64>, Option<i64>)> =
                RedisStore::timed(this.timeout, pipe.query_async(&mut conn)).await?;
            let n = |v: Option<i64>| u64::try_from(v.unwrap_or(0)).unwrap_or(0);
            Ok(all.into_iter().map(|(s, h)| (n(s), n(h))).collect())
        })
    }
}
