"""Experiments built on fra's pipeline: applications of the library, which the library never imports."""
