"""Post-training commands (``ftframe generate / evaluate / merge / export / compare``), each a typed library function
that the CLI wraps and tests call directly. See ``docs/design.md`` for where each concern lives."""
