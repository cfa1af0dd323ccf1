"""Small shared utilities (pure Python / torch)."""
