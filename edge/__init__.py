"""Edge agent: finds every heartbeat of a live ECG stream and replaces it with a synthetic surrogate.

The edge never imports torch or the trainer; the beat codec here is the contract both sides share.
"""

__version__ = "0.1.0"

import warnings as _warnings

# wfdb 4.3 calls DataFrame.set_index/drop(inplace=True), which pandas 3.1 deprecates on every call;
# the edge's users cannot act on it (the test suite filters the same messages in pyproject.toml).
_warnings.filterwarnings("ignore", message="The inplace keyword in DataFrame", module="wfdb")
