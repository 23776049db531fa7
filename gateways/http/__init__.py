"""The HTTP gateway: a QuartTrio app over a Runtime (serve it with gateways.http_server)."""

from gateways.http.app import create_app

__all__ = ["create_app"]
