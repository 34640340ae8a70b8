"""The learner process of the agile loop (`moderation-worker learn`): a tool like the console,
outside the scoring runtime. `cycle` trains and judges a candidate, `coordinator` decides what
to publish, `learner` moves labels and control records over Kafka. The Kafka-free pieces it
builds on (labels, their store, the promotion rule) are in `moderation_worker/loop/`.
"""
