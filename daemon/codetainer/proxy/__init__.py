"""The egress policy proxy: every HTTP(S) request of the agent, decided per request.

Shape (issue 13; README "Egress at the request level"):

- ``model``: the vocabulary, pure data shared by the daemon and the proxy process:
  :class:`~codetainer.proxy.model.Rules` (the optional rule part of an allowlist line),
  :class:`~codetainer.proxy.model.ProxyPolicy` (what the daemon renders to
  ``<run_dir>/proxy/policy.json``), the request the policy decides on and its
  :class:`~codetainer.proxy.model.Decision`, and the refused-request record the proxy
  writes to ``<run_dir>/proxy/refused.json``.
- ``policy``: ``decide(policy, request, now) -> Decision``, pure; presets in ``presets``.
  The daemon imports it for ``codetainer why URL``; the proxy for every request.
- ``addon``: the mitmproxy addon (the only module that imports mitmproxy; it runs in the
  proxy's own process, as the proxy's own user, never in the daemon).
- ``setup``: the boot side: the proxy's user, its CA (generated at boot, private key
  readable only by that user, on tmpfs), the system trust store, ``policy.json`` and the
  credentials file only the proxy's user can read, the exec script of ``[program:proxy]``.

The proxy listens on loopback: ``PROXY_PORT`` for clients that honour ``HTTPS_PROXY``,
``TRANSPARENT_PORT`` for the agent's TCP 80/443 that the firewall redirects to it.
"""
