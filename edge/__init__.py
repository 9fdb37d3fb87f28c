"""Edge agent: finds every heartbeat of a live ECG stream and replaces it with a synthetic surrogate.

The edge never imports torch or the trainer; the beat codec here is the contract both sides share.
"""

__version__ = "0.1.0"
