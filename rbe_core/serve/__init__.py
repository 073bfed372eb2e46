"""``rbe serve``: an OpenAI-compatible HTTP server for .rbe models, with a web page.

``app.create_app(Settings(...))`` builds the FastAPI application (routes, errors, auth, limits);
``store`` holds the loaded models; ``worker`` runs each causal LM's requests in a thread of its own,
in batched engine rounds on a native engine; ``metrics`` renders Prometheus text; ``page.html`` is the page.
Needs the ``serve`` extra (FastAPI, uvicorn).
"""
