"""The pure core of the relay: decisions with no Trio and no I/O.

Modules here take "what happened" and answer "what follows" (lists, routes, changes); the Trio
shell owns sockets, tasks and timeouts and acts on those answers. Hypothesis drives this code
directly, with no event loop.
"""
