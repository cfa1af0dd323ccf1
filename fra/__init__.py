"""fra: Facial Region Awareness pretraining on Ray."""
from fra.redaction import install_log_redaction

__version__ = "0.1.0"

# Every fra.* log line is redacted when created (URI credentials, secret values): fra.redaction.
install_log_redaction()
