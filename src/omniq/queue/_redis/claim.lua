-- claim: lease up to `limit` tasks: queues strictly in list order, within a queue
-- higher priority first, then enqueue order.
-- ARGV: K, lease seconds, lease id, limit, retention seconds ('' = no pruning now),
--       token ('' = claim now), queue, queue, ...
-- With a token (a consumer's K:wt:<consumer> list), the claim is the second half
-- of a wake-up: the consumer sends it right behind its blocking BLMOVE of a token
-- from the queue's wake-up list into that list, so the server runs it as soon as
-- the token arrives, and the task comes back with the wake-up, with no round
-- trip in between. If the BLMOVE timed out (no token), it claims nothing.
-- First, in the same step: expired leases and due scheduled tasks become ready
-- (at most BATCH of each per call) and finished tasks past retention are deleted.
-- Returns {next, id, payload, attempts, due time, error, id, ...}. `next` is how
-- many seconds from now the earliest due time or lease end is ('' if none): an
-- idle consumer that got nothing sleeps that long at most.
-- A consumer claims several times per task it runs, so the schema's helpers are
-- written out here: their closures, built again on every run, cost more than
-- most of the redis.calls of a claim.
if ARGV[6] ~= '' and not redis.call('LPOP', ARGV[6]) then
  return { '' }
end
local BATCH, PRUNE = 1000, 200
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local lease_end, lease_id = now + tonumber(ARGV[2]), ARGV[3]
local limit = tonumber(ARGV[4])
local leases, sched = K .. ':leases', K .. ':sched'

-- The earliest score of a ZSET, as the string Redis stores (nil when empty).
local function head(key)
  return redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')[2]
end

-- A task becomes claimable again: into its queue's ZSET, at its original FIFO place
-- (schema.lua's make_ready and member).
local function ready_again(tk, id, cur)
  redis.call('HSET', tk, 's', 'ready')
  redis.call('ZADD', K .. ':q:' .. cur[2], -tonumber(cur[3]), string.format('%016x', cur[4]) .. id)
end

local ends = head(leases)
if ends and tonumber(ends) <= now then
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', leases, '-inf', now, 'LIMIT', 0, BATCH)) do
    redis.call('ZREM', leases, id)
    local tk = K .. ':t:' .. id
    local cur = redis.call('HMGET', tk, 's', 'q', 'p', 'n')
    if cur[1] == 'running' then
      redis.call('HSET', tk, 'l', '')
      ready_again(tk, id, cur)
    end
  end
  ends = head(leases)
end
local due = head(sched)
if due and tonumber(due) <= now then
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', sched, '-inf', now, 'LIMIT', 0, BATCH)) do
    redis.call('ZREM', sched, id)
    local tk = K .. ':t:' .. id
    local cur = redis.call('HMGET', tk, 's', 'q', 'p', 'n')
    if cur[1] == 'scheduled' then
      redis.call('HINCRBY', K .. ':scount', cur[2], -1)
      ready_again(tk, id, cur)
    end
  end
  due = head(sched)
end
if ARGV[5] ~= '' then
  local before = now - tonumber(ARGV[5])
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', K .. ':done', '-inf', before, 'LIMIT', 0, PRUNE)) do
    redis.call('DEL', K .. ':t:' .. id, K .. ':b:' .. id)
    redis.call('ZREM', K .. ':done', id)
  end
end

local taken, from, claimed, lease_list, payload_keys = 0, {}, {}, {}, {}
for i = 7, #ARGV do
  if taken >= limit then
    break
  end
  -- ZPOPMIN: lowest score (highest priority) first, equal scores bytewise (FIFO).
  local popped = redis.call('ZPOPMIN', K .. ':q:' .. ARGV[i], limit - taken)
  if #popped > 0 then
    from[#from + 1] = ARGV[i]
  end
  for j = 1, #popped, 2 do
    local id = string.sub(popped[j], 17)
    local tk = K .. ':t:' .. id
    local cur = redis.call('HMGET', tk, 's', 'd', 'e', 'a')
    if cur[1] == 'ready' then
      local attempts = (tonumber(cur[4]) or 0) + 1
      redis.call('HSET', tk, 's', 'running', 'l', lease_id, 'a', attempts)
      claimed[#claimed + 1] = { id, attempts, cur[2], cur[3] }
      lease_list[#lease_list + 1] = lease_end
      lease_list[#lease_list + 1] = id
      payload_keys[#payload_keys + 1] = K .. ':b:' .. id
      taken = taken + 1
    end
  end
end

local out = { '' }
if taken > 0 then
  call_many({ 'ZADD', leases }, lease_list)  -- score, member pairs: SLICE is even
  local payloads = mget(payload_keys)
  for i, task in ipairs(claimed) do
    out[#out + 1] = task[1]
    out[#out + 1] = payloads[i]
    out[#out + 1] = task[2]
    out[#out + 1] = task[3]
    out[#out + 1] = task[4]
  end
  if taken >= limit then
    -- Work may be left for other consumers: make sure one of them is awake.
    for i = 7, #ARGV do
      if redis.call('EXISTS', K .. ':q:' .. ARGV[i]) == 1 then
        if redis.call('LLEN', K .. ':w:' .. ARGV[i]) == 0 then
          redis.call('RPUSH', K .. ':w:' .. ARGV[i], '1')
        end
      end
    end
  end
  if ends and lease_end < tonumber(ends) then
    -- This lease ends before all others: a consumer asleep until the earlier end
    -- it knew must re-arm its timer, or our crash would go unnoticed too long.
    -- (Consumers never sleep longer than their own lease time, which covers the
    -- case of no other lease.)
    for _, queue in ipairs(from) do
      if redis.call('LLEN', K .. ':w:' .. queue) == 0 then
        redis.call('RPUSH', K .. ':w:' .. queue, '1')
      end
    end
  end
  if ends == nil or lease_end < tonumber(ends) then
    ends = lease_end
  end
end

local next = tonumber(ends)
if due and (next == nil or tonumber(due) < next) then
  next = tonumber(due)
end
if next then
  out[1] = string.format('%.6f', next - now)
end
return out
