#!/usr/bin/env python3
"""An agent that uses a PostgreSQL credential keyturn rotates.

The same contract as examples/rust_agent.rs (see the README beside this file):

1. read the delivered file (format = "json": value, username, version,
   agent, credential);
2. watch it: inotify on the file's *directory* (keyturn renames a new file
   over the old one), or reload on SIGHUP (--reload sighup);
3. reload: connect with the new credential, then swap the connection;
4. on a refused password, read the file again and retry once;
5. acknowledge the version once a connection with it works
   (`keyturn ack AGENT/CREDENTIAL VERSION`).

It runs `SELECT current_user` in a tight loop and, on SIGTERM or SIGINT,
prints a JSON summary (queries, auth_failures, reloads, last_user,
last_version). With --fresh-connections every query opens a new connection
with the credential held at that moment.

Needs pg8000 and inotify_simple (pure Python):
    pip install pg8000==1.31.6 inotify-simple==2.0.1
The password is never printed.
"""

import argparse
import json
import os
import signal
import ssl
import subprocess
import sys
import time

import pg8000.native
from inotify_simple import INotify, flags

# SQLSTATEs of a refused login: invalid_password, invalid_authorization_specification.
AUTH_FAILED = {"28P01", "28000"}


class Credential:
    def __init__(self, path):
        with open(path, "rb") as f:
            doc = json.load(f)
        if not doc.get("username"):
            raise ValueError(f"{path}: no username (not a postgres target?)")
        self.user = doc["username"]
        self.password = doc["value"]
        self.version = doc["version"]
        self.name = f"{doc['agent']}/{doc['credential']}"

    def __repr__(self):
        return f"Credential({self.name} v{self.version}, user={self.user}, password=...)"


def is_auth_failure(e):
    return (
        isinstance(e, pg8000.native.DatabaseError)
        and isinstance(e.args[0], dict)
        and e.args[0].get("C") in AUTH_FAILED
    )


class Agent:
    def __init__(self, args):
        self.args = args
        self.ssl = None
        if args.ca:
            self.ssl = ssl.create_default_context(cafile=args.ca)
        self.held = Credential(args.file)
        self.acked = None
        self.stop = False
        self.changed = False
        self.summary = dict(
            queries=0,
            auth_failures=0,
            failed_after_retry=0,
            other_errors=0,
            reloads=0,
            acks=0,
            ack_failures=0,
            last_user=None,
            last_version=None,
        )

    def connect_as(self, cred):
        return pg8000.native.Connection(
            user=cred.user,
            password=cred.password,
            host=self.args.host,
            port=self.args.port,
            database=self.args.dbname,
            ssl_context=self.ssl,
            timeout=5,
        )

    def connect(self):
        """Connects with the held credential; on a refused password, reads
        the file again and retries once (a new version may have just landed)."""
        try:
            return self.connect_as(self.held)
        except pg8000.native.DatabaseError as e:
            if not is_auth_failure(e):
                raise
            self.summary["auth_failures"] += 1
        self.held = Credential(self.args.file)
        try:
            return self.connect_as(self.held)
        except pg8000.native.DatabaseError as e:
            if is_auth_failure(e):
                self.summary["auth_failures"] += 1
                self.summary["failed_after_retry"] += 1
            raise

    def ack(self):
        """Tells keyturn this consumer now uses the held version: one call, again on exit 69."""
        if self.acked == self.held.version:
            return
        self.acked = self.held.version
        print(f"python_agent: using version {self.held.version}", file=sys.stderr, flush=True)
        if not self.args.ack_with:
            return
        # 69: keyturn could not record it now (restarting, or the delivery is
        # stuck): ack again a little later. Anything else is final.
        for attempt in range(3):
            r = subprocess.run(
                [self.args.ack_with, "ack", self.held.name, str(self.held.version)],
                stdin=subprocess.DEVNULL,
            )
            if r.returncode != 69 or attempt == 2:
                break
            time.sleep(1)
        if r.returncode == 0:
            self.summary["acks"] += 1
        else:
            self.summary["ack_failures"] += 1

    def query(self, conn):
        user = conn.run("SELECT current_user::text")[0][0]
        self.summary["queries"] += 1
        self.summary["last_user"] = user
        self.summary["last_version"] = self.held.version

    def reload(self):
        new = Credential(self.args.file)
        if new.version == self.held.version:
            return None
        self.held = new
        self.summary["reloads"] += 1
        # Connect with the new credential before dropping the old connection.
        return self.connect()


def close(conn):
    if conn is not None:
        try:
            conn.close()
        except Exception:
            pass


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--file", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5432)
    p.add_argument("--dbname", default="postgres")
    p.add_argument("--ca", help="verify the server against this CA (TLS)")
    p.add_argument("--reload", choices=["watch", "sighup"], default="watch")
    p.add_argument("--ack-with", help="the keyturn binary to acknowledge versions with")
    p.add_argument("--fresh-connections", action="store_true")
    p.add_argument("--summary", help="also write the summary to this file")
    args = p.parse_args()

    agent = Agent(args)

    def on_stop(_sig, _frame):
        agent.stop = True

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    inotify = None
    if args.reload == "sighup":

        def on_hup(_sig, _frame):
            agent.changed = True

        signal.signal(signal.SIGHUP, on_hup)
    else:
        inotify = INotify(nonblocking=True)
        inotify.add_watch(
            os.path.dirname(os.path.abspath(args.file)),
            flags.MOVED_TO | flags.CLOSE_WRITE | flags.CREATE,
        )

    conn = agent.connect()
    agent.ack()
    while not agent.stop:
        # Reload between queries, never in the middle of one.
        if inotify is not None and inotify.read(timeout=0):
            agent.changed = True
        if agent.changed:
            agent.changed = False
            try:
                new = agent.reload()
                if new is not None:
                    close(conn)
                    conn = new
                    agent.ack()
            except Exception as e:
                agent.summary["other_errors"] += 1
                print(f"python_agent: reload: {e}", file=sys.stderr, flush=True)
            continue
        try:
            if args.fresh_connections or conn is None:
                close(conn)
                conn = None
                conn = agent.connect()
            agent.query(conn)
            agent.ack()
        except Exception as e:
            agent.summary["other_errors"] += 1
            print(f"python_agent: {e}", file=sys.stderr, flush=True)
            close(conn)
            conn = None
            time.sleep(0.02)
    close(conn)
    summary = json.dumps(agent.summary)
    print(summary, flush=True)
    if args.summary:
        with open(args.summary, "w") as f:
            f.write(summary + "\n")


if __name__ == "__main__":
    main()
