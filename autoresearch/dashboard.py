"""The live view: optuna-dashboard on the loop's study, served from this process.

    python loop.py dashboard                     # the study beside results.tsv, on 127.0.0.1:8080
    python loop.py dashboard --storage postgresql://...  --port 8081

    from autoresearch import dashboard           # the notebook: a thread of the kernel
    view = dashboard.start(study_location("results.tsv"))
    view.url, view.port                          # http://127.0.0.1:8080/dashboard/studies/0
    view.stop()

optuna-dashboard reads the study's storage itself (a journal file, SQLite or PostgreSQL), so
the page follows a running loop: the trials, their states, values and params, each run's
training curve (the trials' intermediate values) and the importances. It is optuna-dashboard's
own WSGI app, served by the standard library's threaded WSGI server, as its CLI does; a study
location is opened the way the loop opens it (autoresearch.storage.open_storage), so a journal
file gets the same lock and the same repair of a torn last line.
"""
import errno
import os
import socketserver
import threading
import wsgiref.simple_server

from autoresearch import storage as study_storage

HOST = "127.0.0.1"
PORT = 8080
STUDY = "autoresearch"


class DashboardError(Exception):
    """Nothing to show (no study there yet), or nowhere to show it (the port is taken)."""


class PortInUse(DashboardError):
    pass


class _Server(socketserver.ThreadingMixIn, wsgiref.simple_server.WSGIServer):
    daemon_threads = True        # a page still loading never holds up the end of the process
    allow_reuse_address = True   # a restarted dashboard gets its port back at once


class _QuietHandler(wsgiref.simple_server.WSGIRequestHandler):
    def log_message(self, *args):  # one line per request would bury the loop's own output
        pass


def _no_study(location):
    return DashboardError(f"no study at {location} yet: run `python loop.py` first (its runs "
                          "become the study's trials), or name the study's place with --storage")


def open_study_storage(location, study=STUDY):
    """The Optuna storage at a study location, and the id of the study `study` in it (None when
    the storage holds studies but not that one). DashboardError when there is no study there:
    a journal or SQLite file that does not exist is not created."""
    url = study_storage.normalize_url(location)
    if "://" not in url:
        path = url
    elif url.startswith("sqlite:///"):
        path = url[len("sqlite:///"):]
    else:
        path = None
    if path is not None and (not os.path.exists(path) or os.path.getsize(path) == 0):
        raise _no_study(location)
    try:
        storage = study_storage.open_storage(location)
        studies = storage.get_all_studies()
    except Exception as e:  # an unreadable file, a database that is not there
        raise DashboardError(f"cannot read the study at {location}: {e}") from e
    if not studies:
        raise _no_study(location)
    ids = {s.study_name: s._study_id for s in studies}
    return storage, ids.get(study)


class Dashboard:
    """optuna-dashboard bound to host:port (0: any free port) on a study location. serve()
    blocks; start() serves from a daemon thread. url is the study's page (the list of studies
    when the storage has no study by that name)."""

    def __init__(self, location, host=HOST, port=PORT, study=STUDY):
        from optuna_dashboard import wsgi
        storage, study_id = open_study_storage(location, study)
        app = wsgi(storage)
        try:
            self.server = wsgiref.simple_server.make_server(
                host, port, app, server_class=_Server, handler_class=_QuietHandler)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise PortInUse(f"port {port} on {host} is in use (another dashboard, or "
                                "another server): choose another with --port") from None
            raise DashboardError(f"cannot serve on {host}:{port}: {e}") from None
        self.location, self.host = location, host
        self.port = self.server.server_address[1]
        shown = "localhost" if host in ("", "0.0.0.0", "::") else host
        self.path = "/dashboard" if study_id is None else f"/dashboard/studies/{study_id}"
        self.url = f"http://{shown}:{self.port}{self.path}"
        self._thread = None

    def serve(self):
        """Serve until interrupted (Ctrl-C: KeyboardInterrupt) or stop() from another thread."""
        try:
            self.server.serve_forever(poll_interval=0.2)
        finally:
            self.server.server_close()

    def start(self):
        self._thread = threading.Thread(target=self.serve, name="optuna-dashboard", daemon=True)
        self._thread.start()
        return self

    def stop(self):
        self.server.shutdown()
        if self._thread is not None:
            self._thread.join(5)

    def __str__(self):
        return self.url


def start(location, host=HOST, port=PORT, study=STUDY):
    """Serve the dashboard from a background thread; the running Dashboard (its url, port,
    stop()). For a notebook's kernel."""
    return Dashboard(location, host, port, study).start()


def serve(location, host=HOST, port=PORT, study=STUDY, announce=print):
    """Serve the dashboard until Ctrl-C (for `loop.py dashboard`); announce gets its URL first."""
    view = Dashboard(location, host, port, study)
    announce(view)
    view.serve()

