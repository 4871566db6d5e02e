"""The audit of a difusor's public copy (``prep-agent audit``): ``check`` decides,
``fetch`` does the bounded HTTP GETs."""
