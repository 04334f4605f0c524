"""The protocol wing: HTTP as the sidecar speaks it, with no knowledge of the mesh.

- `listener.py`  listening sockets: bind, accept in batches, stop with a grace period;
- `server.py`    the HTTP/1.1 server side of one client connection (llhttp): limits,
                 timeouts, pipelining, parse errors answered in the sidecar's error format;
- `messages.py`  the `Request` a handler gets and the `Response` it returns;
- `client.py`    the HTTP/1.1 client: keep-alive connections pooled per endpoint;
- `headers.py`   the header rules every hop shares (hop-by-hop, request id, forwarding
                 headers, the chunked-only rule);
- `tunnel.py`    WebSocket upgrades, carried as raw bytes once the endpoint answers 101.

Nothing here imports the proxy layer (`forward`, `inbound`, `outbound`, discovery,
balancing, retries); the one module it shares with it is `sidecar.errors`, the sidecar's
own error answers.
"""
