"""moderation-worker: agile hate-speech classification with a LoRA-tuned Gemma, on a Kafka stream.

The core (this package) knows nothing of Kafka; `adapters/` holds the edges.
"""

__version__ = "0.1.0"
