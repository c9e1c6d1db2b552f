"""The ``nodepool-builder`` daemon: build images, upload them to every provider, clean up.

Threads only apply decisions; ``planner`` makes them from a snapshot of the store:

* build workers (``--build-workers``): every ``build_interval``, build the images the planner
  says need one, each under the image-wide build lock (one build of an image at a time across
  all builders);
* upload workers (``--upload-workers``): every ``upload_interval``, upload the newest ready
  build to each provider missing it, each under the (build, provider) upload lock; a slow or
  failing provider only ever occupies the worker handling it;
* the janitor: every ``cleanup_interval`` (``trigger_janitor()`` asks for a pass now), apply
  retention, remove local files of gone builds and cloud images whose upload record is gone.

On start, what a killed builder left is cleaned: our ``building`` records whose build lock is
free are failed (files removed), and abandoned ``uploading`` records lose their cloud image
(found by tag) and their record.
"""
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid

from ..config import load_config
from ..drivers import get_driver
from ..drivers.base import META_BUILD_ID, META_PROVIDER, META_UPLOAD_ID, ImageUploadSpec
from ..errors import (ConfigError, ConflictError, LockError, NodepoolError, NotFoundError,
                      StoreError)
from ..model.images import build_base_path, build_file_path, parse_build_file_name
from ..model.records import Component, ImageBuild, ImageUpload
from ..model.states import BuildState, UploadState
from ..store.base import (CAS_TRIES, build_lock_path, compare_and_set, image_build_lock_path,
                          upload_lock_path, upload_record_lock_path)
from .. import stats
from . import planner
from .runner import kill_orphaned_build, prune_build_logs, run_build

try:
    from .. import metrics
except ImportError:  # pragma: no cover - metrics are optional
    metrics = None

log = logging.getLogger("nodepool.builder")

BUILDER_ID_FILE = "builder_id.txt"
CHECKSUM_SUFFIXES = ("md5", "sha256")


def _state(record):
    return str(getattr(record.state, "value", record.state))


def read_or_create_builder_id(images_dir):
    """The builder's UUID from ``<images-dir>/builder_id.txt``, created on first start."""
    path = os.path.join(images_dir, BUILDER_ID_FILE)
    try:
        with open(path) as f:
            value = f.read().strip()
        if value:
            return value
    except FileNotFoundError:
        pass
    value = str(uuid.uuid4())
    os.makedirs(images_dir, exist_ok=True)
    with open(path, "w") as f:
        f.write(value + "\n")
    return value


def format_image_name(fmt, image, build_id, upload_id, timestamp):
    """The provider-side image name from ``image-name-format``."""
    return fmt.format(image_name=image, build_id=build_id, upload_id=upload_id,
                      timestamp=int(timestamp))


def upload_metadata(config, provider, image, build_id, upload_id):
    """Tags of an uploaded image: the diskimage's ``metadata``, the provider image's ``meta``,
    then our own keys (which always win)."""
    meta = {}
    dimage = config.diskimages.get(image)
    if dimage is not None:
        meta.update(dimage.metadata or {})
    pimage = provider.diskimages.get(image)
    if pimage is not None:
        meta.update(pimage.options.get("meta") or {})
    meta.update({META_BUILD_ID: build_id, META_UPLOAD_ID: upload_id,
                 META_PROVIDER: provider.name})
    return {str(k): str(v) for k, v in meta.items()}


def read_checksum(path):
    try:
        with open(path) as f:
            return (f.read().split() or [None])[0]
    except OSError:
        return None


def remove_build_files(images_dir, image, build_id):
    """Remove every local file of one build (formats, checksums, manifest dir)."""
    removed = []
    prefix = f"{image}-{build_id}"
    try:
        names = os.listdir(images_dir)
    except OSError:
        return removed
    for name in names:
        if parse_build_file_name(name) != (image, build_id) or not name.startswith(prefix):
            continue
        path = os.path.join(images_dir, name)
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
            removed.append(path)
        except OSError as exc:
            log.error("image %s build %s: cannot remove %s: %s", image, build_id, path,
                      exc.strerror)
    return removed


def _count(metric, *labels):
    if metrics is not None and hasattr(metrics, metric):
        try:
            getattr(metrics, metric).labels(*labels).inc()
        except Exception:  # metrics must never break the builder
            pass


def _observe(metric, value, *labels):
    if metrics is not None and hasattr(metrics, metric):
        try:
            getattr(metrics, metric).labels(*labels).observe(value)
        except Exception:
            pass


class Builder:
    """One builder process.  ``start()`` then ``run()`` (blocks until ``stop()``)."""

    def __init__(self, config_path, secure_path=None, store=None, hostname=None,
                 build_workers=1, upload_workers=4, build_interval=10.0, upload_interval=10.0,
                 cleanup_interval=60.0, config_check_interval=1.0, adapter_factory=None):
        self.config_path = config_path
        self.secure_path = secure_path
        self.hostname = hostname or socket.getfqdn()
        self.build_workers = build_workers
        self.upload_workers = upload_workers
        self.build_interval = build_interval
        self.upload_interval = upload_interval
        self.cleanup_interval = cleanup_interval
        self.config_check_interval = config_check_interval
        self.adapter_factory = adapter_factory or (
            lambda prov: get_driver(prov.driver).adapter(prov))
        self.store = store
        self._own_store = store is None
        self.config = None
        self.builder_id = None
        self.component = None
        self._adapters = {}              # provider name -> (provider.raw, adapter)
        self._adapter_lock = threading.Lock()
        self._threads = []
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._wake = {"build": threading.Event(), "upload": threading.Event(),
                      "janitor": threading.Event()}
        self._janitor_lock = threading.Lock()
        self.janitor_passes = 0

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self, workers=True):
        """Load the config, open the store, clean up after a killed builder, start workers
        (tests pass ``workers=False`` and call ``build_once``/``upload_once``/``janitor_pass``)."""
        self.config = load_config(self.config_path, self.secure_path)
        if not self.config.images_dir:
            raise ConfigError(self.config_path, [("images-dir", "required by the builder")])
        try:
            self.builder_id = read_or_create_builder_id(self.config.images_dir)
        except OSError as exc:
            self.builder_id = str(uuid.uuid4())
            log.error("images-dir %s: cannot keep builder_id.txt (%s); using %s for this run",
                      self.config.images_dir, exc.strerror, self.builder_id)
        if self.store is None:
            from ..store import open_store
            self.store = open_store(self.config)
            self.store.start()
        self.store.add_session_listener(self._on_session)
        self.component = self.store.register_component(Component(
            kind="builder", hostname=self.hostname, state="running",
            version_string=_package_version()))
        self.cleanup_after_crash()
        if not workers:
            return
        self._spawn("janitor", self._janitor_loop)
        for i in range(self.build_workers):
            self._spawn(f"build-{i}", self._build_loop)
        for i in range(self.upload_workers):
            self._spawn(f"upload-{i}", self._upload_loop)
        log.info("builder %s (%s) started: %d build and %d upload worker(s)", self.hostname,
                 self.builder_id, self.build_workers, self.upload_workers)

    def _on_session(self, state):
        if state == "lost":
            log.error("state store session lost: builds running now will be marked failed")

    def _spawn(self, name, target):
        thread = threading.Thread(target=self._guarded, args=(name, target),
                                  name=f"builder-{name}", daemon=True)
        thread.start()
        self._threads.append(thread)

    def _guarded(self, name, target):
        try:
            target()
        except Exception:
            log.exception("builder worker %s died", name)

    def install_signal_handlers(self):
        """SIGTERM/SIGINT stop, SIGHUP reloads the config (call from the main thread)."""
        signal.signal(signal.SIGTERM, lambda *a: self.stop())
        signal.signal(signal.SIGINT, lambda *a: self.stop())
        signal.signal(signal.SIGHUP, lambda *a: self._reload.set())

    def stop(self):
        self._stop.set()
        for event in self._wake.values():
            event.set()

    def run(self):
        """Watch the config until ``stop()``, then shut down."""
        try:
            while not self._stop.wait(self.config_check_interval):
                self.maybe_reload()
        finally:
            self.shutdown()

    def shutdown(self):
        """Join build and cleanup workers (a running build is killed); upload workers are not
        waited for long: an abandoned ``uploading`` record is cleaned up later."""
        self.stop()
        deadline = time.monotonic() + 30
        for thread in self._threads:
            uploading = thread.name.startswith("builder-upload")
            thread.join(1.0 if uploading else max(0.1, deadline - time.monotonic()))
        with self._adapter_lock:
            for _, adapter in self._adapters.values():
                try:
                    adapter.stop()
                except Exception:
                    pass
            self._adapters.clear()
        if self.store is not None:
            if self.component is not None:
                try:
                    self.store.unregister_component(self.component)
                except StoreError:
                    pass
            if self._own_store:
                self.store.stop()
        log.info("builder %s stopped", self.hostname)

    def maybe_reload(self):
        """Reload the config when a file changed or SIGHUP asked; a bad file keeps the old one."""
        if not (self._reload.is_set() or self.config.files_changed()):
            return False
        self._reload.clear()
        try:
            new = load_config(self.config_path, self.secure_path)
        except ConfigError as exc:
            log.error("configuration not reloaded, keeping the running one:\n%s", exc)
            self.config.source_mtimes = {p: _mtime(p) for p in self.config.source_mtimes}
            return False
        self.config = new
        log.info("configuration reloaded from %s", self.config_path)
        for event in self._wake.values():
            event.set()
        return True

    def _loop(self, kind, interval, once):
        while not self._stop.is_set():
            try:
                once()
            except StoreError as exc:
                log.error("%s worker: state store error (will retry): %s", kind, exc)
            except Exception:
                log.exception("%s worker failed (will retry)", kind)
            self._wake[kind].wait(interval)
            self._wake[kind].clear()

    def _build_loop(self):
        self._loop("build", self.build_interval, self.build_once)

    def _upload_loop(self):
        self._loop("upload", self.upload_interval, self.upload_once)

    def _janitor_loop(self):
        self._loop("janitor", self.cleanup_interval, self.janitor_pass)

    def trigger(self, kind="janitor"):
        """Ask the ``build``, ``upload`` or ``janitor`` workers for a pass now."""
        self._wake[kind].set()

    # -- adapters ----------------------------------------------------------------------------------

    def adapter(self, provider_name):
        """The adapter of a configured provider (rebuilt when its config changed), or None."""
        prov = self.config.providers.get(provider_name)
        if prov is None:
            return None
        with self._adapter_lock:
            cached = self._adapters.get(provider_name)
            if cached is not None and cached[0] == prov.raw:
                return cached[1]
            if cached is not None:
                try:
                    cached[1].stop()
                except Exception:
                    pass
            adapter = self.adapter_factory(prov)
            adapter.start()
            self._adapters[provider_name] = (prov.raw, adapter)
            return adapter

    # -- builds ------------------------------------------------------------------------------------

    def _snapshot_flags(self, config, names):
        paused = {n for n in names if self.store.is_image_paused(n)}
        requested = {n for n in names if self.store.get_image_build_request(n) is not None}
        return paused, requested

    def build_once(self):
        """One build-worker pass: build every image that needs it and whose lock is free."""
        config = self.config
        names = list(planner.buildable_images(config))
        paused, requested = self._snapshot_flags(config, names)
        needed = planner.images_needing_build(config, self.store.list_builds(), paused,
                                              requested, time.time())
        built = 0
        for need in needed:
            if self._stop.is_set():
                break
            try:
                lock = self.store.lock(image_build_lock_path(need.image),
                                       identifier=f"{self.hostname}-{self.builder_id}")
            except LockError:
                continue               # another worker or builder is building it
            with lock:
                # Re-check under the lock: someone may have finished a build meanwhile.
                paused, requested = self._snapshot_flags(config, [need.image])
                again = planner.images_needing_build(
                    config, self.store.list_builds(image=need.image), paused, requested,
                    time.time())
                current = next((n for n in again if n.image == need.image), None)
                if current is None:
                    continue
                log.info("image %s: building (%s)", need.image, current.reason)
                if self.build_image(config.diskimages[need.image], lock,
                                    manual=current.manual):
                    built += 1
                    self.trigger("upload")
        return built

    def build_image(self, image, lock, manual=False):
        """Build ``image`` under its build ``lock``; True when it ended ready."""
        config = self.config
        build = ImageBuild(image=image.name, id=uuid.uuid4().hex, state=BuildState.BUILDING,
                           state_time=time.time(), builder=self.hostname,
                           builder_id=self.builder_id, formats=",".join(sorted(image.formats)),
                           username=image.username, python_path=image.python_path,
                           shell_type=image.shell_type)
        self.store.create_build(build)
        started = time.monotonic()
        try:
            result = run_build(image, build.id, config.images_dir, config.build_log_dir,
                               elements_dir=config.elements_dir,
                               should_stop=self._stop.is_set)
            error = result.error
            log_path = result.log_path
        except OSError as exc:   # e.g. the build log directory cannot be written
            error = f"cannot run the build: {exc}"
            log_path = config.build_log_dir
        prune_build_logs(config.build_log_dir, image.name, config.build_log_retention)
        if error is None and not self.store.holds(lock):
            # Our build lock vanished with the session: another builder may have built too.
            error = "the state store session was lost during the build"

        def outcome(rec):
            if error is None:
                rec.set_state(BuildState.READY)
                rec.formats = ",".join(sorted(image.formats))
                rec.username = image.username
                rec.python_path = image.python_path
                rec.shell_type = image.shell_type
            else:
                rec.set_state(BuildState.FAILED)

        if error is not None:
            remove_build_files(config.images_dir, image.name, build.id)
        try:
            written = write_outcome(lambda: self.store.get_build(image.name, build.id),
                                    self.store.update_build, BuildState.BUILDING, outcome)
        except StoreError as exc:
            written, error = None, f"cannot record the result ({exc})"
        if written is None:
            log.error("image %s build %s: %s; removing its files", image.name, build.id,
                      error or "the record was marked deleting or removed meanwhile")
            remove_build_files(config.images_dir, image.name, build.id)
            return False
        elapsed = time.monotonic() - started
        stats.image_build(image.name, 0 if error is None else 1, elapsed,
                          stats.format_sizes(config.images_dir, image.name, build.id,
                                             image.formats) if error is None else None)
        if error is None:
            log.info("image %s build %s ready in %.1fs (log %s)", image.name, build.id, elapsed,
                     log_path)
            if manual:
                self.store.remove_image_build_request(image.name)
            _count("IMAGE_BUILDS", image.name, "ready")
            _observe("IMAGE_BUILD_SECONDS", elapsed, image.name)
            return True
        log.error("image %s build %s failed: %s (log %s)", image.name, build.id, error, log_path)
        _count("IMAGE_BUILDS", image.name, "failed")
        return False

    # -- uploads -----------------------------------------------------------------------------------

    def _local_build_ids(self, builds):
        ids = set()
        for b in builds:
            if any(os.path.isfile(build_file_path(self.config.images_dir, b.image, b.id, fmt))
                   for fmt in b.format_list):
                ids.add(b.id)
        return ids

    def upload_once(self):
        """One upload-worker pass: make every needed upload whose lock is free."""
        config = self.config
        builds = self.store.list_builds()
        needed = planner.uploads_needed(config, builds, self.store.list_uploads(),
                                        local_build_ids=self._local_build_ids(builds))
        random.shuffle(needed)          # workers spread over providers instead of queueing
        done = 0
        for need in needed:
            if self._stop.is_set():
                break
            try:
                lock = self.store.lock(upload_lock_path(need.image, need.build_id,
                                                        need.provider))
            except LockError:
                continue
            with lock:
                build = self.store.get_build(need.image, need.build_id)
                if build is None or _state(build) != BuildState.READY.value:
                    continue
                existing = self.store.list_uploads(need.image, need.build_id, need.provider)
                if any(_state(u) in (UploadState.READY.value, UploadState.UPLOADING.value)
                       for u in existing):
                    continue
                if self.upload(config, build, need.provider, need.format):
                    done += 1
        return done

    def upload(self, config, build, provider_name, fmt):
        """Upload one build to one provider (caller holds the upload lock); True when ready."""
        prov = config.providers[provider_name]
        filename = build_file_path(config.images_dir, build.image, build.id, fmt)
        rec = ImageUpload(image=build.image, build_id=build.id, provider=provider_name,
                          state=UploadState.UPLOADING, state_time=time.time(), format=fmt,
                          username=build.username, python_path=build.python_path,
                          shell_type=build.shell_type)
        self.store.create_upload(rec)

        def get_rec():
            return self.store.get_upload(build.image, build.id, provider_name, rec.id)

        name = format_image_name(prov.image_name_format, build.image, build.id, rec.id,
                                 time.time())
        what = f"image {build.image} build {build.id} upload {rec.id} to {provider_name}"
        spec = ImageUploadSpec(
            image_name=name, filename=filename, image_format=fmt,
            metadata=upload_metadata(config, prov, build.image, build.id, rec.id),
            provider_image=prov.diskimages.get(build.image),
            md5=read_checksum(f"{filename}.md5"), sha256=read_checksum(f"{filename}.sha256"),
            timeout=prov.image_upload_timeout)
        started = time.monotonic()
        external_id = None
        try:
            adapter = self.adapter(provider_name)
            external_id = _call_with_timeout(lambda: adapter.upload_image(spec),
                                             prov.image_upload_timeout, what)
            if prov.post_upload_hook:
                run_post_upload_hook(prov.post_upload_hook, provider_name, external_id,
                                     filename, prov.image_upload_timeout)
        except Exception as exc:
            message = str(exc) or type(exc).__name__
            log.error("%s failed: %s", what, message)
            self._delete_cloud_image(provider_name, external_id, rec)
            _quiet_store(write_outcome, get_rec, self.store.update_upload, UploadState.UPLOADING,
                         lambda r: r.set_state(UploadState.FAILED))
            _count("IMAGE_UPLOADS", build.image, provider_name, "failed")
            return False

        def ready(r):
            r.set_state(UploadState.READY)
            r.external_id = external_id
            r.external_name = name
            r.format = fmt

        if write_outcome(get_rec, self.store.update_upload, UploadState.UPLOADING, ready) is None:
            # Deleted or marked deleting while we uploaded: do not leave the image behind.
            log.warning("%s: record changed during upload; deleting the cloud image", what)
            self._delete_cloud_image(provider_name, external_id, rec)
            return False
        elapsed = time.monotonic() - started
        log.info("%s ready as %s (%s) in %.1fs", what, name, external_id, elapsed)
        _count("IMAGE_UPLOADS", build.image, provider_name, "ready")
        _observe("IMAGE_UPLOAD_SECONDS", elapsed, build.image, provider_name)
        stats.image_upload(build.image, provider_name, elapsed)
        return True

    def _delete_cloud_image(self, provider_name, external_id, rec=None):
        """Delete an uploaded image by id, or (id unknown) every image tagged with the upload.
        Returns False when the cloud refused (try again later)."""
        adapter = None
        try:
            adapter = self.adapter(provider_name)
            if adapter is None:
                return True
            ids = [external_id] if external_id else []
            if not ids and rec is not None:
                ids = [img.id for img in adapter.list_images()
                       if img.metadata.get(META_BUILD_ID) == rec.build_id
                       and img.metadata.get(META_UPLOAD_ID) == rec.id
                       and img.metadata.get(META_PROVIDER, provider_name) == provider_name]
            for image_id in ids:
                adapter.delete_image(image_id)
            return True
        except Exception as exc:
            log.error("provider %s: cannot delete image %s: %s (will retry)", provider_name,
                      external_id or (rec and f"of upload {rec.id}"), exc)
            return False

    # -- janitor -----------------------------------------------------------------------------------

    def janitor_pass(self):
        """Apply retention, remove local files of gone builds and leaked cloud images."""
        with self._janitor_lock:
            config = self.config
            builds = self.store.list_builds()
            uploads = self.store.list_uploads()
            held = {p for p in planner.lock_paths_to_probe(builds, uploads)
                    if self.store.is_locked(p)}
            for action in planner.plan_retention(config, builds, uploads, held):
                try:
                    if isinstance(action, planner.DeleteUpload):
                        self.delete_upload(action)
                    else:
                        self.delete_build(action)
                except StoreError as exc:
                    log.error("janitor: %s: %s (will retry)", action, exc)
            self.remove_stale_local_files()
            self.drop_uploaded_formats()
            for prov_name, prov in config.providers.items():
                if prov.manages_images:
                    self.remove_leaked_images(prov_name)
            self.janitor_passes += 1
            stats.report_builder(self.hostname, config, builds, uploads, self.store)

    def _plan_image(self, image):
        """A fresh retention plan of one image, with the records it was made from.

        Records are listed before the locks are probed: a record seen in progress whose lock is
        then free was abandoned, or finished meanwhile, in which case its version moved and the
        compare-and-set that marks it deleting fails."""
        builds = self.store.list_builds(image=image)
        uploads = self.store.list_uploads(image=image)
        held = {p for p in planner.lock_paths_to_probe(builds, uploads)
                if self.store.is_locked(p)}
        return planner.plan_retention(self.config, builds, uploads, held), builds, uploads

    def _confirm_deletion(self, action):
        """Re-decide ``action`` from a fresh read (the caller holds the record's own lock) and
        mark the record ``deleting`` by compare-and-set.

        Returns ``(decision, record)``: record None when it is gone already, decision None when
        the fresh plan keeps it (a build or upload that finished after the janitor's snapshot
        looked abandoned in it).  A lost compare-and-set means someone wrote the record since
        our read: read and decide again."""
        is_upload = isinstance(action, planner.DeleteUpload)
        deleting = UploadState.DELETING if is_upload else BuildState.DELETING
        update = self.store.update_upload if is_upload else self.store.update_build
        key = planner.action_key(action)
        for _ in range(CAS_TRIES):
            fresh, builds, uploads = self._plan_image(action.image)
            rec = next((r for r in (uploads if is_upload else builds)
                        if _record_key(r, is_upload) == key), None)
            if rec is None:
                return action, None
            decision = planner.replanned(action, fresh)
            if decision is None:
                log.info("%s: kept (a fresh read no longer plans its deletion: %s)",
                         _describe(action), _state(rec))
                return None, rec
            if _state(rec) == deleting.value:
                return decision, rec
            rec.set_state(deleting)
            try:
                update(rec, check_version=True)
                return decision, rec
            except ConflictError:
                continue
            except NotFoundError:
                return decision, None
        log.info("%s: changed under every attempt; deciding again next pass", _describe(action))
        return None, None

    def delete_upload(self, action):
        """Apply a planned DeleteUpload if a fresh read still plans it; True when it is gone."""
        try:
            lock = self.store.lock(upload_record_lock_path(action.image, action.build_id,
                                                           action.provider, action.upload_id))
        except LockError:
            return False
        with lock:
            decision, rec = self._confirm_deletion(action)
            if rec is None:
                return decision is not None
            if decision is None:
                return False
            log.info("%s: deleting (%s)", _describe(action), decision.reason)
            if action.provider not in self.config.providers:
                if rec.external_id:
                    log.warning("provider %s is no longer configured: its image %s is left in "
                                "the cloud", action.provider, rec.external_id)
            elif not self._delete_cloud_image(action.provider, rec.external_id, rec):
                return False
            self.store.delete_upload(action.image, action.build_id, action.provider,
                                     action.upload_id)
            return True

    def delete_build(self, action):
        """Apply a planned DeleteBuild if a fresh read still plans it; True when it is gone."""
        try:
            lock = self.store.lock(build_lock_path(action.image, action.build_id))
        except LockError:
            return False
        with lock:
            decision, rec = self._confirm_deletion(action)
            if rec is None:
                return decision is not None
            if decision is None:
                return False
            log.info("%s: deleting (%s)", _describe(action), decision.reason)
            if self.config.images_dir:
                remove_build_files(self.config.images_dir, action.image, action.build_id)
            if self.store.list_uploads(image=action.image, build_id=action.build_id):
                return False            # uploads still being deleted: finish next pass
            self.store.delete_build(action.image, action.build_id)
            return True

    def remove_stale_local_files(self):
        images_dir = self.config.images_dir
        try:
            names = os.listdir(images_dir)
        except OSError:
            return []
        doomed = planner.local_files_to_remove(names, self.store.list_builds())
        removed = set()
        for name in doomed:
            image, build_id = parse_build_file_name(name)
            if (image, build_id) not in removed:
                removed.add((image, build_id))
                remove_build_files(images_dir, image, build_id)
        return sorted(removed)

    def drop_uploaded_formats(self):
        """Apply ``delete-after-upload``: remove format files every provider has uploaded."""
        dropped = []
        for drop in planner.formats_to_drop(self.config, self.store.list_builds(),
                                            self.store.list_uploads()):
            path = build_file_path(self.config.images_dir, drop.image, drop.build_id, drop.format)
            for suffix in ("",) + tuple(f".{c}" for c in CHECKSUM_SUFFIXES):
                try:
                    os.unlink(path + suffix)
                    if not suffix:
                        dropped.append(path)
                        log.info("image %s build %s: %s uploaded everywhere; removed %s",
                                 drop.image, drop.build_id, drop.format, path)
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    log.error("image %s build %s: cannot remove %s: %s", drop.image,
                              drop.build_id, path + suffix, exc.strerror)
        return dropped

    def remove_leaked_images(self, provider_name):
        """Delete cloud images tagged as uploads to this provider whose record is gone."""
        try:
            adapter = self.adapter(provider_name)
            images = adapter.list_images() if adapter is not None else []
        except Exception as exc:
            log.error("provider %s: cannot list images: %s", provider_name, exc)
            return []
        # Listed after the cloud: a record is always created before its cloud image.
        known = {(u.build_id, u.id) for u in self.store.list_uploads(provider=provider_name)}
        leaked = []
        for img in images:
            build_id = img.metadata.get(META_BUILD_ID)
            upload_id = img.metadata.get(META_UPLOAD_ID)
            if not build_id or img.metadata.get(META_PROVIDER) != provider_name:
                continue
            if (build_id, upload_id) in known:
                continue
            try:
                adapter.delete_image(img.id)
                leaked.append(img.id)
                log.info("provider %s: deleted leaked image %s (%s, build %s upload %s)",
                         provider_name, img.id, img.name, build_id, upload_id)
                _count("LEAKED", provider_name, "images")
                stats.leaked(provider_name, "images")
            except Exception as exc:
                log.error("provider %s: cannot delete leaked image %s: %s", provider_name,
                          img.id, exc)
        return leaked

    # -- recovery ----------------------------------------------------------------------------------

    def cleanup_after_crash(self):
        """Fail our ``building`` records left by a killed run of this builder, then let the
        janitor remove them and abandoned uploads (cloud image by tag, then record)."""
        for build in self.store.list_builds():
            if (_state(build) != BuildState.BUILDING.value or build.builder_id != self.builder_id
                    or self.store.is_locked(image_build_lock_path(build.image))):
                continue
            log.info("image %s build %s: left building by a previous run; marking failed",
                     build.image, build.id)
            killed = kill_orphaned_build(build_base_path(self.config.images_dir, build.image,
                                                         build.id))
            if killed:
                log.info("image %s build %s: killed leftover build processes %s", build.image,
                         build.id, killed)
            remove_build_files(self.config.images_dir, build.image, build.id)
            build.set_state(BuildState.FAILED)
            _quiet_store(self.store.update_build, build)
        try:
            self.janitor_pass()
        except (StoreError, NodepoolError) as exc:
            log.error("start-up cleanup incomplete (will retry): %s", exc)


def run_post_upload_hook(hook, provider, external_id, filename, timeout):
    """Run ``<hook> <provider> <external_id> <file>``; raise on a non-zero exit."""
    try:
        proc = subprocess.run([hook, provider, str(external_id), filename], capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NodepoolError(f"post-upload-hook {hook} failed: {exc}") from exc
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
        raise NodepoolError(f"post-upload-hook {hook} exited with {proc.returncode}"
                            f"{': ' + tail[0] if tail[0] else ''}")


def _call_with_timeout(func, timeout, what):
    """Run a blocking adapter call in a helper thread; give up waiting after ``timeout``."""
    box = {}

    def target():
        try:
            box["value"] = func()
        except BaseException as exc:  # handed to the caller
            box["error"] = exc

    thread = threading.Thread(target=target, name="builder-upload-call", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise NodepoolError(f"{what} timed out after {timeout}s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def write_outcome(get, update, in_progress, apply):
    """Write a worker's result (``apply(record)``) onto its record by compare-and-set.

    Returns the written record, or None when the record is gone or no longer ``in_progress``
    (marked ``deleting`` by the janitor or an operator: it is theirs now, and a blind write
    would bring back a record whose files or cloud image are being deleted).  A lost
    compare-and-set re-reads and applies again."""
    def change(rec):
        if _state(rec) != in_progress.value:
            return False
        apply(rec)
    return compare_and_set(get, update, change)


def _record_key(record, is_upload):
    if is_upload:
        return ("upload", record.image, record.build_id, record.provider, record.id)
    return ("build", record.image, record.id)


def _describe(action):
    if isinstance(action, planner.DeleteUpload):
        return (f"image {action.image} build {action.build_id} upload {action.upload_id} "
                f"on {action.provider}")
    return f"image {action.image} build {action.build_id}"


def _quiet_store(func, *args):
    try:
        func(*args)
    except StoreError as exc:
        log.error("state store: %s", exc)


def _package_version():
    from .. import __version__
    return __version__


def _mtime(path):
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None
