"""The dashboard: server-rendered pages over the services the CLI calls (``mloop ui``)."""

from mloop.ui.app import create_ui_app

__all__ = ["create_ui_app"]
