"""The edges of moderation-worker: Faust/Kafka transport, codecs, brokers and model sources."""
