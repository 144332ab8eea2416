"""OpenAI-compatible HTTP serving: one worker thread owns the engine and serves a bounded request queue.

`create_app` is imported lazily so that `draftsmith --help` does not pay for importing FastAPI.
"""


def __getattr__(name: str):
    if name == "create_app":
        from draftsmith.serve.app import create_app

        return create_app
    raise AttributeError(name)


__all__ = ["create_app"]
