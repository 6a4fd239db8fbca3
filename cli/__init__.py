"""The `vlm` command line: thin commands that parse, call the runtime and render with rich."""
