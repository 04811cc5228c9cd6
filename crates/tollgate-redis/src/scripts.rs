//! The Lua scripts: one call per decision, timed by the server's clock (`TIME`), so the
//! instances' clocks never matter. Times are microseconds; Lua numbers are doubles, exact
//! to 2^53 µs (285 years).

/// GCRA over several buckets, all or nothing.
///
/// KEYS: one per bucket. ARGV: `interval_us, burst` per bucket. A bucket's value is its
/// theoretical arrival time (TAT); it expires when that time has passed, so idle keys
/// cost nothing. Returns `{1, 0, 0}` when admitted, `{0, binding (from 0), wait_us}` when
/// not.
pub(crate) const GCRA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local new = {}
local worst, binding = 0, 0
for i = 1, #KEYS do
  local interval = tonumber(ARGV[2 * i - 1])
  local tau = interval * (tonumber(ARGV[2 * i]) - 1)
  local tat = tonumber(redis.call('GET', KEYS[i])) or now
  if tat < now then tat = now end
  local wait = tat - tau - now
  if wait > worst then worst = wait; binding = i - 1 end
  new[i] = tat + interval
end
if worst > 0 then return {0, binding, math.ceil(worst)} end
for i = 1, #KEYS do
  redis.call('SET', KEYS[i], string.format('%.0f', new[i]), 'PX', math.ceil((new[i] - now) / 1000) + 1)
end
return {1, 0, 0}
"#;

/// The part both token scripts begin with: a bucket's state, refilled to now, with the
/// holds whose deadline has passed released as fully spent (their request never
/// settled: a process gone, or Redis away when it tried). Holds are members
/// `id:amount` of a sorted set scored by deadline.
const TOKEN_STATE: &str = r#"
local function bucket(key, holds, cap, rate, now)
  local v = redis.call('HMGET', key, 'a', 'h', 't')
  local h = tonumber(v[2]) or 0
  local a = tonumber(v[1]) or cap
  local last = tonumber(v[3]) or now
  if now > last then a = a + (now - last) * rate end
  local expired = redis.call('ZRANGEBYSCORE', holds, '-inf', now)
  for _, m in ipairs(expired) do
    h = h - (tonumber(string.match(m, ':(%d+)$')) or 0)
  end
  if #expired > 0 then redis.call('ZREMRANGEBYSCORE', holds, '-inf', now) end
  if h < 0 then h = 0 end
  if a > cap - h then a = cap - h end
  return a, h
end
"#;

/// Token buckets with holds, all or nothing: the reserve half of a budget.
///
/// A bucket is a hash — `a` tokens free, `h` tokens held by requests in flight, `t` the
/// time of the last refill — and a sorted set of its holds. Refill adds
/// `capacity / window` per µs up to `capacity - held`: held tokens are neither free nor
/// refilled until settled, or until their deadline passes.
///
/// KEYS: bucket, holds, per bucket. ARGV: `amount, ttl_ms, member, max_hold_us`, then
/// `capacity, window_us` per bucket. Returns `{1, 0, 0}` when reserved; `{0, binding,
/// wait_us}` when not, `wait_us` being -1 when the amount is more than the bucket holds.
pub(crate) fn reserve() -> String {
    format!(
        "{TOKEN_STATE}{}",
        r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local amount = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
local member = ARGV[3]
local deadline = now + tonumber(ARGV[4])
local n = #KEYS / 2
local state = {}
local worst, binding = 0, 0
for i = 1, n do
  local cap = tonumber(ARGV[2 * i + 3])
  local rate = cap / tonumber(ARGV[2 * i + 4])
  if amount > cap then return {0, i - 1, -1} end
  local a, h = bucket(KEYS[2 * i - 1], KEYS[2 * i], cap, rate, now)
  if a < amount then
    local wait = (amount - a) / rate
    if wait > worst then worst = wait; binding = i - 1 end
  end
  state[i] = {a, h}
end
if worst > 0 then return {0, binding, math.ceil(worst)} end
for i = 1, n do
  redis.call('HSET', KEYS[2 * i - 1], 'a', tostring(state[i][1] - amount), 'h', tostring(state[i][2] + amount), 't', string.format('%.0f', now))
  redis.call('PEXPIRE', KEYS[2 * i - 1], ttl)
  redis.call('ZADD', KEYS[2 * i], string.format('%.0f', deadline), member)
  redis.call('PEXPIRE', KEYS[2 * i], ttl)
end
return {1, 0, 0}
"#
    )
}

/// The settle half: releases the hold `member` of `reserved`, of which `used` were spent.
/// A hold already released at its deadline was counted as fully spent: only the
/// difference to what was used is given or taken.
///
/// KEYS: bucket, holds, per bucket. ARGV: `reserved, used, ttl_ms, member`, then
/// `capacity, window_us` per bucket.
pub(crate) fn settle() -> String {
    format!(
        "{TOKEN_STATE}{}",
        r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local reserved = tonumber(ARGV[1])
local used = tonumber(ARGV[2])
local ttl = tonumber(ARGV[3])
local member = ARGV[4]
for i = 1, #KEYS / 2 do
  local cap = tonumber(ARGV[2 * i + 3])
  local rate = cap / tonumber(ARGV[2 * i + 4])
  local a, h = bucket(KEYS[2 * i - 1], KEYS[2 * i], cap, rate, now)
  if redis.call('ZREM', KEYS[2 * i], member) == 1 then
    h = h - reserved
    if h < 0 then h = 0 end
  end
  a = a + reserved - used
  if a > cap - h then a = cap - h end
  redis.call('HSET', KEYS[2 * i - 1], 'a', tostring(a), 'h', tostring(h), 't', string.format('%.0f', now))
  redis.call('PEXPIRE', KEYS[2 * i - 1], ttl)
end
return 1
"#
    )
}

/// Borrowing cells for spending in process (pooled mode), all or nothing.
///
/// KEYS: one per bucket. ARGV per bucket: `interval_us, burst, want, give_back`. A bucket
/// with `want` 0 is only given back to. A wanted bucket grants up to `want` cells, but at
/// most a quarter of what it has now (at least one), so that slices shrink as the quota
/// runs out and no instance sits on what others need. Returns `{1, 0, 0, grant...}`, or
/// `{0, binding, wait_us}`.
pub(crate) const BORROW: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local new, grants = {}, {}
local worst, binding = 0, 0
for i = 1, #KEYS do
  local interval = tonumber(ARGV[4 * i - 3])
  local tau = interval * (tonumber(ARGV[4 * i - 2]) - 1)
  local want = tonumber(ARGV[4 * i - 1])
  local back = tonumber(ARGV[4 * i])
  local tat = tonumber(redis.call('GET', KEYS[i])) or now
  tat = tat - back * interval
  if tat < now then tat = now end
  grants[i] = 0
  if want > 0 then
    local avail = math.floor((now + tau - tat) / interval) + 1
    if avail < 1 then
      local wait = tat - tau - now
      if wait > worst then worst = wait; binding = i - 1 end
    else
      local g = math.min(want, math.max(1, math.floor(avail / 4)))
      grants[i] = g
      tat = tat + g * interval
    end
  end
  new[i] = tat
end
for i = 1, #KEYS do
  local back = tonumber(ARGV[4 * i])
  if (worst == 0 and grants[i] > 0) or back > 0 then
    if worst > 0 then new[i] = new[i] - grants[i] * tonumber(ARGV[4 * i - 3]) end
    local ttl = math.ceil((new[i] - now) / 1000) + 1
    if ttl < 1 then ttl = 1 end
    redis.call('SET', KEYS[i], string.format('%.0f', new[i]), 'PX', ttl)
  end
end
if worst > 0 then return {0, binding, math.ceil(worst)} end
local out = {1, 0, 0}
for i = 1, #KEYS do out[i + 3] = grants[i] end
return out
"#;

/// Borrowing tokens for spending in process (pooled budgets), all or nothing, and giving
/// back what a lease left.
///
/// KEYS: bucket, holds, per bucket. ARGV: `amount, ttl_ms`, then per bucket `capacity, window_us,
/// want, back_lent, back_free`. First each bucket takes back `back_lent` lent tokens
/// (released from its holds) of which `back_free` (possibly negative: overspent) return
/// to the free tokens. Then each bucket with `want` > 0 lends up to `want` — at least
/// `amount`, at most a quarter of its free tokens when that is more than `amount` — as a
/// hold. Returns `{1, 0, 0, grant...}`; `{0, binding, wait_us}` (`-1`: never fits).
pub(crate) fn token_borrow() -> String {
    format!(
        "{TOKEN_STATE}{}",
        r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local amount = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
local n = #KEYS / 2
local state, grants = {}, {}
local worst, binding = 0, 0
for i = 1, n do
  local base = 5 * i - 2
  local cap = tonumber(ARGV[base])
  local rate = cap / tonumber(ARGV[base + 1])
  local want = tonumber(ARGV[base + 2])
  local back_lent = tonumber(ARGV[base + 3])
  local back_free = tonumber(ARGV[base + 4])
  local a, h = bucket(KEYS[2 * i - 1], KEYS[2 * i], cap, rate, now)
  h = h - back_lent
  if h < 0 then h = 0 end
  a = a + back_free
  if a > cap - h then a = cap - h end
  grants[i] = 0
  if want > 0 then
    if amount > cap then return {0, i - 1, -1} end
    if a < amount then
      local wait = (amount - a) / rate
      if wait > worst then worst = wait; binding = i - 1 end
    else
      grants[i] = math.min(want, math.max(amount, math.floor(a / 4)))
    end
  end
  state[i] = {a, h}
end
for i = 1, n do
  local g = grants[i]
  if worst > 0 then g = 0 end
  redis.call('HSET', KEYS[2 * i - 1], 'a', tostring(state[i][1] - g), 'h', tostring(state[i][2] + g), 't', string.format('%.0f', now))
  redis.call('PEXPIRE', KEYS[2 * i - 1], ttl)
end
if worst > 0 then return {0, binding, math.ceil(worst)} end
local out = {1, 0, 0}
for i = 1, n do out[i + 3] = grants[i] end
return out
"#
    )
}
