"""Benchmarks: load generator for any OpenAI server, peers, kernel microbenchmarks, quality."""
