"""Real services started by the tests on loopback."""
