"""The coordinator: the only listener; runs rounds, validates and aggregates updates."""
