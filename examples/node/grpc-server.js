'use strict';

// "greeter" over gRPC: a small @grpc/grpc-js server that joins the mesh through
// micro-sidecar without any mesh code. It speaks plaintext HTTP/2 (insecure
// credentials): its sidecar, started with `--app-protocol h2c`, terminates the
// mesh's mutual TLS and forwards the calls, and probes it with
// grpc.health.v1.Health/Check (`--health-grpc`).
//
//   greeter.Greeter/SayHello    unary: one HelloReply
//   greeter.Greeter/SayHellos   server streaming: STREAM_COUNT HelloReplies
//   grpc.health.v1.Health/Check SERVING, NOT_SERVING once stopping
//
// Every reply names the instance that made it (served_by): $INSTANCE, else
// hostname:port.

const os = require('node:os');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const SERVICE = 'greeter';
const STREAM_COUNT = 3;
const STREAM_INTERVAL_MS = Number(process.env.STREAM_INTERVAL_MS || 100);
const SHUTDOWN_TIMEOUT_MS = Number(process.env.SHUTDOWN_TIMEOUT_MS || 10000);

const LOADER_OPTIONS = { keepCase: true, longs: String, enums: String, defaults: true, oneofs: true };

function load(file) {
  return grpc.loadPackageDefinition(protoLoader.loadSync(path.join(__dirname, file), LOADER_OPTIONS));
}

const greeterProto = load('greeter.proto').greeter;
const healthProto = load('health.proto').grpc.health.v1;

// The services the health check answers for: '' is the whole server.
const HEALTH_SERVICES = new Set(['', 'greeter.Greeter']);

function nameOf(request) {
  return request.name ? request.name : 'world';
}

function createServer(servedBy, health) {
  const server = new grpc.Server();

  server.addService(greeterProto.Greeter.service, {
    SayHello(call, callback) {
      callback(null, { message: `Hello, ${nameOf(call.request)}!`, served_by: servedBy() });
    },

    SayHellos(call) {
      const name = nameOf(call.request);
      let sent = 0;
      let timer = null;
      const tick = () => {
        if (call.cancelled) return;
        sent += 1;
        call.write({ message: `Hello, ${name}! (${sent} of ${STREAM_COUNT})`, served_by: servedBy() });
        if (sent >= STREAM_COUNT) {
          call.end();
        } else {
          timer = setTimeout(tick, STREAM_INTERVAL_MS);
        }
      };
      call.on('cancelled', () => clearTimeout(timer));
      tick();
    },
  });

  server.addService(healthProto.Health.service, {
    Check(call, callback) {
      const asked = call.request.service || '';
      if (!HEALTH_SERVICES.has(asked)) {
        callback({ code: grpc.status.NOT_FOUND, details: `unknown service ${JSON.stringify(asked)}` });
        return;
      }
      callback(null, { status: health.serving ? 'SERVING' : 'NOT_SERVING' });
    },
  });

  return server;
}

function main() {
  const host = process.env.HOST || '0.0.0.0';
  const port = Number(process.env.PORT || 50051);
  const health = { serving: true };
  let boundPort = port;
  const servedBy = () => process.env.INSTANCE || `${os.hostname()}:${boundPort}`;
  const server = createServer(servedBy, health);

  server.bindAsync(`${host}:${port}`, grpc.ServerCredentials.createInsecure(), (err, bound) => {
    if (err) {
      console.error(`${SERVICE}: cannot listen on ${host}:${port}: ${err.message}`);
      process.exit(1);
    }
    boundPort = bound; // the one chosen when PORT is 0; grpc-js >= 1.10 serves once bound
    console.log(`${SERVICE} gRPC listening on ${host}:${bound} (served_by ${servedBy()})`);
  });

  // Answer NOT_SERVING to health checks, stop accepting calls, let the ones in
  // flight finish and exit 0. Calls still running after SHUTDOWN_TIMEOUT_MS
  // are cancelled and the exit code is 1.
  let stopping = false;
  const stop = (signal) => {
    if (stopping) return;
    stopping = true;
    health.serving = false;
    console.log(`${SERVICE}: ${signal} received, closing`);
    const timer = setTimeout(() => {
      console.error(`${SERVICE}: calls still running after ${SHUTDOWN_TIMEOUT_MS} ms, exiting`);
      server.forceShutdown();
      process.exit(1);
    }, SHUTDOWN_TIMEOUT_MS);
    timer.unref();
    server.tryShutdown((err) => {
      clearTimeout(timer);
      if (err) console.error(`${SERVICE}: shutdown: ${err.message}`);
      process.exit(err ? 1 : 0);
    });
  };
  process.on('SIGTERM', () => stop('SIGTERM'));
  process.on('SIGINT', () => stop('SIGINT'));
}

if (require.main === module) {
  main();
}

module.exports = { createServer };
