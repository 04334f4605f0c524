-- wrk script for bench/run.py: an optional upload body, and one JSON line of results.
-- BENCH_BODY_BYTES=N turns every request into a POST of N bytes (set once, so wrk keeps its
-- fast static-request path: no Lua runs per request).

local body_bytes = tonumber(os.getenv("BENCH_BODY_BYTES") or "0") or 0
if body_bytes > 0 then
  wrk.method = "POST"
  wrk.body = string.rep("x", body_bytes)
  wrk.headers["Content-Type"] = "application/octet-stream"
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {"requests": %d, "duration_us": %d, "bytes": %d, "connect_errors": %d, ' ..
    '"read_errors": %d, "write_errors": %d, "status_errors": %d, "timeouts": %d, ' ..
    '"p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d, "mean_us": %.1f}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean))
end
