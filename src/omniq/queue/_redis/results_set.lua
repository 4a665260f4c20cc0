-- results_set: store task results, and hand each to the clients waiting for it.
-- Keys (K as in schema.lua): K:r:<id> the result, PX its ttl; K:rw:<id> set by
-- waiters while they wait; K:rl:<id> a list holding the result for them: they
-- BLMOVE it onto itself, so every waiter reads it and it stays for late ones.
-- ARGV: K, hand-over ms, results (msgpack [[task id, ttl ms (-1 = keep)], ...]),
--       then the encoded result of each, in the same order
local K, latch_ms = ARGV[1], tonumber(ARGV[2])
local rows = cmsgpack.unpack(ARGV[3])
local marks = {}
for i, row in ipairs(rows) do
  marks[i] = K .. ':rw:' .. row[1]
end
local waited = {}
for i = 1, #marks, 4000 do
  local part = redis.call('MGET', unpack(marks, i, math.min(i + 3999, #marks)))
  for j = 1, #part do
    waited[i + j - 1] = part[j]
  end
end
for i, row in ipairs(rows) do
  local id, ttl, payload = row[1], row[2], ARGV[3 + i]
  if ttl < 0 then
    redis.call('SET', K .. ':r:' .. id, payload)
  else
    redis.call('SET', K .. ':r:' .. id, payload, 'PX', ttl)
  end
  if waited[i] then
    -- Only waited-for results get a hand-over list; a waiter that looks later
    -- finds the result itself, so an older list never misleads anyone.
    local latch = K .. ':rl:' .. id
    redis.call('DEL', latch)
    redis.call('RPUSH', latch, payload)
    redis.call('PEXPIRE', latch, (ttl >= 0 and ttl < latch_ms) and ttl or latch_ms)
  end
end
return 0
