"""The OpenAI-compatible HTTP frontend.

    backend.py   Backend (the protocol the HTTP layer talks to), LocalBackend, and
                 exception_of: what each StreamError code raises
    schemas.py   OpenAI request and response bodies
    serving.py   one request from body to response (chat and completions)
    choices.py   ChoiceStreams: the n backend requests behind one HTTP request
    metrics.py   Prometheus metrics
    app.py       create_app(backend) -> FastAPI

Nothing here imports torch; LocalBackend loads the engine only when asked to.
"""
