-- put: insert tasks as pending, skipping ids that exist in any state.
-- ARGV: K, tasks (msgpack [[id, queue, priority, due time], ...]), the producer's
--       clock (Unix s), then the payload of each task, in the same order
-- A task due by the producer's clock is ready at once (always without an eta:
-- its due time is that clock's "now"); a later one is scheduled, and becomes
-- ready by the server's clock (claim).
-- Returns one 1 (inserted) or 0 (known id) per task. Wakes the tasks' queues.
local rows, now = cmsgpack.unpack(ARGV[2]), tonumber(ARGV[3])
local out, fresh, payloads = {}, {}, {}
-- The payload key exists exactly as long as the task: it is the idempotency guard.
if #rows == 1 then
  local written = redis.call('SET', K .. ':b:' .. rows[1][1], ARGV[4], 'NX')
  out[1] = written and 1 or 0
  fresh[1] = written and 1 or nil
else
  local keys, seen = {}, {}
  for i, row in ipairs(rows) do
    keys[i] = K .. ':b:' .. row[1]
  end
  local known = mget(keys)
  for i, row in ipairs(rows) do
    if known[i] or seen[row[1]] then
      out[i] = 0
    else
      seen[row[1]] = true
      out[i] = 1
      fresh[#fresh + 1] = i
      payloads[#payloads + 1] = keys[i]
      payloads[#payloads + 1] = ARGV[3 + i]
    end
  end
  if #payloads > 0 then
    call_many({ 'MSET' }, payloads)
  end
end
if #fresh == 0 then
  return out
end

local seq = redis.call('INCRBY', K .. ':seq', #fresh) - #fresh
local ready, sched, scheduled, woken = {}, {}, {}, {}
for _, i in ipairs(fresh) do
  local id, queue, priority, due = rows[i][1], rows[i][2], rows[i][3], rows[i][4]
  seq = seq + 1
  if due <= now then
    redis.call('HSET', task_key(id), 'q', queue, 'p', priority, 'n', seq, 'd', due, 's', 'ready')
    ready[queue] = ready[queue] or {}
    table.insert(ready[queue], -priority)
    table.insert(ready[queue], member(seq, id))
  else
    redis.call('HSET', task_key(id), 'q', queue, 'p', priority, 'n', seq, 'd', due,
      's', 'scheduled')
    sched[#sched + 1] = due
    sched[#sched + 1] = id
    scheduled[queue] = (scheduled[queue] or 0) + 1
  end
  -- A scheduled task wakes too: idle consumers then re-arm their timers for its due time.
  woken[queue] = (woken[queue] or 0) + 1
end
for queue, list in pairs(ready) do
  call_many({ 'ZADD', K .. ':q:' .. queue }, list)
end
if #sched > 0 then
  call_many({ 'ZADD', K .. ':sched' }, sched)
end
for queue, n in pairs(scheduled) do
  redis.call('HINCRBY', K .. ':scount', queue, n)
end
for queue, n in pairs(woken) do
  wake(queue, n)
end
return out
