"""Test-time alignment methods as request options (plug-ins over the engine primitives)."""
