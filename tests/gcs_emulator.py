"""A Cloud Storage emulator (gcp-storage-emulator, the real GCS JSON API) on the loopback
address, for the gs:// tests: started and stopped by the tests themselves."""

import os
import socket
import subprocess
import sys
import time
import urllib.request

BUCKET = "jaxcond-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Emulator:
    """The emulator in `folder` (its objects persist there across stop/start)."""

    def __init__(self, folder: str):
        self.folder, self.port, self.proc = folder, _free_port(), None
        self.host = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        server = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gcs_emulator_server.py")
        self.proc = subprocess.Popen([sys.executable, server, "start", "--host=127.0.0.1", f"--port={self.port}",
                                      f"--default-bucket={BUCKET}", "--quiet"], cwd=self.folder,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        t0 = time.time()
        while True:
            try:
                urllib.request.urlopen(f"{self.host}/storage/v1/b/{BUCKET}", timeout=1)
                return
            except OSError:
                if self.proc.poll() is not None or time.time() - t0 > 30:
                    raise RuntimeError("the GCS emulator did not start")
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def deny_writes(self, deny: bool = True) -> None:
        """Every write refused with 403 (an account that may only read) until called with False."""
        path = os.path.join(self.folder, "deny_writes")
        if deny:
            open(path, "w").close()
        elif os.path.exists(path):
            os.remove(path)

    def url(self, *names: str) -> str:
        return "/".join((f"gs://{BUCKET}",) + names)
