"""alignserve: OpenAI-compatible server for test-time alignment on its own paged engine."""
