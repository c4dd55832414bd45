"""Entry point of a python-backend instance process (see stub_process.py).

python -m modelport.repository.python_stub_main FD NAME     # an instance
python -m modelport.repository.python_stub_main --auto-complete < request.json
"""

from __future__ import annotations

import json
import signal
import sys
from multiprocessing.connection import Connection

from modelport.repository import python_stub


def main() -> int:
    if sys.argv[1] == "--auto-complete":
        req = json.loads(sys.stdin.read())
        result = python_stub.auto_complete(req["model_file"], req["version_dir"], req["config"])
        sys.stdout.write("\n" + json.dumps(result) + "\n")
        return 0
    # Ctrl-C (and a service manager's SIGTERM) reach the whole process group: the server
    # unloads its models in order (TritonPythonModel.finalize runs) and ends a stub with a
    # message or SIGKILL
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    conn = Connection(int(sys.argv[1]))
    try:
        init = conn.recv()
    except EOFError:
        return 1
    python_stub.child_main(conn, *init)
    return 0


if __name__ == "__main__":
    sys.exit(main())
