"""uvicorn factories for ``benchmarks/scaling.py``: the FastAPI example in each mode."""

from __future__ import annotations

import fastapi_app
from fastapi import FastAPI


def batchkit_app() -> FastAPI:
    return fastapi_app.create_app("batchkit")


def naive_app() -> FastAPI:
    return fastapi_app.create_app("naive")
