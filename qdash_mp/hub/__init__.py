"""The Redis hub (issue "Scale-out"): one dashboard over many hosts.

A collector started with ``--hub redis://...`` publishes its absolute state to Redis
(``publisher``, one ``EVALSHA`` of ``publish.lua`` a second, seq-guarded) and executes the
commands the hub sends it (``commands``); ``keys`` and ``format`` are the contract with the
hub side. Nothing here is imported unless the hub is used (redis-py is the ``hub`` extra).
See ``docs/hub.md``.
"""
