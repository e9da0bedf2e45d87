"""moderator: streaming content moderation on Kafka with CLIP.

The serving path (``moderator.encode`` and the stages after it) imports no torch;
``moderator.model`` holds the export / train tools that need the ``train`` extra.
"""

__version__ = "0.1.0"
