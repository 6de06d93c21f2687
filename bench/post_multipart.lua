-- wrk script for bench/serving.py: POST prebuilt multipart/form-data bodies in rotation and print
-- one machine-readable summary line.
--
-- usage: wrk -t1 -cN -dSs --latency -s bench/post_multipart.lua URL -- BODY_DIR COUNT CONTENT_TYPE
--   BODY_DIR      folder holding body-0000.bin .. body-<COUNT-1>.bin (complete multipart bodies)
--   COUNT         how many body files there are
--   CONTENT_TYPE  the Content-Type header, boundary included
--
-- Every request is formatted once in init(), so the per-request cost in Lua is one table lookup.
-- done() prints "BENCH_JSON {...}" with the duration, the completed requests, wrk's error
-- counters (status = responses with a status >= 400) and latency percentiles, all in microseconds.

local prepared = {}
local next_index = 0

function init(args)
  local dir, count, content_type = args[1], tonumber(args[2]), args[3]
  if dir == nil or count == nil or count < 1 or content_type == nil then
    error("usage: -- BODY_DIR COUNT CONTENT_TYPE")
  end
  for i = 0, count - 1 do
    local name = string.format("%s/body-%04d.bin", dir, i)
    local file = assert(io.open(name, "rb"))
    local body = file:read("*a")
    file:close()
    prepared[#prepared + 1] = wrk.format("POST", nil, { ["Content-Type"] = content_type }, body)
  end
end

function request()
  next_index = next_index % #prepared + 1
  return prepared[next_index]
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"tool": "wrk", "duration_us": %.0f, "requests": %.0f, "connect": %.0f, '
      .. '"read": %.0f, "write": %.0f, "status": %.0f, "timeout": %.0f, '
      .. '"p50_us": %.1f, "p90_us": %.1f, "p99_us": %.1f}\n',
    summary.duration, summary.requests, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99)
  ))
end
