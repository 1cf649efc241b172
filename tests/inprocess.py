"""A Flower Grid whose SuperNodes are the real ClientApp called in this process: the ServerApp's
deployment path (discovery, per-site messages, replies) without processes, ports or Ray."""
from __future__ import annotations

import time
import uuid


class InProcessGrid:
    """Node id -> node_config; each node keeps its own Context (``context.state``) across rounds.

    ``restart(node_id)`` gives a node a fresh Context, as a restarted SuperNode has. A node in
    ``late`` (node id -> seconds) answers every train message, but its reply can be pulled only that
    many seconds after the push: it misses a shorter round timeout, as a slow site does.
    """

    def __init__(self, node_configs: dict[int, dict], *, run_id: int = 1, client_app=None,
                 late: dict[int, float] | None = None):
        self.node_configs, self.run_id = dict(node_configs), run_id
        self.contexts = {n: self._context(n) for n in self.node_configs}
        self.sent = []
        self.client_app = client_app
        self.late = dict(late or {})
        self._replies: dict[str, tuple[float, object]] = {}  # message id -> (pullable from, reply)

    def _context(self, node_id: int):
        from flwr.app import Context, RecordDict

        return Context(run_id=self.run_id, node_id=node_id, node_config=self.node_configs[node_id],
                       state=RecordDict(), run_config={})

    def restart(self, node_id: int) -> None:
        self.contexts[node_id] = self._context(node_id)

    def get_node_ids(self):
        return list(self.contexts)

    def _answer(self, m):
        from flwr.app import Error, Message

        from client.app import app

        try:
            return (self.client_app or app)(m, self.contexts[m.metadata.dst_node_id])
        except Exception as ex:  # what flwr-clientapp replies when the ClientApp raises (run_clientapp.py)
            return Message(Error(code=0, reason=str(type(ex)) + ":<'" + str(ex) + "'>"), reply_to=m)

    def push_messages(self, messages):
        ids = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # as Flower's grids do
            self.sent.append(m)
            delay = self.late.get(m.metadata.dst_node_id, 0.0) if m.metadata.message_type == "train" else 0.0
            reply = self._answer(m)  # then late by `delay` seconds, however long the answer took on a busy machine
            self._replies[m.metadata.message_id] = (time.monotonic() + delay, reply)
            ids.append(m.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        now = time.monotonic()
        due = [i for i in message_ids if i in self._replies and self._replies[i][0] <= now]
        return [self._replies.pop(i)[1] for i in due]

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))
