// The gRPC backend of bench/'s gRPC rows on Node (@grpc/grpc-js), the same two methods as
// bench/grpc_backend.py: /bench.Echo/Unary answers a fixed small message, /bench.Echo/Caller
// the x-sidecar-caller it was called with. Raw bytes in and out, no .proto.
//
//     NODE_PATH=<a node_modules holding @grpc/grpc-js> node bench/grpc_backend.js PORT
//
// bench/run.py uses it (--grpc-backend node, or auto when @grpc/grpc-js resolves) because it
// answers about twice the calls per core of grpcio's server, so that it limits no row.
'use strict';
const grpc = require('@grpc/grpc-js');

const REPLY = Buffer.from([0x0a, 0x05, 0x68, 0x65, 0x6c, 0x6c, 0x6f]); // field 1: "hello"
const raw = (b) => b;
const method = (path) => ({
  path,
  requestStream: false,
  responseStream: false,
  requestSerialize: raw,
  requestDeserialize: raw,
  responseSerialize: raw,
  responseDeserialize: raw,
});

const server = new grpc.Server({ 'grpc.max_concurrent_streams': 1000 });
server.addService(
  { Unary: method('/bench.Echo/Unary'), Caller: method('/bench.Echo/Caller') },
  {
    Unary: (call, cb) => cb(null, REPLY),
    Caller: (call, cb) => {
      const seen = call.metadata.get('x-sidecar-caller');
      cb(null, Buffer.from(seen.length ? String(seen[0]) : ''));
    },
  },
);
const port = Number(process.argv[2]);
server.bindAsync(`127.0.0.1:${port}`, grpc.ServerCredentials.createInsecure(), (err, bound) => {
  if (err || bound !== port) {
    // the bench reads this as a port that was taken (see harness.ADDRESS_IN_USE_RE)
    console.log(`cannot bind 127.0.0.1:${port}: address already in use (${err})`);
    process.exit(98);
  }
  console.log(`grpc backend (node) on 127.0.0.1:${port}`);
});
// The bench is over: calls in flight are cancelled, connections dropped.
const stop = () => {
  server.forceShutdown();
  process.exit(0);
};
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
