"""Jobs built from several analyses: the localization diagnostic and sequential-edit stress tests."""
