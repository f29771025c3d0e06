"""Benchmarks for the privacy-request pipeline (see bench/README.md)."""
