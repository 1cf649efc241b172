"""Deployment at separate sites: certificates, SuperNode keys and a local multi-site launcher.

``deploy.certs``   CA + SuperLink server certificate (SAN for the address the sites dial) and
                   SuperNode authentication key pairs (ECDSA P-384, OpenSSH format, as Flower reads them).
``deploy.launch``  starts a SuperLink (TLS, SuperNode authentication, SQLite state) and one SuperNode
                   per site on loopback, registers their keys, writes the ``flwr`` connection, runs the
                   app, polls the run's final status and tears everything down by PID.
``deploy.payload`` what one hospital sends in a round (runs the ClientApp on a crafted train message).

The guide is ``docs/deployment.md``; every command in it is run by ``tests/test_deployment.py``.
"""
