"""The agile loop: moderator labels in, a candidate adapter out, promoted only when it wins.

A layer of its own between the model package and the edges: it trains and scores through
`moderation_worker.model`, keeps labels in files, and decides promotions, but never speaks
Kafka (`adapters/learner.py` does, and runs it in the `moderation-worker learn` process).
"""
