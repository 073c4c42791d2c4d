"""Local `evaluate` metric modules for generated reports, one folder each, loaded with `evaluate.load(<folder>)`."""
