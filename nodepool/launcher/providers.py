"""The providers and pools a launcher runs, kept in step with its configuration.

``ProviderSet.sync`` starts a ``ProviderWorker`` for each new or changed provider and retires
the workers of removed or changed ones (they finish their in-flight launches and deletes);
it registers one ``pool`` component per pool so requestors and other launchers see what we
serve.  ``views`` turns that, plus the workers' cached cloud facts, into the ``PoolView``s the
planner decides with.  Nothing here calls a cloud: the workers do, on their own threads.
"""
import logging
import time
import uuid

from ..model.images import newest_ready_upload
from ..model.records import Component
from . import planner
from .provider_worker import ProviderWorker

log = logging.getLogger("nodepool.launcher")

UPLOADS_TTL = 2.0


class ProviderSet:
    def __init__(self, store, hostname, launcher_name, version, worker_options, on_change):
        self.store = store
        self.hostname = hostname
        self.launcher_name = launcher_name
        self.version = version
        self.worker_options = worker_options      # tick, leak_interval
        self.on_change = on_change
        self.workers = {}               # provider name -> ProviderWorker
        self.retired = []               # workers finishing their in-flight work
        self.components = {}            # pool key -> Component
        self.config = None
        self._uploads_cache = None

    # -- configuration ------------------------------------------------------------------------

    def sync(self, config):
        """Start workers for new/changed providers; retire those removed or changed."""
        self.config = config
        for name, worker in list(self.workers.items()):
            prov = config.providers.get(name)
            if prov is None or prov.raw != worker.provider.raw:
                log.info("provider %s %s: finishing its in-flight work", name,
                         "removed" if prov is None else "changed")
                worker.retire()
                self.retired.append(worker)
                del self.workers[name]
        for name, prov in config.providers.items():
            if name not in self.workers:
                try:
                    worker = ProviderWorker(prov, self.store, self.launcher_name,
                                            on_change=self.on_change, **self.worker_options)
                except Exception as exc:
                    log.error("provider %s cannot be used: %s", name, exc)
                    continue
                worker.start()
                self.workers[name] = worker
        self.retired = [w for w in self.retired if w.thread.is_alive()]
        self._sync_components(config)

    def _sync_components(self, config):
        wanted = {pool.key: pool for pool in config.pools() if pool.provider in self.workers}
        for key in list(self.components):
            if key not in wanted:
                quietly(self.store.unregister_component, self.components.pop(key))
        for key, pool in wanted.items():
            comp = self.components.get(key)
            labels = sorted(pool.labels)
            if comp is None:
                comp = Component(
                    kind="pool", hostname=self.hostname, state="running",
                    version_string=self.version, name=pool.name, provider_name=pool.provider,
                    supported_labels=labels, priority=pool.priority, paused=False,
                    pool_id=f"{self.hostname}-PoolWorker.{pool.provider}-{pool.name}-"
                            f"{uuid.uuid4().hex}")
                self.components[key] = self.store.register_component(comp)
            elif comp.supported_labels != labels or comp.priority != pool.priority:
                comp.supported_labels = labels
                comp.priority = pool.priority
                self.store.update_component(comp)

    def set_paused(self, paused):
        for key, comp in self.components.items():
            want = key in paused
            if comp.paused != want:
                comp.paused = want
                quietly(self.store.update_component, comp)

    # -- lookups ------------------------------------------------------------------------------

    def pool(self, key):
        """The configured pool of ``key`` ("provider/pool") if its provider runs here."""
        provider, name = key.split("/", 1)
        prov = self.config.providers.get(provider) if self.config else None
        if prov is None or provider not in self.workers:
            return None
        return prov.pools.get(name)

    def worker_of(self, node_or_provider):
        name = getattr(node_or_provider, "provider", node_or_provider)
        worker = self.workers.get(name)
        if worker is not None:
            return worker
        return next((w for w in self.retired if w.provider.name == name), None)

    def pool_key_of(self, pool_id):
        return next((k for k, c in self.components.items() if c.pool_id == pool_id), None)

    def busy(self):
        return any(w.busy for w in self.workers.values())

    def all_workers(self):
        return list(self.workers.values()) + list(self.retired)

    def uploads(self, fresh=False):
        """Upload records, reread at most every ``UPLOADS_TTL`` seconds: images change rarely and
        listing them walks the whole image tree of the store."""
        now = time.monotonic()
        if fresh or self._uploads_cache is None or now - self._uploads_cache[0] > UPLOADS_TTL:
            self._uploads_cache = (now, self.store.list_uploads())
        return self._uploads_cache[1]

    def image_ready(self, image, provider, fresh=False):
        return newest_ready_upload(self.uploads(fresh), image, provider) is not None

    # -- the planner's view -------------------------------------------------------------------

    def views(self, index):
        views = []
        for key, comp in list(self.components.items()):
            pool = self.pool(key)
            worker = self.workers.get(pool.provider) if pool else None
            if worker is None:
                continue
            prov = worker.provider
            if not worker.started and not worker.start_error:
                continue          # still starting: neither take nor decline requests yet
            unavailable = {}
            for label in pool.labels.values():
                if label.diskimage:
                    if not self.image_ready(label.diskimage, prov.name):
                        unavailable[label.name] = (f"no ready upload of diskimage "
                                                   f"{label.diskimage} to {prov.name}")
                elif label.cloud_image and worker.cloud_image_ready.get(label.name) is False:
                    unavailable[label.name] = f"cloud image {label.cloud_image} not found"
            down = None
            if not worker.started:
                down = f"{prov.name} is not available: {worker.start_error}"
            views.append(planner.PoolView(
                pool=pool, pool_id=comp.pool_id, label_costs=worker.label_costs,
                broken_labels=worker.broken_labels, unavailable_labels=unavailable,
                down=down,
                cloud_limits=worker.quota_limits if worker.quota_limits else None,
                unmanaged_usage=worker.unmanaged_usage(index),
                ignore_provider_quota=pool.ignore_provider_quota,
                max_concurrency=prov.max_concurrency, in_flight=worker.in_flight,
                launches=getattr(worker.adapter, "launches", True),
                slot_labels=worker.slot_labels.get(pool.name)))
        return views

    # -- shutdown -----------------------------------------------------------------------------

    def stop(self):
        workers = self.all_workers()
        for worker in workers:
            worker.stop()
        for worker in workers:
            worker.join(10)
        for comp in self.components.values():
            quietly(self.store.unregister_component, comp)

    def session_lost(self):
        for worker in self.all_workers():
            worker.session_lost()


def quietly(fn, *args):
    """Call ``fn`` on a release/cleanup path where a failure changes nothing (the lock ends with
    the session, the record is cleaned up later): log it at debug level and go on."""
    try:
        return fn(*args)
    except Exception as exc:
        log.debug("ignored during cleanup: %s", exc)
