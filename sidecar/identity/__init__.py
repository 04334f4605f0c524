"""Workload identities for mutual TLS: where a sidecar's certificate comes from.

`base.py` is the interface; `local.py` (a CA beside the local registry), `consul.py`
(Consul's Connect CA through the agent) and `files.py` (PEM files written by something
else) are the sources, shaped like `sidecar/registry/`.
"""
