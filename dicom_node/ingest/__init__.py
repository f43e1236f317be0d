"""Ingest: receive (C-ECHO, C-STORE, commitment reports, MPPS), check, store durably, index,
and tell when a study is complete. Knows nothing of jobs or delivery."""
