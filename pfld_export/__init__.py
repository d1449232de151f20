"""pfld-export: get a PFLD facial landmark detector onto a phone, and prove the landmarks did not move."""

__version__ = "0.1.0"
