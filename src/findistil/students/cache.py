"""The per-process student cache: loaded models, shared by the flywheel's stages and serving.

Stages never hand a loaded model to each other: each asks this cache for the student it needs
(``with cache.use(model, kind, settings, adapter=path) as student``), so any stage can run in
any process, and in the process that ran the previous stage it finds the model still loaded.
Serving asks the same cache, so a student that a job just tuned answers without a reload.

Entries are keyed by (model id, kind); the adapter (a LoRA folder, a tuned encoder head) is
switched in place under the entry's lock: a causal LM keeps every adapter it loaded and
swaps between them, an encoder keeps its last few tuned heads. The cache is bounded
(``student_cache_size``, least recently used first out); an entry in use is never evicted.
One user at a time per entry: a student's active adapter is state of the loaded model.

    with shared_cache().use("HuggingFaceTB/SmolLM2-135M-Instruct", "causal_lm", settings) as s:
        s.predict([messages])
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from findistil.config import Settings
from findistil.students.base import Student

_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}  # per parameter (registry's dtype names)


@dataclass
class _Entry:
    lock: threading.Lock = field(default_factory=threading.Lock)
    student: Student | None = None
    users: int = 0


class StudentCache:
    """At most ``capacity`` loaded students (more only while all of them are in use)."""

    def __init__(self, capacity: int = 2) -> None:
        self.capacity = max(1, capacity)
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0  # how many times a model was loaded (tests, /health)

    @contextlib.contextmanager
    def use(
        self, model_name: str, kind: str, settings: Settings, *, adapter: Path | None = None
    ) -> Iterator[Student]:
        """The student ``model_name`` with ``adapter`` active (``None``: the base model)."""
        from findistil.students import resolve_kind

        key = (model_name, resolve_kind(model_name, kind, settings))
        with self._lock:
            entry = self._entries.setdefault(key, _Entry())
            self._entries.move_to_end(key)
            entry.users += 1
        try:
            with entry.lock:
                if entry.student is None:
                    entry.student = self._load(model_name, key[1], settings)
                entry.student.use_tuned(adapter)
                yield entry.student
        finally:
            with self._lock:
                entry.users -= 1
                if entry.student is None and entry.users == 0:  # the load failed
                    self._entries.pop(key, None)
            self._trim()

    def warm(
        self,
        model_name: str,
        kind: str,
        settings: Settings,
        should_stop: Callable[[], bool] = lambda: False,
        poll_s: float = 0.2,
    ) -> bool:
        """Load ``model_name`` into the cache unless it is there; True once it is.

        A cold load cannot be interrupted (``from_pretrained``, a GGUF conversion), so it runs
        on a thread and this waits, asking ``should_stop`` every ``poll_s``: False as soon as
        it says stop. The load then finishes in the background and stays cached for the next
        user. A failed load raises here.
        """
        from findistil.students import resolve_kind

        key = (model_name, resolve_kind(model_name, kind, settings))
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.student is not None:
                return True
        done, failure = threading.Event(), []

        def load() -> None:
            try:
                with self.use(model_name, kind, settings):
                    pass
            except BaseException as exc:  # handed to the waiting caller
                failure.append(exc)
            finally:
                done.set()

        threading.Thread(target=load, name=f"load {model_name}", daemon=True).start()
        while not done.wait(poll_s):
            if should_stop():
                return False
        if failure:
            raise failure[0]
        return True

    def _load(self, model_name: str, kind: str, settings: Settings) -> Student:
        from findistil.students import load_student

        student = load_student(model_name, kind, settings)
        self.loads += 1
        return student

    def _trim(self) -> None:
        closing = []
        with self._lock:
            idle = [k for k, e in self._entries.items() if e.users == 0]
            while len(self._entries) > self.capacity and idle:
                closing.append(self._entries.pop(idle.pop(0)))
        for entry in closing:
            if entry.student is not None:
                entry.student.close()

    def loaded(self) -> list[tuple[str, str]]:
        """``(model, kind)`` of every loaded student, least recently used first."""
        with self._lock:
            return [k for k, e in self._entries.items() if e.student is not None]

    def describe(self) -> list[dict]:
        """Each loaded student (least recently used first) with its weights' size in MB
        (parameters x bytes per parameter of its dtype), for ``/health``."""
        with self._lock:
            loaded = [(k, e.student, e.users) for k, e in self._entries.items() if e.student]
        return [
            {
                "model": model,
                "kind": kind,
                "in_use": users > 0,
                "params": int(getattr(student, "num_params", 0) or 0),
                "weights_mb": round(
                    int(getattr(student, "num_params", 0) or 0)
                    * _BYTES.get(str(getattr(student, "dtype", "")), 4)
                    / 2**20,
                    1,
                ),
            }
            for (model, kind), student, users in loaded
        ]

    def clear(self) -> None:
        """Close every student not in use (a worker shutting down, a test)."""
        with self._lock:
            idle = [k for k, e in self._entries.items() if e.users == 0]
            closing = [self._entries.pop(k) for k in idle]
        for entry in closing:
            if entry.student is not None:
                entry.student.close()


_SHARED: StudentCache | None = None
_SHARED_LOCK = threading.Lock()


def shared_cache(capacity: int | None = None) -> StudentCache:
    """This process's cache (created on first use; ``capacity`` applies then and grows it)."""
    global _SHARED
    with _SHARED_LOCK:
        if _SHARED is None:
            _SHARED = StudentCache(capacity or 2)
        elif capacity and capacity > _SHARED.capacity:
            _SHARED.capacity = capacity
        return _SHARED
