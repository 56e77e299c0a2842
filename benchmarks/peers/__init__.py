"""Benchmark adapters for peer job queues (Celery, RQ, procrastinate)."""
