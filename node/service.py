"""The node: listener -> spool -> quiet timer -> selection -> bounded queue -> Triton -> results -> PACS.

Threads: pynetdicom's association threads (C-STORE handlers), one *closer* (quiet timers, feeding
the bounded queue, retries), ``queue.workers`` workers (one series each, several in flight), the
HTTP server. All state that matters is on disk (``ctlesion_node.state``); memory only holds what
is being received and the queue, both rebuilt from disk on start.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

import pydicom
from pynetdicom import evt

from ctlesion_client.client import LesionClient
from ctlesion_client.errors import InvalidInputError, ModelMismatchError
from ctlesion_client.options import ClientOptions
from ctlesion_client.result import SeriesResult
from ctlesion_node import state as S
from ctlesion_node.audit import AuditLog
from ctlesion_node.config import NodeConfig
from ctlesion_node.deliver import destination_for
from ctlesion_node.durable import make_dir_durable, read_json, write_atomic, write_json_atomic
from ctlesion_node.hooks import pause_point
from ctlesion_node.metrics import HealthServer, Metrics
from ctlesion_node.results import build_outputs
from ctlesion_node.scp import CANNOT_UNDERSTAND, OUT_OF_RESOURCES, SUCCESS, start_listener
from ctlesion_node.selection import select_series
from ctlesion_node.spool import Spool

log = logging.getLogger("ctlesion_node")
PERMANENT = (InvalidInputError, ModelMismatchError)  # retrying cannot help: the series fails


@dataclass
class OpenBatch:
    """A series being received: its state, when the last instance came, writes in progress."""

    state: S.BatchState
    last_rx: float
    pending: int = 0
    count: int = 0
    sop_uids: set[str] = field(default_factory=set)


class Node:
    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.spool = Spool(config.spool)
        self.store = S.BatchStore(config.spool.dir)
        self.audit = AuditLog(config.audit_path, config.audit_key())
        self.metrics = Metrics()
        self._lock = threading.Lock()
        self._open: dict[str, OpenBatch] = {}
        self._work: queue.Queue[str] = queue.Queue(maxsize=config.queue.max_queued)
        self._backlog: deque[str] = deque()  # queued on disk, not yet handed to the bounded queue
        self._retry_at: dict[str, float] = {}
        self._inflight: set[str] = set()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._received = 0
        self._server = None
        self._http: HealthServer | None = None
        self._register_gauges()

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._recover()
        self._server = start_listener(self.config.listener, self._on_store, self._on_echo, self._on_association)
        self.dicom_port = self._server.server_address[1]
        self._spawn("node-closer", self._closer_loop)
        for i in range(self.config.queue.workers):
            self._spawn(f"node-worker-{i}", self._worker_loop)
        if self.config.listener.http_port >= 0:
            self._http = HealthServer(self.config.listener.http_host, self.config.listener.http_port,
                                      self.metrics, self.live, self.ready)
            self._http.start()
            self.http_port = self._http.port
        log.info("node %s listening on %s:%d (DICOM%s), http %s; spool %s",
                 self.config.listener.ae_title, self.config.listener.host, self.dicom_port,
                 "+TLS" if self.config.listener.tls else "", getattr(self, "http_port", "off"), self.spool.root)
        self.audit.write("node_started", ae_title=self.config.listener.ae_title, port=self.dicom_port)

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
        for t in self._threads:
            t.join(timeout=30)
        if self._http is not None:
            self._http.stop()

    def _spawn(self, name: str, target: object) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)  # type: ignore[arg-type]
        t.start()
        self._threads.append(t)

    def live(self) -> bool:
        return not self._stop.is_set() and all(t.is_alive() for t in self._threads)

    def ready(self) -> bool:
        return self.live() and self._server is not None and self.spool.writable()

    def _register_gauges(self) -> None:
        m = self.metrics
        m.gauge("queue_depth", "series complete and waiting for a worker", lambda: self._work.qsize() + len(self._backlog))
        m.gauge("in_flight", "series being processed now", lambda: len(self._inflight))
        m.gauge("receiving", "series being received (quiet timer running)", lambda: len(self._open))
        m.gauge("spool_bytes", "bytes of instances in the spool", lambda: self.spool.usage.bytes)
        m.gauge("spool_instances", "instances in the spool", lambda: self.spool.usage.instances)

    def _recover(self) -> None:
        """Rebuild memory from disk: every batch resumes at its state."""
        files: list[Path] = []
        resumed = 0
        for st in self.store.scan():
            if st.state in S.FINAL_STATES:
                self.store.release_files(st.batch_id)  # a crash between the final state and the clean-up
                continue
            batch_files = self.store.instance_files(st.batch_id)
            files += batch_files
            if st.state == S.RECEIVING:
                # The sender may still resend the rest; the quiet timer starts again from now.
                self._open[st.series_uid] = OpenBatch(st, time.monotonic(), count=len(batch_files))
            else:
                self._backlog.append(st.batch_id)
            resumed += 1
        self.spool.recount(files)
        if resumed:
            log.info("recovered %d unfinished batch(es) from the spool", resumed)
            self.audit.write("recovered", batches=resumed, instances=len(files))

    # ------------------------------------------------------------------ DICOM handlers
    def _on_association(self, event: evt.Event, what: str) -> None:
        req = event.assoc.requestor
        aet = str(req.ae_title).strip()
        self.metrics.inc("associations_total", "associations by outcome", outcome=what)
        self.audit.write(f"association_{what}", calling_aet=aet, peer=f"{req.address}:{req.port}")
        if what == "rejected":
            log.warning("association from %s (%s) rejected", aet, req.address)

    def _on_echo(self, event: evt.Event) -> int:
        self.metrics.inc("echo_total", "C-ECHO requests answered")
        return SUCCESS

    def _on_store(self, event: evt.Event) -> int:
        t0 = time.perf_counter()
        try:
            data = event.encoded_dataset(include_meta=True)
            ds = pydicom.dcmread(BytesIO(data), stop_before_pixels=True)
            series_uid, sop_uid = str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)
        except Exception as exc:  # noqa: BLE001 - anything unreadable is refused, not fatal
            self.metrics.inc("refused_total", "C-STORE refused", reason="unreadable")
            log.warning("C-STORE refused: cannot read the instance (%s)", type(exc).__name__)
            return CANNOT_UNDERSTAND
        req = event.assoc.requestor
        aet = str(req.ae_title).strip()
        reason = self.spool.reserve(len(data))
        if reason is not None:
            self.metrics.inc("refused_total", "C-STORE refused", reason="spool_full")
            log.warning("C-STORE from %s refused with 0xA700: %s", aet, reason)
            self.audit.write("store_refused", calling_aet=aet, series_uid=series_uid, status="0xA700", reason=reason)
            return OUT_OF_RESOURCES
        ob = self._batch_for(series_uid, ds, aet, str(req.address))
        try:
            _, existed = self.spool.write_instance(self.store.instances_dir(ob.state.batch_id), sop_uid, data)
        except OSError as exc:
            self.spool.release(len(data))
            with self._lock:
                ob.pending -= 1
            log.error("C-STORE from %s refused with 0xA700: spool write failed: %s", aet, exc)
            self.metrics.inc("refused_total", "C-STORE refused", reason="write_failed")
            return OUT_OF_RESOURCES
        with self._lock:
            ob.pending -= 1
            ob.last_rx = time.monotonic()
            if existed:
                self.spool.release(len(data))  # a repeat of an instance of this batch replaced its copy
            else:
                ob.count += 1
            self._received += 1
            received = self._received
        self.metrics.inc("received_total", "instances received and spooled")
        self.metrics.observe("step_seconds", "latency per step", time.perf_counter() - t0, step="store")
        pause_point("received", self.spool.root, received)
        return SUCCESS  # the file is durably on disk: now the sender may forget it

    def _batch_for(self, series_uid: str, ds: pydicom.Dataset, aet: str, peer: str) -> OpenBatch:
        with self._lock:
            ob = self._open.get(series_uid)
            if ob is None:
                st = S.BatchState(
                    batch_id=self.store.next_generation(series_uid), series_uid=series_uid,
                    study_uid=str(ds.get("StudyInstanceUID", "")), calling_aet=aet, peer_host=peer,
                    patient_pseudonym=self.audit.pseudonym(str(ds.get("PatientID", ""))),
                )
                self.store.create(st)
                ob = OpenBatch(st, time.monotonic())
                self._open[series_uid] = ob
                self.audit.write("series_receiving", batch=st.batch_id, calling_aet=aet, peer=peer,
                                 study_uid=st.study_uid, series_uid=series_uid, patient=st.patient_pseudonym,
                                 modality=str(ds.get("Modality", "")))
            ob.pending += 1
            ob.last_rx = time.monotonic()
            return ob

    # ------------------------------------------------------------------ quiet timer, selection, queue
    def _closer_loop(self) -> None:
        while not self._stop.wait(0.2):
            now = time.monotonic()
            with self._lock:
                due = [ob for ob in self._open.values()
                       if ob.pending == 0 and now - ob.last_rx >= self.config.series_quiet_s]
                for ob in due:
                    del self._open[ob.state.series_uid]
            for ob in due:
                try:
                    self._close(ob.state)
                except Exception:  # noqa: BLE001 - keep the node up; the batch stays on disk
                    log.exception("closing batch %s failed; it stays in the spool", ob.state.batch_id)
            self._feed(now)

    def _close(self, st: S.BatchState) -> None:
        t0 = time.perf_counter()
        files = self.store.instance_files(st.batch_id)
        selection = select_series(files, self.config.selection)
        st.n_instances, st.closed = len(files), time.time()
        st.timings_s["receive"] = round(st.closed - st.created, 3)
        st.timings_s["select"] = round(time.perf_counter() - t0, 3)
        if selection.selected:
            st.state = S.QUEUED
            self.store.save(st)
            self.metrics.inc("selected_total", "series selected for the model")
            log.info("series %s complete: %d instance(s) from %s, %s -> queued", st.series_uid, len(files),
                     st.calling_aet, selection.reason)
            self.audit.write("series_queued", batch=st.batch_id, series_uid=st.series_uid, instances=len(files),
                             calling_aet=st.calling_aet, selection=selection.reason, timings_s=st.timings_s)
            pause_point("queued", self.spool.root)
            with self._lock:
                self._backlog.append(st.batch_id)
        else:
            st.state, st.reason = S.DROPPED, selection.reason
            self.store.save(st)
            self.metrics.inc("dropped_total", "series not for the model (localizer, dose screen, ...)")
            log.info("series %s complete: %d instance(s) from %s, dropped: %s", st.series_uid, len(files),
                     st.calling_aet, selection.reason)
            self.audit.write("series_dropped", batch=st.batch_id, series_uid=st.series_uid, instances=len(files),
                             calling_aet=st.calling_aet, reason=selection.reason)
            self._release(st.batch_id, files)

    def _release(self, batch_id: str, files: list[Path] | None = None) -> None:
        files = self.store.instance_files(batch_id) if files is None else files
        size = sum(p.stat().st_size for p in files if p.exists())
        self.store.release_files(batch_id)
        self.spool.release(size, len(files))

    def _feed(self, now: float) -> None:
        with self._lock:
            for bid, at in list(self._retry_at.items()):
                if at <= now:
                    del self._retry_at[bid]
                    self._backlog.append(bid)
            while self._backlog and not self._work.full():
                self._work.put_nowait(self._backlog.popleft())

    # ------------------------------------------------------------------ workers
    def _worker_loop(self) -> None:
        client: LesionClient | None = None
        while not self._stop.is_set():
            try:
                bid = self._work.get(timeout=0.5)
            except queue.Empty:
                continue
            with self._lock:
                self._inflight.add(bid)
            try:
                if client is None:
                    t = self.config.triton
                    client = LesionClient(t.url, ClientOptions(client_timeout_s=t.timeout_s,
                                                               concurrency=t.slab_concurrency))
                self._process(bid, client)
            finally:
                with self._lock:
                    self._inflight.discard(bid)

    def _process(self, bid: str, client: LesionClient) -> None:
        st = self.store.load(bid)
        try:
            if st.state == S.QUEUED:
                self._infer(st, client)
            if st.state == S.INFERRED:
                self._build(st)
            if st.state == S.BUILT:
                self._deliver(st)
        except PERMANENT as exc:
            self._fail(st, f"{type(exc).__name__}: {exc}")
        except Exception as exc:  # noqa: BLE001 - server / PACS trouble: try again later
            st.attempts += 1
            if st.attempts >= self.config.queue.max_attempts:
                self._fail(st, f"gave up after {st.attempts} attempts: {type(exc).__name__}: {exc}")
                return
            self.store.save(st)
            delay = self.config.queue.retry_s * min(2 ** (st.attempts - 1), 32)
            log.warning("series %s (%s): %s: %s; retry %d in %.0f s", st.series_uid, st.state,
                        type(exc).__name__, exc, st.attempts, delay)
            self.metrics.inc("retries_total", "steps that failed and will be retried", step=st.state)
            with self._lock:
                self._retry_at[bid] = time.monotonic() + delay

    def _fail(self, st: S.BatchState, reason: str) -> None:
        st.state, st.reason = S.FAILED, reason
        self.store.save(st)
        self.metrics.inc("failed_total", "series that failed for good")
        log.error("series %s failed: %s", st.series_uid, reason)
        self.audit.write("series_failed", batch=st.batch_id, series_uid=st.series_uid, reason=reason)
        self._release(st.batch_id)

    def _infer(self, st: S.BatchState, client: LesionClient) -> None:
        t0 = time.perf_counter()
        result_path = self.store.result_path(st.batch_id)
        if not result_path.exists():
            files = self.store.instance_files(st.batch_id)
            client.wait_ready(self.config.triton.wait_ready_s)

            def progress(done: int, total: int) -> None:
                log.info("series %s: slab %d/%d", st.series_uid, done, total)
                if done >= 1:
                    pause_point("inference", self.spool.root)

            result = client.detect_series([str(p) for p in files], series_uid=st.series_uid, progress=progress)
            write_atomic(result_path, result.to_json().encode())
        st.state = S.INFERRED
        st.timings_s["inference"] = round(time.perf_counter() - t0, 3)
        self.store.save(st)
        self.metrics.observe("step_seconds", "latency per step", time.perf_counter() - t0, step="inference")

    def _build(self, st: S.BatchState) -> None:
        t0 = time.perf_counter()
        result = SeriesResult.from_json(self.store.result_path(st.batch_id).read_text())
        files = self.store.instance_files(st.batch_id)
        datasets = build_outputs(result, files, key_images=self.config.destination.key_images,
                                 predecessor_sr=self.store.previous_report(st.series_uid, st.batch_id))
        out = self.store.out_dir(st.batch_id)
        make_dir_durable(out)
        names = []
        for i, ds in enumerate(datasets):
            buf = BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            name = f"{i:03d}.dcm"
            write_atomic(out / name, buf.getvalue())
            names.append(name)
        write_json_atomic(out / "manifest.json", {"files": names, "sop_uids": [str(d.SOPInstanceUID) for d in datasets]})
        st.state = S.BUILT
        st.timings_s["build"] = round(time.perf_counter() - t0, 3)
        self.store.save(st)
        findings = [{"diameter_mm": round(les.diameter_mm, 1), "score": round(les.max_score, 3),
                     "characteristic": les.characteristic, "side": les.side, "lobe": les.lobe}
                    for les in result.lesions]
        self.audit.write("series_inferred", batch=st.batch_id, series_uid=st.series_uid, slices=result.num_slices,
                         slabs=result.num_slabs, findings=findings, sr_uid=str(datasets[0].SOPInstanceUID),
                         key_images=len(datasets) - 1, timings_s=dict(st.timings_s))
        self.metrics.observe("step_seconds", "latency per step", time.perf_counter() - t0, step="build")

    def _deliver(self, st: S.BatchState) -> None:
        t0 = time.perf_counter()
        out = self.store.out_dir(st.batch_id)
        manifest = read_json(out / "manifest.json")
        datasets = [pydicom.dcmread(out / name) for name in manifest["files"]]
        pacs, where = destination_for(self.config, st.calling_aet)
        # The SR first: once it is there the study has its report; key images follow. Sending again
        # after a crash re-sends the same SOP Instance UIDs, which a PACS stores once.
        pacs.store(datasets[:1])
        pause_point("sending", self.spool.root)
        if datasets[1:]:
            pacs.store(datasets[1:])
        st.state, st.delivered_uids = S.DELIVERED, list(manifest["sop_uids"])
        st.timings_s["deliver"] = round(time.perf_counter() - t0, 3)
        st.timings_s["total"] = round(time.time() - st.created, 3)
        self.store.save(st)
        self.metrics.inc("processed_total", "series processed and their results delivered")
        self.metrics.observe("step_seconds", "latency per step", time.perf_counter() - t0, step="deliver")
        log.info("series %s: SR + %d key image(s) delivered to %s", st.series_uid, len(datasets) - 1, where)
        self.audit.write("series_delivered", batch=st.batch_id, series_uid=st.series_uid, destination=where,
                         sop_uids=st.delivered_uids, timings_s=dict(st.timings_s))
        self._release(st.batch_id)
