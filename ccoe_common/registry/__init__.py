"""Registry: Redis store, rollouts, client (the registry issue), and the embedded Redis server."""
