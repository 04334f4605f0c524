'use strict';

// "greeter": a small Express app that joins the mesh through micro-sidecar
// without any mesh code. It only speaks plain HTTP: inbound requests arrive
// from the sidecar, and calls to other services go to the sidecar's outbound
// listener, whose address the sidecar passes in MICRO_SIDECAR_OUTBOUND.

const express = require('express');

const SERVICE = 'greeter';
const OUTBOUND_TIMEOUT_MS = 5000;
const SHUTDOWN_TIMEOUT_MS = Number(process.env.SHUTDOWN_TIMEOUT_MS || 10000);

// Parse a non-negative integer query parameter, clamped to [min, max].
function intParam(value, fallback, min, max) {
  if (value === undefined || value === '') return fallback;
  const n = Number(value);
  if (!Number.isInteger(n)) return null;
  return Math.min(Math.max(n, min), max);
}

function createApp() {
  const app = express();
  app.disable('x-powered-by');

  app.get('/health', (req, res) => {
    res.json({ status: 'ok', service: SERVICE });
  });

  app.get('/hello', (req, res) => {
    const name = typeof req.query.name === 'string' && req.query.name ? req.query.name : 'world';
    res.json({
      service: SERVICE,
      message: `Hello, ${name}!`,
      requestId: req.get('x-request-id') ?? null,
    });
  });

  // Calls the Ruby "fortune" service through the sidecar, path-prefix form:
  //   GET $MICRO_SIDECAR_OUTBOUND/<service>/<path>
  app.get('/ask-ruby', async (req, res) => {
    const outbound = process.env.MICRO_SIDECAR_OUTBOUND;
    const requestId = req.get('x-request-id');
    if (!outbound) {
      res.status(503).json({
        error: 'no_outbound',
        detail: 'MICRO_SIDECAR_OUTBOUND is not set: run this app under micro-sidecar',
      });
      return;
    }
    const headers = { accept: 'application/json' };
    if (requestId) headers['x-request-id'] = requestId;
    const url = `${outbound.replace(/\/+$/, '')}/fortune/fortune`;
    try {
      const answer = await fetch(url, { headers, signal: AbortSignal.timeout(OUTBOUND_TIMEOUT_MS) });
      const body = await answer.text();
      let fortune;
      try {
        fortune = JSON.parse(body);
      } catch {
        fortune = body;
      }
      res.status(answer.ok ? 200 : 502).json({
        service: SERVICE,
        requestId: requestId ?? null,
        greeter: { message: 'Hello from Node!' },
        fortune,
        fortuneStatus: answer.status,
      });
    } catch (err) {
      res.status(502).json({ error: 'fortune_unreachable', detail: String(err && err.message) });
    }
  });

  // Answers after ?ms= milliseconds (default 1000, at most 60000): an
  // in-flight request for graceful-stop tests.
  app.get('/slow', (req, res) => {
    const ms = intParam(req.query.ms, 1000, 0, 60000);
    if (ms === null) {
      res.status(400).json({ error: 'bad_request', detail: 'ms must be an integer' });
      return;
    }
    const timer = setTimeout(() => res.json({ service: SERVICE, sleptMs: ms }), ms);
    res.on('close', () => clearTimeout(timer));
  });

  // Server-Sent Events: ?count= events (default 5, at most 1000), ?interval=
  // milliseconds apart (default 100), then the stream ends.
  app.get('/events', (req, res) => {
    const count = intParam(req.query.count, 5, 0, 1000);
    const interval = intParam(req.query.interval, 100, 0, 10000);
    if (count === null || interval === null) {
      res.status(400).json({ error: 'bad_request', detail: 'count and interval must be integers' });
      return;
    }
    res.writeHead(200, {
      'content-type': 'text/event-stream; charset=utf-8',
      'cache-control': 'no-cache',
    });
    res.flushHeaders();
    let sent = 0;
    let timer = null;
    const tick = () => {
      if (sent >= count) {
        res.end();
        return;
      }
      sent += 1;
      const data = JSON.stringify({ n: sent, of: count, service: SERVICE });
      res.write(`id: ${sent}\nevent: tick\ndata: ${data}\n\n`);
      timer = setTimeout(tick, interval);
    };
    res.on('close', () => clearTimeout(timer));
    tick();
  });

  app.use((req, res) => {
    res.status(404).json({ error: 'not_found', path: req.path });
  });

  return app;
}

function main() {
  const port = Number(process.env.PORT || 3000);
  const host = process.env.HOST || '127.0.0.1';
  const server = createApp().listen(port, host, (err) => {
    if (err) {
      console.error(`${SERVICE}: cannot listen on ${host}:${port}: ${err.message}`);
      process.exit(1);
    }
    const bound = server.address();
    console.log(`${SERVICE} listening on http://${host}:${bound.port}`);
  });

  // Stop accepting, let in-flight requests finish, exit 0. A request that
  // outlives SHUTDOWN_TIMEOUT_MS is cut and the exit code is 1.
  let stopping = false;
  const stop = (signal) => {
    if (stopping) return;
    stopping = true;
    console.log(`${SERVICE}: ${signal} received, closing`);
    server.close(() => process.exit(0));
    server.closeIdleConnections();
    setTimeout(() => {
      console.error(`${SERVICE}: requests still running after ${SHUTDOWN_TIMEOUT_MS} ms, exiting`);
      server.closeAllConnections();
      process.exit(1);
    }, SHUTDOWN_TIMEOUT_MS).unref();
  };
  process.on('SIGTERM', () => stop('SIGTERM'));
  process.on('SIGINT', () => stop('SIGINT'));
}

if (require.main === module) {
  main();
}

module.exports = { createApp };
