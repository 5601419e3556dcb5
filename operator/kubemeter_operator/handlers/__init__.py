"""kopf handlers, one module per kind; ``main.py`` registers them."""
