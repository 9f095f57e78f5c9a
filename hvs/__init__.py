"""hvs: compatibility-aware heterogeneous visual search (CMP-NAS, CVPR 2021).

A large gallery model and a small query model share one embedding space, so queries run cheaply
while accuracy stays near the large model's (the paragon).
"""

__version__ = "0.1.0"
