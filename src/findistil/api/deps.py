"""Shared dependencies of the API routes, as ``Annotated`` aliases.

The app's lifespan (``api/app.py``) opens the settings, the flywheel DB, the log store, the
artefact store, the student cache and the runner once and keeps them on ``app.state``;
routes take them through these aliases, so a handler reads ``def get(db: DBDep)`` and
knows nothing of where they came from.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request

from findistil.config import Settings


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_db(request: Request) -> Any:
    """The ``flywheel.db.FlywheelDB`` of this app."""
    return request.app.state.db


def get_store(request: Request) -> Any:
    """The ``logstore.LogStore`` the jobs read their records from."""
    return request.app.state.store


def get_artifacts(request: Request) -> Any:
    """The ``artifacts.ArtifactStore`` job artefacts live in."""
    return request.app.state.artifacts


def get_cache(request: Request) -> Any:
    """This process's ``students.cache.StudentCache`` (shared with the thread runner)."""
    return request.app.state.student_cache


def get_batcher(request: Request) -> Any:
    """This app's ``serving.MicroBatcher`` (concurrent /v1 requests answered together)."""
    return request.app.state.batcher


def get_runner(request: Request) -> Any:
    """The job runner (``flywheel.runner.Runner``), or None when the app runs without one."""
    return request.app.state.runner


SettingsDep = Annotated[Settings, Depends(get_settings)]
DBDep = Annotated[Any, Depends(get_db)]
StoreDep = Annotated[Any, Depends(get_store)]
RunnerDep = Annotated[Any, Depends(get_runner)]
ArtifactsDep = Annotated[Any, Depends(get_artifacts)]
CacheDep = Annotated[Any, Depends(get_cache)]
BatcherDep = Annotated[Any, Depends(get_batcher)]
