"""Data: embedded sample, record format, grain pipelines, prompt sampling, preparation."""
