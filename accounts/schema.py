"""Tells drf-spectacular how Turbo tokens are sent, so Swagger UI can authorize."""

from drf_spectacular.extensions import OpenApiAuthenticationExtension


class TokenAuthenticationScheme(OpenApiAuthenticationExtension):
    target_class = "accounts.auth.TokenAuthentication"
    name = ["bearerAuth", "cookieAuth"]

    def get_security_definition(self, auto_schema):
        return [
            {"type": "http", "scheme": "bearer", "description": "a Turbo session token or JWT"},
            {"type": "apiKey", "in": "cookie", "name": "sess"},
        ]
