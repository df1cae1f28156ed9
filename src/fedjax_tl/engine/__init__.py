"""The compiled round's pieces that every round path shares (state.py)."""
