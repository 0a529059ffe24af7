"""edgetk."""
