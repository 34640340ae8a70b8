"""The moderator console: the live stream, the operating point on the curve, a review queue.

`moderation-worker console` serves it (`app.py`) from what `feed.py` reads off the topics into
`state.py`; the page (`static/`) is plain HTML and JavaScript, no build step.
"""
