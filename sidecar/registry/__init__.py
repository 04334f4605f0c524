"""Registry backends: the interface (base), the embedded SQLite registry (local), Consul (consul)."""
