"""The broker process: the engine (queue operations over the group committer),
its faces (HTTP, RESP, the status page, metrics), the broker registry and
topic ownership (membership, forwarding), discovery (broker.json), the owner
duties (reaping, schedules, follow-ups, sweeps), and the composition root
that wires them (server.py). The topic state
machine lives in simplequeue.state; topic objects are written only by
simplequeue.groupcommit, never from here."""
