"""Image rollout in the launcher: the I/O side of ``rollout.py``.

``RolloutManager`` lives in the launcher loop.  It

* picks the upload each launch boots (``choose``), counting the launch for that upload;
* collects launch outcomes from the provider workers (``record``) and adds them to the upload
  records' counters by compare-and-set (``flush``), so every launcher sharing the store sees
  the sum;
* every ``INTERVAL`` seconds applies ``rollout.plan_pair`` to each (image, provider) pair it
  serves: starts a candidate's rollout, advances its steps, withdraws it when it does worse;
* runs validations: claims one in the upload record, asks for a node booted from the candidate
  (an ordinary node request whose ``requestor_data`` names the upload), checks that node over
  SSH on a thread of its own (never the loop), and records the result;
* deletes ready stock that must not serve (withdrawn or unvalidated uploads), re-checks the
  candidate's stock over SSH when asked to, and counts nodes given back unused.

Failure rules: every store write is a compare-and-set re-decided on a fresh record; an error
with one pair is logged and that pair is tried again next pass.  A validation that cannot run
(no node, store trouble, its launcher died) is retried after a backoff without counting against
the upload; meanwhile the current upload serves every request, so no request ever waits on a
validation.  Outcome counts not yet written stay in memory and are written next pass.
"""
import collections
import concurrent.futures
import logging
import os
import re
import subprocess
import tempfile
import threading
import time

from .. import metrics
from ..config.rollout import Validation, policy_for
from ..errors import LockError, StoreError
from ..model.records import NodeRequest
from ..model.rollout import (RUNNING, PENDING, WITHDRAWN, Rollout, pair_status)
from ..model.states import NodeState, RequestState, UploadState
from ..store.base import compare_and_set
from . import rollout as ro
from .nodescan import NodeScan

log = logging.getLogger("nodepool.launcher.rollout")

INTERVAL = 2.0
VALIDATION_REQUESTOR = "nodepool-rollout"
# in the request's requestor_data (which Nodepool keeps when it rewrites a request): the upload
VALIDATION_KEY = "rollout_validation"
NODE_LOCK_TIMEOUT = 10
WITHDRAWN_REASONS_KEY = "withdrawn_reasons"  # build extra: provider -> reason

_UPLOAD_PATH = re.compile(r"^/nodepool/images/(?P<image>[^/]+)/builds/(?P<build>[^/]+)"
                          r"/providers/(?P<provider>[^/]+)/images/(?P<upload>[^/]+)$")


def parse_upload_path(path):
    match = _UPLOAD_PATH.match(path or "")
    return (match.group("image"), match.group("build"), match.group("provider"),
            match.group("upload")) if match else None


class RolloutManager:
    def __init__(self, store, config, launcher_name, clock=time.time):
        self.store = store
        self.config = config                    # () -> running configuration
        self.launcher_name = launcher_name
        self.clock = clock
        self._lock = threading.Lock()
        self._choose_lock = threading.Lock()
        self._pending = collections.defaultdict(collections.Counter)   # upload path -> counts
        self._checks = {}                      # upload path -> Future of a validation check
        self._rechecks = {}                    # node id -> Future of a stock node's re-check
        self._rechecked = set()                # node ids re-checked (ok) by this launcher
        self._executor = None
        self._last_run = float("-inf")

    # -- launches (called by the request handler and the provider workers) ----------------------

    def launches(self, upload):
        with self._lock:
            pending = self._pending.get(upload.path, {}).get("launches", 0)
        return Rollout.of(upload).count("launches") + pending

    def choose(self, uploads, image, provider, request=None):
        """The upload a new node of ``image`` on ``provider`` boots (None: none ready)."""
        policy = policy_for(self.config(), image, provider)
        status = pair_status(uploads, image, provider, policy is not None)
        data = getattr(request, "requestor_data", None)
        wanted = data.get(VALIDATION_KEY) if isinstance(data, dict) else None
        with self._choose_lock:     # launches may start side by side: count each choice once
            upload = ro.choose_upload(status, policy, self.launches, wanted)
            if upload is not None:
                self._add(upload.path, "launches")
        return upload

    def record(self, node, kind):
        """A launch attempt of ``node`` ended (``kind``: ready or a failure counter)."""
        self._add(node.image_id, kind)

    def returned(self, node):
        """Cleanup gave ``node`` back to the pool: its requestor returned it without using it
        (Zuul unlocks such nodes and deletes its request).  Counted against its upload."""
        self._add(node.image_id, "returned_unused")

    def _add(self, path, kind, count=1):
        """Count an outcome of an upload of a pair under rollout (others' records are left
        as Nodepool writes them)."""
        key = parse_upload_path(path)
        if key is None or policy_for(self.config(), key[0], key[2]) is None:
            return
        with self._lock:
            self._pending[path][kind] += count

    # -- the periodic pass -----------------------------------------------------------------------

    def run(self, requests, nodes=(), now=None, force=False):
        """Called from the launcher loop with its snapshot: cheap unless ``INTERVAL`` has
        passed."""
        mono = time.monotonic()
        if not force and mono - self._last_run < INTERVAL:
            return
        self._last_run = mono
        now = self.clock() if now is None else now
        self.flush()
        config = self.config()
        pairs = [(image, prov_name) for prov_name, prov in config.providers.items()
                 for image in prov.diskimages if policy_for(config, image, prov_name)]
        if not pairs and not self._checks:
            return
        uploads = self.store.list_uploads()
        live = {r.id for r in requests}
        rolled = set(pairs)
        try:
            self._retire(ro.nodes_to_retire(nodes, ro.unservable_paths(
                uploads, lambda image, provider: (image, provider) in rolled)),
                "its upload was withdrawn or is not validated")
            self._recheck(config, uploads, pairs, nodes)
            withdrawn = [u for u in uploads if Rollout.of(u).phase == WITHDRAWN]
            if withdrawn:
                for key in unremembered_withdrawals(withdrawn, self.store.list_builds()):
                    remember_withdrawal(self.store, *key)
            by_id = {r.id: r for r in requests}
            for request_id in ro.orphan_validation_requests(requests, uploads,
                                                            VALIDATION_REQUESTOR, now):
                log.info("validation request %s is no longer followed: deleting it and its "
                         "node", request_id)
                # its node is not stock: it goes with the request (and is not counted as
                # given back unused)
                self._retire(by_id[request_id].nodes, "its validation was given up",
                             allocated_to=request_id)
                quietly_delete_request(self.store, request_id)
        except Exception:
            log.exception("rollout of stock nodes and validation requests failed (will retry)")
        for image, provider in pairs:
            try:
                self._run_pair(config, uploads, image, provider, now, live)
            except StoreError as exc:
                log.warning("rollout of %s on %s: store error (will retry): %s", image,
                            provider, exc)
            except Exception:
                log.exception("rollout of %s on %s failed (will retry)", image, provider)

    def _recheck(self, config, uploads, pairs, nodes):
        """Re-scan SSH of the rolling candidate's ready stock nodes (``rollout.recheck``): a
        node that no longer answers counts against its upload and is deleted, not handed out."""
        for node_id, future in list(self._rechecks.items()):
            if not future.done():
                continue
            del self._rechecks[node_id]
            try:
                ok, reason, node = future.result()
            except Exception as exc:             # a bug in the check must not wedge the pass
                log.warning("node %s: re-check crashed: %s", node_id, exc)
                continue
            if ok:
                self._rechecked.add(node_id)
                continue
            log.warning("node %s (%s) failed its re-check: %s", node_id, node.image_id, reason)
            self._add(node.image_id, "recheck_failures")
            self._retire([node_id], "it failed its re-check")
        live = {n.id for n in nodes}
        self._rechecked &= live
        for image, provider in pairs:
            policy = policy_for(config, image, provider)
            cand = pair_status(uploads, image, provider, True).candidate
            if not policy.recheck or cand is None or Rollout.of(cand).phase != ro.ROLLING:
                continue
            check = Validation(timeout=policy.recheck_timeout)
            for node in ro.nodes_to_recheck(nodes, cand.path,
                                            self._rechecked | set(self._rechecks)):
                self._rechecks[node.id] = self._pool().submit(recheck_node, node, check)

    def _retire(self, node_ids, why, allocated_to=None):
        """Delete ready nodes (under their lock, re-checked) that must never be handed to a
        request: unallocated ones, or those allocated to ``allocated_to``.  ``why`` says why."""
        for node_id in node_ids:
            try:
                with self.store.lock_node(node_id, identifier=self.launcher_name):
                    node = self.store.get_node(node_id)
                    if (node is None or node.state != NodeState.READY
                            or node.allocated_to != allocated_to):
                        continue
                    node.set_state(NodeState.USED)
                    self.store.update_node(node, check_version=True)
                    log.info("node %s booted from %s is not handed out (%s): deleting it",
                             node_id, node.image_id, why)
            except LockError:
                continue                      # in use by someone: looked at again next pass
            except StoreError as exc:
                log.warning("node %s: not retired yet: %s", node_id, exc)

    def flush(self):
        """Add the counts gathered since the last flush to the upload records."""
        with self._lock:
            pending, self._pending = self._pending, collections.defaultdict(collections.Counter)
        for path, counts in pending.items():
            key = parse_upload_path(path)
            if key is None or not counts:
                continue

            def add(upload, counts=counts):
                state = Rollout.of(upload)
                for kind, n in counts.items():
                    state.outcomes[kind] = state.count(kind) + n
                state.store(upload)
            try:
                compare_and_set(lambda key=key: self.store.get_upload(*key),
                                self.store.update_upload, add)
            except StoreError as exc:
                log.warning("upload %s: outcome counts not written yet: %s", path, exc)
                with self._lock:
                    self._pending[path].update(counts)

    def _run_pair(self, config, uploads, image, provider, now, live):
        policy = policy_for(config, image, provider)
        status = pair_status(uploads, image, provider, True)
        if self._follow_validation(config, status, policy, now):
            return                    # the snapshot predates what it changed: plan next pass
        action = ro.plan_pair(status, policy, now, self.launches, live)
        if action is None:
            return
        if isinstance(action, ro.StartRollout):
            cur = action.current
            cur_outcomes = Rollout.of(cur).outcomes if cur is not None else {}
            cur_launches = self.launches(cur) if cur is not None else 0
            if self._change(action.upload, lambda s: ro.start_rollout(
                    s, policy, now, cur_outcomes, cur.path if cur else None, cur_launches)):
                log.info("upload %s: new candidate of %s on %s (%s)", action.upload.path,
                         image, provider, "validating" if policy.validation else "rolling out")
        elif isinstance(action, ro.AdvanceStep):
            cur_launches = self.launches(action.current) if action.current is not None else 0
            if self._change(action.upload, lambda s: ro.advance_step(
                    s, policy, action.to_step, now, cur_launches)):
                event = "current" if action.to_step >= len(policy.steps) else "step"
                metrics.ROLLOUT_EVENTS.labels(image, provider, event).inc()
                log.info("upload %s of %s on %s: %s", action.upload.path, image, provider,
                         "now current" if event == "current" else
                         f"step {action.to_step + 1}: {policy.steps[action.to_step]}% of launches")
        elif isinstance(action, ro.Withdraw):
            # still a rolling candidate (not promoted by an operator meanwhile)
            self.withdraw(action.upload, action.by, action.reason, now,
                          only_if=lambda s: s.phase == ro.ROLLING)
        elif isinstance(action, ro.StartValidation):
            self._start_validation(config, action.upload, policy, now)
        elif isinstance(action, ro.ResetValidation):
            request = action.upload.extra.get("rollout", {}).get("validation", {}).get("request")
            if request and self.store.get_request(request) is not None:
                return                # it exists after all (our snapshot predates it)
            self._apply_validation(action.upload, policy, False, action.reason, now,
                                   counts=False)

    def _change(self, upload, change):
        """Compare-and-set ``change(Rollout)`` into the upload record; True when written."""
        def edit(record):
            if str(getattr(record.state, "value", record.state)) != UploadState.READY.value:
                return False
            state = Rollout.of(record)
            if change(state) is False:
                return False
            state.store(record)
        return compare_and_set(
            lambda: self.store.get_upload(upload.image, upload.build_id, upload.provider,
                                          upload.id),
            self.store.update_upload, edit) is not None

    # -- withdrawal ------------------------------------------------------------------------------

    def withdraw(self, upload, by, reason, now=None, only_if=None):
        """Take the upload out of service the way ``nodepool image-delete`` does (the builder
        deletes its cloud image and never uploads that build there again), with the reason."""
        if not withdraw_upload(self.store, upload, by, reason,
                               self.clock() if now is None else now, only_if):
            return
        metrics.ROLLOUT_EVENTS.labels(upload.image, upload.provider, f"withdrawn-{by}").inc()
        log.warning("upload %s of %s on %s withdrawn (%s): %s", upload.id, upload.image,
                    upload.provider, by, reason)

    # -- validation ------------------------------------------------------------------------------

    def _validation_label(self, config, image, provider, policy):
        prov = config.providers.get(provider)
        if prov is None:
            return None
        labels = sorted((lbl.pool, lbl.name) for lbl in prov.labels() if lbl.diskimage == image)
        if policy.validation.label:
            return policy.validation.label if any(
                name == policy.validation.label for _, name in labels) else None
        return labels[0][1] if labels else None

    def _start_validation(self, config, upload, policy, now):
        me = self.launcher_name

        def claim(state):
            if state.phase != ro.VALIDATING or state.validation.get("state") != PENDING:
                return False
            state.validation = dict(state.validation, state=RUNNING, claimed_by=me,
                                    claimed_at=now, request=None)
        if not self._change(upload, claim):
            return                              # someone else runs it, or it changed
        label = self._validation_label(config, upload.image, upload.provider, policy)
        if label is None:
            self._apply_validation(upload, policy, False, f"no label of provider "
                                   f"{upload.provider} boots {upload.image}", now, counts=False)
            return
        try:
            req = NodeRequest(node_types=[label], requestor=VALIDATION_REQUESTOR, reuse=False,
                              provider=upload.provider, created_time=now,
                              requestor_data={VALIDATION_KEY: upload.path})
            req = self.store.submit_request(req, priority="100", ephemeral=True)
        except StoreError as exc:
            self._apply_validation(upload, policy, False, f"node request not submitted: {exc}",
                                   now, counts=False)
            return

        def note_request(state):
            val = state.validation
            if val.get("state") != RUNNING or val.get("claimed_by") != me:
                return False
            state.validation = dict(val, request=req.id)
        try:
            noted = self._change(upload, note_request)
        except StoreError:
            noted = False
        if not noted:
            # the claim was lost or not written: the request is nobody's (the orphan sweep
            # removes it should this delete fail too)
            quietly_delete_request(self.store, req.id)
            return
        log.info("upload %s: validation node requested (%s, request %s)", upload.path, label,
                 req.id)

    def _follow_validation(self, config, status, policy, now):
        """Move this launcher's running validation of the pair's candidate on; True when it
        wrote the candidate's record."""
        cand = status.candidate
        if cand is None:
            return False
        path = cand.path
        future = self._checks.get(path)
        if future is not None:
            if not future.done():
                return False
            del self._checks[path]
            try:
                ok, reason, counts = future.result()
            except Exception as exc:          # a bug in the check must not wedge the rollout
                ok, reason, counts = False, f"validation check crashed: {exc}", False
            self._apply_validation(cand, policy, ok, reason, now, counts)
            return True
        state = Rollout.of(cand)
        val = state.validation
        if (state.phase != ro.VALIDATING or val.get("state") != RUNNING
                or val.get("claimed_by") != self.launcher_name or not val.get("request")):
            return False
        req = self.store.get_request(val["request"])
        if req is None:
            return False                       # plan_pair resets it
        if req.state == RequestState.FAILED:
            reasons = "; ".join(sorted(set((req.extra.get("declined_reasons") or {}).values())))
            quietly_delete_request(self.store, req.id)
            self._apply_validation(cand, policy, False, "the validation node failed to launch"
                                   + (f" ({reasons})" if reasons else ""), now, counts=True)
            return True
        if req.state == RequestState.FULFILLED:
            self._checks[path] = self._pool().submit(
                validate_on_node, self.store, req, cand.path, policy.validation,
                self._username(config, cand.image))
        return False

    def _username(self, config, image):
        dimg = config.diskimages.get(image)
        return dimg.username if dimg else "zuul"

    def _apply_validation(self, upload, policy, ok, reason, now, counts):
        cur = pair_status(self.store.list_uploads(image=upload.image, provider=upload.provider),
                          upload.image, upload.provider, True).current
        cur_launches = self.launches(cur) if cur is not None else 0
        verdict = []

        def change(state):
            if state.phase != ro.VALIDATING:
                return False
            verdict[:] = [ro.after_validation(state, policy, ok, reason, now, cur_launches,
                                              counts)]
        if not self._change(upload, change):
            return
        if ok:
            metrics.ROLLOUT_EVENTS.labels(upload.image, upload.provider, "validated").inc()
            log.info("upload %s of %s on %s validated: %s", upload.id, upload.image,
                     upload.provider, reason)
        elif verdict and verdict[0]:
            metrics.ROLLOUT_EVENTS.labels(upload.image, upload.provider,
                                          "validation-failed").inc()
            self.withdraw(upload, "validation", verdict[0], now,
                          only_if=lambda s: s.phase == ro.VALIDATING)
        else:
            log.warning("upload %s of %s on %s: validation attempt %s: %s", upload.id,
                        upload.image, upload.provider,
                        "failed" if counts else "could not run (retrying later)", reason)

    def _pool(self):
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=2, thread_name_prefix="rollout-validation")
        return self._executor

    def stop(self):
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)


def quietly_delete_request(store, request_id):
    try:
        store.delete_request(request_id)
    except StoreError as exc:
        log.debug("validation request %s not deleted (it goes with our session): %s",
                  request_id, exc)


def withdraw_upload(store, upload, by, reason, now, only_if=None):
    """Mark the upload ``deleting`` with its rollout phase ``withdrawn`` and the reason, then
    remember in its build that it was withdrawn from this provider (with the reason), so the
    builder never uploads that build there again.  ``only_if(Rollout)`` re-checks the fresh
    record first (a decision made from a snapshot must still hold: an operator may have
    promoted it meanwhile).  Returns True when the upload is withdrawn.  Shared by the
    launcher and the CLI."""
    def mark_upload(record):
        if str(getattr(record.state, "value", record.state)) != UploadState.READY.value:
            return False
        state = Rollout.of(record)
        if only_if is not None and not only_if(state):
            return False
        state.phase = WITHDRAWN
        state.withdrawn_by = by
        state.reason = reason
        state.note(now, f"withdrawn by {by}: {reason}")
        state.store(record)
        record.set_state(UploadState.DELETING)
    done = compare_and_set(lambda: store.get_upload(upload.image, upload.build_id,
                                                    upload.provider, upload.id),
                           store.update_upload, mark_upload)
    if done is None:
        return False
    remember_withdrawal(store, upload.image, upload.build_id, upload.provider,
                        f"{by}: {reason}")
    return True


def remember_withdrawal(store, image, build_id, provider, reason):
    """Record in the build that it was withdrawn from ``provider`` (idempotent)."""
    from ..builder.planner import WITHDRAWN_KEY, withdrawn_providers

    def mark_build(build):
        reasons = dict(build.extra.get(WITHDRAWN_REASONS_KEY) or {})
        if provider in withdrawn_providers(build) and provider in reasons:
            return False
        build.extra[WITHDRAWN_KEY] = sorted(withdrawn_providers(build) | {provider})
        reasons.setdefault(provider, reason)
        build.extra[WITHDRAWN_REASONS_KEY] = reasons
    compare_and_set(lambda: store.get_build(image, build_id), store.update_build, mark_build)


def unremembered_withdrawals(uploads, builds):
    """Withdrawn uploads whose build does not record the withdrawal yet (its write failed
    after the upload's): ``(image, build_id, provider, reason)``."""
    from ..builder.planner import withdrawn_providers
    by_key = {(b.image, b.id): b for b in builds}
    out = []
    for u in uploads:
        state = Rollout.of(u)
        build = by_key.get((u.image, u.build_id))
        if (state.phase == WITHDRAWN and build is not None
                and u.provider not in withdrawn_providers(build)):
            out.append((u.image, u.build_id, u.provider, f"{state.withdrawn_by}: {state.reason}"))
    return out


# -- the check on the validation node (runs on a thread of its own) -------------------------------

def validate_on_node(store, request, upload_path, validation, username):
    """``(ok, reason, counts)`` for the fulfilled validation request: the node booted from
    ``upload_path`` must answer SSH (its host keys are scanned), then run the command if one
    is configured.  Afterwards the node is marked used (deleted by cleanup) and the request
    deleted.  ``counts`` is False when the check could not run for reasons of our own."""
    node_id = request.nodes[0] if request.nodes else None
    try:
        node = store.get_node(node_id) if node_id else None
        if node is None:
            return False, "the validation node is gone", False
        try:
            lock = store.lock_node(node.id, blocking=True, timeout=NODE_LOCK_TIMEOUT,
                                   identifier=VALIDATION_REQUESTOR)
        except LockError:
            return False, f"node {node.id} stayed locked", False
        try:
            if node.image_id != upload_path:
                result = (False, f"node {node.id} booted {node.image_id}, not the candidate "
                                 "(the request went to another provider)", False)
            else:
                ok, reason = check_node(node, validation, validation.username or username)
                result = (ok, f"node {node.id}: {reason}", True)
            node = store.get_node(node.id)
            if node is not None and node.state == NodeState.READY:
                node.set_state(NodeState.USED)
                store.update_node(node)
        finally:
            lock.release()
        return result
    except StoreError as exc:
        return False, f"store error during validation: {exc}", False
    finally:
        quietly_delete_request(store, request.id)


def recheck_node(node, check):
    """``(ok, reason, node)``: does the ready node still answer SSH?"""
    ok, reason = check_node(node, check, None)
    return ok, reason, node


def check_node(node, validation, username, clock=time.monotonic):
    """``(ok, reason)``: scan the node's SSH host keys, then run the validation command."""
    deadline = clock() + validation.timeout
    scan = NodeScan(node.interface_ip, node.connection_port or 22, validation.timeout,
                    node.connection_type)
    try:
        while True:
            try:
                keys = scan.advance()
            except Exception as exc:       # LaunchTimeout: it never answered
                return False, f"did not answer SSH: {exc}"
            if keys is not None:
                break
            time.sleep(0.1)
    finally:
        scan.close()
    if not validation.command:
        return True, f"answered SSH ({len(keys)} host key(s))"
    with tempfile.TemporaryDirectory(prefix="nodepool-validate-") as tmp:
        known_hosts = os.path.join(tmp, "known_hosts")
        port = int(node.connection_port or 22)
        host = node.interface_ip if port == 22 else f"[{node.interface_ip}]:{port}"
        with open(known_hosts, "w") as f:
            for key in keys:
                f.write(f"{host} {key}\n")
        argv = ["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
                "-o", f"UserKnownHostsFile={known_hosts}", "-o", "ConnectTimeout=10",
                "-o", "LogLevel=ERROR", "-i", validation.key_file, "-p", str(port),
                "-l", username, node.interface_ip, validation.command]
        remaining = max(1.0, deadline - clock())
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=remaining,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return False, f"command {validation.command!r} did not finish within " \
                          f"{validation.timeout}s"
        except OSError as exc:
            return False, f"ssh could not run: {exc}"
    if proc.returncode == 0:
        return True, f"command {validation.command!r} succeeded"
    tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-1:] or ["no output"]
    return False, f"command {validation.command!r} exited {proc.returncode}: {tail[0]}"
