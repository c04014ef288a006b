-- qdash_mp hub: one publish of one host, applied atomically and only if newer (docs/hub.md).
--
-- ARGV (built by qdash_mp.hub.publisher.build_args; keys in qdash_mp.hub.keys):
--   1 prefix  2 host  3 seq (decimal int)  4 host info blob  5 workers blob ("" = unchanged)
--   6 minute cutoff  7 hour cutoff (unix s: history fields older are dropped when the key
--     gets a new point)  8 how many pending commands to return  9 result TTL (s)
--   then five counted sections, each "n" followed by n groups:
--     queues   (queue, record)
--     history  (resolution "m"|"h", queue, period start, point)
--     adds     (job id, failed_at score, FAILED record)
--     removes  (job id)
--     acks     (command stream entry id, req, result blob)
-- Returns {applied (1|0), previous applied seq (decimal string), pending commands}: a
-- publish whose seq is not above the applied one changes nothing (a replay after a lost
-- reply, or a delayed older process), but still gets the commands.

local p, host, seq = ARGV[1], ARGV[2], ARGV[3]
local seq_key = p .. 'seq'
local prev = redis.call('HGET', seq_key, host) or '0'

local function pending()
  local n = tonumber(ARGV[8])
  if n <= 0 then
    return {}
  end
  return redis.call('XRANGE', p .. 'cmd:' .. host, '-', '+', 'COUNT', n)
end

if tonumber(seq) <= tonumber(prev) then
  return {0, prev, pending()}
end

redis.call('HSET', seq_key, host, seq)
redis.call('HSET', p .. 'hosts', host, ARGV[4])
if ARGV[5] ~= '' then
  redis.call('SET', p .. 'w:' .. host, ARGV[5])
end

local i = 10
local n = tonumber(ARGV[i]); i = i + 1
local qkey = p .. 'q:' .. host
for _ = 1, n do
  redis.call('HSET', qkey, ARGV[i], ARGV[i + 1])
  i = i + 2
end

n = tonumber(ARGV[i]); i = i + 1
local touched = {}
local order = {}
for _ = 1, n do
  local res, queue = ARGV[i], ARGV[i + 1]
  local key = p .. 'h' .. res .. ':' .. host .. ':' .. queue
  redis.call('HSET', key, ARGV[i + 2], ARGV[i + 3])
  if not touched[key] then
    touched[key] = (res == 'm') and tonumber(ARGV[6]) or tonumber(ARGV[7])
    order[#order + 1] = key
    redis.call('SADD', p .. 'hq:' .. host, queue)
  end
  i = i + 4
end
for _, key in ipairs(order) do
  local cutoff = touched[key]
  for _, f in ipairs(redis.call('HKEYS', key)) do
    if tonumber(f) < cutoff then
      redis.call('HDEL', key, f)
    end
  end
end

local fi, fj, fall = p .. 'fi:' .. host, p .. 'fj:' .. host, p .. 'fall'
-- fseqz: member -> the hub's arrival sequence (fseq), new only when the record is new or
-- changed (a job that failed again), not when a reconciliation re-sends the same bytes; the
-- hub's failed-list snapshots are high-water marks of it.
local fseq, fseqz = p .. 'fseq', p .. 'fseqz'
n = tonumber(ARGV[i]); i = i + 1
for _ = 1, n do
  local id, score = ARGV[i], ARGV[i + 1]
  local member = host .. '\0' .. id
  local old = redis.call('HGET', fj, id)
  redis.call('ZADD', fi, score, id)
  redis.call('HSET', fj, id, ARGV[i + 2])
  redis.call('ZADD', fall, score, member)
  if old ~= ARGV[i + 2] or not redis.call('ZSCORE', fseqz, member) then
    redis.call('ZADD', fseqz, redis.call('INCR', fseq), member)
  end
  i = i + 3
end

-- frmz: member -> the fseq value of its removal, so a hub that mirrors the index in memory
-- (qdash_mp.hub.failed_mirror) follows removals as it follows arrivals; only the last
-- FRM_KEEP removals are kept, frmlo is the highest removal sequence dropped from it.
local frmz, FRM_KEEP = p .. 'frmz', 100000
n = tonumber(ARGV[i]); i = i + 1
local removed = 0
for _ = 1, n do
  local id = ARGV[i]
  local member = host .. '\0' .. id
  redis.call('ZREM', fi, id)
  redis.call('HDEL', fj, id)
  if redis.call('ZREM', fall, member) == 1 then
    redis.call('ZADD', frmz, redis.call('INCR', fseq), member)
    removed = removed + 1
  end
  redis.call('ZREM', fseqz, member)
  i = i + 1
end
if removed > 0 then
  local over = redis.call('ZCARD', frmz) - FRM_KEEP
  if over > 1000 then -- trimmed in steps: one ZREMRANGE per thousand removals, not each
    local last = redis.call('ZRANGE', frmz, over - 1, over - 1, 'WITHSCORES')
    redis.call('ZREMRANGEBYRANK', frmz, 0, over - 1)
    redis.call('SET', p .. 'frmlo', last[2])
  end
end

n = tonumber(ARGV[i]); i = i + 1
local cmd = p .. 'cmd:' .. host
for _ = 1, n do
  if ARGV[i + 1] ~= '' then -- '' = an entry too broken to answer: only deleted
    redis.call('SET', p .. 'res:' .. ARGV[i + 1], ARGV[i + 2], 'EX', tonumber(ARGV[9]))
  end
  redis.call('XDEL', cmd, ARGV[i])
  i = i + 3
end

return {1, prev, pending()}
