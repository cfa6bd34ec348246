"""Helpers for privileged end-to-end tests: network namespaces and the two-namespace lab.

`tunio.testing.netns` creates sockets and runs code inside a named network namespace without
moving the calling thread; `tunio.testing.netlab.Lab` builds (and always tears down) the
app/srv topology that the end-to-end tests, the demo and the benchmarks share.
"""
