"""The embedded default demo: dataset generator, pipeline, plots and the reproduce script."""
