"""Drafters: each proposes a Draft for the target to verify. The contract every drafter inherits is in
`base.py`, one small module per drafter, and `registry.py` builds them by name."""
