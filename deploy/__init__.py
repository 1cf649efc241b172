"""Deployment at separate sites, locked down: certificates, keys, signed bundles and a multi-site launcher.

``deploy.certs``     CA + SuperLink server certificate (SAN for the address the sites dial), SuperNode
                     authentication key pairs (ECDSA P-384, OpenSSH format, as Flower reads them) and the
                     consortium's bundle-signing key (Ed25519) with the sites' ``trusted-entities.yaml``.
``deploy.bundle``    builds the app's FAB, signs it and publishes it into the registry folder.
``deploy.registry``  the loopback registry the SuperLink fetches signed bundles from
                     (``FLWR_SUPERGRID_API_URL``, ``flwr run @publisher/name==version``).
``deploy.superlink`` ``flower-superlink`` with only the Fleet API and /health reachable from other addresses.
``deploy.sites``     the sites of a loopback deployment (``dataset@size`` or a scenario) and their node-config.
``deploy.launch``    starts the registry, the filtered SuperLink (TLS, SuperNode authentication, SQLite
                     state, confined run-config paths) and one SuperNode per site (signed bundles only) on
                     loopback, registers their keys, writes the ``flwr`` connection, runs the signed app,
                     polls the run's final status and tears everything down by PID (``tools.processes``).
``deploy.payload``   what one hospital sends in a round (runs the ClientApp on a crafted train message).

The guide is ``docs/deployment.md``; every command in it is run by ``tests/test_deployment.py``.
"""
