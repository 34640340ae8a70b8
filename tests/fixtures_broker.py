"""Fixtures for Kafka-protocol brokers (filled in by the worker tests)."""
