"""Run in every worker of the tests' Ray cluster at its start (runtime_env worker_process_setup_hook):
each SQLite connection a worker opens is written to the file MASTERMERGE_SQLITE_LOG names, so a
test can show that only the driver writes the metric cache. Kept apart from helpers.py, whose
imports (torch, transformers) would slow every worker's start."""

import os
import sys


def record_sqlite() -> None:
    log = os.environ["MASTERMERGE_SQLITE_LOG"]

    def audit(event: str, args: tuple) -> None:
        if event == "sqlite3.connect":
            with open(log, "a", encoding="utf-8") as f:
                f.write(f"{os.getpid()} {args[0]}\n")

    sys.addaudithook(audit)
