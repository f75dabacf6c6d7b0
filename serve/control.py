"""Model control while the server runs: load, unload and list model versions (Triton's model repository extension,
explicit mode, with its `latest` version policy), and `--poll`.

One transport-neutral object, `ModelControl`, hung on the InferenceService (`service.control`): HTTP's
/v2/repository routes (serve.routes) and gRPC's RepositoryModelLoad / RepositoryModelUnload / RepositoryIndex call
the same `load`, `unload` and `index`; each refusal is a serve.protocol.RequestError with an HTTP status.

A load never drops a request (serve.workers says why kiln starts the workers itself, not LitServe):
1. the version is checked in a thread first (manifest, variant, every file's sha256, runtime: what the start
   checks), so a damaged folder is refused before any process starts, and the serving version is untouched;
2. a new WorkerGateway on its own socket, and the version's workers started beside the running ones;
3. once all of them said Hello (loaded and warmed up), the version is registered, and the unversioned routes
   switch to it if it is the newest ready one (one dict assignment on the event loop: a request is routed either
   before or after, never half-way);
4. the versions the policy no longer serves (latest: one) are retired: taken out of the routes, then drained (the
   gateway waits until every request it accepted is answered; no await lies between a request's lookup and its
   submission, so none can slip in after), then their gateway stopped and their workers stopped.

A version that fails (its check, or a worker that dies while loading) is recorded with its reason, shown by the
index, and the serving version stays; `--poll` does not try it again until its manifest changes.

The workers LitServe started with the server are retired too, though LitServe's monitor restarts whatever exits:
a marker file beside the version's socket tells a restarted worker to idle without loading its model
(serve.api.KilnAPI.setup), and the HTTP process then SIGTERMs the workers that said Hello on that socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.core.errors import KilnError, one_line
from kiln.core.manifest import MANIFEST_NAME
from kiln.serve.inference import Endpoint
from kiln.serve.protocol import RequestError

READY, LOADING, UNLOADING, UNAVAILABLE = "READY", "LOADING", "UNLOADING", "UNAVAILABLE"
LOAD_TIMEOUT_S = 600.0  # a version's workers must be loaded and warmed up by then (large models on one core: minutes)
RETIRED_SUFFIX = ".retired"  # beside a retired version's socket: its workers, if restarted, idle


def retired_marker(channel_path: str) -> str:
    return channel_path + RETIRED_SUFFIX


@dataclass
class Version:
    """One version of one model, as the server knows it: served, loading, retired or refused (with why)."""

    name: str
    version: str
    folder: str | None
    state: str
    reason: str = ""
    endpoint: Endpoint | None = None
    plan: Any = None  # serve.repository.ModelPlan, once checked
    workers: Any = None  # serve.workers.ModelWorkers where kiln started them; None: LitServe's (or none)
    api: Any = None  # the KilnAPI its workers run (to restart one that crashes)
    stamp: float = 0.0  # its manifest's mtime when it was tried: a refused version is retried once it changes
    restarts: int = 0

    def entry(self) -> dict:
        """Its row in the repository index (Triton's shape: name, version, state, reason)."""
        ready = self.state == READY and self.endpoint is not None and self.endpoint.gateway.ready()
        row = {"name": self.name, "version": self.version, "state": READY if ready else
               (self.state if self.state != READY else UNAVAILABLE)}
        reason = self.reason
        if self.state == READY and not ready and self.endpoint is not None:
            gateway = self.endpoint.gateway
            reason = (f"{gateway.connected} of {gateway.expected} inference workers connected (starting, or "
                      "restarting after a crash)")
        if reason:
            row["reason"] = reason
        return row


def _manifest_stamp(folder: Path) -> float:
    try:
        return (folder / MANIFEST_NAME).stat().st_mtime
    except OSError:
        return 0.0


@dataclass
class _Model:
    versions: dict[str, Version] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    model_folder: Path | None = None  # a model folder of numbered versions, where the model has one
    unloaded: bool = False  # unloaded on request: --poll leaves it unloaded until a load names it again


class ModelControl:
    """Loads, unloads and lists the versions of the served models while the server runs (module docstring).

    `service`: the InferenceService whose `endpoints` (the unversioned routes: each model's newest ready version)
    and `versions` (every ready version) this object alone changes after the start."""

    def __init__(self, service, config, state_dir: str, metrics, started: list[Version], next_index: int,
                 parts, info) -> None:
        """`parts(plan, channel_path, metrics)` -> (ServedModel, KilnAPI, WorkerGateway) and `info(plan)` -> its
        kiln_info labels: serve.server's model_parts and info_labels, which build the versions served at start."""
        from kiln.serve.repository import repository_roots

        self.parts = parts
        self.info = info
        self.service = service
        self.config = config
        self.state_dir = state_dir
        self.metrics = metrics
        self.roots = repository_roots(config.artifact_dirs)
        self.models: dict[str, _Model] = {}
        self._indexes = iter(range(next_index, 1 << 30))
        self._tasks: list[asyncio.Task] = []
        self._closing = False
        for version in started:
            model = self._model(version.name)
            model.versions[version.version] = version
            if version.plan is not None:
                self._note_folder(model, Path(version.plan.folder), version.version)
                for skipped, reason in version.plan.skipped:
                    folder = Path(version.plan.folder).parent / skipped
                    model.versions[skipped] = Version(version.name, skipped, str(folder), UNAVAILABLE,
                                                      f"failed to load: {reason}", stamp=_manifest_stamp(folder))

    # --- the three calls ---------------------------------------------------------------------------------------

    async def load(self, name: str, folder: str | None = None) -> Version:
        """Loads the model's newest version on disk (or the artifact folder `folder`, a path inside a served
        repository) and serves it once ready; the version it replaces is drained and retired. Loading what already
        serves changes nothing. Raises RequestError: 404 no such model, 400 a folder refused or a version that
        failed to load (the serving version stays), 409 while the server stops."""
        from kiln.core.paths import MODEL_NAME, MODEL_NAME_RULE

        if not MODEL_NAME.fullmatch(name):
            raise RequestError(f"model name {name[:130]!r} is not {MODEL_NAME_RULE}", 400)
        if self._closing:
            raise RequestError("the server is stopping; no model is loaded now", 409)
        model = self._model(name)
        try:
            async with model.lock:
                version, path = await asyncio.to_thread(self._candidate, name, self._snapshot(model), folder,
                                                        self._folders())
                known = model.versions.get(version)
                if known is not None and known.state == READY and known.folder == str(path.resolve()):
                    return known  # already serving: nothing to do
                model.unloaded = False
                return await self._load_version(model, name, version, path)
        finally:
            if not model.versions and self.models.get(name) is model:
                del self.models[name]  # a name that never loaded leaves nothing behind

    async def unload(self, name: str, version: str | None = None) -> list[Version]:
        """Retires the model (every version, or only `version`): its routes stop taking requests at once (404 once
        no version is left), the requests it accepted are answered, then its workers stop. Raises RequestError
        404 where nothing of that name (or version) is loaded."""
        model = self.models.get(name)
        if model is None:
            raise RequestError(f"no model named {name!r} is loaded", 404)
        async with model.lock:
            loaded = [v for v in model.versions.values() if v.state == READY and (version in (None, v.version))]
            if not loaded:
                which = f"version {version!r} of model {name!r}" if version else f"model {name!r}"
                raise RequestError(f"{which} is not loaded", 404)
            model.unloaded = not any(v.state == READY for v in model.versions.values() if v not in loaded)
            for item in loaded:
                item.state = UNLOADING
                item.reason = "unloading: draining the requests in flight"
            self._route(name)
            await asyncio.gather(*(self._retire(item, "unloaded") for item in loaded))
            return loaded

    def index(self, ready_only: bool = False) -> list[dict]:
        """Every version of every model the server knows, with its state and, where not READY, why; the versions a
        model folder holds that were never loaded (an older one the policy passes over) too."""
        rows = []
        for name, model in self.models.items():
            versions = dict(model.versions)
            if model.model_folder is not None:
                from kiln.serve.repository import version_folders

                for number, folder in version_folders(model.model_folder):
                    if number not in versions:
                        versions[number] = Version(name, number, str(folder), UNAVAILABLE,
                                                   "not loaded (policy: the newest version that loads serves)")
            for number in sorted(versions, key=_version_key):
                row = versions[number].entry()
                if not ready_only or row["state"] == READY:
                    rows.append(row)
        return rows

    # --- poll, supervision, stop -------------------------------------------------------------------------------

    def start(self) -> None:
        """In the HTTP process, once its loop runs: the watch over kiln-started workers, and --poll's."""
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._supervise()))
        if getattr(self.config, "poll_s", None):
            self._tasks.append(loop.create_task(self._poll_forever(self.config.poll_s)))

    async def close(self) -> None:
        """Stops the watches, every gateway and every worker kiln started (the server is stopping)."""
        self._closing = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        stopping = []
        for model in self.models.values():
            for version in model.versions.values():
                if version.endpoint is not None:
                    await version.endpoint.gateway.stop()
                if version.workers is not None:
                    stopping.append(asyncio.to_thread(version.workers.retire, 10.0))
        await asyncio.gather(*stopping, return_exceptions=True)

    async def poll(self) -> list[Version]:
        """One look at the repositories (Triton's poll mode): a new version of a served model, or a new model, is
        loaded. A version that failed is tried again only once its manifest changes. Removed folders are left
        serving (their workers hold the model already)."""
        loaded = []
        for name, path, version in await asyncio.to_thread(self._discover, self._folders()):
            model = self._model(name)
            async with model.lock:
                if model.unloaded or not self._new(model, path, version):
                    continue
                with contextlib.suppress(RequestError):
                    loaded.append(await self._load_version(model, name, version, path))
            if not model.versions and self.models.get(name) is model:
                del self.models[name]
        return loaded

    @staticmethod
    def _new(model: _Model, path: Path, version: str) -> bool:
        """Whether --poll loads `path` as `version`: newer than every version serving (or none serves), and not a
        version already tried from this folder whose manifest has not changed since."""
        folder = str(path.resolve())
        for known in model.versions.values():
            if known.state in (READY, LOADING, UNLOADING) and _version_key(known.version) >= _version_key(version):
                return False
            if known.folder == folder and known.state == UNAVAILABLE and known.stamp == _manifest_stamp(path):
                return False
        return True

    async def _poll_forever(self, every_s: float) -> None:
        while True:
            await asyncio.sleep(every_s)
            try:
                await self.poll()
            except Exception as error:  # a poll that fails (a folder removed mid-scan) is tried again next time
                print(f"kiln: warning: --poll: {one_line(error)}", flush=True)

    async def _supervise(self) -> None:
        """Restarts a kiln-started worker that died (LitServe's monitor watches only the workers it started)."""
        while True:
            await asyncio.sleep(2.0)
            for model in list(self.models.values()):
                for version in list(model.versions.values()):
                    if version.state == READY and version.workers is not None and version.api is not None:
                        restarted = version.workers.restart_dead(version.api)
                        if restarted:
                            version.restarts += restarted
                            print(f"kiln: {version.name} version {version.version}: {restarted} worker(s) died; "
                                  "restarted", flush=True)

    # --- internals ---------------------------------------------------------------------------------------------

    def _model(self, name: str) -> _Model:
        model = self.models.get(name)
        if model is None:
            model = self.models[name] = _Model()
        return model

    @staticmethod
    def _note_folder(model: _Model, folder: Path, version: str) -> None:
        from kiln.serve.repository import VERSION

        if VERSION.fullmatch(version) and folder.name == version and folder.parent.is_dir():
            model.model_folder = folder.parent

    def _inside_roots(self, folder: str) -> Path:
        """`folder` as a path inside one of the served repositories (core.paths' rule: symlinks resolved, nothing
        outside); 400 otherwise."""
        from kiln.core.errors import ManifestError
        from kiln.core.paths import inside

        if not isinstance(folder, str) or not folder:
            raise RequestError("parameters.folder must be a non-empty string: a folder inside the repository", 400)
        if not self.roots:
            raise RequestError("this server was started with artifact folders only, no repository: a folder can be "
                               "loaded only from inside a repository it serves (kiln serve REPOSITORY)", 400)
        errors = []
        for root in self.roots:
            try:
                path = inside(root, folder, "folder", ManifestError, "name a folder inside the repository")
            except ManifestError as error:
                errors.append(str(error))
                continue
            if path.is_dir():
                return path
            errors.append(f"{folder!r} is not a folder inside {str(root)!r}")
        raise RequestError(errors[0] if len(errors) == 1 else "; ".join(errors), 400)

    def _folders(self) -> dict[str, str]:
        """{artifact folder: model name} of every version tried: a snapshot taken on the event loop for a thread."""
        return {v.folder: name for name, model in self.models.items() for v in model.versions.values() if v.folder}

    @staticmethod
    def _snapshot(model: _Model) -> list[tuple[str, str | None]]:
        return [(v.version, v.folder) for v in model.versions.values()]

    def _candidate(self, name: str, versions: list[tuple[str, str | None]], folder: str | None,
                   folders: dict[str, str]) -> tuple[str, Path]:
        """(version, artifact folder) that a load of `name` means (`versions`: the model's (version, folder) pairs);
        in a thread, as it reads folders, so it reads only the snapshots it is given of what the loop changes."""
        from kiln.serve.repository import VERSION, version_folders

        known = [int(v) for v, _ in versions if VERSION.fullmatch(v)]
        if folder is not None:
            path = self._inside_roots(folder)
            versions = version_folders(path) if not (path / MANIFEST_NAME).is_file() else ()
            if versions:
                return versions[0]
            if not (path / MANIFEST_NAME).is_file():
                raise RequestError(f"folder {folder!r} holds no {MANIFEST_NAME} and no version folders (NAME/1/); "
                                   "name an artifact folder written by `kiln export`", 400)
            if VERSION.fullmatch(path.name) and path.parent.name == name:
                return path.name, path
            return str(max(known, default=0) + 1), path  # a folder of another name: the model's next version
        for found_name, path, version in self._discover(folders):
            if found_name == name:
                return version, path
        for number, known_folder in versions:  # a lone artifact folder: loaded again from where it was
            if known_folder is not None and (Path(known_folder) / MANIFEST_NAME).is_file():
                return number, Path(known_folder)
        raise RequestError(f"no model named {name!r} in the served repositories "
                           f"({', '.join(str(r) for r in self.roots) or 'none: only artifact folders were given'})",
                           404)

    def _discover(self, folders: dict[str, str]) -> list[tuple[str, Path, str]]:
        """(name, artifact folder, version) of each model's newest version in the repositories; in a thread
        (`folders`: the _folders snapshot, whose manifests need no second reading)."""
        from kiln.core.manifest import read_manifest
        from kiln.serve.repository import entry_for

        found = []
        for root in self.roots:
            entry = entry_for(root)
            entries = [entry] if entry is not None else [e for e in (entry_for(p) for p in sorted(root.iterdir()))
                                                         if e is not None]
            for item in entries:
                version, path = item.versions[0]
                name = item.name
                if name is None:
                    known = folders.get(str(path.resolve()))
                    if known is not None:
                        name = known
                    else:
                        try:
                            name = read_manifest(path).model
                        except KilnError:
                            continue
                found.append((name, path, version))
        return found

    async def _load_version(self, model: _Model, name: str, version: str, path: Path) -> Version:
        """Checks, starts and serves one version (the module docstring's steps); the caller holds the model's
        lock. A failure is recorded on the version and raised as RequestError 400; what serves stays."""
        from kiln.serve.repository import Settings, plan_version
        from kiln.serve.workers import start_workers

        record = Version(name, version, str(path.resolve()), LOADING, "loading", stamp=_manifest_stamp(path))
        previous = model.versions.get(version)
        if previous is not None and previous.state == READY:  # the same number from another folder: a reload
            previous.state = UNLOADING
        model.versions[version] = record
        self._note_folder(model, path, version)
        index = next(self._indexes)
        channel_path = os.path.join(self.state_dir, f"worker-{index}.sock")
        gateway = None
        workers = None
        try:
            try:
                variant, count, threads = Settings(self.config, sorted({*self.models, name})).of(name)
                plan = await asyncio.to_thread(plan_version, self.config, name, version, path, index, variant, count,
                                               threads)
            except KilnError as error:
                raise RequestError(f"version {version} of {name!r} failed to load: {one_line(error)}", 400) from None
            served, api, gateway = self.parts(plan, channel_path, self.metrics)
            await gateway.start()
            workers = start_workers(api, count, f"{name}-v{version}")
            started = time.monotonic()
            while not gateway.ready():
                if self._closing:
                    raise RequestError("the server is stopping", 409)
                if workers.alive() < count:
                    codes = [p.exitcode for p in workers.processes if not p.is_alive()]
                    raise RequestError(f"version {version} of {name!r} failed to load: a worker exited with code "
                                       f"{codes[0]} while loading it (the server log says why)", 400)
                if time.monotonic() - started > LOAD_TIMEOUT_S:
                    raise RequestError(f"version {version} of {name!r} failed to load: its workers were not ready "
                                       f"within {LOAD_TIMEOUT_S:g}s", 400)
                await asyncio.sleep(0.05)
        except RequestError as error:
            record.state, record.reason = UNAVAILABLE, str(error)
            if gateway is not None:
                await gateway.stop()
            if workers is not None:
                await asyncio.to_thread(workers.retire, 10.0)
            if previous is not None and previous.state == UNLOADING:
                previous.state = READY
                model.versions[version] = previous
            print(f"kiln: {error}; what served stays", flush=True)
            raise
        record.endpoint = Endpoint(served, gateway)
        record.plan, record.workers, record.api = plan, workers, api
        record.state, record.reason = READY, ""
        self.metrics.info[name] = self.info(plan)
        self._route(name)
        print(f"kiln: {name} version {version} serves ({plan.variant.name}; {count} worker(s))", flush=True)
        retiring = [v for v in [previous, *model.versions.values()]
                    if v is not None and v is not record and v.endpoint is not None and v.state in (READY, UNLOADING)
                    and (v is previous or _version_key(v.version) < _version_key(version))]
        for old in retiring:
            old.state, old.reason = UNLOADING, f"unloading: version {version} serves"
        self._route(name)
        await asyncio.gather(*(self._retire(old, f"unloaded: version {version} serves (policy: latest 1)")
                               for old in retiring))
        return record

    def _route(self, name: str) -> None:
        """Points the model's routes at its READY versions: each version's own route, and the unversioned one at
        the newest (Triton's `latest`); no READY version left, the model's routes answer 404."""
        model = self.models.get(name)
        ready = {v.version: v.endpoint for v in (model.versions.values() if model else ())
                 if v.state == READY and v.endpoint is not None}
        service = self.service
        if ready:
            service.versions[name] = ready
            service.endpoints[name] = ready[max(ready, key=_version_key)]
        else:
            service.versions.pop(name, None)
            service.endpoints.pop(name, None)
            self.metrics.info.pop(name, None)
        offload = getattr(service, "offload", None)
        if offload is not None:
            offload.update(service.endpoints, service.versions)

    async def _retire(self, version: Version, reason: str) -> None:
        """Drains a version already taken out of the routes, then stops its gateway and workers."""
        endpoint = version.endpoint
        if endpoint is not None:
            gateway = endpoint.gateway
            deadline = time.monotonic() + gateway.timeout_s + 1.0  # every accepted request has its answer by then
            while gateway.in_flight() and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            pids = gateway.worker_pids()
            if version.workers is None:  # LitServe's workers: a restarted one must idle, not load the model again
                Path(retired_marker(gateway.channel_path)).touch()
            await gateway.stop()
            if version.workers is not None:
                await asyncio.to_thread(version.workers.retire, 10.0)
            else:
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signal.SIGTERM)
        version.endpoint = None
        version.workers = None
        version.api = None
        version.state, version.reason = UNAVAILABLE, reason
        print(f"kiln: {version.name} version {version.version} {reason}", flush=True)


def _version_key(version: str) -> tuple[int, str]:
    return (int(version), "") if version.isdigit() else (1 << 62, version)
