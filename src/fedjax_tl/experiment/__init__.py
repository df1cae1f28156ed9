"""The experiment layer: config keys (keys.py) and, around them, the host side."""
