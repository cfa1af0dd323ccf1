"""fra: Facial Region Awareness pretraining on Ray."""
__version__ = "0.1.0"
