"""The agile loop's Kafka-free and model-free pieces: a moderator's label and its validation
(`labels`), the durable label store (`store`), and the rule that decides a promotion
(`promotion`). The learner process that trains and publishes with them is a tool
(`moderation_worker/tools/learning/`), like the console that sends labels.
"""
