"""A Flower Grid whose SuperNodes are the real ClientApp called in this process: the ServerApp's
deployment path (discovery, per-site messages, replies) without processes, ports or Ray."""
from __future__ import annotations


class InProcessGrid:
    """Node id -> node_config; each node keeps its own Context (``context.state``) across rounds.

    ``restart(node_id)`` gives a node a fresh Context, as a restarted SuperNode has.
    """

    def __init__(self, node_configs: dict[int, dict], *, run_id: int = 1, client_app=None):
        self.node_configs, self.run_id = dict(node_configs), run_id
        self.contexts = {n: self._context(n) for n in self.node_configs}
        self.sent = []
        self.client_app = client_app

    def _context(self, node_id: int):
        from flwr.app import Context, RecordDict

        return Context(run_id=self.run_id, node_id=node_id, node_config=self.node_configs[node_id],
                       state=RecordDict(), run_config={})

    def restart(self, node_id: int) -> None:
        self.contexts[node_id] = self._context(node_id)

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        from flwr.app import Error, Message

        from client.app import app

        client_app = self.client_app or app
        out = []
        for m in messages:
            self.sent.append(m)
            try:
                out.append(client_app(m, self.contexts[m.metadata.dst_node_id]))
            except Exception as ex:  # what flwr-clientapp replies when the ClientApp raises (run_clientapp.py)
                out.append(Message(Error(code=0, reason=str(type(ex)) + ":<'" + str(ex) + "'>"), reply_to=m))
        return out
