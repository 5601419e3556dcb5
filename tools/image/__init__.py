"""Build the Dockerfile's image without Docker or a registry (docs/install.md, "The image without Docker")."""
