"""micro-sidecar: a per-service sidecar proxy for apps in any language."""

__version__ = "0.1.0"
