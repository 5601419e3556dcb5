"""``kubemeter sink``: a local billing API (OpenMeter-, Flexprice-, Lago- and CloudEvents-compatible
ingest with each API's deduplication, stored in SQLite, queryable). The default target of the demo
and of the tests."""
