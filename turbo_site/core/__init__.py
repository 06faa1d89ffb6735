"""Plain shared code (errors, HTTP helpers, middleware) that imports no Turbo app."""
