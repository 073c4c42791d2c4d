"""Local `evaluate` metric module (loaded with `evaluate.load(<this folder>)`); a package only so that it ships."""
