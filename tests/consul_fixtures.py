"""Pytest fixtures around the Consul test agent (tests/consul_agent.py)."""
