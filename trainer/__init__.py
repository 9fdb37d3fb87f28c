"""Trainer: learns the beat generator and classifier from PhysioNet ECG and exports them as ONNX.

It imports the beat codec and the record conventions from the edge package, never the reverse.
"""

__version__ = "0.1.0"
