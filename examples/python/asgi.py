"""A minimal ASGI app for uvicorn under `cluster --listen`:

    cluster --workers 2 --listen 127.0.0.1:8080 -- python3 -m uvicorn --fd 3 --app-dir examples/python asgi:app

uvicorn serves from descriptor 3 (the watcher's socket) and stops
gracefully on SIGTERM.
"""

import os


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    pid = str(os.getpid())
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain"), (b"x-pid", pid.encode())],
        }
    )
    await send({"type": "http.response.body", "body": f"Hello from pid {pid}\n".encode()})
