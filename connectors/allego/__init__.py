"""Allego's product stores: their mappings, `stores.toml`, and the demo data generator."""
