"""The unified dashboard: a separate web process that shows the events the shells push to Redis.

command.py (click options, light) -> server.py (Starlette app, uvicorn) -> hub.py (the one Redis
subscription shared by every viewer) -> sse.py (one viewer's event stream). Nothing here is
imported by the shell's start-up except command.py.
"""
